"""Pool-based active-learning simulation on labeled data: does a strategy beat random, here?

For each seed and strategy: a random initial labeled set (the same for every strategy of a seed),
then cycles of *select k → reveal their labels → retrain from scratch → test accuracy on a held-out
split*. Selection goes through the strategy registry exactly as ``score`` does: the trained model is
wrapped as a ``LoadedModel`` and its ``forward_outputs`` over the pool give ``probs``,
``embedding`` and any head output (``loss_pred``); ``mc_probs`` come from ``alselect.mc_dropout``
(full passes with the same masks for every image, or head-only dropout on the embeddings). Every
registered strategy is benchmarkable with no extra code: ``PoolInputs`` are built from its
``needs``, and batch-aware strategies get the budget k.

Results folder (``-o``): ``cycles.csv`` (one row per strategy, seed, cycle; appended and fsynced as
cycles finish; ``seconds`` is wall time, ``cpu_seconds`` the process CPU time of all threads, which
stays comparable when other work shares the machine), ``state/`` (each run's selections, so a
resumed benchmark never re-runs a finished cycle), ``cache/`` (the initial model of each seed,
shared by the strategies of that seed: the same seed, data and settings give the same model),
``summary.md``/``summary.csv`` and
``learning_curves.png`` (with matplotlib: ``pip install 'alselect[plot]'``), ``benchmark.json``
(settings, commands, machine and load of each invocation).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import textwrap
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alselect import __version__
from alselect.checkpoints import LoadedModel
from alselect.datasets import ArraySplit, image_folder, is_idx_folder, load_idx_dataset
from alselect.embed import OutputModel, resolve_device
from alselect.errors import AlselectError, DataError, StoreLockedError, UsageError
from alselect.fsutil import fsync_directory
from alselect.mc_dropout import FullPassModel, dropout_layers, head_layer, head_mc_probs
from alselect.models.loss_prediction import OUTPUT_NAME, LossPredictionModule, LossPredictor, find_stages
from alselect.pipeline import STANDARD_INPUTS, McDropout
from alselect.preprocess import Preprocess
from alselect.progress import NULL_REPORTER, Reporter
from alselect.store.lock import WriterLock
from alselect.strategies import PoolInputs, Strategy, available, build_strategy, parse_params
from alselect.train import (
    EVAL_BATCH,
    ArraySource,
    TrainConfig,
    TrainResult,
    evaluate,
    fit,
    load_files,
    loaded_model,
    new_model,
    normalizer,
    stratified_split,
)

BASELINE = "random"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CSV_FIELDS = [
    "strategy",
    "seed",
    "cycle",
    "n_labeled",
    "accuracy",
    "seconds",
    "select_seconds",
    "train_seconds",
    "cpu_seconds",
]
SUBSET_SEED = 20240601  # fixed: the pool and test subsets do not depend on the benchmark seeds
FOLDER_TEST_FRACTION = 0.2

PRESETS: dict[str, dict[str, Any]] = {
    # Yoo & Kweon's CIFAR-10 protocol: ResNet-18 (CIFAR stem), 1k initial + 1k per cycle to 10k,
    # 200 epochs, SGD 0.1 → 0.01 at epoch 160, momentum 0.9, wd 5e-4, batch 128; the loss-prediction
    # module stops reaching the backbone after epoch 120; learning loss ranks a random 10k subset.
    "seed-cifar10": {
        "data": None,
        "initial": 1000,
        "step": 1000,
        "cycles": 9,
        "seeds": 3,
        "image_size": 32,
        "train": {
            "arch": "resnet18_cifar",
            "epochs": 200,
            "lr": 0.1,
            "batch_size": 128,
            "optimizer": "sgd",
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "step",
            "milestones": (160,),
            "lp_stop_fraction": 0.6,
        },
        "params": {"learning-loss": {"subset": 10000}},
        "needs_gpu": True,
    },
    # Sized for about 18 strategies × 3 seeds in about 2 hours on 2 idle CPU cores; the arithmetic
    # is in docs/results/fashion-mnist-cpu/README.md.
    "fashion-mnist-cpu": {
        "data": FASHION_MNIST_DIR,
        "initial": 100,
        "step": 100,
        "cycles": 8,
        "seeds": 3,
        "pool_size": 6000,
        "test_size": 3000,
        "mc_samples": 10,
        "mc_mode": "head",
        "mc_rate": 0.2,  # small_cnn's own dropout (0.2) sits right before its final layer
        "train": {
            "arch": "small_cnn",
            "epochs": 20,
            "lr": 0.002,
            "batch_size": 32,
            "optimizer": "adam",
            "weight_decay": 0.0,
            "schedule": "cosine",
        },
        "params": {},
    },
}


@dataclass(frozen=True)
class BenchmarkOptions:
    """A benchmark's settings. ``strategies`` always starts with ``random`` (the baseline);
    ``params`` are per-strategy constructor options; ``train`` configures every retraining
    (its seed is replaced per seed and cycle)."""

    data: Path
    strategies: tuple[str, ...]
    seeds: int = 3
    initial: int = 100
    step: int = 100
    cycles: int = 5
    train: TrainConfig = field(default_factory=lambda: TrainConfig(arch="small_cnn", val_fraction=0.0))
    pool_size: int | None = None
    test_size: int | None = None
    image_size: int | None = None
    mc: McDropout = field(default_factory=McDropout)
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    preset: str | None = None

    def settings(self) -> dict[str, Any]:
        """What a resumed benchmark must share with the original (strategies and seeds may grow)."""
        train = asdict(self.train)
        train.pop("device")
        train.pop("workers")
        train["milestones"] = list(self.train.milestones)
        return {
            "data": str(self.data),
            "initial": self.initial,
            "step": self.step,
            "cycles": self.cycles,
            "pool_size": self.pool_size,
            "test_size": self.test_size,
            "image_size": self.image_size,
            "train": train,
            "mc": asdict(self.mc),
        }


def resolve_options(
    preset: str | None,
    *,
    data: Path | None = None,
    strategies: Sequence[str] | None = None,
    seeds: int | None = None,
    initial: int | None = None,
    step: int | None = None,
    cycles: int | None = None,
    epochs: int | None = None,
    arch: str | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    pool_size: int | None = None,
    test_size: int | None = None,
    image_size: int | None = None,
    mc_samples: int | None = None,
    mc_mode: str | None = None,
    params: Sequence[str] = (),
    device: str = "auto",
) -> BenchmarkOptions:
    """The preset's settings (if any) overridden by the given options; strategies checked.

    No strategy, or ``all``, means every registered strategy. ``params`` items are
    ``STRATEGY:KEY=VALUE``.
    """
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        base = PRESETS[preset]
    folder = data if data is not None else base.get("data")
    if folder is None:
        need = (
            "a CIFAR-10 class folder (train/ and test/, one folder per class)" if preset else "a data folder"
        )
        raise UsageError(f"benchmark needs {need}")
    train_base = dict(base.get("train", {"arch": "small_cnn"}))
    overrides = {"epochs": epochs, "arch": arch, "lr": lr, "batch_size": batch_size}
    train_base.update({k: v for k, v in overrides.items() if v is not None})
    train = TrainConfig(**train_base, val_fraction=0.0, device=device, loss_prediction=False)
    train.check()
    known = available()
    names: list[str] = []
    for name in strategies or ["all"]:
        for item in known if name == "all" else [name]:
            if item not in known:
                raise UsageError(f"unknown strategy {item!r}; known strategies: {', '.join(known)}")
            if item != BASELINE and item not in names:
                names.append(item)
    per_strategy: dict[str, dict[str, Any]] = {k: dict(v) for k, v in base.get("params", {}).items()}
    for item in params:
        name, sep, rest = item.partition(":")
        if not sep or name not in known:
            raise UsageError(f"--param expects STRATEGY:KEY=VALUE with a known strategy, got {item!r}")
        per_strategy.setdefault(name, {}).update(parse_params([rest]))
    chosen = (BASELINE, *names)
    for name in chosen:
        build_strategy(name, params=per_strategy.get(name))  # bad keys are usage errors now
    defaults = BenchmarkOptions(data=Path(), strategies=())
    return BenchmarkOptions(
        data=Path(folder),
        strategies=chosen,
        seeds=seeds or base.get("seeds", 3),
        initial=initial or base.get("initial", defaults.initial),
        step=step or base.get("step", defaults.step),
        cycles=cycles or base.get("cycles", defaults.cycles),
        train=train,
        pool_size=pool_size or base.get("pool_size"),
        test_size=test_size or base.get("test_size"),
        image_size=image_size or base.get("image_size"),
        mc=McDropout(
            samples=mc_samples or base.get("mc_samples", McDropout().samples),
            mode=mc_mode or base.get("mc_mode", "auto"),
            rate=base.get("mc_rate", McDropout().rate),
        ),
        params={k: v for k, v in per_strategy.items() if k in chosen},
        preset=preset,
    )


# -- data -------------------------------------------------------------------------------------


@dataclass
class BenchData:
    """The pool (labels hidden until selected), the test split, classes and preprocessing."""

    pool: ArraySplit
    test: ArraySplit
    classes: list[str]
    preprocess: Preprocess
    description: str


def load_data(options: BenchmarkOptions, reporter: Reporter = NULL_REPORTER) -> BenchData:
    """Read an IDX folder or a class folder (``train/`` + ``test/``/``val/`` inside, or a seeded
    stratified 20 % test split), subsample pool and test when asked, and derive mean/std from the pool."""
    folder = options.data
    if not folder.exists():
        raise DataError(f"benchmark data not found: {folder}")
    if is_idx_folder(folder):
        pool, test, classes = load_idx_dataset(folder)
        description = f"IDX files in {folder}"
    else:
        pool, test, classes = _folder_splits(folder, options.image_size or 32, reporter)
        description = f"class folder {folder}"
    rng = np.random.default_rng(SUBSET_SEED)
    pool = _subset(pool, options.pool_size, rng)
    test = _subset(test, options.test_size, rng)
    needed = options.initial + options.step * options.cycles
    if needed > len(pool):
        raise UsageError(
            f"initial {options.initial} + {options.cycles} cycles × {options.step} = {needed} labels, "
            f"but the pool holds {len(pool)} images"
        )
    pixels = pool.images.astype(np.float64) / 255.0
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3))
    if len(mean) == 1:
        mean, std = np.repeat(mean, 3), np.repeat(std, 3)
    size = pool.images.shape[-1]
    preprocess = Preprocess(
        image_size=size,
        resize_size=size,
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=tuple(float(max(s, 1e-3)) for s in std[:3]),  # type: ignore[arg-type]
    )
    return BenchData(pool, test, classes, preprocess, description)


def _subset(split: ArraySplit, size: int | None, rng: np.random.Generator) -> ArraySplit:
    if size is None or size >= len(split):
        return split
    keep = np.sort(rng.choice(len(split), size=size, replace=False))
    return ArraySplit(split.images[keep], split.labels[keep])


def _folder_splits(folder: Path, size: int, reporter: Reporter) -> tuple[ArraySplit, ArraySplit, list[str]]:
    preprocess = Preprocess(image_size=size, resize_size=size, mean=(0.0,) * 3, std=(1.0,) * 3)
    test_dir = next((folder / n for n in ("test", "val") if (folder / n).is_dir()), None)
    if (folder / "train").is_dir() and test_dir is not None:
        train_files, test_files = image_folder(folder / "train"), image_folder(test_dir)
        if train_files.classes != test_files.classes:
            raise DataError(f"{folder}: train/ and {test_dir.name}/ hold different class folders")
        parts = [_decode(train_files, preprocess, reporter), _decode(test_files, preprocess, reporter)]
        return parts[0], parts[1], train_files.classes
    files = image_folder(folder)
    everything = _decode(files, preprocess, reporter)
    train_idx, test_idx = stratified_split(everything.labels, FOLDER_TEST_FRACTION, SUBSET_SEED)
    return (
        ArraySplit(everything.images[train_idx], everything.labels[train_idx]),
        ArraySplit(everything.images[test_idx], everything.labels[test_idx]),
        files.classes,
    )


def _decode(files: Any, preprocess: Preprocess, reporter: Reporter) -> ArraySplit:
    source, labels, failed = load_files(files, preprocess, min(4, os.cpu_count() or 1), reporter)
    if failed:
        reporter.warning(
            f"{len(failed)} image(s) could not be decoded and were left out, e.g. {failed[0][0]}"
        )
    if not isinstance(source, ArraySource):
        raise DataError(
            "the benchmark keeps its images in memory: lower --image-size or use a smaller folder"
        )
    return ArraySplit(source.images.numpy(), labels)


# -- one simulation ---------------------------------------------------------------------------


@torch.inference_mode()
def model_outputs(
    model: OutputModel, source: ArraySource, preprocess: Preprocess, device: torch.device
) -> dict[str, np.ndarray]:
    """``forward_outputs`` over every image of ``source``, concatenated: ``name -> [N, ...]``."""
    model.to(device)
    normalize = normalizer(preprocess, device)
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for _, pixels in source.batches(np.arange(len(source)), EVAL_BATCH):
        for name, value in model.forward_outputs(normalize(pixels).contiguous()).items():
            parts[name].append(value.cpu().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def pool_inputs(
    strategy: Strategy,
    model: LoadedModel,
    source: ArraySource,
    preprocess: Preprocess,
    labeled: np.ndarray,
    mc: McDropout,
    device: torch.device,
) -> PoolInputs:
    """The ``PoolInputs`` ``score`` would give ``strategy`` for this model and labeled mask.

    A strategy that needs nothing from the model (``random``) gets uniform ``probs`` without a pass
    over the pool.
    """
    needs = strategy.needs
    if not needs:
        classes = len(model.classes or []) or int(model.num_classes or 1)
        uniform = np.full((len(source), classes), 1.0 / classes, dtype=np.float32)
        return PoolInputs(probs=uniform, labeled=labeled)
    outputs = model_outputs(model, source, preprocess, device)
    missing = sorted(needs - STANDARD_INPUTS - set(outputs))
    if missing:
        raise AlselectError(
            f"strategy {strategy.name!r} needs {', '.join(missing)}, which the model does not give"
        )
    probs = outputs["probs"].astype(np.float32)
    mc_probs = None
    if "mc_probs" in needs:
        mode = mc.mode if mc.mode != "auto" else ("full" if dropout_layers(model.module) else "head")
        if mode == "full":
            passes = model_outputs(FullPassModel(model, mc.samples), source, preprocess, device)
            mc_probs = passes["mc_probs"].astype(np.float32)
        else:
            weight, bias = head_layer(model, probs, outputs["embedding"])
            mc_probs = head_mc_probs(outputs["embedding"], weight, bias, mc.samples, mc.rate)
    return PoolInputs(
        probs=probs,
        labeled=labeled,
        embeddings=outputs["embedding"].astype(np.float32) if "embeddings" in needs else None,
        mc_probs=mc_probs,
        arrays={name: outputs[name] for name in sorted(needs - STANDARD_INPUTS)},
    )


def select(strategy: Strategy, inputs: PoolInputs, k: int) -> np.ndarray:
    """``k`` new pool indices from the strategy (every strategy gets the budget)."""
    chosen = np.asarray(strategy.select(k, inputs).indices, dtype=np.int64)[:k]
    if len(np.unique(chosen)) != len(chosen) or inputs.labeled[chosen].any():
        raise AlselectError(f"strategy {strategy.name!r} selected labeled or repeated images")
    return chosen


@dataclass
class Trained:
    model: LoadedModel
    accuracy: float
    seconds: float
    cpu_seconds: float = 0.0  # process CPU time, all threads: comparable on a shared machine


class Simulation:
    """Runs and resumes (strategy, seed) simulations into a results folder."""

    def __init__(self, options: BenchmarkOptions, data: BenchData, out: Path, reporter: Reporter) -> None:
        self.options = options
        self.data = data
        self.out = out
        self.reporter = reporter
        self.device = resolve_device(options.train.device)
        self.pool = ArraySource(data.pool.images)
        self.test = ArraySource(data.test.images)
        self.rows = read_rows(out / "cycles.csv")
        self.initial_models: dict[tuple[int, bool], Trained] = {}

    def done(self, strategy: str, seed: int) -> set[int]:
        return {r["cycle"] for r in self.rows if r["strategy"] == strategy and r["seed"] == seed}

    def train(self, labeled: np.ndarray, seed: int, cycle: int, loss_prediction: bool) -> Trained:
        start, cpu = time.perf_counter(), time.process_time()
        config = replace(self.options.train, seed=seed * 1000 + cycle, loss_prediction=loss_prediction)
        module = new_model(config.arch or "small_cnn", len(self.data.classes), config.seed)
        result = fit(
            module,
            self.pool,
            self.data.pool.labels,
            np.sort(labeled),
            np.zeros(0, dtype=np.int64),
            self.data.preprocess,
            config,
        )
        accuracy = evaluate(
            module,
            self.test,
            self.data.test.labels,
            np.arange(len(self.test)),
            self.data.preprocess,
            self.device,
        )
        model = loaded_model(result, config.arch or "small_cnn", self.data.classes, self.data.preprocess)
        return Trained(model, accuracy, time.perf_counter() - start, time.process_time() - cpu)

    def initial_model(self, labeled: np.ndarray, seed: int, loss_prediction: bool) -> Trained:
        """Cycle 0 of a seed: trained once (per with/without loss prediction), shared, cached on disk."""
        key = (seed, loss_prediction)
        if key in self.initial_models:
            return self.initial_models[key]
        path = self.out / "cache" / f"initial-seed{seed}{'-lp' if loss_prediction else ''}.pt"
        trained = None
        if path.is_file():
            trained = self._load_initial(path, seed, loss_prediction)
        if trained is None:
            trained = self.train(labeled, seed, 0, loss_prediction)
            self._save_initial(path, trained)
        self.initial_models[key] = trained
        return trained

    def _save_initial(self, path: Path, trained: Trained) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        model = trained.model
        head = model.heads.get(OUTPUT_NAME)
        payload = {
            "state_dict": {k: v.detach().cpu() for k, v in model.module.state_dict().items()},
            "head": {k: v.detach().cpu() for k, v in head.head.state_dict().items()}
            if isinstance(head, LossPredictor)
            else None,
            "accuracy": trained.accuracy,
            "seconds": trained.seconds,
            "cpu_seconds": trained.cpu_seconds,
            "settings": json.dumps(self.options.settings(), sort_keys=True),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def _load_initial(self, path: Path, seed: int, loss_prediction: bool) -> Trained | None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        if payload.get("settings") != json.dumps(self.options.settings(), sort_keys=True):
            return None
        config = replace(self.options.train, seed=seed * 1000, loss_prediction=loss_prediction)
        arch = config.arch or "small_cnn"
        module = new_model(arch, len(self.data.classes), config.seed)
        module.load_state_dict(payload["state_dict"])
        head = None
        stages: list[str] = []
        if loss_prediction:
            if payload.get("head") is None:
                return None
            stages, channels = find_stages(module, self.data.preprocess.image_size)
            head = LossPredictionModule(channels)
            head.load_state_dict(payload["head"])
        module.eval()
        result = TrainResult(module=module, head=head, stages=stages)
        model = loaded_model(result, arch, self.data.classes, self.data.preprocess)
        return Trained(
            model,
            float(payload["accuracy"]),
            float(payload["seconds"]),
            float(payload.get("cpu_seconds", 0.0)),
        )

    def run(self, name: str, seed: int, on_row: Any) -> None:
        """Simulate (strategy ``name``, ``seed``), skipping the cycles already in ``cycles.csv``."""
        options = self.options
        params = dict(options.params.get(name, {}))
        state_path = self.out / "state" / f"{name}__seed{seed}.json"
        state = load_state(state_path)
        initial = np.sort(
            np.random.default_rng(seed).choice(len(self.data.pool), size=options.initial, replace=False)
        )
        if state is None:
            state = {
                "strategy": name,
                "seed": seed,
                "params": params,
                "initial": initial.tolist(),
                "selections": [],
            }
        elif (
            state.get("params") != json.loads(json.dumps(params)) or state.get("initial") != initial.tolist()
        ):
            raise UsageError(
                f"{state_path}: strategy {name!r} ran with other options ({state.get('params')}); "
                "use another --output folder"
            )
        selections: list[dict[str, Any]] = state["selections"]
        done = self.done(name, seed)
        probe = build_strategy(name, seed=seed * 1000, params=params)
        loss_prediction = OUTPUT_NAME in probe.needs
        for cycle in range(options.cycles + 1):
            labeled_idx = np.concatenate(
                [initial, *[np.asarray(s["indices"], dtype=np.int64) for s in selections[:cycle]]]
            )
            need_selection = cycle < options.cycles and len(selections) == cycle
            if cycle in done and not need_selection:
                continue
            trained = (
                self.initial_model(labeled_idx, seed, loss_prediction)
                if cycle == 0
                else self.train(labeled_idx, seed, cycle, loss_prediction)
            )
            if cycle not in done:
                select_seconds = float(selections[cycle - 1]["seconds"]) if cycle > 0 else 0.0
                select_cpu = float(selections[cycle - 1].get("cpu_seconds", 0.0)) if cycle > 0 else 0.0
                row = {
                    "strategy": name,
                    "seed": seed,
                    "cycle": cycle,
                    "n_labeled": len(labeled_idx),
                    "accuracy": trained.accuracy,
                    "seconds": select_seconds + trained.seconds,
                    "select_seconds": select_seconds,
                    "train_seconds": trained.seconds,
                    "cpu_seconds": select_cpu + trained.cpu_seconds,
                }
                append_row(self.out / "cycles.csv", row)
                self.rows.append(row)
                on_row(row)
            if need_selection:
                start, cpu = time.perf_counter(), time.process_time()
                strategy = build_strategy(name, seed=seed * 1000 + cycle, params=params)
                labeled = np.zeros(len(self.data.pool), dtype=bool)
                labeled[labeled_idx] = True
                inputs = pool_inputs(
                    strategy, trained.model, self.pool, self.data.preprocess, labeled, options.mc, self.device
                )
                chosen = select(strategy, inputs, options.step)
                selections.append(
                    {
                        "cycle": cycle,
                        "indices": chosen.tolist(),
                        "seconds": time.perf_counter() - start,
                        "cpu_seconds": time.process_time() - cpu,
                    }
                )
                write_json(state_path, state)


# -- files ------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Complete rows of ``cycles.csv``; a torn last line (a killed run) is dropped and the file
    rewritten without it."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    rows: list[dict[str, Any]] = []
    torn = False
    for raw in csv.DictReader(io.StringIO(text, newline="")):
        try:
            rows.append(
                {
                    "strategy": raw["strategy"],
                    "seed": int(raw["seed"]),
                    "cycle": int(raw["cycle"]),
                    "n_labeled": int(raw["n_labeled"]),
                    "accuracy": float(raw["accuracy"]),
                    "seconds": float(raw["seconds"]),
                    "select_seconds": float(raw["select_seconds"]),
                    "train_seconds": float(raw["train_seconds"]),
                    "cpu_seconds": float(raw["cpu_seconds"]),
                }
            )
        except (KeyError, TypeError, ValueError):
            torn = True
    if torn or not text.endswith("\n"):
        write_text(path, rows_csv(rows))
    return rows


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(format_row(row))
    return buffer.getvalue()


def format_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "accuracy": f"{row['accuracy']:.6f}",
        "seconds": f"{row['seconds']:.3f}",
        "select_seconds": f"{row['select_seconds']:.3f}",
        "train_seconds": f"{row['train_seconds']:.3f}",
        "cpu_seconds": f"{row['cpu_seconds']:.3f}",
    }


def append_row(path: Path, row: Mapping[str, Any]) -> None:
    """Append one row (the header first in a new file), flushed and fsynced."""
    new = not path.exists()
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerow(format_row(row))
    with open(path, "a", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    if new:
        fsync_directory(path.parent)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AlselectError(f"{path} is unreadable ({exc}); remove it to redo that run") from exc
    return state if isinstance(state, dict) else None


# -- summary ----------------------------------------------------------------------------------


@dataclass
class StrategySummary:
    """Per strategy: accuracy mean/std per cycle over seeds, AULC, and paired differences vs random
    (over the seeds where both finished every cycle)."""

    strategy: str
    seeds: int
    n_labeled: list[int]
    mean: list[float]
    std: list[float]
    aulc: list[float]  # per complete seed
    delta_aulc: list[float]  # per seed finished by both, strategy − random
    delta_final: list[float]


def aulc(n_labeled: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under the learning curve (trapezoids over the label counts) divided by the label range:
    the curve's mean accuracy. A single point gives that point."""
    x = np.asarray(n_labeled, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if len(x) < 2 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def summarize(
    rows: Sequence[Mapping[str, Any]], strategies: Sequence[str], cycles: int
) -> list[StrategySummary]:
    curves: dict[tuple[str, int], dict[int, Mapping[str, Any]]] = defaultdict(dict)
    for row in rows:
        curves[(row["strategy"], row["seed"])][row["cycle"]] = row
    complete: dict[str, dict[int, list[Mapping[str, Any]]]] = defaultdict(dict)
    for (name, seed), by_cycle in curves.items():
        if all(c in by_cycle for c in range(cycles + 1)):
            complete[name][seed] = [by_cycle[c] for c in range(cycles + 1)]
    names = [s for s in strategies if s in {n for n, _ in curves}]
    names += sorted({n for n, _ in curves} - set(names))
    summaries = []
    baseline = complete.get(BASELINE, {})
    for name in names:
        seeds = sorted({seed for (n, seed) in curves if n == name})
        counts, means, stds = [], [], []
        for c in range(cycles + 1):
            values = [curves[(name, s)][c] for s in seeds if c in curves[(name, s)]]
            if not values:
                break
            counts.append(round(float(np.mean([v["n_labeled"] for v in values]))))
            accs = np.array([v["accuracy"] for v in values])
            means.append(float(accs.mean()))
            stds.append(float(accs.std(ddof=1)) if len(accs) > 1 else 0.0)
        own = complete.get(name, {})
        areas = {s: aulc([r["n_labeled"] for r in rs], [r["accuracy"] for r in rs]) for s, rs in own.items()}
        base_areas = {
            s: aulc([r["n_labeled"] for r in rs], [r["accuracy"] for r in rs]) for s, rs in baseline.items()
        }
        paired = sorted(set(areas) & set(base_areas))
        summaries.append(
            StrategySummary(
                strategy=name,
                seeds=len(seeds),
                n_labeled=counts,
                mean=means,
                std=stds,
                aulc=[areas[s] for s in sorted(areas)],
                delta_aulc=[areas[s] - base_areas[s] for s in paired],
                delta_final=[own[s][-1]["accuracy"] - baseline[s][-1]["accuracy"] for s in paired],
            )
        )
    return summaries


def _pm(values: Sequence[float], scale: float = 100.0, signed: bool = False) -> str:
    if not values:
        return "–"
    arr = np.asarray(values) * scale
    spread = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return f"{float(arr.mean()):{'+' if signed else ''}.2f} ± {spread:.2f}"


def verdict(summary: StrategySummary) -> str:
    """``better in k/n seeds`` by AULC against random (paired by seed)."""
    if summary.strategy == BASELINE:
        return "baseline"
    if not summary.delta_aulc:
        return "incomplete"
    wins = sum(d > 0 for d in summary.delta_aulc)
    return f"{wins}/{len(summary.delta_aulc)}"


def summary_markdown(summaries: Sequence[StrategySummary], cycles: int) -> str:
    """Accuracy (%) mean ± std over seeds per label count, AULC, and paired differences vs random."""
    counts = max((s.n_labeled for s in summaries), key=len, default=[])
    head = [
        "strategy",
        "seeds",
        *[str(n) for n in counts],
        "AULC",
        "ΔAULC vs random",
        "Δ final vs random",
        "AULC > random",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for s in summaries:
        cells = [
            f"{s.mean[i] * 100:.2f} ± {s.std[i] * 100:.2f}" if i < len(s.mean) else "–"
            for i in range(len(counts))
        ]
        delta_aulc = _pm(s.delta_aulc, signed=True) if s.strategy != BASELINE else "0"
        delta_final = _pm(s.delta_final, signed=True) if s.strategy != BASELINE else "0"
        lines.append(
            "| "
            + " | ".join([s.strategy, str(s.seeds), *cells, _pm(s.aulc), delta_aulc, delta_final, verdict(s)])
            + " |"
        )
    return "\n".join(lines) + "\n"


def summary_csv(summaries: Sequence[StrategySummary]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "strategy",
            "seeds",
            "aulc_mean",
            "aulc_std",
            "delta_aulc_mean",
            "delta_aulc_std",
            "delta_final_mean",
            "delta_final_std",
            "seeds_better",
        ]
    )
    for s in summaries:

        def stats(values: Sequence[float]) -> list[str]:
            if not values:
                return ["", ""]
            arr = np.asarray(values)
            return [f"{arr.mean():.6f}", f"{arr.std(ddof=1) if len(arr) > 1 else 0.0:.6f}"]

        writer.writerow(
            [s.strategy, s.seeds, *stats(s.aulc), *stats(s.delta_aulc), *stats(s.delta_final), verdict(s)]
        )
    return buffer.getvalue()


PLOT_COLOURS = 20  # matplotlib's tab20
PLOT_MARKERS = "os^Dv"
PLOT_DASHES = ("-", "-.", ":")
LEGEND_INSIDE = 24  # legend entries (2 columns) that fit inside the axes
LEGEND_ROWS = 30  # rows per legend column beside the axes


def curve_style(index: int) -> tuple[int, str, str]:
    """(colour index, marker, line style) of the ``index``-th non-baseline curve: 20 colours, each
    round of 20 shifts the markers and changes the line style, so the first 300 curves all differ."""
    colour, round_ = index % PLOT_COLOURS, index // PLOT_COLOURS
    marker = PLOT_MARKERS[(index + round_) % len(PLOT_MARKERS)]
    return colour, marker, PLOT_DASHES[round_ % len(PLOT_DASHES)]


def plot_curves(summaries: Sequence[StrategySummary], path: Path, title: str) -> bool:
    """Learning curves (mean ± std band over seeds) as PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    drawn = [s for s in summaries if s.mean]
    tab20 = plt.get_cmap("tab20")
    palette = [tab20(i) for i in range(PLOT_COLOURS)]
    band = 0.12 if len(drawn) <= 6 else 0.05  # many bands on one plot hide each other
    others = [s for s in drawn if s.strategy != BASELINE]
    for s in drawn:
        x = np.asarray(s.n_labeled[: len(s.mean)])
        mean, std = np.asarray(s.mean) * 100, np.asarray(s.std) * 100
        if s.strategy == BASELINE:
            style: dict[str, Any] = {"color": "black", "linewidth": 2.2, "linestyle": "--", "marker": "o"}
        else:
            colour, marker, dash = curve_style(others.index(s))
            style = {"color": palette[colour], "marker": marker, "linestyle": dash}
        (line,) = ax.plot(x, mean, markersize=3, label=f"{s.strategy} ({s.seeds})", **style)
        ax.fill_between(x, mean - std, mean + std, alpha=band, color=line.get_color())
    ax.set_xlabel("labeled images")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(title, 100), fontsize=9)
    ax.grid(alpha=0.3)
    if len(drawn) <= LEGEND_INSIDE:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    else:  # more entries than the axes hold: beside them, in columns of at most LEGEND_ROWS
        columns = -(-len(drawn) // LEGEND_ROWS)
        ax.legend(fontsize=7, ncol=columns, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, bbox_inches="tight")  # the whole legend, wherever it is
    plt.close(fig)
    os.replace(tmp, path)
    return True


# -- driver -----------------------------------------------------------------------------------


@dataclass
class BenchmarkResult:
    output: Path
    rows: list[dict[str, Any]]
    summaries: list[StrategySummary]
    summary_text: str
    plot: Path | None
    notes: list[str]


def _load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def _record_invocation(
    out: Path, options: BenchmarkOptions, command: str | None, device: torch.device
) -> None:
    meta_path = out / "benchmark.json"
    settings = options.settings()
    meta: dict[str, Any] = {"settings": settings, "invocations": []}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise AlselectError(f"{meta_path} is unreadable: {exc}") from exc
        if meta.get("settings") != json.loads(json.dumps(settings)):
            raise UsageError(
                f"{out} holds a benchmark with other settings (see {meta_path}); resume it with the same "
                "settings (strategies and seeds may be added) or use another --output folder"
            )
    meta["invocations"].append(
        {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "preset": options.preset,
            "strategies": list(options.strategies),
            "seeds": options.seeds,
            "params": {k: dict(v) for k, v in options.params.items()},
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": _load_average(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "alselect": __version__,
        }
    )
    write_json(meta_path, meta)


def _finish_invocation(out: Path, seconds: float) -> None:
    meta_path = out / "benchmark.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["invocations"][-1].update({"seconds": round(seconds, 1), "load_average_end": _load_average()})
    write_json(meta_path, meta)


def run_benchmark(
    options: BenchmarkOptions,
    output: str | Path,
    *,
    reporter: Reporter = NULL_REPORTER,
    command: str | None = None,
) -> BenchmarkResult:
    """Run (or resume) the simulation into ``output`` and write the summary and plot."""
    started = time.perf_counter()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {output} is a file; name a folder for the results")
    device = resolve_device(options.train.device)
    if PRESETS.get(options.preset or "", {}).get("needs_gpu") and device.type != "cuda":
        reporter.warning(f"preset {options.preset} is sized for a GPU; on a CPU it takes days")
    data = load_data(options, reporter)
    out.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(out / "lock", timeout=0)
    try:
        lock.acquire()
    except StoreLockedError:
        raise AlselectError(f"{out} is in use by another benchmark (see {out / 'lock'})") from None
    try:
        return _run_locked(options, out, data, device, reporter, command, started)
    finally:
        lock.release()


def _run_locked(
    options: BenchmarkOptions,
    out: Path,
    data: BenchData,
    device: torch.device,
    reporter: Reporter,
    command: str | None,
    started: float,
) -> BenchmarkResult:
    notes: list[str] = []
    _record_invocation(out, options, command, device)
    simulation = Simulation(options, data, out, reporter)
    total = len(options.strategies) * options.seeds * (options.cycles + 1)
    finished = {(r["strategy"], r["seed"], r["cycle"]) for r in simulation.rows}
    todo = {(s, seed) for s in options.strategies for seed in range(options.seeds)}
    counted = sum(1 for (s, seed, _) in finished if (s, seed) in todo)
    reporter.info(
        f"benchmark: {len(options.strategies)} strategies × {options.seeds} seeds × {options.cycles + 1} "
        f"trainings on {data.description} (pool {len(data.pool)}, test {len(data.test)}); "
        f"{counted} of {total} already done"
    )
    progress = {"done": counted}
    reporter.progress("cycles", counted, total)

    def on_row(row: Mapping[str, Any]) -> None:
        progress["done"] += 1
        reporter.progress("cycles", progress["done"], total)
        reporter.info(
            f"{row['strategy']} seed {row['seed']} cycle {row['cycle']}: {row['n_labeled']} labeled, "
            f"accuracy {row['accuracy']:.2%} ({row['seconds']:.1f} s)"
        )

    for seed in range(options.seeds):
        for name in options.strategies:
            simulation.run(name, seed, on_row)
    summaries = summarize(simulation.rows, options.strategies, options.cycles)
    text = summary_markdown(summaries, options.cycles)
    write_text(out / "summary.md", text)
    write_text(out / "summary.csv", summary_csv(summaries))
    title = (
        f"{data.description}: pool {len(data.pool)}, test {len(data.test)}, "
        f"{options.train.arch}, {options.train.epochs} epochs, mean ± std over seeds"
    )
    plot = out / "learning_curves.png"
    if not plot_curves(summaries, plot, title):
        notes.append("matplotlib is not installed: no learning-curve plot (pip install 'alselect[plot]')")
        plot_path = None
    else:
        plot_path = plot
    _finish_invocation(out, time.perf_counter() - started)
    return BenchmarkResult(out, simulation.rows, summaries, text, plot_path, notes)
