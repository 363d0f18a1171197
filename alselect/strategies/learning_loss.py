"""Learning loss (Yoo & Kweon, CVPR 2019): annotate first the images with the largest predicted loss.

The predicted loss ``loss_pred [N]`` comes from a checkpoint trained with a loss-prediction module
(``alselect train --loss-prediction``); it is stored per image like the probabilities. Predicted
losses are scale-free: compare ranks, not values, across models.
"""

from __future__ import annotations

import numpy as np

from alselect.errors import UsageError
from alselect.strategies.base import PoolInputs, Selection, Strategy, register, top_k


@register
class LearningLoss(Strategy):
    """Rank by predicted loss; ``subset`` (the paper: 10,000) first draws that many candidates at
    random (seeded) and ranks only those, which the paper does to avoid redundant top picks."""

    name = "learning-loss"
    summary = "largest predicted training loss first (needs a checkpoint from 'train --loss-prediction')"
    needs = frozenset({"loss_pred"})
    score_meaning = (
        "predicted loss of the image (scale-free); with subset, only the drawn candidates are ranked"
    )

    def __init__(self, *, subset: int | None = None, seed: int = 0) -> None:
        self.subset = subset
        self.seed = seed

    def score(self, inputs: PoolInputs) -> np.ndarray:
        loss = np.asarray(inputs.arrays["loss_pred"], dtype=np.float64)
        return loss.reshape(inputs.size)

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        scores = self.score(inputs)
        excluded = inputs.excluded
        if self.subset is not None:
            if self.subset < 1:
                raise UsageError(f"{self.name}: subset must be at least 1, got {self.subset}")
            candidates = np.flatnonzero(~excluded)
            if len(candidates) > self.subset:
                drawn = np.random.default_rng(self.seed).choice(candidates, size=self.subset, replace=False)
                excluded = np.ones_like(excluded)
                excluded[drawn] = False
        return top_k(scores, excluded, budget)
