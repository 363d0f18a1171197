"""compose(): prefilter and class-balancing wrappers, index mapping and context rows."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from alselect.errors import UsageError
from alselect.strategies import PoolInputs, Selection, Strategy, make_strategy, top_k
from alselect.strategies.compose import (
    ClassBalanced,
    Prefiltered,
    balanced_quotas,
    compose,
    parse_prefilter,
    subpool,
)
from alselect.strategies.uncertainty import top_two
from tests.conftest import SAMPLE_DATA
from tests.helpers import cli


class Recorder(Strategy):
    """Ranks rows by ``arrays["value"]`` and remembers the inputs it was given."""

    name = "recorder"
    summary = "test double"
    needs = frozenset({"value"})
    score_meaning = "the value"
    batch_aware = False
    seen: ClassVar[list[PoolInputs]] = []

    def __init__(self) -> None:
        pass

    def score(self, inputs: PoolInputs) -> np.ndarray:
        Recorder.seen.append(inputs)
        return inputs.arrays["value"]


def make_pool(n: int = 40, classes: int = 3, seed: int = 0) -> PoolInputs:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(classes), n).astype(np.float32)
    labeled = np.zeros(n, dtype=bool)
    labeled[[1, 7, 20]] = True
    pending = np.zeros(n, dtype=bool)
    pending[[3, 30]] = True
    emb = rng.standard_normal((n, 4)).astype(np.float32)
    return PoolInputs(
        probs=probs, labeled=labeled, embeddings=emb, pending=pending, arrays={"value": rng.random(n)}
    )


def test_subpool_keeps_context_rows_in_pool_order() -> None:
    inputs = make_pool()
    sub, rows = subpool(inputs, np.array([25, 5, 11]))
    assert rows.tolist() == [1, 3, 5, 7, 11, 20, 25, 30]
    assert sub.labeled.tolist() == [True, False, False, True, False, True, False, False]
    assert sub.pending is not None and sub.pending.tolist() == [
        False,
        True,
        False,
        False,
        False,
        False,
        False,
        True,
    ]
    assert sub.embeddings is not None
    np.testing.assert_array_equal(sub.embeddings, inputs.embeddings[rows])
    np.testing.assert_array_equal(sub.probs, inputs.probs[rows])
    np.testing.assert_array_equal(sub.arrays["value"], inputs.arrays["value"][rows])
    assert (~sub.excluded).sum() == 3


def test_prefilter_maps_indices_back_and_passes_context() -> None:
    inputs = make_pool()
    Recorder.seen.clear()
    margin_top = make_strategy("margin").select(6, inputs).indices
    wrapped = compose(Recorder(), prefilter=(make_strategy("margin"), 6))
    selection = wrapped.select(4, inputs)
    given = Recorder.seen[-1]
    assert given.size == 6 + 5  # the six kept candidates plus 3 labeled and 2 pending rows
    kept = set(margin_top.tolist())
    assert set(selection.indices.tolist()) <= kept
    expected = sorted(kept, key=lambda i: (-inputs.arrays["value"][i], i))[:4]
    assert selection.indices.tolist() == expected
    np.testing.assert_array_equal(selection.scores, inputs.arrays["value"][expected])


def test_prefiltered_coreset_still_measures_distance_to_the_labeled_set() -> None:
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((60, 3)).astype(np.float32)
    probs = rng.dirichlet(np.ones(3), 60).astype(np.float32)
    labeled = np.zeros(60, dtype=bool)
    labeled[[2, 9]] = True
    top = top_k(1 - (top_two(probs)[0] - top_two(probs)[1]), labeled, 12).indices
    far = int(top[0])
    emb[2] = emb[far] + 1e-3  # the most uncertain image sits right next to a labeled one
    inputs = PoolInputs(probs=probs, labeled=labeled, embeddings=emb)
    selection = compose(make_strategy("coreset"), prefilter=(make_strategy("margin"), 12)).select(12, inputs)
    assert sorted(selection.indices.tolist()) == sorted(top.tolist())
    assert selection.indices[-1] == far  # covered by its labeled neighbour: last
    # brute force: k-center over the kept candidates, distances to labeled rows 2 and 9
    x = emb.astype(np.float64)
    covered, picks = [2, 9], []
    for _ in range(12):
        rest = [i for i in top.tolist() if i not in picks]
        d = [min(((x[i] - x[c]) ** 2).sum() for c in covered + picks) for i in rest]
        picks.append(rest[int(np.argmax(d))])
    assert selection.indices.tolist() == picks


def test_balanced_ranking_base_round_robin_fewer_labeled_first() -> None:
    inputs = make_pool(n=60, seed=1)
    predicted = inputs.probs.argmax(axis=1)
    covered = np.bincount(predicted[inputs.excluded], minlength=3)
    priority = sorted(range(3), key=lambda c: (covered[c], c))
    selection = compose(make_strategy("entropy"), balance_classes=True).select(10, inputs)
    classes = predicted[selection.indices]
    counts = np.bincount(classes, minlength=3)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 10
    assert classes[:3].tolist() == priority  # each round visits classes in priority order
    full = make_strategy("entropy").select(None, inputs).indices
    for c in range(3):
        mine = selection.indices[classes == c].tolist()
        assert mine == [i for i in full.tolist() if predicted[i] == c][: len(mine)]
    assert selection.scores.tolist() == [4.0] * 3 + [3.0] * 3 + [2.0] * 3 + [1.0]


def test_balanced_when_a_class_runs_out() -> None:
    probs = np.array(
        [[0.9, 0.05, 0.05]] * 2 + [[0.1, 0.8, 0.1]] * 10 + [[0.1, 0.1, 0.8]] * 10, dtype=np.float32
    )
    inputs = PoolInputs(probs=probs, labeled=np.zeros(22, dtype=bool))
    selection = compose(make_strategy("margin"), balance_classes=True).select(12, inputs)
    counts = np.bincount(probs[selection.indices].argmax(axis=1), minlength=3)
    assert counts.tolist() == [2, 5, 5]
    everything = compose(make_strategy("margin"), balance_classes=True).select(None, inputs)
    assert sorted(everything.indices.tolist()) == list(range(22))
    assert np.all(np.diff(everything.scores) <= 0)


def test_balanced_batch_aware_base_runs_per_class_with_context() -> None:
    rng = np.random.default_rng(6)
    n = 90
    emb = rng.standard_normal((n, 3)).astype(np.float32)
    probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
    labeled = np.zeros(n, dtype=bool)
    labeled[[0, 5, 10, 15]] = True
    inputs = PoolInputs(probs=probs, labeled=labeled, embeddings=emb)
    selection = compose(make_strategy("coreset"), balance_classes=True).select(11, inputs)
    predicted = probs.argmax(axis=1)
    counts = np.bincount(predicted[selection.indices], minlength=3)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 11
    assert not labeled[selection.indices].any()
    for c in range(3):
        members = np.flatnonzero(~labeled & (predicted == c))
        sub, rows = subpool(inputs, members)
        alone = rows[make_strategy("coreset").select(int(counts[c]), sub).indices]
        assert selection.indices[predicted[selection.indices] == c].tolist() == alone.tolist()
    assert np.all(np.diff(selection.scores) <= 0)


def test_balanced_quotas() -> None:
    assert balanced_quotas(10, [5, 5, 5]) == [4, 3, 3]
    assert balanced_quotas(10, [1, 20, 20]) == [1, 5, 4]
    assert balanced_quotas(10, [0, 3, 20]) == [0, 3, 7]
    assert balanced_quotas(100, [2, 3]) == [2, 3]
    assert balanced_quotas(0, [2, 3]) == [0, 0]
    # a class that runs out hands its share to the classes with the fewest (outside review)
    assert balanced_quotas(10, [2, 100, 100, 100]) == [2, 3, 3, 2]
    assert balanced_quotas(253, [27, 26, 34, 30, 40, 25, 30, 28, 25, 30]) == [26, 26, 26] + [25] * 7


def brute_force_quotas(total: int, available: list[int]) -> list[int]:
    """One pick at a time to the class with the fewest so far that has candidates left (ties: priority)."""
    quotas = [0] * len(available)
    for _ in range(min(total, sum(available))):
        open_classes = [i for i, n in enumerate(available) if quotas[i] < n]
        quotas[min(open_classes, key=lambda i: (quotas[i], i))] += 1
    return quotas


def test_balanced_quotas_match_one_pick_at_a_time() -> None:
    rng = np.random.default_rng(4)
    for _ in range(300):
        available = rng.integers(0, 30, rng.integers(1, 9)).tolist()
        total = int(rng.integers(0, 120))
        assert balanced_quotas(total, available) == brute_force_quotas(total, available), (total, available)


def test_compose_names_needs_params_and_validation() -> None:
    coreset = make_strategy("coreset", seed=3)
    assert compose(coreset) is coreset
    margin = make_strategy("margin")
    both = compose(coreset, prefilter=(margin, 500), balance_classes=True)
    assert isinstance(both, Prefiltered) and isinstance(both.base, ClassBalanced)
    assert both.name == "coreset+balanced+prefilter(margin:500)"
    assert both.needs == {"embeddings", "probs"}
    assert both.batch_aware
    assert "top 500 by margin" in both.score_meaning
    params = both.get_params()
    assert json.loads(json.dumps(params)) == {
        "base": {
            "name": "coreset+balanced",
            "params": {
                "base": {"name": "coreset", "params": {"seed": 3, "device": "auto", "precision": "auto"}},
                "balance_classes": True,
            },
        },
        "prefilter": {"name": "margin", "params": {}},
        "top": 500,
    }
    assert compose(Recorder(), balance_classes=True).needs == {"value", "probs"}
    assert not compose(margin, balance_classes=True).batch_aware
    with pytest.raises(UsageError, match="ranking strategy"):
        compose(margin, prefilter=(make_strategy("badge"), 100))
    with pytest.raises(UsageError, match="at least 1"):
        compose(coreset, prefilter=(margin, 0))
    with pytest.raises(UsageError, match="--budget N"):
        both.select(None, make_pool())


def test_parse_prefilter() -> None:
    strategy, top = parse_prefilter("margin:10000")
    assert strategy.name == "margin" and top == 10000
    random_strategy, _ = parse_prefilter("random:5", seed=9)
    assert random_strategy.get_params() == {"seed": 9}
    for bad in ("margin", "margin:", "margin:ten", ":10"):
        with pytest.raises(UsageError, match="STRATEGY:TOP"):
            parse_prefilter(bad)
    with pytest.raises(UsageError, match="unknown strategy"):
        parse_prefilter("nope:10")
    with pytest.raises(UsageError, match="ranking strategy"):
        parse_prefilter("coreset:10")


def test_selection_type_is_the_library_one() -> None:
    selection = compose(make_strategy("margin"), balance_classes=True).select(3, make_pool())
    assert isinstance(selection, Selection)


def test_score_cli_prefilter_and_balance_classes_on_sample_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``score --prefilter margin:60 --balance-classes`` picks only from margin's top 60, evenly by class."""
    store = str(tmp_path / "store")
    common = ("--store", store)
    base = ("score", str(SAMPLE_DATA / "images" / "fashion"), "-m", str(SAMPLE_DATA / "model.pt"))

    code, _, err = cli(capsys, *common, *base, "-s", "margin", "--workers", "0")
    assert code == 0, err
    code, out, err = cli(capsys, *common, "export", "--top", "60", "--dry-run")
    assert code == 0, err
    margin_top = {row["path"]: row["predicted_label"] for row in csv.DictReader(io.StringIO(out))}
    assert len(margin_top) == 60

    budget = 30
    code, _, err = cli(
        capsys, *common, *base, "-s", "coreset", "--budget", str(budget), "--prefilter", "margin:60",
        "--balance-classes", "--workers", "0",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = cli(capsys, *common, "export", "--top", "1000", "--dry-run")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == budget
    assert {row["strategy"] for row in rows} == {"coreset+balanced+prefilter(margin:60)"}
    assert {row["path"] for row in rows} <= set(margin_top)  # only the prefilter's candidates

    available = Counter(margin_top.values())
    picked = Counter(row["predicted_label"] for row in rows)
    assert all(picked[c] <= available[c] for c in picked)
    most = max(picked.values())
    # A class that still had candidates left got at most one fewer than any other class.
    assert all(picked[c] >= most - 1 for c in available if picked[c] < available[c])
