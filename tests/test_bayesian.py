"""Bayesian strategies over mc_probs [N, T, C]: hand-computed formulas, brute-force BatchBALD, power."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import alselect.strategies.bayesian as bayesian
from alselect.errors import UsageError
from alselect.strategies import PoolInputs, available, build_strategy, make_strategy, top_k
from alselect.strategies.batchbald import GAIN_FLOOR, batchbald, joint_gains
from alselect.strategies.power import perturbed_scores, power_order

LN = math.log
PER_IMAGE = (
    "mc-entropy",
    "bald",
    "variation-ratio",
    "mean-std",
    "vote-entropy",
    "consensus-entropy",
    "kl-disagreement",
)
POWER = ("power-bald", "power-entropy")
ALL_NEW = (*PER_IMAGE, *POWER, "batchbald")


def mc_pool(
    mc: object, labeled: list[bool] | np.ndarray | None = None, pending: np.ndarray | None = None
) -> PoolInputs:
    probs = np.asarray(mc)
    n = probs.shape[0]
    mask = np.zeros(n, dtype=bool) if labeled is None else np.asarray(labeled, dtype=bool)
    return PoolInputs(probs=probs.mean(axis=1), labeled=mask, pending=pending, mc_probs=probs)


def scores_of(name: str, mc: object) -> np.ndarray:
    inputs = mc_pool(mc)
    result = np.asarray(make_strategy(name).score(inputs), dtype=np.float64)
    assert result.shape == (inputs.size,)
    return result


def dirichlet_pool(seed: int, n: int, t: int, c: int, alpha: float = 0.5) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(c, alpha), size=(n, t))


# --- hand-computed per-image scores ------------------------------------------------------------------

# Row 0: two passes that disagree; row 1: three identical passes; row 2: four one-hot passes.
DISAGREE = [[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]
AGREE = [[0.5, 0.3, 0.2]] * 3
ONE_HOT = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def h(*p: float) -> float:
    return -sum(x * LN(x) for x in p if x > 0)


H_DISAGREE_MEAN = h(0.4, 0.2, 0.4)
H_DISAGREE_PASS = h(0.7, 0.2, 0.1)
HAND: dict[str, dict[str, float]] = {
    "disagree": {
        "mc-entropy": H_DISAGREE_MEAN,
        "bald": H_DISAGREE_MEAN - H_DISAGREE_PASS,
        # both passes are at KL 0.7 ln(0.7/0.4) + 0.2 ln 1 + 0.1 ln(0.1/0.4) from the mean
        "kl-disagreement": 0.7 * LN(0.7 / 0.4) + 0.1 * LN(0.1 / 0.4),
        "variation-ratio": 0.5,  # votes: class 0 once, class 2 once
        "vote-entropy": LN(2),
        "mean-std": (0.3 + 0.0 + 0.3) / 3,  # population std of (0.7, 0.1) is 0.3
    },
    "agree": {
        "mc-entropy": h(0.5, 0.3, 0.2),
        "bald": 0.0,
        "kl-disagreement": 0.0,
        "variation-ratio": 0.0,
        "vote-entropy": 0.0,
        "mean-std": 0.0,
    },
    "one-hot": {
        "mc-entropy": h(0.25, 0.5, 0.25),
        "bald": h(0.25, 0.5, 0.25),  # every pass is certain: all entropy is disagreement
        "kl-disagreement": h(0.25, 0.5, 0.25),
        "variation-ratio": 0.5,
        "vote-entropy": h(0.25, 0.5, 0.25),
        "mean-std": (math.sqrt(0.25 * 0.75) + 0.5 + math.sqrt(0.25 * 0.75)) / 3,
    },
}
HAND["disagree"]["consensus-entropy"] = HAND["disagree"]["mc-entropy"]
HAND["agree"]["consensus-entropy"] = HAND["agree"]["mc-entropy"]
HAND["one-hot"]["consensus-entropy"] = HAND["one-hot"]["mc-entropy"]
ROWS = {"disagree": DISAGREE, "agree": AGREE, "one-hot": ONE_HOT}


@pytest.mark.parametrize("name", PER_IMAGE)
@pytest.mark.parametrize("case", list(ROWS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hand_computed_scores(name: str, case: str, dtype: type) -> None:
    got = scores_of(name, np.asarray([ROWS[case]], dtype=dtype))
    assert got[0] == pytest.approx(HAND[case][name], abs=1e-6 if dtype is np.float32 else 1e-12)


def test_hand_computed_identities_hold() -> None:
    # guards the table: BALD = H[mean] - E H, and KL-to-the-mean equals it
    assert HAND["disagree"]["bald"] == pytest.approx(HAND["disagree"]["kl-disagreement"], abs=1e-15)


def test_mc_entropy_is_entropy_of_the_mean_not_expected_entropy() -> None:
    # modAL's bug: the mean of the per-pass entropies. Here it would be 0 (certain passes).
    got = scores_of("mc-entropy", [ONE_HOT])
    assert got[0] == pytest.approx(1.5 * LN(2), abs=1e-12)
    assert bayesian.expected_entropy(np.asarray([ONE_HOT]))[0] == 0.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_bald_is_exactly_zero_when_all_passes_agree(dtype: type) -> None:
    rng = np.random.default_rng(3)
    rows = rng.dirichlet(np.ones(7), size=50)
    mc = np.repeat(rows[:, None, :], 20, axis=1).astype(dtype)
    got = scores_of("bald", mc)
    if dtype is np.float64:
        assert np.all(np.abs(got) <= 1e-12)
    else:  # the float64 mean of T equal float32/float16 values is exact, so each KL term is 0
        assert np.all(got == 0.0)
    assert np.all(scores_of("kl-disagreement", mc) == got)


def test_bald_is_nonnegative_and_bounded_by_entropy_and_log_t() -> None:
    mc = dirichlet_pool(5, 400, 6, 5, alpha=0.3)
    mc[mc < 0.02] = 0.0  # exact zeros: 0 log 0 = 0
    mc /= mc.sum(axis=2, keepdims=True)
    mc[7, :] = mc[7, 0]  # agreeing passes
    got = scores_of("bald", mc)
    assert np.all(got >= 0.0)
    assert got[7] <= 1e-15  # float64 input: the mean of equal passes may be off by an ulp
    assert np.all(got <= scores_of("mc-entropy", mc) + 1e-12)
    assert np.all(got <= LN(6) + 1e-12)  # mutual information with a uniform ω over 6 passes


def test_variation_ratio_uses_the_mode_of_predicted_labels_not_the_mean() -> None:
    # x: two of three passes vote class 0 though the mean favours class 1 → VR 1/3, 1 - max p̄ = 0.4
    # y: every pass votes class 1 → VR 0, though 1 - max p̄ = 0.45 is larger than x's
    x = [[0.6, 0.4], [0.6, 0.4], [0.0, 1.0]]
    y = [[0.45, 0.55]] * 3
    got = scores_of("variation-ratio", [x, y])
    assert got.tolist() == pytest.approx([1 / 3, 0.0], abs=1e-12)
    mean = np.asarray([x, y]).mean(axis=1)
    least_confidence_of_mean = 1 - mean.max(axis=1)
    assert least_confidence_of_mean.tolist() == pytest.approx([0.4, 0.45])
    # the two definitions rank the rows oppositely
    assert make_strategy("variation-ratio").select(None, mc_pool([x, y])).indices.tolist() == [0, 1]


def test_argmax_ties_vote_for_the_lowest_class() -> None:
    passes = [[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]  # the tied passes vote class 0
    assert scores_of("variation-ratio", [passes])[0] == pytest.approx(1 / 3, abs=1e-12)
    assert scores_of("vote-entropy", [passes])[0] == pytest.approx(h(2 / 3, 1 / 3), abs=1e-12)
    counts = bayesian.vote_counts(np.asarray([passes]))
    assert counts.tolist() == [[2, 1]]


def test_vote_entropy_counts_votes_not_probabilities() -> None:
    # 5 members: votes 3 × class 0, 2 × class 2; soft probabilities play no part
    members = [[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]
    assert scores_of("vote-entropy", [members])[0] == pytest.approx(h(0.6, 0.4), abs=1e-12)
    assert scores_of("variation-ratio", [members])[0] == pytest.approx(0.4, abs=1e-12)


# brute-force per-row references in plain Python


def ref_rows(mc: np.ndarray) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in HAND["agree"]}
    for row in mc.tolist():
        t, c = len(row), len(row[0])
        mean = [sum(row[k][j] for k in range(t)) / t for j in range(c)]
        h_mean = h(*mean)
        h_each = sum(h(*p) for p in row) / t
        kl = 0.0
        for p in row:
            kl += sum(x * LN(x / m) for x, m in zip(p, mean, strict=True) if x > 0) / t
        votes = [0] * c
        for p in row:
            votes[max(range(c), key=lambda j, p=p: (p[j], -j))] += 1
        std = [math.sqrt(sum((p[j] - mean[j]) ** 2 for p in row) / t) for j in range(c)]
        out["mc-entropy"].append(h_mean)
        out["consensus-entropy"].append(h_mean)
        out["bald"].append(h_mean - h_each)
        out["kl-disagreement"].append(kl)
        out["variation-ratio"].append(1 - max(votes) / t)
        out["vote-entropy"].append(h(*(v / t for v in votes)))
        out["mean-std"].append(sum(std) / c)
    return out


@pytest.fixture(scope="module")
def random_mc() -> np.ndarray:
    mc = dirichlet_pool(11, 150, 7, 4, alpha=0.4)
    mc[mc < 0.03] = 0.0
    mc /= mc.sum(axis=2, keepdims=True)
    mc[10] = mc[3]  # duplicate rows: exact ties
    mc[20, :, :] = 0.0
    mc[20, :, 1] = 1.0  # all passes certain and agreeing
    return mc


@pytest.mark.parametrize("name", PER_IMAGE)
def test_scores_match_per_row_loop(name: str, random_mc: np.ndarray) -> None:
    expected = ref_rows(random_mc)[name]
    assert scores_of(name, random_mc).tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", PER_IMAGE)
def test_chunking_does_not_change_scores(
    name: str, random_mc: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = scores_of(name, random_mc)
    monkeypatch.setattr(bayesian, "CHUNK_VALUES", 3 * 7 * 4)  # three rows per chunk, a ragged tail
    np.testing.assert_array_equal(scores_of(name, random_mc), whole)


@pytest.mark.parametrize("name", PER_IMAGE)
def test_float16_input_close_to_float64(name: str, random_mc: np.ndarray) -> None:
    # float16 rounds probabilities by up to ~5e-4; scores move by about that much
    np.testing.assert_allclose(
        scores_of(name, random_mc.astype(np.float16)), scores_of(name, random_mc), atol=5e-3
    )


@pytest.mark.parametrize("name", PER_IMAGE)
def test_single_pass_and_single_class(name: str) -> None:
    one_pass = np.asarray([[[0.2, 0.8]], [[0.5, 0.5]]])
    got = scores_of(name, one_pass)
    if name in ("mc-entropy", "consensus-entropy"):
        assert got.tolist() == pytest.approx([h(0.2, 0.8), LN(2)], abs=1e-12)
    else:  # one pass cannot disagree with itself
        assert got.tolist() == [0.0, 0.0]
    assert scores_of(name, np.ones((3, 5, 1))).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", [*PER_IMAGE, *POWER])
def test_nan_rows_score_nan_and_select_last(name: str) -> None:
    mc = np.asarray([DISAGREE, DISAGREE, DISAGREE], dtype=np.float32)
    mc[1] = [[0.4, 0.2, 0.4], [0.45, 0.1, 0.45]]
    mc[0, 1, 2] = np.nan
    strategy = make_strategy(name, seed=1)
    assert np.isnan(np.asarray(strategy.score(mc_pool(mc)))[0])
    selection = strategy.select(None, mc_pool(mc))
    assert selection.indices[-1] == 0
    assert np.isnan(selection.scores[-1])
    assert strategy.select(2, mc_pool(mc)).indices.tolist() == selection.indices[:2].tolist()


@pytest.mark.parametrize("name", ALL_NEW)
def test_labeled_and_pending_rows_never_selected(name: str, random_mc: np.ndarray) -> None:
    n = random_mc.shape[0]
    bald_order = np.argsort(-bayesian.bald(random_mc), kind="stable")
    labeled = np.zeros(n, dtype=bool)
    pending = np.zeros(n, dtype=bool)
    labeled[bald_order[:10]] = True  # the most informative rows are taken
    pending[bald_order[10:20]] = True
    pending[::7] = True
    inputs = mc_pool(random_mc, labeled, pending)
    allowed = set(np.flatnonzero(~labeled & ~pending).tolist())
    strategy = make_strategy(name, seed=2, num_samples=500)  # only batchbald takes num_samples
    for budget in (1, 5, 40):
        chosen = strategy.select(budget, inputs).indices.tolist()
        assert len(chosen) == len(set(chosen)) == budget
        assert set(chosen) <= allowed
    if name != "batchbald":
        full = strategy.select(None, inputs).indices.tolist()
        assert sorted(full) == sorted(allowed)


@pytest.mark.parametrize("name", PER_IMAGE)
def test_select_orders_by_score_with_ties_in_row_order(name: str, random_mc: np.ndarray) -> None:
    strategy = make_strategy(name)
    score = strategy.score(mc_pool(random_mc))
    selection = strategy.select(None, mc_pool(random_mc))
    expected = sorted(range(len(score)), key=lambda i: (-score[i], i))
    assert selection.indices.tolist() == expected
    assert score[3] == score[10]
    assert expected.index(3) < expected.index(10)


@pytest.mark.parametrize("name", ALL_NEW)
def test_missing_mc_probs_is_a_usage_error(name: str) -> None:
    inputs = PoolInputs(probs=np.full((3, 2), 0.5), labeled=np.zeros(3, dtype=bool))
    with pytest.raises(UsageError, match="mc_probs"):
        make_strategy(name).select(2, inputs)


def test_registry_entries() -> None:
    registered = available()
    for name in ALL_NEW:
        cls = registered[name]
        assert cls.needs == {"mc_probs"}
        assert cls.summary.strip() and cls.score_meaning.strip()
        assert cls.batch_aware == (name == "batchbald")


def test_params_from_the_command_line() -> None:
    strategy = build_strategy(
        "batchbald", seed=4, params={"num_samples": "500", "prefilter": "2000", "lazy": "false"}
    )
    assert strategy.get_params() == {
        "num_samples": 500,
        "prefilter": 2000,
        "lazy": False,
        "device": "cpu",
        "seed": 4,
    }
    assert build_strategy("power-bald", params={"temperature": "0.5"}).get_params() == {
        "temperature": 0.5,
        "seed": 0,
    }
    with pytest.raises(UsageError, match="temperature"):
        build_strategy("bald", params={"temperature": "2"})


# --- power sampling ---------------------------------------------------------------------------------


def power_indices(
    scores: list[float], seed: int, temperature: float = 1.0, budget: int | None = None
) -> list[int]:
    excluded = np.zeros(len(scores), dtype=bool)
    return power_order(
        np.asarray(scores), excluded, budget, temperature=temperature, seed=seed
    ).indices.tolist()


def test_power_first_pick_frequencies_follow_score_power() -> None:
    scores = [0.5, 1.0, 2.0, 4.0, 0.0]
    trials = 4000
    for temperature in (1.0, 0.5, 2.0):
        weights = np.asarray([s ** (1 / temperature) for s in scores])
        expected = weights / weights.sum()
        firsts = np.bincount(
            [power_indices(scores, seed, temperature, 1)[0] for seed in range(trials)], minlength=5
        )
        observed = firsts / trials
        # binomial standard error ≤ 0.008 here; 0.035 is over 4 of them, and the seeds are fixed
        np.testing.assert_allclose(observed, expected, atol=0.035)
        assert firsts[4] == 0  # a zero score is never drawn while a positive one is left


def test_power_second_pick_follows_sampling_without_replacement() -> None:
    # P(second = j | first = i) = w_j / (W - w_i): check P(second = 0) summed over first picks
    w = np.asarray([1.0, 2.0, 3.0])
    expected = sum(w[i] / w.sum() * w[0] / (w.sum() - w[i]) for i in (1, 2))
    seconds = [power_indices(w.tolist(), seed)[1] for seed in range(4000)]
    assert np.mean(np.asarray(seconds) == 0) == pytest.approx(expected, abs=0.03)


def test_power_order_is_reproducible_and_seed_dependent() -> None:
    scores = np.random.default_rng(0).random(200).tolist()
    first = power_indices(scores, 7)
    assert first == power_indices(scores, 7)
    assert first != power_indices(scores, 8)
    assert sorted(first) == list(range(200))  # a permutation: no index repeats


def test_power_zero_scores_last_in_row_order_then_nan() -> None:
    scores = [0.0, 0.3, np.nan, 0.0, 0.9, 0.0, 0.1]
    for seed in range(20):
        order = power_indices(scores, seed)
        assert sorted(order[:3]) == [1, 4, 6]
        assert order[3:] == [0, 3, 5, 2]


def test_power_scores_are_perturbed_keys_non_increasing() -> None:
    scores = np.random.default_rng(1).random(50)
    selection = power_order(scores, np.zeros(50, dtype=bool), None, temperature=0.7, seed=3)
    assert np.all(np.diff(selection.scores) <= 0)
    exponential = np.random.default_rng(3).standard_exponential(50)
    np.testing.assert_allclose(selection.scores, (scores * exponential**-0.7)[selection.indices], rtol=1e-12)


def test_power_low_temperature_approaches_top_k() -> None:
    scores = np.linspace(0.1, 1.0, 30)[::-1].copy()
    assert power_indices(scores.tolist(), 5, temperature=1e-3) == list(range(30))
    perturbed = perturbed_scores(scores, temperature=1e-3, seed=5)
    np.testing.assert_allclose(perturbed, scores, rtol=0.1)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_power_temperature_must_be_positive(temperature: float) -> None:
    with pytest.raises(UsageError, match="temperature"):
        power_indices([1.0, 2.0], 0, temperature)


def test_power_noise_per_row_does_not_depend_on_exclusions() -> None:
    scores = np.random.default_rng(2).random(40)
    everything = power_order(scores, np.zeros(40, dtype=bool), None, temperature=1.0, seed=9)
    excluded = np.zeros(40, dtype=bool)
    excluded[::3] = True
    some = power_order(scores, excluded, None, temperature=1.0, seed=9)
    assert some.indices.tolist() == [i for i in everything.indices.tolist() if not excluded[i]]


@pytest.mark.parametrize("name", POWER)
def test_power_strategies_rank_their_base_score(name: str, random_mc: np.ndarray) -> None:
    base = bayesian.bald(random_mc) if name == "power-bald" else bayesian.mc_entropy(random_mc)
    strategy = make_strategy(name, temperature=0.5, seed=6)
    selection = strategy.select(None, mc_pool(random_mc))
    expected = power_order(base, np.zeros(len(base), dtype=bool), None, temperature=0.5, seed=6)
    assert selection.indices.tolist() == expected.indices.tolist()
    np.testing.assert_array_equal(selection.scores, expected.scores)
    # score() gives the same perturbed values; sorting it gives the same order
    score = strategy.score(mc_pool(random_mc))
    assert top_k(score, np.zeros(len(base), dtype=bool), None).indices.tolist() == selection.indices.tolist()


# --- BatchBALD: brute force ------------------------------------------------------------------------


def joint_mi(mc: np.ndarray, rows: list[int]) -> float:
    """I[y_rows; ω] by enumerating every label configuration of the rows."""
    t, c = mc.shape[1], mc.shape[2]
    joint_entropy = 0.0
    for labels in itertools.product(range(c), repeat=len(rows)):
        p = sum(math.prod(mc[r, k, y] for r, y in zip(rows, labels, strict=True)) for k in range(t)) / t
        if p > 0:
            joint_entropy -= p * math.log(p)
    conditional = sum(sum(h(*mc[r, k]) for k in range(t)) / t for r in rows)
    return joint_entropy - conditional


def brute_greedy(mc: np.ndarray, budget: int) -> tuple[list[int], list[float]]:
    picks: list[int] = []
    gains: list[float] = []
    current = 0.0
    bald_scores = [joint_mi(mc, [i]) for i in range(mc.shape[0])]
    for _ in range(budget):
        rest = [i for i in range(mc.shape[0]) if i not in picks]
        values = {i: joint_mi(mc, [*picks, i]) - current for i in rest}
        best = max(rest, key=lambda i: (values[i], -i))
        if values[best] < GAIN_FLOOR:  # documented: the rest follow BALD order
            tail = sorted(rest, key=lambda i: (-bald_scores[i], i))
            picks += tail[: budget - len(picks)]
            gains += [0.0] * (budget - len(gains))
            break
        picks.append(best)
        gains.append(values[best])
        current += values[best]
    return picks, gains


BRUTE_CASES = [
    (seed, n, t, c, b)
    for seed, (n, t, c, b) in enumerate(
        [
            (5, 4, 2, 3),
            (6, 5, 3, 3),
            (7, 8, 2, 3),
            (8, 6, 3, 3),
            (8, 10, 3, 2),
            (6, 3, 3, 3),
            (8, 7, 2, 3),
            (4, 6, 3, 3),
        ]
        * 3
    )
]


@pytest.mark.parametrize(("seed", "n", "t", "c", "b"), BRUTE_CASES)
@pytest.mark.parametrize("lazy", [True, False])
def test_batchbald_matches_brute_force_greedy(seed: int, n: int, t: int, c: int, b: int, lazy: bool) -> None:
    mc = dirichlet_pool(100 + seed, n, t, c, alpha=0.6)
    picks, gains = brute_greedy(mc, b)
    result = batchbald(mc, np.zeros(n, dtype=bool), b, lazy=lazy, prefilter=n)
    assert result.indices.tolist() == picks
    np.testing.assert_allclose(result.gains, gains, atol=1e-10)
    assert result.exact_steps == b


def test_joint_gains_match_brute_force() -> None:
    mc = dirichlet_pool(42, 7, 6, 3, alpha=0.6)
    for picked in ([], [2], [2, 5], [0, 3, 6]):
        got = joint_gains(mc[picked].reshape(len(picked), 6, 3), mc)
        base = joint_mi(mc, picked) if picked else 0.0
        expected = [joint_mi(mc, [*picked, i]) - base for i in range(7)]
        np.testing.assert_allclose(got, expected, atol=1e-12)


def test_brute_force_cases_exercise_the_greedy() -> None:
    # guards the cases above: most runs must reach the budget on real gains, not the BALD tail
    full = sum(
        min(brute_greedy(dirichlet_pool(100 + s, n, t, c, 0.6), b)[1]) > GAIN_FLOOR
        for s, n, t, c, b in BRUTE_CASES
    )
    assert full >= len(BRUTE_CASES) - 3


def test_batchbald_first_pick_is_bald_argmax() -> None:
    for seed in range(10):
        mc = dirichlet_pool(seed, 60, 5, 4)
        mc[17] = mc[40]  # a tie, possibly at the top
        excluded = np.zeros(60, dtype=bool)
        excluded[seed * 3] = True
        score = bayesian.bald(mc)
        expected = top_k(score, excluded, 1)
        result = batchbald(mc, excluded, 3)
        assert result.indices[0] == expected.indices[0]
        assert result.gains[0] == expected.scores[0]


def test_batchbald_avoids_a_duplicate_that_adds_nothing() -> None:
    # Four passes. a and its copy split the passes {0,1} vs {2,3}; b splits {0,2} vs {1,3} and is
    # a little less certain. BALD picks a and its copy; BatchBALD knows the copy tells nothing new.
    a = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    b = [[0.95, 0.05], [0.05, 0.95], [0.95, 0.05], [0.05, 0.95]]
    mc = np.asarray([a, a, b, [[0.5, 0.5]] * 4])
    assert make_strategy("bald").select(2, mc_pool(mc)).indices.tolist() == [0, 1]
    result = batchbald(mc, np.zeros(4, dtype=bool), 3)
    assert result.indices.tolist()[:2] == [0, 2]
    assert result.gains[1] == pytest.approx(joint_mi(mc, [0, 2]) - joint_mi(mc, [0]), abs=1e-12)


def test_batchbald_after_the_information_runs_out_follows_bald_order() -> None:
    # two passes, and row 0 tells them apart for sure: after it nothing has any gain left
    mc = np.asarray(
        [
            [[1.0, 0.0], [0.0, 1.0]],
            [[0.3, 0.7], [0.7, 0.3]],
            [[0.5, 0.5], [0.5, 0.5]],
            [[0.1, 0.9], [0.9, 0.1]],
            [[0.4, 0.6], [0.6, 0.4]],
        ]
    )
    result = batchbald(mc, np.zeros(5, dtype=bool), 5)
    assert result.indices.tolist() == [0, 3, 1, 4, 2]  # then BALD order
    assert result.gains[0] == pytest.approx(LN(2))
    assert result.scores.tolist()[1:] == [0.0] * 4


def test_batchbald_single_pass_and_single_class() -> None:
    for mc in (dirichlet_pool(1, 9, 1, 3), np.ones((9, 4, 1))):
        result = batchbald(mc, np.zeros(9, dtype=bool), 4)
        assert result.indices.tolist() == [0, 1, 2, 3]  # every score is 0: row order
        assert result.scores.tolist() == [0.0] * 4


def mc_dropout_like(seed: int, n: int, t: int, c: int, dims: int = 16, scale: float = 2.0) -> np.ndarray:
    """Dropout on a random embedding before a random linear head: the same T masks for every row."""
    rng = np.random.default_rng(seed)
    head = rng.standard_normal((dims, c)) * scale / math.sqrt(dims)
    masks = (rng.random((t, dims)) < 0.5) * 2.0
    logits = np.einsum("nd,td,dc->ntc", rng.standard_normal((n, dims)), masks, head)
    logits -= logits.max(axis=2, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=2, keepdims=True)


def test_batchbald_sampled_path_approximates_exact() -> None:
    mc = mc_dropout_like(4, 60, 40, 5)
    excluded = np.zeros(60, dtype=bool)
    exact = batchbald(mc, excluded, 7, num_samples=20_000)
    assert exact.exact_steps == 7  # 5^6 = 15625 configurations at most
    assert exact.gains[-1] > 0.1  # guard: informative to the end, not the BALD tail
    for seed in range(2):
        sampled = batchbald(mc, excluded, 7, num_samples=3000, seed=seed)
        assert sampled.exact_steps == 5  # 5^5 configurations > 3000: the last 2 gains are sampled
        assert sampled.indices.tolist() == exact.indices.tolist()
        np.testing.assert_array_equal(sampled.gains[:5], exact.gains[:5])
        np.testing.assert_allclose(sampled.gains, exact.gains, rtol=0.05, atol=0.005)


def test_batchbald_lazy_equals_full_evaluation_in_the_sampled_phase() -> None:
    mc = mc_dropout_like(8, 400, 12, 4)
    excluded = np.zeros(400, dtype=bool)
    lazy = batchbald(mc, excluded, 12, num_samples=300, seed=3)
    full = batchbald(mc, excluded, 12, num_samples=300, seed=3, lazy=False)
    assert lazy.exact_steps < 12  # the comparison covers sampled steps
    assert lazy.indices.tolist() == full.indices.tolist()
    np.testing.assert_allclose(lazy.gains, full.gains, atol=1e-12)
    assert lazy.evaluations < full.evaluations


def test_batchbald_is_deterministic_for_a_seed() -> None:
    mc = mc_dropout_like(9, 200, 10, 6)
    excluded = np.zeros(200, dtype=bool)
    first = batchbald(mc, excluded, 10, num_samples=200, seed=5)
    again = batchbald(mc, excluded, 10, num_samples=200, seed=5)
    assert first.indices.tolist() == again.indices.tolist()
    np.testing.assert_array_equal(first.gains, again.gains)


def test_batchbald_scores_non_increasing_and_selection_matches() -> None:
    mc = mc_dropout_like(2, 300, 16, 5)
    inputs = mc_pool(mc)
    strategy = make_strategy("batchbald", num_samples=500, seed=1)
    selection = strategy.select(15, inputs)
    result = batchbald(mc, inputs.excluded, 15, num_samples=500, seed=1)
    assert selection.indices.tolist() == result.indices.tolist()
    np.testing.assert_array_equal(selection.scores, result.scores)
    assert np.all(np.diff(selection.scores) <= 0)
    assert np.all(selection.scores >= 0)
    assert selection.scores[0] == bayesian.bald(mc)[selection.indices[0]]


def test_batchbald_prefilter_limits_the_candidates() -> None:
    mc = mc_dropout_like(3, 500, 8, 4)
    score = bayesian.bald(mc)
    result = batchbald(mc, np.zeros(500, dtype=bool), 5, prefilter=20)
    assert result.candidates == 20
    assert set(result.indices.tolist()) <= set(np.argsort(-score, kind="stable")[:20].tolist())
    assert batchbald(mc, np.zeros(500, dtype=bool), 5).candidates == 500  # default max(10·5, 1000)


def test_batchbald_needs_a_budget_and_sane_options() -> None:
    inputs = mc_pool(dirichlet_pool(0, 10, 3, 2))
    with pytest.raises(UsageError, match="budget"):
        make_strategy("batchbald").select(None, inputs)
    with pytest.raises(UsageError, match="prefilter"):
        make_strategy("batchbald", prefilter=3).select(5, inputs)
    with pytest.raises(UsageError, match="num_samples"):
        make_strategy("batchbald", num_samples=0).select(5, inputs)
    with pytest.raises(UsageError, match="no per-image score"):
        make_strategy("batchbald").score(inputs)


def test_batchbald_budget_edges_and_nan_rows() -> None:
    mc = dirichlet_pool(6, 8, 4, 3)
    mc[2, 1, 0] = np.nan
    excluded = np.zeros(8, dtype=bool)
    excluded[5] = True
    assert batchbald(mc, excluded, 0).indices.tolist() == []
    result = batchbald(mc, excluded, 20)  # more than there is: every finite row, then the NaN one
    assert sorted(result.indices[:-1].tolist()) == [0, 1, 3, 4, 6, 7]
    assert result.indices[-1] == 2
    assert np.isnan(result.scores[-1]) and np.all(np.isfinite(result.scores[:-1]))
    assert batchbald(mc, np.ones(8, dtype=bool), 3).indices.tolist() == []
