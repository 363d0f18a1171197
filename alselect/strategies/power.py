"""Stochastic power sampling (Kirsch et al. 2023, "Stochastic Batch Acquisition: A Simple Baseline
for Deep Active Learning", TMLR): draw images without replacement with ``P(i) ∝ s_i^β``.

Top-k of a per-image score picks near-duplicates: the k best images are often k views of the same
confusion. Sampling in proportion to a power of the score keeps most of the batch on high scores
and spreads the rest. The paper calls β the coldness (β = 1 by default there); here the option is
the temperature ``τ = 1/β``: ``P(i) ∝ s_i^(1/τ)``. τ → 0 approaches plain top-k; large τ approaches
uniform random order.

Sampling uses the Gumbel-top-k trick (Kool, van Hoof & Welling 2019): sorting the keys
``log(s_i)/τ + G_i``, with ``G_i`` i.i.d. Gumbel(0, 1), gives the whole order of a sequential draw
without replacement, in one pass. Here ``G_i = −log E_i`` with ``E_i`` i.i.d. Exponential(1) from
numpy's PCG64 seeded with ``seed``, one per pool row in row order, so a row's draw does not depend
on which other rows are excluded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from alselect.errors import UsageError
from alselect.strategies.base import PoolInputs, Selection, Strategy, register
from alselect.strategies.bayesian import bald, mc_entropy, require_mc_probs


def gumbel_log_keys(scores: np.ndarray, *, temperature: float, seed: int) -> np.ndarray:
    """``log(s_i) − τ·log(E_i)`` per row (``[N]`` → ``[N]``): τ × the Gumbel key, same order.

    Scores ≤ 0 give −inf (never drawn while a positive score is left); NaN stays NaN.
    """
    try:
        tau = float(temperature)
    except (TypeError, ValueError):
        tau = math.nan
    if not (math.isfinite(tau) and tau > 0):
        raise UsageError(f"temperature must be a positive number, got {temperature!r}")
    values = np.asarray(scores, dtype=np.float64)
    exponential = np.random.default_rng(seed).standard_exponential(values.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        keys = np.log(np.where(values > 0, values, 0.0)) - tau * np.log(exponential)
    return np.where(np.isnan(values), np.nan, keys)


def perturbed_scores(scores: np.ndarray, *, temperature: float, seed: int) -> np.ndarray:
    """``s_i · E_i^(−τ)`` per row: ``exp`` of :func:`gumbel_log_keys`, in the units of the score.

    Tends to the score as τ → 0; scores ≤ 0 give 0; NaN stays NaN.
    """
    with np.errstate(over="ignore"):
        return np.exp(gumbel_log_keys(scores, temperature=temperature, seed=seed))


def power_order(
    scores: np.ndarray, excluded: np.ndarray, budget: int | None, *, temperature: float, seed: int
) -> Selection:
    """Rows not ``excluded`` drawn without replacement with ``P(i) ∝ score_i^(1/τ)``, first ``budget``.

    Returns the rows in draw order with their perturbed scores (non-increasing). Rows with score 0
    come after every positive score, in row order; NaN scores come last, in row order.
    """
    keys = gumbel_log_keys(scores, temperature=temperature, seed=seed)
    candidates = np.flatnonzero(~np.asarray(excluded, dtype=bool))
    # Sort the log keys, not their exp(), which can round distinct keys to the same float.
    order = np.argsort(-keys[candidates], kind="stable")  # −inf keys (score 0) after finite, NaN last
    chosen = candidates[order[:budget] if budget is not None else order]
    with np.errstate(over="ignore"):
        return Selection(indices=chosen, scores=np.exp(keys[chosen]))


class PowerStrategy(Strategy):
    """Power sampling of a per-image score of ``mc_probs``; subclasses set ``base_score``."""

    needs = frozenset({"mc_probs"})
    base_score: Callable[[np.ndarray], np.ndarray]

    def __init__(self, *, temperature: float = 1.0, seed: int = 0) -> None:
        self.temperature = temperature
        self.seed = seed

    def score(self, inputs: PoolInputs) -> np.ndarray:
        """The perturbed score ``s_i · E_i^(−τ)`` of every row; sorting it gives the draw order."""
        base = type(self).base_score(require_mc_probs(inputs, self.name))
        return perturbed_scores(base, temperature=self.temperature, seed=self.seed)

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        base = type(self).base_score(require_mc_probs(inputs, self.name))
        return power_order(base, inputs.excluded, budget, temperature=self.temperature, seed=self.seed)


@register
class PowerBALD(PowerStrategy):
    name = "power-bald"
    summary = "BALD with stochastic power sampling: P(pick) ∝ BALD^(1/temperature), seeded"
    score_meaning = (
        "BALD × E^(-temperature), E ~ Exponential(1) per image from --seed: the sampling key in "
        "nats; tends to BALD as temperature → 0"
    )
    base_score = staticmethod(bald)


@register
class PowerEntropy(PowerStrategy):
    name = "power-entropy"
    summary = "MC entropy with stochastic power sampling: P(pick) ∝ H[p̄]^(1/temperature), seeded"
    score_meaning = (
        "H[mean_t p_t] × E^(-temperature), E ~ Exponential(1) per image from --seed: the sampling "
        "key in nats; tends to the entropy as temperature → 0"
    )
    base_score = staticmethod(mc_entropy)
