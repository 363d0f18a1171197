"""BADGE (Ash et al., ICLR 2020): k-means++ seeding on gradient embeddings.

The gradient of the cross-entropy loss with respect to the last layer, taking the model's own
prediction ``ŷ = argmax p`` as the label (never a true label), is ``g = (p − e_ŷ) ⊗ h`` with ``h``
the penultimate embedding. Its norm grows with uncertainty, and k-means++ seeding on ``g`` spreads
the batch: each next image is drawn with probability ∝ its squared distance to the nearest image
already chosen. Distances use ``‖a₁⊗h₁ − a₂⊗h₂‖² = ‖a₁‖²‖h₁‖² + ‖a₂‖²‖h₂‖² − 2(a₁·a₂)(h₁·h₂)``, so
the ``N × (C·D)`` gradient matrix is never built (see :mod:`alselect.strategies.greedy`).
"""

from __future__ import annotations

import numpy as np

from alselect.strategies.base import (
    PoolInputs,
    Selection,
    register,
    require_budget,
    require_embeddings,
)
from alselect.strategies.greedy import GreedyStrategy, greedy_centres


def gradient_factors(probs: np.ndarray) -> np.ndarray:
    """``a = p − e_ŷ`` per row, ``ŷ = argmax p`` (first class on ties); ``[N, C]`` → ``[N, C]`` float32."""
    a = np.array(probs, dtype=np.float32, copy=True)
    if a.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {a.shape}")
    if a.shape[0]:
        a[np.arange(a.shape[0]), np.argmax(a, axis=1)] -= 1.0
    return a


def gradient_embedding(probs: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """The explicit ``[N, C·D]`` gradient embeddings (row-major ``a ⊗ h``): for tests and small pools."""
    a = gradient_factors(probs).astype(np.float64)
    h = np.asarray(embeddings, dtype=np.float64)
    return np.einsum("nc,nd->ncd", a, h).reshape(a.shape[0], -1)


@register
class Badge(GreedyStrategy):
    """k-means++ seeding on ``(p − e_ŷ) ⊗ h`` from ``probs [N, C]`` and ``embeddings [N, D]``.

    The first pick is the largest gradient norm; each next one is drawn with probability ∝ its
    squared gradient distance to the nearest pick (``numpy.random.default_rng(seed)``, one uniform
    number per pick), without repeats. Pending images (exported, not labeled yet: the batch already
    in flight) count as chosen, so tonight's batch is drawn away from yesterday's; labeled images do
    not (as in the paper, the model has learned from them; the gradients already reflect that).
    When every remaining image has zero distance (duplicates, or zero gradients after a zero-gradient
    pick), the rest of the batch is drawn uniformly. ``device`` and ``precision`` as for ``coreset``.
    """

    name = "badge"
    summary = "k-means++ seeding on gradient embeddings (p − e_ŷ) ⊗ h: uncertain and diverse (Ash et al.)"
    needs = frozenset({"probs", "embeddings"})
    score_meaning = (
        "gradient-embedding distance from the image to the nearest earlier pick (or pending image) "
        "when it was drawn; the first pick with nothing pending scores its gradient norm "
        "‖p − e_ŷ‖·‖h‖; capped by the previous score (running minimum) so it never increases "
        "along the pick order"
    )

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        count = require_budget(self.name, budget)
        embeddings = require_embeddings(self.name, inputs)
        if inputs.probs.shape[0] != inputs.size:
            raise ValueError(f"{self.name}: probs shape {inputs.probs.shape}, expected ({inputs.size}, C)")
        factors = gradient_factors(inputs.probs)
        pending = np.zeros(inputs.size, dtype=bool) if inputs.pending is None else inputs.pending
        result = greedy_centres(
            embeddings,
            np.flatnonzero(~inputs.excluded),
            count,
            rng=np.random.default_rng(self.seed),
            factors=factors,
            centres=np.flatnonzero(pending & ~inputs.labeled),
            sample=True,
            first="max_norm",
            device=self.device,
            precision=self.precision,
        )
        scores = result.dists.copy()
        if scores.size and np.isnan(scores[0]):
            first = int(result.picks[0])
            scores[0] = float(np.linalg.norm(factors[first].astype(np.float64))) * float(
                np.linalg.norm(np.asarray(embeddings[first], dtype=np.float64))
            )
        return Selection(indices=result.picks, scores=np.minimum.accumulate(scores))
