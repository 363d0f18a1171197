"""Bayesian uncertainty from T stochastic predictions per image: ``mc_probs [N, T, C]``.

The T predictions are MC-dropout passes (the same T dropout masks for every image) or the members
of an ensemble; each ``mc_probs[i, t]`` is a probability row. Every score here is computed per row
in float64, in chunks of rows (float16 and float32 inputs are converted chunk by chunk, so memory
stays at a few MB beyond the input), in nats, with ``0 log 0 = 0``. A row holding any NaN or
infinity scores NaN, which ``top_k`` sorts last. Definitions and the library bugs they avoid:
``reference/algorithms.md``; Gal, Islam & Ghahramani (2017), "Deep Bayesian Active Learning with
Image Data"; Houlsby et al. (2011) for BALD.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from alselect.errors import UsageError
from alselect.strategies.base import PoolInputs, Strategy, register

# Rows per chunk are chosen so a float64 chunk holds about this many values (8 MB).
CHUNK_VALUES = 1 << 20
TINY = np.finfo(np.float64).tiny


def require_mc_probs(inputs: PoolInputs, strategy: str) -> np.ndarray:
    """``inputs.mc_probs`` checked to be ``[N, T, C]`` with N the pool size, T ≥ 1, C ≥ 1."""
    mc_probs = inputs.mc_probs
    if mc_probs is None:
        raise UsageError(
            f"strategy {strategy!r} needs T stochastic predictions per image (mc_probs [N, T, C]: "
            "MC-dropout passes or ensemble members), and none were computed"
        )
    mc_probs = np.asarray(mc_probs)
    if mc_probs.ndim != 3 or mc_probs.shape[0] != inputs.size or 0 in mc_probs.shape[1:]:
        raise ValueError(f"{strategy}: mc_probs shape {mc_probs.shape}, expected ({inputs.size}, T, C)")
    return mc_probs


def rowwise(mc_probs: np.ndarray, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``reduce`` (float64 ``[n, T, C]`` → ``[n]``) chunk by chunk; non-finite rows give NaN."""
    mc_probs = np.asarray(mc_probs)
    if mc_probs.ndim != 3:
        raise ValueError(f"mc_probs must be [N, T, C], got shape {mc_probs.shape}")
    n, t, c = mc_probs.shape
    out = np.empty(n, dtype=np.float64)
    step = max(1, CHUNK_VALUES // max(1, t * c))
    for start in range(0, n, step):
        chunk = np.asarray(mc_probs[start : start + step], dtype=np.float64)
        values = reduce(chunk)
        # One cheap pass finds NaN/inf anywhere in a row: its sum is not finite.
        values[~np.isfinite(chunk.sum(axis=(1, 2)))] = np.nan
        out[start : start + step] = values
    return out


def xlogx(p: np.ndarray) -> np.ndarray:
    """``p log p`` elementwise with ``0 log 0 = 0`` (NaN stays NaN)."""
    return p * np.log(np.maximum(p, TINY))


def pass_mean(chunk: np.ndarray) -> np.ndarray:
    """``[n, T, C]`` → ``[n, C]`` mean over passes (a batched product with ones: several times faster
    than ``mean(axis=1)``; exact for T equal float32/float16 values, as any order of summing is)."""
    return (np.ones(chunk.shape[1]) @ chunk) / chunk.shape[1]


def _mean_entropy(chunk: np.ndarray) -> np.ndarray:
    return -xlogx(pass_mean(chunk)).sum(axis=1)


def _expected_entropy(chunk: np.ndarray) -> np.ndarray:
    return -xlogx(chunk).sum(axis=(1, 2)) / chunk.shape[1]


def _mean_kl_to_mean(chunk: np.ndarray) -> np.ndarray:
    # mean_t Σ_c p_tc (log p_tc − log p̄_c). Equal to H[p̄] − mean_t H[p_t], but each term is
    # exactly 0 when a pass equals the mean, so rows whose passes agree score exactly 0 (for
    # float32/float16 input the float64 mean of T equal values is exact), and small values do not
    # suffer the cancellation of subtracting two entropies of similar size.
    log_mean = np.log(np.maximum(pass_mean(chunk), TINY))
    terms = np.maximum(chunk, TINY)
    np.log(terms, out=terms)
    terms -= log_mean[:, None, :]
    terms *= chunk
    return np.maximum(terms.sum(axis=(1, 2)) / chunk.shape[1], 0.0)  # clip float error below 0


def _mean_std(chunk: np.ndarray) -> np.ndarray:
    return chunk.std(axis=1).mean(axis=1)


def vote_counts(chunk: np.ndarray) -> np.ndarray:
    """``[n, T, C]`` → ``[n, C]`` int: passes whose argmax is each class (ties: lowest class index)."""
    n, _, c = chunk.shape
    labels = chunk.argmax(axis=2)  # numpy's argmax returns the first maximum: deterministic
    flat = (np.arange(n)[:, None] * c + labels).ravel()
    return np.bincount(flat, minlength=n * c).reshape(n, c)


def _variation_ratio(chunk: np.ndarray) -> np.ndarray:
    return 1.0 - vote_counts(chunk).max(axis=1) / chunk.shape[1]


def _vote_entropy(chunk: np.ndarray) -> np.ndarray:
    return -xlogx(vote_counts(chunk) / chunk.shape[1]).sum(axis=1)


def mc_entropy(mc_probs: np.ndarray) -> np.ndarray:
    """Predictive entropy ``H[p̄]``, ``p̄ = mean_t p_t``: ``[N, T, C]`` → ``[N]`` in [0, log C]."""
    return rowwise(mc_probs, _mean_entropy)


def expected_entropy(mc_probs: np.ndarray) -> np.ndarray:
    """Expected entropy ``mean_t H[p_t]`` (aleatoric part): ``[N, T, C]`` → ``[N]``."""
    return rowwise(mc_probs, _expected_entropy)


def bald(mc_probs: np.ndarray) -> np.ndarray:
    """BALD ``H[p̄] − mean_t H[p_t]`` (mutual information of label and weights) ≥ 0: ``[N]``.

    Computed as ``mean_t KL(p_t ‖ p̄)``, the same quantity: exactly 0 when all passes agree.
    """
    return rowwise(mc_probs, _mean_kl_to_mean)


def variation_ratio(mc_probs: np.ndarray) -> np.ndarray:
    """``1 − (passes voting for the modal label) / T`` in [0, 1 − 1/C]: ``[N]``."""
    return rowwise(mc_probs, _variation_ratio)


def vote_entropy(mc_probs: np.ndarray) -> np.ndarray:
    """``−Σ_c (V_c/T) log(V_c/T)``, ``V_c`` = passes whose argmax is c: ``[N]`` in [0, log min(C, T)]."""
    return rowwise(mc_probs, _vote_entropy)


def mean_std(mc_probs: np.ndarray) -> np.ndarray:
    """Mean over classes of the standard deviation over passes (ddof 0): ``[N]`` in [0, 0.5]."""
    return rowwise(mc_probs, _mean_std)


class MCStrategy(Strategy):
    """A per-image score of ``mc_probs [N, T, C]``; subclasses set ``compute``."""

    needs = frozenset({"mc_probs"})
    compute: Callable[[np.ndarray], np.ndarray]

    def __init__(self) -> None:
        pass

    def score(self, inputs: PoolInputs) -> np.ndarray:
        return type(self).compute(require_mc_probs(inputs, self.name))


@register
class MCEntropy(MCStrategy):
    name = "mc-entropy"
    summary = "entropy of the mean of T MC-dropout passes (total predictive uncertainty)"
    score_meaning = "H[mean_t p_t] in nats, in [0, log C]"
    compute = staticmethod(mc_entropy)


@register
class BALD(MCStrategy):
    name = "bald"
    summary = "BALD: mutual information between label and weights over T passes or members"
    score_meaning = "H[mean_t p_t] - mean_t H[p_t] in nats, in [0, log C]; 0 when all passes agree"
    compute = staticmethod(bald)


@register
class VariationRatio(MCStrategy):
    name = "variation-ratio"
    summary = "share of the T passes that do not vote for the most common predicted label"
    score_meaning = "1 - (votes for the modal argmax label) / T, in [0, 1 - 1/min(C, T)]"
    compute = staticmethod(variation_ratio)


@register
class MeanStd(MCStrategy):
    name = "mean-std"
    summary = "mean over classes of the standard deviation of the probability over T passes"
    score_meaning = "mean_c std_t p_tc (population std), in [0, 0.5]"
    compute = staticmethod(mean_std)
