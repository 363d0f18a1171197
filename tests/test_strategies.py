"""Acquisition strategies: hand-computed scores, selection order, brute-force references, params."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from alselect.errors import UsageError
from alselect.strategies import PoolInputs, Strategy, available, make_strategy, top_k

UNCERTAINTY = ("least-confidence", "margin", "ratio", "entropy")
LN = math.log


def pool(rows: list[list[float]], labeled: list[bool] | None = None) -> PoolInputs:
    probs = np.asarray(rows, dtype=np.float32)
    mask = np.zeros(len(rows), dtype=bool) if labeled is None else np.asarray(labeled, dtype=bool)
    return PoolInputs(probs=probs, labeled=mask)


def scores_of(name: str, inputs: PoolInputs) -> list[float]:
    result = np.asarray(make_strategy(name).score(inputs), dtype=np.float64)
    assert result.shape == (inputs.size,)
    return [float(v) for v in result]


# Three classes: a typical row, a one-hot row, the uniform row, and a tie between the top two.
THREE_CLASS = [
    [0.5, 0.3, 0.2],
    [0.0, 1.0, 0.0],
    [1 / 3, 1 / 3, 1 / 3],
    [0.1, 0.6, 0.3],
    [0.4, 0.2, 0.4],
]

HAND_COMPUTED: dict[str, list[float]] = {
    "least-confidence": [0.5, 0.0, 2 / 3, 0.4, 0.6],
    # 1 - (p1 - p2)
    "margin": [1 - (0.5 - 0.3), 0.0, 1.0, 1 - (0.6 - 0.3), 1.0],
    # p2 / p1
    "ratio": [0.3 / 0.5, 0.0, 1.0, 0.3 / 0.6, 1.0],
    "entropy": [
        -(0.5 * LN(0.5) + 0.3 * LN(0.3) + 0.2 * LN(0.2)),
        0.0,
        LN(3),
        -(0.1 * LN(0.1) + 0.6 * LN(0.6) + 0.3 * LN(0.3)),
        -(0.4 * LN(0.4) + 0.2 * LN(0.2) + 0.4 * LN(0.4)),
    ],
}

TWO_CLASS = [[0.7, 0.3], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]
HAND_COMPUTED_C2: dict[str, list[float]] = {
    "least-confidence": [0.3, 0.5, 0.0, 0.0],
    "margin": [1 - (0.7 - 0.3), 1.0, 0.0, 0.0],
    "ratio": [0.3 / 0.7, 1.0, 0.0, 0.0],
    "entropy": [-(0.7 * LN(0.7) + 0.3 * LN(0.3)), LN(2), 0.0, 0.0],
}


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_hand_computed_scores_three_classes(name: str) -> None:
    got = scores_of(name, pool(THREE_CLASS))
    # float32 inputs: 0.3 is stored as 0.30000001..., hence the 1e-6 tolerance.
    assert got == pytest.approx(HAND_COMPUTED[name], abs=1e-6)


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_one_hot_row_scores_exactly_zero(name: str) -> None:
    got = scores_of(name, pool([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert got == [0.0, 0.0]


def test_uniform_row_has_maximal_entropy_ln_c() -> None:
    for c in (2, 4, 5, 8):
        got = scores_of("entropy", pool([[1 / c] * c]))
        assert got[0] == pytest.approx(math.log(c), abs=1e-6)
        # and nothing beats it among a few non-uniform rows of the same width
        rng = np.random.default_rng(c)
        others = rng.dirichlet(np.ones(c), size=20).tolist()
        assert max(scores_of("entropy", pool(others))) < got[0]


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_two_class_scores(name: str) -> None:
    got = scores_of(name, pool(TWO_CLASS))
    assert got == pytest.approx(HAND_COMPUTED_C2[name], abs=1e-6)


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_single_class_scores_are_zero(name: str) -> None:
    # With one class the model is always certain: second probability counts as 0.
    got = scores_of(name, pool([[1.0], [1.0], [1.0]]))
    assert got == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_select_orders_descending_by_score(name: str) -> None:
    inputs = pool(THREE_CLASS)
    selection = make_strategy(name).select(None, inputs)
    expected = HAND_COMPUTED[name]
    ref = sorted(range(len(expected)), key=lambda i: (-round(expected[i], 6), i))
    assert selection.indices.tolist() == ref
    assert np.all(np.diff(selection.scores) <= 0)
    assert selection.scores.tolist() == pytest.approx([expected[i] for i in ref], abs=1e-6)


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_exact_ties_keep_input_order(name: str) -> None:
    a, b = [0.5, 0.3, 0.2], [0.8, 0.1, 0.1]
    # identical rows give bit-identical scores; a is more uncertain than b for every strategy
    inputs = pool([b, a, b, a, a, b])
    selection = make_strategy(name).select(None, inputs)
    assert selection.indices.tolist() == [1, 3, 4, 0, 2, 5]


def test_top_k_ties_are_stable() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.5, 0.1, 0.9])
    selection = top_k(scores, np.zeros(7, dtype=bool), None)
    assert selection.indices.tolist() == [1, 3, 6, 0, 2, 4, 5]
    assert selection.scores.tolist() == [0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.1]


def test_top_k_nan_scores_go_last_in_input_order() -> None:
    scores = np.array([np.nan, 0.2, np.nan, 0.7, 0.0, np.nan])
    selection = top_k(scores, np.zeros(6, dtype=bool), None)
    assert selection.indices.tolist() == [3, 1, 4, 0, 2, 5]
    assert np.isnan(selection.scores[3:]).all()
    # a budget that ends before the NaNs never picks one
    assert top_k(scores, np.zeros(6, dtype=bool), 3).indices.tolist() == [3, 1, 4]


def test_top_k_nan_sorts_after_negative_infinity() -> None:
    scores = np.array([np.nan, -np.inf, 1.0])
    selection = top_k(scores, np.zeros(3, dtype=bool), None)
    assert selection.indices.tolist() == [2, 1, 0]


def test_nan_probabilities_select_last() -> None:
    nan_row = [float("nan")] * 3
    inputs = pool([nan_row, [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    selection = make_strategy("least-confidence").select(None, inputs)
    assert selection.indices.tolist() == [1, 2, 0]
    assert math.isnan(selection.scores[-1])


@pytest.mark.parametrize("name", [*UNCERTAINTY, "random"])
def test_labeled_rows_never_selected(name: str) -> None:
    rows = [[0.34, 0.33, 0.33], [0.9, 0.05, 0.05], [0.5, 0.5, 0.0], [0.6, 0.2, 0.2], [1 / 3] * 3]
    labeled = [True, False, True, False, True]
    strategy = make_strategy(name, seed=4)
    selection = strategy.select(None, pool(rows, labeled))
    assert sorted(selection.indices.tolist()) == [1, 3]
    # the most uncertain rows are labeled: even budget 1 must not reach them
    assert selection.indices[0] in (1, 3)
    assert strategy.select(1, pool(rows, labeled)).indices.tolist() == selection.indices[:1].tolist()


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_budget_truncates_the_full_order(name: str) -> None:
    inputs = pool(THREE_CLASS)
    full = make_strategy(name).select(None, inputs)
    for budget in range(len(THREE_CLASS) + 1):
        part = make_strategy(name).select(budget, inputs)
        assert part.indices.tolist() == full.indices[:budget].tolist()
        assert part.scores.tolist() == full.scores[:budget].tolist()


@pytest.mark.parametrize("name", [*UNCERTAINTY, "random"])
def test_budget_larger_than_pool_returns_all_unlabeled(name: str) -> None:
    inputs = pool(THREE_CLASS, labeled=[False, True, False, False, True])
    selection = make_strategy(name).select(100, inputs)
    assert sorted(selection.indices.tolist()) == [0, 2, 3]
    assert selection.indices.tolist() == make_strategy(name).select(None, inputs).indices.tolist()


# --- brute-force references ------------------------------------------------------------------------


def ref_least_confidence(row: list[float]) -> float:
    return 1.0 - max(row)


def ref_margin(row: list[float]) -> float:
    ordered = sorted(row, reverse=True)
    return 1.0 - (ordered[0] - ordered[1])


def ref_ratio(row: list[float]) -> float:
    ordered = sorted(row, reverse=True)
    return ordered[1] / ordered[0]


def ref_entropy(row: list[float]) -> float:
    total = 0.0
    for p in row:
        if p > 0:
            total -= p * math.log(p)
    return total


REFERENCES: dict[str, Callable[[list[float]], float]] = {
    "least-confidence": ref_least_confidence,
    "margin": ref_margin,
    "ratio": ref_ratio,
    "entropy": ref_entropy,
}


@pytest.fixture(scope="module")
def random_pool() -> PoolInputs:
    rng = np.random.default_rng(20240607)
    raw = rng.random((200, 7)) ** 3  # skewed so some rows are confident
    raw[rng.random((200, 7)) < 0.1] = 0.0  # exact zeros exercise 0 log 0
    raw[:, 0] += 1e-3  # no all-zero rows
    probs = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
    probs[50] = probs[5]  # exact duplicates → exact score ties
    probs[120] = probs[5]
    probs[199] = probs[17]
    probs[33] = np.eye(7, dtype=np.float32)[2]
    labeled = rng.random(200) < 0.3
    labeled[5] = False
    labeled[50] = False
    labeled[120] = False
    return PoolInputs(probs=probs, labeled=labeled)


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_scores_match_per_row_loop(name: str, random_pool: PoolInputs) -> None:
    reference = REFERENCES[name]
    expected = [reference([float(p) for p in row]) for row in random_pool.probs]
    got = scores_of(name, random_pool)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", [*UNCERTAINTY, "random"])
def test_select_matches_sorted_reference(name: str, random_pool: PoolInputs) -> None:
    strategy = make_strategy(name, seed=11)
    score = [float(v) for v in strategy.score(random_pool)]
    unlabeled = set(np.flatnonzero(~random_pool.labeled).tolist())
    expected = [i for i in sorted(range(200), key=lambda i: (-score[i], i)) if i in unlabeled]
    selection = strategy.select(None, random_pool)
    assert selection.indices.tolist() == expected
    assert selection.scores.tolist() == [score[i] for i in expected]
    for budget in (0, 1, 17, len(expected), 500):
        assert strategy.select(budget, random_pool).indices.tolist() == expected[:budget]


def test_random_pool_has_exact_ties(random_pool: PoolInputs) -> None:
    # guards the fixture: the tie-order checks above are only meaningful with real ties
    score = make_strategy("entropy").score(random_pool)
    assert score[5] == score[50] == score[120]


# --- random ------------------------------------------------------------------------------------------


def random_order(seed: int, inputs: PoolInputs, budget: int | None = None) -> list[int]:
    return make_strategy("random", seed=seed).select(budget, inputs).indices.tolist()


def test_random_same_seed_same_order(random_pool: PoolInputs) -> None:
    assert random_order(7, random_pool) == random_order(7, random_pool)


def test_random_different_seeds_differ(random_pool: PoolInputs) -> None:
    orders = {tuple(random_order(seed, random_pool)) for seed in range(5)}
    assert len(orders) == 5


def test_random_scores_are_documented_pcg64_draw(random_pool: PoolInputs) -> None:
    got = make_strategy("random", seed=42).score(random_pool)
    np.testing.assert_array_equal(got, np.random.default_rng(42).random(200))


def test_random_ignores_global_numpy_rng(random_pool: PoolInputs) -> None:
    np.random.seed(1)
    first = random_order(3, random_pool)
    state = np.random.get_state()
    np.random.seed(2)
    second = random_order(3, random_pool)
    np.random.seed(1)
    random_order(3, random_pool)
    after = np.random.get_state()
    assert first == second
    # the global generator was not advanced either
    assert after[0] == state[0]
    np.testing.assert_array_equal(after[1], state[1])
    assert after[2:] == state[2:]


def test_random_covers_every_unlabeled_index_once(random_pool: PoolInputs) -> None:
    order = random_order(9, random_pool)
    assert len(order) == len(set(order))
    assert set(order) == set(np.flatnonzero(~random_pool.labeled).tolist())
    # a random order is not the identity order
    assert order != sorted(order)


# --- constructor rules and registry ------------------------------------------------------------------


def test_get_params_returns_constructor_params_unmodified() -> None:
    seed = np.int64(123)
    strategy = make_strategy("random", seed=seed)
    params = strategy.get_params()
    assert params == {"seed": 123}
    assert params["seed"] is seed
    assert make_strategy("random", seed=5).get_params() == {"seed": 5}
    for name in UNCERTAINTY:
        assert make_strategy(name).get_params() == {}


def test_get_params_round_trips_through_constructor() -> None:
    for name, cls in available().items():
        params = make_strategy(name, seed=17).get_params()
        clone = cls(**params)
        assert clone.get_params() == params
        assert repr(clone) == repr(make_strategy(name, seed=17))


def test_make_strategy_ignores_unaccepted_params() -> None:
    strategy = make_strategy("entropy", seed=3, budget=10)
    assert type(strategy) is available()["entropy"]
    assert strategy.get_params() == {}
    assert not hasattr(strategy, "seed")


def test_make_strategy_unknown_name_lists_every_strategy() -> None:
    with pytest.raises(UsageError) as excinfo:
        make_strategy("no-such-strategy")
    message = str(excinfo.value)
    assert "no-such-strategy" in message
    for name in available():
        assert name in message


def test_registry_entries_are_well_formed() -> None:
    registered = available()
    assert set(UNCERTAINTY) | {"random"} <= set(registered)
    assert list(registered) == sorted(registered)
    for name, cls in registered.items():
        assert issubclass(cls, Strategy)
        assert cls.name == name
        assert cls.name.strip()
        assert cls.summary.strip()
        assert cls.needs <= {"probs", "embeddings", "mc_probs", "loss_pred"}
