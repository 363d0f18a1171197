"""Single-pass uncertainty from class probabilities ``probs [N, C]``.

Scores are oriented so that higher means annotate first. See Settles (2009), "Active Learning
Literature Survey", section 3.1, for the definitions. For detectors and segmenters the same
measure is taken per box or per pixel and reduced per image before scoring (``alselect.tasks``);
the strategy then reads that per-image score (``precomputed_uncertainty``).
"""

from __future__ import annotations

import numpy as np

from alselect.strategies.base import PoolInputs, Strategy, precomputed_uncertainty, register


def top_two(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second-largest probability per row (second is 0 for one class)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 1:
        return p[:, 0], np.zeros(p.shape[0])
    part = np.partition(p, p.shape[1] - 2, axis=1)
    return part[:, -1], part[:, -2]


@register
class LeastConfidence(Strategy):
    name = "least-confidence"
    summary = "1 − max probability: images the model is least sure of"
    score_meaning = "1 - p_max, in [0, 1 - 1/C]"

    def __init__(self) -> None:
        pass

    def score(self, inputs: PoolInputs) -> np.ndarray:
        task = precomputed_uncertainty(inputs, "least_confidence")
        if task is not None:
            return task
        first, _ = top_two(inputs.probs)
        return 1.0 - first


@register
class Margin(Strategy):
    name = "margin"
    summary = "smallest gap between the top two classes first (score = 1 − margin)"
    score_meaning = "1 - (p_1 - p_2), in [0, 1]; 1 = the top two classes tie"

    def __init__(self) -> None:
        pass

    def score(self, inputs: PoolInputs) -> np.ndarray:
        task = precomputed_uncertainty(inputs, "margin")
        if task is not None:
            return task
        first, second = top_two(inputs.probs)
        return 1.0 - (first - second)


@register
class Ratio(Strategy):
    name = "ratio"
    summary = "ratio of second to first class probability: close to 1 first"
    score_meaning = "p_2 / p_1, in [0, 1]"

    def __init__(self) -> None:
        pass

    def score(self, inputs: PoolInputs) -> np.ndarray:
        task = precomputed_uncertainty(inputs, "ratio")
        if task is not None:
            return task
        first, second = top_two(inputs.probs)
        ratio = np.zeros_like(first)
        np.divide(second, first, out=ratio, where=first != 0)
        return np.where(np.isnan(first), np.nan, ratio)


@register
class Entropy(Strategy):
    name = "entropy"
    summary = "Shannon entropy of the predicted distribution (nats)"
    score_meaning = "-sum p log p in nats, in [0, log C]"

    def __init__(self) -> None:
        pass

    def score(self, inputs: PoolInputs) -> np.ndarray:
        task = precomputed_uncertainty(inputs, "entropy")
        if task is not None:
            return task
        return entropy(inputs.probs)


def entropy(probs: np.ndarray) -> np.ndarray:
    """``-Σ p log p`` per row in nats, with ``0 log 0 = 0``; ``probs [N, C]`` → ``[N]``."""
    p = np.asarray(probs, dtype=np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=1)
