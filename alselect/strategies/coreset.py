"""Core-set selection (Sener & Savarese, ICLR 2018): k-center greedy on embeddings.

Each pick is the candidate farthest (Euclidean, in embedding space) from everything already covered:
the labeled images, the pending ones (exported, not labeled yet: they will be, so they count as
covered) and the earlier picks. See :mod:`alselect.strategies.greedy` for the algorithm, its memory
(one distance vector, chunked initialisation, never an N × |L| matrix) and its precision modes.
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


@register
class CoreSet(GreedyStrategy):
    """k-center greedy over ``embeddings [N, D]`` (any float dtype; float16 is read in chunks).

    Cold start (nothing labeled or pending): the first pick is drawn uniformly from the candidates
    with ``numpy.random.default_rng(seed)``; every later pick is deterministic. Parameters: see
    :class:`~alselect.strategies.greedy.GreedyStrategy`.
    """

    name = "coreset"
    summary = "k-center greedy: each pick is the image farthest from all labeled, pending and picked ones"
    needs = frozenset({"embeddings"})
    score_meaning = (
        "Euclidean embedding distance from the image to the nearest labeled, pending or earlier-picked "
        "image at the moment it was picked (never increases along the batch); with nothing labeled or "
        "pending, the first pick (drawn with --seed) scores its distance to the farthest candidate"
    )

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        count = require_budget(self.name, budget)
        embeddings = require_embeddings(self.name, inputs)
        excluded = inputs.excluded
        result = greedy_centres(
            embeddings,
            np.flatnonzero(~excluded),
            count,
            rng=np.random.default_rng(self.seed),
            centres=np.flatnonzero(excluded),
            first="sample",
            device=self.device,
            precision=self.precision,
        )
        scores = result.dists.copy()
        if scores.size and np.isnan(scores[0]):
            scores[0] = result.first_radius
        return Selection(indices=result.picks, scores=scores)
