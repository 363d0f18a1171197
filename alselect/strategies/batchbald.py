"""BatchBALD (Kirsch, van Amersfoort & Gal 2019): greedy maximisation of the joint mutual information
``I[y_1..y_b; ω] = H[y_1..y_b] − Σ_i E_ω H[y_i | ω]`` over ``mc_probs [N, T, C]``.

The T predictions per image must come from the same T weight samples for every image (consistent
MC dropout: the same T dropout masks everywhere, or the T members of an ensemble), because the
joint predictive is ``p(y_1..y_n) = (1/T) Σ_t Π_i p_i,t(y_i)``. ω is uniform over the T passes, so
a batch can never gain more than ``log T`` nats in total.

How it is computed (float64 throughout):

- **Prefilter.** BALD ranks the unexcluded rows; the greedy runs on the top ``prefilter`` of them
  (default ``max(10 · budget, 1000)``). The first pick is BALD's argmax: with nothing selected, a
  candidate's gain is its BALD score (taken from the ``bald`` computation itself).
- **Gain of candidate i** after picks ``y_1..y_n``: ``H[y_i | y_1..y_n] − E_ω H[y_i | ω]``, the
  increase of the joint mutual information, with ``H[y_i | y_1..y_n] = Σ_s q(s) H[Σ_t w_s,t p_i,t]``
  over label configurations ``s`` of the picks (``q(s)`` their joint predictive probability, ``w_s``
  the posterior over the T passes given ``s``). Working with conditional entropies (at most
  ``log C``) instead of subtracting joint entropies of many variables avoids cancellation.
- **Exact, then sampled.** Configurations are enumerated exactly (zero-probability ones dropped)
  while there are at most ``num_samples`` (M) of them: while ``C^n ≤ M`` for dense probabilities.
  Past that, M configurations are drawn from the exact joint, stratified over ω (``M // T`` per
  pass, as batchbald_redux does), and each later pick extends every sample by ancestral sampling
  from the pass it was drawn under. Each sample carries the importance weight of its pass
  (``p(ω = t) / samples of t``); the candidate's own label is summed exactly, as in
  batchbald_redux's estimator. The same samples serve every later step, so successive gains are
  comparable, and once the batch has pinned ω down the gains fall to 0 instead of to noise in how
  often each pass was drawn. numpy's PCG64 seeded with ``seed`` draws them.
- **Collapsed posteriors.** A configuration whose posterior puts ``≥ 1 − 1e-12`` on one pass is
  merged into that pass (changing a gain by less than about 1e-10 nats); its children would keep
  that posterior, so such mass costs T numbers instead of a growing set of configurations.
- **Lazy greedy with bounds** (Minoux 1978 for the idea). Merging configurations into groups (mass-
  weighted mean posteriors, grouped by k-means) coarsens the conditioning, which can only raise the
  conditional entropy (concavity; this holds for the sampled estimate too): the gain computed with
  32, 128, then 512 groups is an upper bound, cheap to get for every candidate. In the exact phase
  a candidate's previous gain is an upper bound too (submodularity). Full gains are computed best
  bound first until the best one beats every remaining bound, so the pick is the one evaluating
  every candidate would give (up to float rounding); ``lazy=False`` evaluates every candidate.
- **End of information.** When the best gain falls below 1e-6 nats (ω is pinned down), further
  gains are rounding and sampling residue; the rest of the batch follows BALD order with gain 0.

Cost of one step for K prefiltered candidates, with ``S = min(C^n, M)`` configurations: a full gain
is ``S·T·C`` multiply-adds and ``S·C`` logarithms, so evaluating every candidate costs ``K·T·C^(n+1)``
exact and ``K·M·T·C`` sampled (batchbald_redux does that at every step); the bounds cost
``K·G·T·C`` for G groups plus ``S·G·T`` for k-means, and only the candidates that the bounds cannot
rule out get a full gain. Memory: the candidates' probabilities (``K·T·C`` float64), the
configurations (``M·T`` posteriors and sample counts) and a work block of 32 MB on
the CPU or 1 GB on CUDA. The BALD prefilter is one pass over ``mc_probs``, as for ``bald``.

Score of each pick: its gain (nats), clipped at 0 and capped by the running minimum so that it never
increases along the order (exact greedy gains of a submodular function do not increase anyway; the
cap hides sampling noise and rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from alselect.errors import UsageError
from alselect.strategies.base import DEVICE_PARAM, PoolInputs, Selection, Strategy, register
from alselect.strategies.bayesian import bald, require_mc_probs

if TYPE_CHECKING:
    import torch

MIN_PREFILTER = 1000
COLLAPSED = 1e-12  # a posterior within this of one pass counts as collapsed onto it
FIRST_BLOCK = 16  # full gains computed in the first block of a step; the block doubles after
COARSE_GROUPS = (32, 128, 512)  # group counts of the successively finer upper bounds
KMEANS_ITERATIONS = 1
GAIN_FLOOR = 1e-6  # nats: smaller gains end the greedy
TIE_TOLERANCE = 1e-12  # a bound this close below the best gain is still evaluated (float rounding)


@dataclass(frozen=True)
class BatchBALDResult:
    """A BatchBALD selection and how it was computed.

    - ``indices [b]``: pool rows in pick order
    - ``gains [b]``: each pick's marginal gain in joint mutual information as computed (nats)
    - ``scores [b]``: ``gains`` clipped at 0, capped by the running minimum (non-increasing)
    - ``exact_steps``: picks whose gain used the exact joint (the rest used sampled configurations)
    - ``candidates``: rows the greedy ran on, after the BALD prefilter
    - ``evaluations``: candidate gains computed over all steps (lazy greedy needs fewer than
      ``candidates × b``)
    """

    indices: np.ndarray
    gains: np.ndarray
    scores: np.ndarray
    exact_steps: int
    candidates: int
    evaluations: int


def default_prefilter(budget: int) -> int:
    """The prefilter size when none is given: ``max(10 · budget, 1000)``."""
    return max(10 * budget, MIN_PREFILTER)


def batchbald(
    mc_probs: np.ndarray,
    excluded: np.ndarray,
    budget: int,
    *,
    num_samples: int = 10_000,
    prefilter: int | None = None,
    lazy: bool = True,
    seed: int = 0,
    device: str = "cpu",
    bald_scores: np.ndarray | None = None,
) -> BatchBALDResult:
    """Greedy BatchBALD batch of ``budget`` rows of ``mc_probs [N, T, C]`` not ``excluded [N]``.

    ``bald_scores [N]`` may be passed when already computed. Rows whose probabilities are not finite
    are never picked by the greedy; when fewer than ``budget`` finite rows remain they follow, in row
    order, with NaN gains and scores (as ``top_k`` sorts NaN last).
    """
    mc_probs = np.asarray(mc_probs)
    excluded = np.asarray(excluded, dtype=bool)
    _check_options(budget, num_samples, prefilter)
    size = default_prefilter(budget) if prefilter is None else prefilter
    if size < budget:
        raise UsageError(f"batchbald: prefilter ({size}) must be at least the budget ({budget})")
    scores = bald(mc_probs) if bald_scores is None else np.asarray(bald_scores, dtype=np.float64)

    valid = np.flatnonzero(~excluded & np.isfinite(scores))
    top = np.argsort(-scores[valid], kind="stable")[:size]
    candidates = np.sort(valid[top])  # row order: the lowest row wins a tie
    picks, gains, exact_steps, evaluations = _greedy(
        np.asarray(mc_probs[candidates], dtype=np.float64),
        scores[candidates],
        min(budget, candidates.size),
        num_samples=num_samples,
        lazy=lazy,
        seed=seed,
        device=device,
    )
    indices = candidates[picks]
    missing = budget - indices.size
    if missing > 0:  # not enough finite rows: the NaN ones follow, as in top_k
        rest = np.flatnonzero(~excluded & ~np.isfinite(scores))[:missing]
        indices = np.concatenate([indices, rest])
        gains = np.concatenate([gains, np.full(rest.size, np.nan)])
    clipped = np.maximum(gains, 0.0)
    finite = np.isfinite(clipped)
    clipped[finite] = np.minimum.accumulate(clipped[finite])
    return BatchBALDResult(
        indices=indices,
        gains=gains,
        scores=clipped,
        exact_steps=exact_steps,
        candidates=int(candidates.size),
        evaluations=evaluations,
    )


def joint_gains(
    picked: np.ndarray,
    candidates: np.ndarray,
    *,
    num_samples: int = 10_000,
    seed: int = 0,
    device: str = "cpu",
) -> np.ndarray:
    """Gain in joint mutual information of each candidate given a batch already picked.

    ``picked [n, T, C]`` and ``candidates [K, T, C]`` (the same T passes) → ``[K]`` nats:
    ``I[y_picked, y_i; ω] − I[y_picked; ω]``, computed as in :func:`batchbald` (exact while the
    picks have at most ``num_samples`` label configurations, sampled after, with ``seed``).
    """
    picked = np.asarray(picked, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.float64)
    _check_options(0, num_samples, None)
    state = _Configurations(candidates.shape[1], num_samples)
    rng = np.random.default_rng(seed)
    for probs in picked:
        state.add(probs, rng)
    evaluator = _GainEvaluator(candidates, device)
    return evaluator(state.weights, state.mass, state.vertex, np.arange(candidates.shape[0]))


def _check_options(budget: int, num_samples: int, prefilter: int | None) -> None:
    if budget < 0:
        raise UsageError(f"batchbald: budget must be at least 0, got {budget}")
    if num_samples < 1:
        raise UsageError(f"batchbald: num_samples must be at least 1, got {num_samples}")
    if prefilter is not None and prefilter < 1:
        raise UsageError(f"batchbald: prefilter must be at least 1, got {prefilter}")


def _greedy(
    probs: np.ndarray,
    bald_scores: np.ndarray,
    budget: int,
    *,
    num_samples: int,
    lazy: bool,
    seed: int,
    device: str,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Greedy picks over candidates ``probs [K, T, C]`` (positions into K), their gains, exact steps."""
    k, t, _ = probs.shape
    picks = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)
    if budget == 0:
        return picks, gains, 0, 0
    evaluator = _GainEvaluator(probs, device)
    rng = np.random.default_rng(seed)
    state = _Configurations(t, num_samples)
    values = bald_scores.astype(np.float64).copy()  # the gains with nothing selected
    available = np.ones(k, dtype=bool)
    evaluations = 0
    exact_steps = 0
    for step in range(budget):
        if step > 0:
            if lazy:
                evaluations += _refresh(values, available, state, evaluator)
            else:
                idx = np.flatnonzero(available)
                values[idx] = evaluator(state.weights, state.mass, state.vertex, idx)
                evaluations += idx.size
        best = int(np.argmax(np.where(available, values, -np.inf)))  # first maximum: lowest row
        if values[best] < GAIN_FLOOR:  # the batch has learnt all it can: the rest in BALD order
            rest = np.flatnonzero(available)
            rest = rest[np.argsort(-bald_scores[rest], kind="stable")][: budget - step]
            picks[step:], gains[step:] = rest, 0.0
            break
        picks[step], gains[step] = best, values[best]
        exact_steps += state.exact
        available[best] = False
        if step + 1 < budget:
            state.add(probs[best], rng)
    return picks, gains, exact_steps, evaluations


def _refresh(
    values: np.ndarray, available: np.ndarray, state: _Configurations, evaluator: _GainEvaluator
) -> int:
    """Update ``values`` so that its argmax over ``available`` is the candidate of highest gain.

    On entry ``values`` holds the gains of the previous step. Candidates get upper bounds first:
    their gain with the configurations merged into a few groups (a coarser conditioning, so a
    higher conditional entropy: by concavity of entropy this holds for the sampled estimate too)
    and, in the exact phase, their previous gain (submodularity). Full gains are then computed best
    bound first until the best of them beats every bound left; candidates left with a bound keep it
    in ``values``, below the best. Returns the number of full gains computed.
    """
    idx = np.flatnonzero(available)
    live = state.mass.size
    if live <= COARSE_GROUPS[0]:  # a handful of configurations: full gains cost no more than bounds
        values[idx] = evaluator(state.weights, state.mass, state.vertex, idx)
        return idx.size
    upper = np.full(values.shape, np.inf)
    if state.exact:
        upper[idx] = values[idx]
    fresh = np.zeros(values.shape, dtype=bool)
    best = -np.inf

    def evaluate_best_bounds(contenders: np.ndarray, count: int) -> float:
        """Full gains of the ``count`` contenders of highest bound; their maximum."""
        take = contenders[np.argsort(-upper[contenders], kind="stable")[:count]]
        if take.size == 0:
            return -np.inf
        values[take] = evaluator(state.weights, state.mass, state.vertex, take)
        fresh[take] = True
        return float(values[take].max())

    for groups in COARSE_GROUPS:
        if groups >= live:
            break
        contenders = idx[~fresh[idx] & (upper[idx] >= best - TIE_TOLERANCE)]
        weights, mass = state.coarsened(groups)
        upper[contenders] = np.minimum(upper[contenders], evaluator(weights, mass, state.vertex, contenders))
        best = max(best, evaluate_best_bounds(contenders, FIRST_BLOCK))
    block = FIRST_BLOCK
    while True:
        contenders = idx[~fresh[idx] & (upper[idx] >= best - TIE_TOLERANCE)]
        if contenders.size == 0:
            break
        best = max(best, evaluate_best_bounds(contenders, block))
        block *= 2
    stale = idx[~fresh[idx]]
    values[stale] = upper[stale]  # bounds below the best: never the argmax
    return int(np.count_nonzero(fresh))


class _Configurations:
    """Label configurations of the picks so far, as posteriors over the T passes with masses.

    - ``weights [S, T]``: posterior over passes of each live configuration; ``mass [S]`` its mass
    - ``vertex [T]``: mass of configurations whose posterior has collapsed onto one pass (within
      ``COLLAPSED``): their children keep that posterior, so they are merged and never split again
    - once sampled, ``counts [S, T]``: samples of each configuration drawn under each pass, and
      ``unit [T]``: the mass of one sample drawn under each pass

    Live masses plus vertex masses sum to 1.
    """

    def __init__(self, passes: int, num_samples: int) -> None:
        self.weights = np.full((1, passes), 1.0 / passes)
        self.mass = np.ones(1)
        self.vertex = np.zeros(passes)
        self.counts: np.ndarray | None = None
        self.unit = np.zeros(passes)
        self.num_samples = num_samples

    @property
    def exact(self) -> bool:
        return self.counts is None

    def add(self, probs: np.ndarray, rng: np.random.Generator) -> None:
        """Condition on one more pick with probabilities ``probs [T, C]``."""
        if self.counts is None:
            child_mass = self.mass[:, None] * (self.weights @ probs)  # [S, C]
            live = child_mass > 0
            if np.count_nonzero(live) <= self.num_samples:
                parent, label = np.nonzero(live)
                mass = child_mass[parent, label]
                self._extend(probs, parent, label, mass * (self.mass.sum() / mass.sum()), None)
                return
            self._draw_samples(rng)
        assert self.counts is not None
        # Ancestral sampling: each sample drawn under pass t draws its new label from p_t.
        config, passes = np.nonzero(self.counts)
        repeats = self.counts[config, passes]
        sample_config, sample_pass = np.repeat(config, repeats), np.repeat(passes, repeats)
        cumulative = np.cumsum(probs, axis=1)
        cumulative /= cumulative[:, -1:]  # the last class with p > 0 ends at exactly 1
        uniform = rng.random(sample_pass.size)
        label = np.empty(sample_pass.size, dtype=np.int64)
        for t in np.unique(sample_pass):  # a loop over passes, not samples or candidates
            mine = sample_pass == t
            label[mine] = np.searchsorted(cumulative[t], uniform[mine], side="right")
        c = probs.shape[1]
        children, child = np.unique(sample_config * c + label, return_inverse=True)
        counts = np.bincount(
            child * self.weights.shape[1] + sample_pass, minlength=children.size * self.weights.shape[1]
        ).reshape(children.size, -1)  # [S', T]
        self._extend(probs, children // c, children % c, counts @ self.unit, counts)

    def _draw_samples(self, rng: np.random.Generator) -> None:
        """Replace the live configurations by M samples, stratified over the passes.

        Pass t gets ``M // T`` samples (at least 1) of p(configuration | ω = t), so every pass
        carries exactly its share of the mass: the gains of a batch that has pinned ω down go to
        0 instead of to sampling noise in how often each pass was drawn.
        """
        passes = self.weights.shape[1]
        per_pass = max(1, self.num_samples // passes)
        joint = self.mass[:, None] * self.weights  # [S, T]: p(configuration, ω = t), live part
        by_pass = joint.sum(axis=0)
        drawn = by_pass > 0
        counts = np.zeros(joint.shape, dtype=np.int64)
        counts[:, drawn] = rng.multinomial(per_pass, (joint[:, drawn] / by_pass[drawn]).T).T
        self.unit = np.where(drawn, by_pass / per_pass, 0.0)
        keep = counts.sum(axis=1) > 0
        self.weights, self.counts = self.weights[keep], counts[keep]
        self.mass = self.counts @ self.unit

    def _extend(
        self,
        probs: np.ndarray,
        parent: np.ndarray,
        label: np.ndarray,
        mass: np.ndarray,
        counts: np.ndarray | None,
    ) -> None:
        weights = self.weights[parent] * probs[:, label].T
        weights /= weights.sum(axis=1, keepdims=True)
        top = weights.argmax(axis=1)
        collapsed = weights[np.arange(top.size), top] >= 1.0 - COLLAPSED
        np.add.at(self.vertex, top[collapsed], mass[collapsed])
        keep = ~collapsed
        self.weights, self.mass = weights[keep], mass[keep]
        self.counts = None if counts is None else counts[keep]

    def coarsened(self, groups: int) -> tuple[np.ndarray, np.ndarray]:
        """The live configurations merged into at most ``groups``: mass-weighted mean posteriors.

        A few weighted k-means (Lloyd) iterations group similar posteriors, which keeps the bound
        tight; any grouping gives a valid bound, provided each group's posterior is the
        mass-weighted mean of its members'.
        """
        weights, mass = self.weights, self.mass
        spread = np.lexsort((weights.max(axis=1), weights.argmax(axis=1)))
        centres = weights[spread[np.linspace(0, mass.size - 1, groups).astype(np.int64)]]
        for _ in range(KMEANS_ITERATIONS):
            distances = (centres * centres).sum(axis=1) - 2.0 * (weights @ centres.T)  # + |w|², constant
            member = distances.argmin(axis=1)
            group_mass = np.bincount(member, weights=mass, minlength=centres.shape[0])
            sums = np.zeros_like(centres)
            np.add.at(sums, member, weights * mass[:, None])
            used = group_mass > 0
            centres, group_mass = sums[used] / group_mass[used, None], group_mass[used]
        return centres, group_mass


class _GainEvaluator:
    """Gains ``H[y_i | picks] − E_ω H[y_i | ω]`` of candidate positions, in torch (CPU or CUDA)."""

    def __init__(self, probs: np.ndarray, device: str) -> None:
        import torch

        from alselect.embed import resolve_device

        self.torch = torch
        self.device = resolve_device(device, DEVICE_PARAM)
        self.probs = torch.as_tensor(probs, dtype=torch.float64, device=self.device)  # [K, T, C]
        entropies = torch.special.entr(self.probs).sum(dim=2)  # [K, T]: H[p_i,t]
        self.pass_entropy = entropies  # used for configurations collapsed onto one pass
        self.conditional = entropies.mean(dim=1)  # [K]: E_ω H[y_i | ω]
        self.block_values = 1 << (27 if self.device.type == "cuda" else 22)

    def __call__(
        self, weights: np.ndarray, mass: np.ndarray, vertex: np.ndarray, positions: np.ndarray
    ) -> np.ndarray:
        """Gains of candidates ``positions`` given live configurations and collapsed mass."""
        torch = self.torch
        if positions.size == 0:
            return np.empty(0)
        idx = torch.as_tensor(positions, device=self.device)
        # Collapsed configurations: H[y_i | pass t] weighted by their mass.
        gains = self.pass_entropy[idx] @ torch.as_tensor(vertex, device=self.device) - self.conditional[idx]
        if mass.size:
            w_t = torch.as_tensor(np.ascontiguousarray(weights.T), device=self.device)  # [T, S]
            m = torch.as_tensor(mass, device=self.device)  # [S]
            step = max(1, self.block_values // (mass.size * self.probs.shape[2]))
            gains += torch.cat([self._live(w_t, m, idx[i : i + step]) for i in range(0, idx.shape[0], step)])
        return gains.cpu().numpy()

    def _live(self, w_t: torch.Tensor, mass: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``Σ_s mass_s H[Σ_t w_s,t p_i,t]`` over live configurations, for candidates ``idx``."""
        b, c = idx.shape[0], self.probs.shape[2]
        block = self.probs[idx].transpose(1, 2).reshape(b * c, -1)  # [b·C, T]
        predictive = block @ w_t  # [b·C, S]: p(y_i = c | configuration s)
        plogp = self.torch.special.entr(predictive, out=predictive)  # −p log p, in place
        return (plogp @ mass).view(b, c).sum(dim=1)


@register
class BatchBALD(Strategy):
    name = "batchbald"
    summary = "BatchBALD: greedy batch maximising joint mutual information (needs --budget)"
    needs = frozenset({"mc_probs"})
    batch_aware = True
    score_meaning = (
        "the pick's marginal gain in joint mutual information with the weights (nats), "
        "capped by the running minimum so it never increases; the first is the pick's BALD"
    )

    def __init__(
        self,
        *,
        num_samples: int = 10_000,
        prefilter: int | None = None,
        lazy: bool = True,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.prefilter = prefilter
        self.lazy = lazy
        self.device = device
        self.seed = seed

    def score(self, inputs: PoolInputs) -> np.ndarray:
        raise UsageError("batchbald chooses a batch jointly and has no per-image score; use select")

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        if budget is None:
            raise UsageError("batchbald chooses its batch jointly and needs a budget (--budget N)")
        result = batchbald(
            require_mc_probs(inputs, self.name),
            inputs.excluded,
            budget,
            num_samples=self.num_samples,
            prefilter=self.prefilter,
            lazy=self.lazy,
            seed=self.seed,
            device=self.device,
        )
        return Selection(indices=result.indices, scores=result.scores)
