"""Uniform random selection: the baseline every other strategy must beat."""

from __future__ import annotations

import numpy as np

from alselect.strategies.base import PoolInputs, Strategy, register


@register
class RandomSampling(Strategy):
    name = "random"
    summary = "uniformly random order from --seed (the baseline)"
    needs = frozenset()
    score_meaning = "uniform draw in [0, 1) from numpy's PCG64 seeded with --seed"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def score(self, inputs: PoolInputs) -> np.ndarray:
        return np.random.default_rng(self.seed).random(inputs.size)
