"""Diversity strategies (coreset, badge) and the greedy engine, against brute-force references.

Generic contracts of every batch-aware strategy (budget required, no excluded rows, no duplicates,
non-increasing scores, determinism) are checked here for all of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from alselect.errors import DataError, UsageError
from alselect.strategies import PoolInputs, available, make_strategy
from alselect.strategies import greedy as greedy_module
from alselect.strategies.badge import gradient_embedding, gradient_factors
from alselect.strategies.greedy import greedy_centres

BATCH_AWARE = ("badge", "coreset", "dal", "diverse-minibatch", "kmeans")
FAST_DAL = {"max_epochs": 15, "sub_queries": 3}


def make(name: str, seed: int = 0, **params: object) -> object:
    extra = FAST_DAL if name == "dal" else {}
    return make_strategy(name, seed=seed, **{**extra, **params})


def clustered(
    n: int, dims: int, clusters: int, seed: int, spread: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: ``(points [n, dims] float32, blob id [n])``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dims)) * spread
    blob = rng.integers(0, clusters, n)
    return (centres[blob] + rng.standard_normal((n, dims))).astype(np.float32), blob


def random_probs(n: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(classes, 0.6), n).astype(np.float32)


def engine_case(n: int, dims: int, every: int, badge: bool, seed: int, dtype: type = np.float32):
    """Separated blobs, every ``every``-th row covered; BADGE mode adds ``a = p − e_ŷ`` and sampling.

    Returns ``(x, candidates, options)`` for :func:`greedy_centres` (without ``rng``).
    """
    x, blob = clustered(n, dims, 12, seed=seed)
    covered = np.arange(0, n, every)
    options: dict = {"centres": covered}
    if badge:  # k-means++ draws on a ⊗ h, with the owner and projection filters in tensor space
        probs = np.full((n, 4), 0.1, dtype=np.float32)
        probs[np.arange(n), blob % 4] = 0.7
        options.update(factors=gradient_factors(probs), sample=True)
    return x.astype(dtype), np.setdiff1d(np.arange(n), covered), options


# --- brute-force references ----------------------------------------------------------------------


def brute_kcenter(x: np.ndarray, covered: list[int], candidates: list[int], budget: int, first: int | None):
    """Textbook k-center greedy in float64 with explicit loops over centres: (picks, distances)."""
    x = x.astype(np.float64)
    centres = list(covered)
    picks: list[int] = []
    dists: list[float] = []
    if not centres:
        assert first is not None
        centres, picks, dists = [first], [first], [math.nan]
    while len(picks) < min(budget, len(candidates)):
        best, best_d = -1, -1.0
        for i in candidates:
            if i in picks:
                continue
            d = min(float(((x[i] - x[c]) ** 2).sum()) for c in centres)
            if d > best_d:  # strict: the first (lowest row) wins ties
                best, best_d = i, d
        picks.append(best)
        dists.append(math.sqrt(best_d))
        centres.append(best)
    return picks, dists


def brute_badge(
    probs: np.ndarray, emb: np.ndarray, candidates: list[int], budget: int, seed: int, pending=()
):
    """k-means++ on the explicit gradient embeddings, with the documented draw (cumsum, searchsorted)."""
    g = gradient_embedding(probs, emb)
    uniforms = np.random.default_rng(seed).random(min(budget, len(candidates)))
    cand = np.asarray(candidates)
    centres = [g[p] for p in pending]
    picks: list[int] = []
    dists: list[float] = []
    for step, u in enumerate(uniforms):
        if not centres:
            norms = np.linalg.norm(g[cand], axis=1)
            j = int(cand[int(np.argmax(norms))])
            dists.append(math.nan)
        else:
            d2 = np.array([min(float(((g[i] - c) ** 2).sum()) for c in centres) for i in cand])
            d2[np.isin(cand, picks)] = 0.0
            cumulative = np.cumsum(d2)
            j = int(cand[int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))])
            dists.append(math.sqrt(d2[np.flatnonzero(cand == j)[0]]))
        picks.append(j)
        centres.append(g[j])
        assert step == len(picks) - 1
    return picks, dists


# --- coreset -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def points() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((120, 6)).astype(np.float32)


def test_coreset_matches_brute_force_with_labeled_set(points: np.ndarray) -> None:
    labeled = np.zeros(120, dtype=bool)
    labeled[[4, 17, 60, 61, 99]] = True
    candidates = np.flatnonzero(~labeled).tolist()
    inputs = PoolInputs(probs=np.zeros((120, 2)), labeled=labeled, embeddings=points)
    selection = make_strategy("coreset").select(25, inputs)
    picks, dists = brute_kcenter(points, [4, 17, 60, 61, 99], candidates, 25, None)
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, dists, rtol=1e-12)


def test_coreset_counts_pending_rows_as_covered(points: np.ndarray) -> None:
    labeled = np.zeros(120, dtype=bool)
    labeled[[0, 1]] = True
    pending = np.zeros(120, dtype=bool)
    pending[[10, 50, 51, 80]] = True
    emb = points.copy()
    emb[30] = emb[50]  # a candidate on top of a pending image: covered, picked last
    inputs = PoolInputs(probs=np.zeros((120, 2)), labeled=labeled, embeddings=emb, pending=pending)
    selection = make_strategy("coreset").select(116, inputs)
    picks, dists = brute_kcenter(
        emb, [0, 1, 10, 50, 51, 80], np.flatnonzero(~(labeled | pending)).tolist(), 116, None
    )
    assert selection.indices.tolist() == picks
    assert not set(picks) & {0, 1, 10, 50, 51, 80}
    assert selection.scores[picks.index(30)] == 0.0
    np.testing.assert_allclose(selection.scores, dists, rtol=1e-12)


def test_coreset_cold_start_draws_the_first_pick_from_the_seed(points: np.ndarray) -> None:
    inputs = PoolInputs(probs=np.zeros((120, 2)), labeled=np.zeros(120, dtype=bool), embeddings=points)
    for seed in (0, 1, 2):
        selection = make_strategy("coreset", seed=seed).select(10, inputs)
        first = int(np.random.default_rng(seed).random(10)[0] * 120)  # uniform over the 120 candidates
        assert selection.indices[0] == first
        picks, dists = brute_kcenter(points, [], list(range(120)), 10, first)
        assert selection.indices.tolist() == picks
        # the first pick scores the radius it covers alone: its distance to the farthest candidate
        radius = np.sqrt(((points.astype(np.float64) - points[first]) ** 2).sum(axis=1)).max()
        assert selection.scores[0] == pytest.approx(radius, rel=1e-12)
        np.testing.assert_allclose(selection.scores[1:], dists[1:], rtol=1e-12)
    firsts = {int(make_strategy("coreset", seed=s).select(1, inputs).indices[0]) for s in range(6)}
    assert len(firsts) > 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("badge", [False, True])
def test_fast_path_agrees_with_exact_on_separated_data(dtype: type, prune: bool, badge: bool) -> None:
    x, candidates, options = engine_case(3000, 80, 97, badge, seed=5, dtype=dtype)
    exact = greedy_centres(x, candidates, 60, rng=np.random.default_rng(0), precision="exact", **options)
    fast = greedy_centres(
        x,
        candidates,
        60,
        rng=np.random.default_rng(0),
        precision="fast",
        device="cpu",
        prune=prune,
        **options,
    )
    assert fast.picks.tolist() == exact.picks.tolist()
    np.testing.assert_allclose(fast.dists, exact.dists, rtol=1e-4)


def test_pruned_path_skips_rows_and_keeps_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = clustered(4000, 96, 20, seed=8)
    counted: dict[str, int] = {}
    original = greedy_module._CpuBackend.close

    def close(self: greedy_module._CpuBackend) -> None:
        counted["computed"] = self.computed
        original(self)

    monkeypatch.setattr(greedy_module, "PRUNE_DIMS", 16)
    monkeypatch.setattr(greedy_module._CpuBackend, "close", close)
    cand = np.arange(4000)
    fast = greedy_centres(
        x, cand, 80, rng=np.random.default_rng(1), precision="fast", device="cpu", prune=True
    )
    exact = greedy_centres(x, cand, 80, rng=np.random.default_rng(1), precision="exact")
    assert fast.picks.tolist() == exact.picks.tolist()
    # the bound must actually skip work: a dense run computes 80 × 4000 distances
    assert counted["computed"] < 0.5 * 80 * 4000


def test_filters_switch_off_on_data_without_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    # isotropic noise: no candidate can be skipped, so the filters run only every DENSE_STEPS + 1 steps
    x = np.random.default_rng(0).standard_normal((3000, 128)).astype(np.float32)
    stats: dict[str, int] = {}
    original = greedy_module._CpuBackend.close

    def close(self: greedy_module._CpuBackend) -> None:
        stats.update(filtered=self.filtered_steps, computed=self.computed)
        original(self)

    monkeypatch.setattr(greedy_module._CpuBackend, "close", close)
    covered = np.arange(0, 3000, 30)
    cand = np.setdiff1d(np.arange(3000), covered)
    fast = greedy_centres(
        x, cand, 60, rng=np.random.default_rng(0), centres=covered, precision="fast", device="cpu", prune=True
    )
    exact = greedy_centres(x, cand, 60, rng=np.random.default_rng(0), centres=covered, precision="exact")
    assert fast.picks.tolist() == exact.picks.tolist()
    assert stats["computed"] > 0.9 * 60 * cand.size
    assert stats["filtered"] <= 60 // (greedy_module.DENSE_STEPS + 1) + 1


def test_context_larger_than_one_block_is_covered_chunkwise() -> None:
    # more labeled rows than the 4,096-row context block: two blocks, same answer as exact
    x, _ = clustered(5000, 8, 30, seed=2)
    labeled = np.zeros(5000, dtype=bool)
    labeled[:4200] = True
    inputs = PoolInputs(probs=np.zeros((5000, 2)), labeled=labeled, embeddings=x)
    exact = make_strategy("coreset", precision="exact").select(15, inputs)
    fast = make_strategy("coreset", precision="fast", device="cpu").select(15, inputs)
    assert fast.indices.tolist() == exact.indices.tolist()
    x64 = x.astype(np.float64)
    d2 = np.array([((x64[:4200] - x64[i]) ** 2).sum(axis=1).min() for i in range(4200, 5000)])
    assert exact.indices[0] == 4200 + int(np.argmax(d2))
    assert exact.scores[0] == pytest.approx(math.sqrt(d2.max()), rel=1e-12)


def test_nan_embeddings_are_a_data_error(points: np.ndarray) -> None:
    emb = points.copy()
    emb[7, 2] = np.nan
    inputs = PoolInputs(probs=np.zeros((120, 2)), labeled=np.zeros(120, dtype=bool), embeddings=emb)
    for precision in ("exact", "fast"):
        with pytest.raises(DataError, match="NaN or infinite"):
            make_strategy("coreset", precision=precision, device="cpu").select(5, inputs)


def test_unknown_precision_is_a_usage_error(points: np.ndarray) -> None:
    inputs = PoolInputs(probs=np.zeros((120, 2)), labeled=np.zeros(120, dtype=bool), embeddings=points)
    with pytest.raises(UsageError, match="precision"):
        make_strategy("coreset", precision="half").select(5, inputs)


# --- badge ---------------------------------------------------------------------------------------


def test_gradient_factors_use_the_predicted_class() -> None:
    probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    expected = [[0.2, -0.3, 0.1], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]  # ties: the first class
    np.testing.assert_allclose(gradient_factors(probs), expected, atol=1e-7)


def test_factorised_distances_equal_explicit_gradient_distances() -> None:
    rng = np.random.default_rng(4)
    probs = random_probs(60, 5, seed=4)
    emb = rng.standard_normal((60, 7)).astype(np.float32)
    g = gradient_embedding(probs, emb)
    assert g.shape == (60, 35)
    cand = np.arange(60)
    for precision in ("exact", "fast"):
        result = greedy_centres(
            emb,
            cand,
            20,
            rng=np.random.default_rng(0),
            factors=gradient_factors(probs),
            sample=True,
            first="max_norm",
            precision=precision,
            device="cpu",
        )
        # each recorded distance is the explicit distance to the nearest earlier pick
        for step in range(1, 20):
            earlier = g[result.picks[:step]]
            explicit = np.sqrt(((earlier - g[result.picks[step]]) ** 2).sum(axis=1).min())
            assert result.dists[step] == pytest.approx(explicit, rel=1e-5 if precision == "fast" else 1e-9)


def test_badge_matches_brute_force_kmeanspp() -> None:
    rng = np.random.default_rng(9)
    probs = random_probs(80, 4, seed=9)
    emb = rng.standard_normal((80, 5)).astype(np.float32)
    labeled = np.zeros(80, dtype=bool)
    labeled[[3, 9, 40]] = True
    inputs = PoolInputs(probs=probs, labeled=labeled, embeddings=emb)
    for seed in (0, 7):
        selection = make_strategy("badge", seed=seed).select(30, inputs)
        picks, dists = brute_badge(probs, emb, np.flatnonzero(~labeled).tolist(), 30, seed)
        assert selection.indices.tolist() == picks
        first_norm = np.linalg.norm(gradient_embedding(probs, emb)[picks[0]])
        expected = np.minimum.accumulate(np.array([first_norm, *dists[1:]]))
        np.testing.assert_allclose(selection.scores, expected, rtol=1e-9)


def test_badge_draws_away_from_pending_images() -> None:
    rng = np.random.default_rng(2)
    probs = random_probs(50, 3, seed=2)
    emb = rng.standard_normal((50, 4)).astype(np.float32)
    pending = np.zeros(50, dtype=bool)
    pending[[5, 6]] = True
    emb[20], probs[20] = emb[5], probs[5]  # a candidate identical to a pending image
    inputs = PoolInputs(probs=probs, labeled=np.zeros(50, dtype=bool), embeddings=emb, pending=pending)
    selection = make_strategy("badge", seed=3).select(48, inputs)
    # the draws use one uniform per pick from the front of the stream, so 40 picks are a prefix of 48
    picks, _ = brute_badge(probs, emb, np.flatnonzero(~pending).tolist(), 40, 3, pending=[5, 6])
    assert selection.indices.tolist()[:40] == picks
    assert 20 not in selection.indices[:40]  # zero distance: drawn only once nothing else is left


def test_badge_never_returns_duplicates_with_identical_rows_and_zero_gradients() -> None:
    rng = np.random.default_rng(0)
    probs = random_probs(300, 4, seed=0)
    emb = rng.standard_normal((300, 8)).astype(np.float32)
    probs[:120] = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 120)]  # one-hot: zero gradients
    emb[120:200] = emb[120]  # 80 identical images with identical predictions
    probs[120:200] = probs[120]
    labeled = np.zeros(300, dtype=bool)
    labeled[::23] = True
    inputs = PoolInputs(probs=probs, labeled=labeled, embeddings=emb)
    for precision in ("exact", "fast"):
        strategy = make_strategy("badge", seed=1, precision=precision, device="cpu")
        for budget in (50, 200, 1000):
            selection = strategy.select(budget, inputs)
            assert (
                len(set(selection.indices.tolist()))
                == selection.indices.size
                == min(budget, int((~labeled).sum()))
            )
            assert not labeled[selection.indices].any()
            assert np.all(np.diff(selection.scores) <= 0)
        # distinct informative rows come before the copies: one copy, then the unique ones
        first = strategy.select(95, inputs).indices
        assert np.isin(first, np.arange(120, 200)).sum() <= 1


# --- every batch-aware strategy ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> PoolInputs:
    x, _ = clustered(400, 12, 6, seed=11, spread=3.0)
    probs = random_probs(400, 3, seed=11)
    labeled = np.zeros(400, dtype=bool)
    labeled[np.random.default_rng(1).choice(400, 40, replace=False)] = True
    pending = np.zeros(400, dtype=bool)
    pending[np.flatnonzero(~labeled)[:15]] = True
    return PoolInputs(probs=probs, labeled=labeled, embeddings=x, pending=pending)


def test_batch_aware_set_is_what_the_registry_says() -> None:
    # batchbald is batch-aware too; tests/test_bayesian.py covers it.
    assert {name for name, cls in available().items() if cls.batch_aware} == {*BATCH_AWARE, "batchbald"}


@pytest.mark.parametrize("name", BATCH_AWARE)
def test_budget_none_is_a_usage_error_naming_the_option(name: str, pool: PoolInputs) -> None:
    with pytest.raises(UsageError, match="--budget N"):
        make(name).select(None, pool)


@pytest.mark.parametrize("name", BATCH_AWARE)
def test_contract_no_excluded_no_duplicates_non_increasing(name: str, pool: PoolInputs) -> None:
    cls = available()[name]
    assert cls.score_meaning.strip() and cls.summary.strip()
    selection = make(name).select(30, pool)
    picked = selection.indices.tolist()
    assert len(picked) == 30 == len(set(picked))
    assert not pool.excluded[selection.indices].any()
    assert selection.scores.shape == (30,)
    assert np.isfinite(selection.scores).all()
    assert np.all(np.diff(selection.scores) <= 0)


@pytest.mark.parametrize("name", BATCH_AWARE)
def test_budget_beyond_candidates_returns_every_candidate_once(name: str, pool: PoolInputs) -> None:
    selection = make(name).select(10_000, pool)
    assert sorted(selection.indices.tolist()) == np.flatnonzero(~pool.excluded).tolist()
    assert np.all(np.diff(selection.scores) <= 0)
    assert make(name).select(0, pool).indices.size == 0


@pytest.mark.parametrize("name", BATCH_AWARE)
def test_deterministic_for_a_seed(name: str, pool: PoolInputs) -> None:
    first = make(name, seed=5).select(25, pool)
    second = make(name, seed=5).select(25, pool)
    assert first.indices.tolist() == second.indices.tolist()
    np.testing.assert_array_equal(first.scores, second.scores)


@pytest.mark.parametrize("name", ["badge", "dal", "diverse-minibatch", "kmeans"])
def test_different_seeds_can_differ(name: str, pool: PoolInputs) -> None:
    orders = {tuple(make(name, seed=seed).select(25, pool).indices.tolist()) for seed in range(4)}
    assert len(orders) > 1


@pytest.mark.parametrize("name", BATCH_AWARE)
def test_global_random_state_untouched(name: str, pool: PoolInputs) -> None:
    import torch

    np.random.seed(123)
    torch.manual_seed(123)
    numpy_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    make(name).select(10, pool)
    after = np.random.get_state()
    np.testing.assert_array_equal(after[1], numpy_state[1])
    assert after[2] == numpy_state[2]
    assert torch.equal(torch.random.get_rng_state(), torch_state)


@pytest.mark.parametrize("badge", [False, True])
def test_device_backend_logic_on_cpu_tensors(badge: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA backend's code, run on CPU tensors (without a GPU, its float16 matmul falls back)."""
    import torch

    def dense(stack, h, candidates, factors, *rest):
        return greedy_module._CudaBackend(h, candidates, factors, torch.device("cpu"))

    x, candidates, options = engine_case(2000, 48, 40, badge, seed=4, dtype=np.float16)
    exact = greedy_centres(x, candidates, 40, rng=np.random.default_rng(0), precision="exact", **options)
    monkeypatch.setattr(greedy_module, "_open_backend", dense)
    got = greedy_centres(x, candidates, 40, rng=np.random.default_rng(0), precision="fast", **options)
    assert got.picks.tolist() == exact.picks.tolist()
    np.testing.assert_allclose(got.dists, exact.dists, rtol=1e-4)
    cold = greedy_centres(x, candidates, 10, rng=np.random.default_rng(2), precision="fast")
    monkeypatch.undo()
    reference = greedy_centres(x, candidates, 10, rng=np.random.default_rng(2), precision="exact")
    assert cold.picks.tolist() == reference.picks.tolist()
    assert cold.first_radius == pytest.approx(reference.first_radius, rel=1e-5)
