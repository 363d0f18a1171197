"""Benchmark: a smoke simulation, resuming, PoolInputs for any strategy's needs, the summary."""

from __future__ import annotations

import csv
import gzip
import multiprocessing
import struct
import sys
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alselect import benchmark as bench
from alselect.benchmark import BenchmarkOptions, aulc, resolve_options, run_benchmark, summarize
from alselect.errors import UsageError
from alselect.pipeline import McDropout
from alselect.strategies import PoolInputs, Selection, Strategy
from alselect.strategies.base import _REGISTRY, top_k
from alselect.train import TrainConfig

SEEN: dict[str, list[dict[str, object]]] = {}


class FarthestFromLabeled(Strategy):
    """Batch-aware test strategy that needs embeddings: greedy k-center on ``embeddings``."""

    name = "test-kcenter"
    summary = "test only"
    needs = frozenset({"embeddings"})
    batch_aware = True

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        assert inputs.embeddings is not None and budget is not None
        SEEN.setdefault(self.name, []).append(
            {"shape": inputs.embeddings.shape, "labeled": int(inputs.labeled.sum()), "budget": budget}
        )
        emb = inputs.embeddings.astype(np.float64)
        centres = list(np.flatnonzero(inputs.labeled))
        dist = np.min(((emb[:, None, :] - emb[None, centres, :]) ** 2).sum(-1), axis=1)
        chosen: list[int] = []
        for _ in range(budget):
            dist[inputs.excluded] = -1
            dist[chosen] = -1
            pick = int(np.argmax(dist))
            chosen.append(pick)
            dist = np.minimum(dist, ((emb - emb[pick]) ** 2).sum(-1))
        return Selection(np.array(chosen), np.arange(budget, 0, -1, dtype=np.float64))


class McDisagreement(Strategy):
    """Test strategy that needs ``mc_probs``: variance of the top class over the T samples."""

    name = "test-mc"
    summary = "test only"
    needs = frozenset({"mc_probs"})

    def __init__(self) -> None:
        pass

    def score(self, inputs: PoolInputs) -> np.ndarray:
        assert inputs.mc_probs is not None
        SEEN.setdefault(self.name, []).append({"shape": inputs.mc_probs.shape})
        assert np.allclose(inputs.mc_probs.sum(-1), 1.0, atol=2e-3)  # float16 full passes
        return inputs.mc_probs.var(axis=1).sum(axis=1)


@pytest.fixture
def test_strategies() -> Iterator[None]:
    """Register the test strategies for one test only."""
    SEEN.clear()
    for cls in (FarthestFromLabeled, McDisagreement):
        _REGISTRY[cls.name] = cls
    yield
    for cls in (FarthestFromLabeled, McDisagreement):
        _REGISTRY.pop(cls.name, None)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    data = (
        bytes([0, 0, 0x08, array.ndim])
        + b"".join(struct.pack(">I", d) for d in array.shape)
        + array.tobytes()
    )
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def tiny_idx(tmp_path: Path) -> Path:
    """A 3-class MNIST-layout folder: 60 train / 30 test images of 12×12 (train gzipped, test not)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, n, gz in (("train", 60, True), ("t10k", 30, False)):
        labels = (np.arange(n) % 3).astype(np.uint8)
        images = np.clip(60 + 70 * labels[:, None, None] + rng.normal(0, 25, (n, 12, 12)), 0, 255).astype(
            np.uint8
        )
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return folder


def tiny_options(data: Path, strategies: list[str], seeds: int = 1) -> BenchmarkOptions:
    options = resolve_options(
        None,
        data=data,
        strategies=strategies,
        seeds=seeds,
        initial=6,
        step=4,
        cycles=2,
        epochs=1,
        batch_size=4,
        mc_samples=3,
        device="cpu",
    )
    return options


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_smoke_benchmark_writes_csv_summary_plot_and_resumes(
    tmp_path: Path, tiny_idx: Path, test_strategies: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    options = tiny_options(tiny_idx, ["learning-loss", "test-kcenter", "test-mc"])
    assert options.strategies == ("random", "learning-loss", "test-kcenter", "test-mc")
    result = run_benchmark(options, out, command="alselect benchmark ...")
    rows = read_csv(out / "cycles.csv")
    assert list(rows[0]) == bench.CSV_FIELDS
    assert len(rows) == 4 * 3
    assert {(r["strategy"], r["cycle"]) for r in rows} == {
        (s, str(c)) for s in options.strategies for c in range(3)
    }
    assert [int(r["n_labeled"]) for r in rows if r["strategy"] == "test-mc"] == [6, 10, 14]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    # the strategies saw the arrays their needs name, and the budget
    assert SEEN["test-kcenter"] == [
        {"shape": (60, 128), "labeled": 6, "budget": 4},
        {"shape": (60, 128), "labeled": 10, "budget": 4},
    ]
    assert [s["shape"] for s in SEEN["test-mc"]] == [(60, 3, 3), (60, 3, 3)]
    # every run starts from the same random labeled set; selections never repeat or hit labeled rows
    states = {s: bench.load_state(out / "state" / f"{s}__seed0.json") for s in options.strategies}
    assert len({tuple(st["initial"]) for st in states.values() if st}) == 1
    for st in states.values():
        assert st is not None
        picked = st["initial"] + [i for sel in st["selections"] for i in sel["indices"]]
        assert len(picked) == len(set(picked)) == 14
    png = out / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "summary.md").read_text(encoding="utf-8") == result.summary_text
    assert "| learning-loss | 1 |" in result.summary_text
    assert result.notes == []

    # resume: nothing is trained or selected again
    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a finished cycle was re-run")

    monkeypatch.setattr(bench.Simulation, "train", forbidden)
    monkeypatch.setattr(bench, "select", forbidden)
    again = run_benchmark(options, out)
    assert len(read_csv(out / "cycles.csv")) == 12
    assert again.summary_text == result.summary_text


def test_resume_after_a_kill_retrains_only_the_missing_cycle(tmp_path: Path, tiny_idx: Path) -> None:
    out = tmp_path / "out"
    options = tiny_options(tiny_idx, ["entropy"])
    run_benchmark(options, out)
    rows = read_csv(out / "cycles.csv")
    # a kill during cycle 2's training of entropy: the selection is saved, the row is not;
    # the file also ends in a torn line
    kept = [r for r in rows if not (r["strategy"] == "entropy" and r["cycle"] == "2")]
    with open(out / "cycles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=bench.CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        handle.write("entropy,0,2,14,0.5")
    calls: list[tuple[int, int]] = []
    original = bench.Simulation.train

    def counting(
        self: bench.Simulation, labeled: np.ndarray, seed: int, cycle: int, lp: bool
    ) -> bench.Trained:
        calls.append((len(labeled), cycle))
        return original(self, labeled, seed, cycle, lp)

    def reselect(*_args: object) -> None:
        raise AssertionError("a saved selection was made again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench.Simulation, "train", counting)
        patch.setattr(bench, "select", reselect)
        run_benchmark(options, out)
    assert calls == [(14, 2)]
    final = read_csv(out / "cycles.csv")
    assert len(final) == 6
    assert sorted((r["strategy"], r["cycle"]) for r in final) == sorted(
        (s, str(c)) for s in ("random", "entropy") for c in range(3)
    )


def test_resume_with_other_settings_is_refused_but_more_seeds_are_welcome(
    tmp_path: Path, tiny_idx: Path
) -> None:
    out = tmp_path / "out"
    run_benchmark(tiny_options(tiny_idx, ["entropy"]), out)
    changed = resolve_options(
        None, data=tiny_idx, strategies=["entropy"], seeds=1, initial=6, step=4, cycles=2, epochs=2,
        batch_size=4, device="cpu",
    )  # fmt: skip
    with pytest.raises(UsageError, match="other settings"):
        run_benchmark(changed, out)
    more = run_benchmark(tiny_options(tiny_idx, ["entropy", "margin"], seeds=2), out)
    assert len(more.rows) == 3 * 2 * 3


def test_benchmark_without_matplotlib_still_writes_csv_and_summary(
    tmp_path: Path, tiny_idx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = run_benchmark(tiny_options(tiny_idx, ["random"]), tmp_path / "out")
    assert result.plot is None
    assert (tmp_path / "out" / "cycles.csv").is_file() and (tmp_path / "out" / "summary.md").is_file()
    assert not (tmp_path / "out" / "learning_curves.png").exists()
    assert result.notes == [
        "matplotlib is not installed: no learning-curve plot (pip install 'alselect[plot]')"
    ]


def test_benchmark_cli_on_a_class_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import cli
    from tests.test_train import write_class_folder

    folder = write_class_folder(tmp_path / "data", per_class=10, size=12)
    code, out, err = cli(
        capsys, "benchmark", str(folder), "-o", str(tmp_path / "out"), "-s", "margin", "--seeds", "1",
        "--initial", "4", "--step", "2", "--cycles", "1", "--epochs", "1", "--batch-size", "4",
        "--image-size", "12", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("| strategy | seeds | 4 | 6 |")
    assert "margin seed 0 cycle 1: 6 labeled" in err
    rows = read_csv(tmp_path / "out" / "cycles.csv")
    assert [r["strategy"] for r in rows] == ["random", "random", "margin", "margin"]


def test_benchmark_usage_errors(tmp_path: Path, tiny_idx: Path) -> None:
    with pytest.raises(UsageError, match="unknown strategy"):
        resolve_options(None, data=tiny_idx, strategies=["nope"])
    with pytest.raises(UsageError, match="no parameter"):
        resolve_options(None, data=tiny_idx, strategies=["entropy"], params=["entropy:beta=3"])
    with pytest.raises(UsageError, match="unknown preset"):
        resolve_options("cifar-someday")
    with pytest.raises(UsageError, match="CIFAR-10 class folder"):
        resolve_options("seed-cifar10")
    options = resolve_options(
        None, data=tiny_idx, strategies=["entropy"], initial=50, step=10, cycles=2, device="cpu"
    )
    with pytest.raises(UsageError, match="pool holds 60"):
        run_benchmark(options, tmp_path / "out")


def test_presets_carry_the_paper_protocol() -> None:
    cifar = resolve_options("seed-cifar10", data=Path("/nonexistent"), device="cpu")
    assert (cifar.initial, cifar.step, cifar.cycles, cifar.seeds) == (1000, 1000, 9, 3)
    assert cifar.train == TrainConfig(
        arch="resnet18_cifar", epochs=200, lr=0.1, batch_size=128, optimizer="sgd", momentum=0.9,
        weight_decay=5e-4, schedule="step", milestones=(160,), lp_stop_fraction=0.6, val_fraction=0.0,
        device="cpu",
    )  # fmt: skip
    assert cifar.train.lr_at(159) == 0.1 and cifar.train.lr_at(160) == pytest.approx(0.01)
    assert cifar.train.lp_stop_epoch == 120
    assert cifar.params["learning-loss"] == {"subset": 10000}
    fmnist = resolve_options("fashion-mnist-cpu", epochs=3, device="cpu")
    assert fmnist.data == bench.FASHION_MNIST_DIR and fmnist.train.epochs == 3
    assert fmnist.strategies[0] == "random" and "learning-loss" in fmnist.strategies
    assert fmnist.mc == McDropout(samples=10, mode="head", rate=0.2)


def test_aulc_and_paired_differences_by_hand() -> None:
    assert aulc([10, 20, 30], [0.5, 0.7, 0.8]) == pytest.approx((0.6 * 10 + 0.75 * 10) / 20)
    rows = []
    for seed, (base, other) in enumerate([((0.5, 0.6), (0.5, 0.7)), ((0.4, 0.6), (0.4, 0.5))]):
        for cycle in range(2):
            for name, accs in (("random", base), ("x", other)):
                rows.append({"strategy": name, "seed": seed, "cycle": cycle, "n_labeled": 10 * (cycle + 1),
                             "accuracy": accs[cycle]})  # fmt: skip
    rows.append({"strategy": "x", "seed": 2, "cycle": 0, "n_labeled": 10, "accuracy": 0.9})  # incomplete seed
    summaries = {s.strategy: s for s in summarize(rows, ["random", "x"], cycles=1)}
    x = summaries["x"]
    assert x.seeds == 3 and x.n_labeled == [10, 20]
    assert x.mean == pytest.approx([np.mean([0.5, 0.4, 0.9]), np.mean([0.7, 0.5])])
    assert x.delta_aulc == pytest.approx([0.05, -0.05])  # (0.6 − 0.55), (0.45 − 0.5)
    assert x.delta_final == pytest.approx([0.1, -0.1])
    assert bench.verdict(x) == "1/2"
    assert "| x | 3 |" in bench.summary_markdown(list(summaries.values()), cycles=1)


def test_select_refuses_a_strategy_that_picks_labeled_images() -> None:
    class Bad(Strategy):
        name = "bad"
        needs = frozenset()

        def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
            return top_k(np.zeros(inputs.size), np.zeros(inputs.size, dtype=bool), budget)

    inputs = PoolInputs(probs=np.full((4, 2), 0.5, np.float32), labeled=np.array([True, False, False, False]))
    with pytest.raises(Exception, match="selected labeled or repeated"):
        bench.select(Bad(), inputs, 2)


def test_a_results_folder_in_use_is_refused(tmp_path: Path, tiny_idx: Path) -> None:
    from alselect.errors import AlselectError

    out = tmp_path / "out"
    out.mkdir()
    context = multiprocessing.get_context("fork")
    ready, stop = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(out / "lock", ready, stop))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(AlselectError, match="in use by another benchmark"):
            run_benchmark(tiny_options(tiny_idx, ["random"]), out)
    finally:
        stop.set()
        holder.join(30)
    assert not (out / "cycles.csv").exists()


def _hold_lock(path: Path, ready: Event, stop: Event) -> None:
    """Another process holding the results folder's lock until told to stop."""
    from alselect.store.lock import WriterLock

    with WriterLock(path, timeout=0):
        ready.set()
        stop.wait(60)


def test_curve_styles_stay_distinct_beyond_sixty_strategies() -> None:
    """Colour, marker and line style repeated from the 61st strategy on (markers cycled with the
    colours, so only 20 × 3 combinations were reachable)."""
    styles = [bench.curve_style(i) for i in range(300)]
    assert len(set(styles)) == 300
    assert styles[:20] == [(i, "os^Dv"[i % 5], "-") for i in range(20)]  # the first 20 as before


@pytest.mark.parametrize("count", [1, 21, 70])
def test_the_plot_holds_every_legend_entry(
    tmp_path: Path, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """70 entries overflowed the axes: the legend ran off the top of the saved image."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    saved = []
    real_savefig = plt.Figure.savefig

    def savefig(fig: Any, fname: Any, **kwargs: Any) -> None:
        real_savefig(fig, fname, **kwargs)
        renderer = fig.canvas.get_renderer()
        area = fig.get_tightbbox(renderer) if kwargs.get("bbox_inches") == "tight" else fig.bbox_inches
        legend = (
            fig.axes[0].get_legend().get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
        )
        saved.append((area, legend, len(fig.axes[0].get_legend().get_texts())))

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    names = ["random", *(f"strategy-{i}" for i in range(count - 1))]
    summaries = [
        bench.StrategySummary(name, 2, [10, 20, 30], [0.5, 0.6, 0.7], [0.01] * 3, [0.6], [0.0], [0.0])
        for name in names
    ]
    assert bench.plot_curves(summaries, tmp_path / "curves.png", "title")
    ((area, legend, entries),) = saved
    assert entries == count
    tolerance = 0.02  # inches
    assert area.x0 - tolerance <= legend.x0 and legend.x1 <= area.x1 + tolerance
    assert area.y0 - tolerance <= legend.y0 and legend.y1 <= area.y1 + tolerance
