"""Embed throughput of the Ray engine against the local engine, plus the driver's own limits.

Prints machine facts and a Markdown report to stdout; progress goes to stderr. See README.md.

    python benchmarks/ray_throughput.py [--jpegs 200] [--batch-size 64] [--repeats 2] [--json FILE]

Needs the ray extra (``pip install -e ".[ray]"``). Cases as in ``embed_throughput.py``: generated
1024×768 JPEGs with a random-weight resnet18 at 224 px, and ``sample_data`` with its SmallCNN.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from alselect.checkpoints import load_checkpoint
from alselect.discover import hash_files, walk_images
from alselect.embed import EmbedOptions
from alselect.pipeline import ModelSpec, embed_folder
from alselect.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import (  # the sibling benchmark's generators and facts
    SAMPLE_DATA,
    log,
    machine_facts,
    make_jpegs,
    make_resnet_checkpoint,
)

REGISTER_CHUNKS = 50


@dataclass
class CaseResult:
    """Images/s per repeat for each engine, and the driver-side rates for one folder and model."""

    name: str
    images: int
    model: str
    local: list[float] = field(default_factory=list)
    ray: list[float] = field(default_factory=list)
    model_1_thread: float = 0.0
    model_all_threads: float = 0.0
    hash_rate: float = 0.0
    hash_mb_s: float = 0.0
    register_rate: float = 0.0


def timed_embed(folder: Path, checkpoint: Path, options: EmbedOptions, store_dir: Path) -> tuple[float, int]:
    """Seconds for one ``embed_folder`` into a new, empty store, and how many images it embedded."""
    shutil.rmtree(store_dir, ignore_errors=True)
    with Store.open(store_dir, write=True, create=True) as store:
        start = time.perf_counter()
        result = embed_folder(store, folder, ModelSpec(checkpoint), options)
        seconds = time.perf_counter() - start
    shutil.rmtree(store_dir, ignore_errors=True)
    return seconds, result.embedded


def model_rate(checkpoint: Path, count: int, batch_size: int, threads: int) -> float:
    """Images/s of ``predict`` alone on ``threads`` torch threads (a CPU actor gets 1)."""
    model = load_checkpoint(checkpoint)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        size = model.preprocess.image_size
        batch = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        model.predict(batch)  # warm-up
        start = time.perf_counter()
        done = 0
        while done < count:
            n = min(batch_size, count - done)
            model.predict(batch[:n])
            done += n
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def hash_rate(folder: Path) -> tuple[float, float]:
    """Images/s and MB/s of the driver's sha256 of every file (4 threads, as ``sync_folder``)."""
    root = folder.resolve()
    files = [found.relpath for found in walk_images(root)]
    size = sum((root / rel).stat().st_size for rel in files)
    start = time.perf_counter()
    for _ in hash_files(root, files, 4):
        pass
    seconds = time.perf_counter() - start
    return len(files) / seconds, size / seconds / 1e6


def register_rate(checkpoint: Path, batch_size: int, store_dir: Path) -> float:
    """Images/s the driver registers: ``add_outputs`` (append, fsync, one transaction) per chunk of
    ``batch_size`` rows of this model's output shapes."""
    from alselect.pipeline import prepare_model, register

    prepared = prepare_model(ModelSpec(checkpoint))
    size = prepared.preprocess.image_size
    outputs = prepared.model.forward_outputs(torch.zeros(1, 3, size, size))
    rng = np.random.default_rng(0)
    shutil.rmtree(store_dir, ignore_errors=True)
    with Store.open(store_dir, write=True, create=True) as store:
        register(store, prepared)
        chunks = [
            (
                [f"{rng.integers(1 << 62):064x}" for _ in range(batch_size)],
                {k: np.repeat(v.numpy(), batch_size, axis=0) for k, v in outputs.items()},
            )
            for _ in range(REGISTER_CHUNKS)
        ]
        start = time.perf_counter()
        for shas, arrays in chunks:
            store.add_outputs(prepared.key, shas, arrays)
        seconds = time.perf_counter() - start
    shutil.rmtree(store_dir, ignore_errors=True)
    return REGISTER_CHUNKS * batch_size / seconds


def fmt(values: list[float]) -> str:
    def num(v: float) -> str:
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"

    if len(values) == 1:
        return num(values[0])
    return f"{num(statistics.median(values))} ({num(min(values))}–{num(max(values))})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpegs", type=int, default=200, help="generated 1024×768 JPEGs (default: 200)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per chunk (default: 64)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per engine (default: 2)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write results as JSON")
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    facts = machine_facts(torch.device("cpu"))
    facts["ray"] = ray.__version__
    facts["load_before"] = os.getloadavg()
    local = EmbedOptions(device="cpu", batch_size=args.batch_size)
    remote = EmbedOptions(device="cpu", batch_size=args.batch_size, engine="ray")
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="alselect-ray-bench-") as tmp:
        scratch = Path(tmp)
        log(f"generating {args.jpegs} JPEGs and a resnet18 checkpoint in {tmp}")
        make_jpegs(scratch / "jpegs", args.jpegs)
        make_resnet_checkpoint(scratch / "resnet18.pt")
        cases = [
            ("generated JPEG 1024×768 q90", scratch / "jpegs", scratch / "resnet18.pt", "resnet18 @ 224 px"),
            ("sample_data/images", SAMPLE_DATA / "images", SAMPLE_DATA / "model.pt", "small_cnn @ 28 px"),
        ]
        for name, folder, checkpoint, model in cases:
            count = sum(1 for _ in walk_images(folder.resolve()))
            result = CaseResult(name, count, model)
            result.hash_rate, result.hash_mb_s = hash_rate(folder)
            result.register_rate = register_rate(checkpoint, args.batch_size, scratch / "store-reg")
            result.model_1_thread = model_rate(checkpoint, count, args.batch_size, 1)
            result.model_all_threads = model_rate(checkpoint, count, args.batch_size, torch.get_num_threads())
            for repeat in range(args.repeats):
                seconds, embedded = timed_embed(folder, checkpoint, local, scratch / "store")
                result.local.append(embedded / seconds)
                log(f"[{name}] local repeat {repeat + 1}: {seconds:.1f} s, {embedded / seconds:.1f} img/s")
            results.append(result)
        log(f"starting a local Ray instance with {cpus} CPUs")
        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        startup = time.perf_counter() - start
        try:
            one = scratch / "one"
            one.mkdir()
            shutil.copy(next((scratch / "jpegs").iterdir()), one)
            fixed, _ = timed_embed(one, scratch / "resnet18.pt", remote, scratch / "store")
            log(f"ray fixed cost (1 image): {fixed:.1f} s")
            for result, (name, folder, checkpoint, _) in zip(results, cases, strict=True):
                for repeat in range(args.repeats):
                    seconds, embedded = timed_embed(folder, checkpoint, remote, scratch / "store")
                    result.ray.append(embedded / seconds)
                    log(f"[{name}] ray repeat {repeat + 1}: {seconds:.1f} s, {embedded / seconds:.1f} img/s")
        finally:
            ray.shutdown()
    facts["load_after"] = os.getloadavg()
    report(facts, args, startup, fixed, results)
    if args.json is not None:
        data: dict[str, Any] = {"machine": facts, "ray_startup_s": startup, "ray_fixed_s": fixed}
        data["cases"] = [asdict(r) for r in results]
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


def report(
    facts: dict[str, Any], args: argparse.Namespace, startup: float, fixed: float, results: list[CaseResult]
) -> None:
    load = ", ".join(f"{x:.1f}" for x in facts["load_before"])
    print("## Ray engine vs local engine")
    print()
    print(f"- CPU: {facts['cpu']} — {facts['cpu_count']} CPUs; no GPU; load average before: {load}")
    print(f"- torch {facts['torch']}, Ray {facts['ray']}, Pillow {facts['pillow']}, Python {facts['python']}")
    print(
        f"- batch size {args.batch_size}; local: DataLoader workers min(4, CPUs), torch "
        f"{facts['torch_threads']} threads; Ray: a local instance with all CPUs, the default plan "
        "(half the CPUs as model actors, 1 torch thread each; decode tasks on the rest)"
    )
    print(f"- Ray start-up (`ray.init`, local instance): {startup:.1f} s, paid once per command")
    print(
        f"- Ray fixed cost per embedding run with the instance up (1 image, resnet18): {fixed:.1f} s "
        "(pipeline start, actor process, model load)"
    )
    print(f"- {args.repeats} repeat(s), median (min–max), images/s; each repeat embeds into a new store")
    print()
    print(
        "| dataset | images | model | local | Ray (instance up) | model alone, 1 thread | all threads "
        "| driver sha256 | driver registers |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        driver = f"{r.hash_rate:.0f} ({r.hash_mb_s:.0f} MB/s) | {r.register_rate:.0f}"
        print(
            f"| {r.name} | {r.images} | {r.model} | {fmt(r.local)} | {fmt(r.ray)} | {r.model_1_thread:.0f} "
            f"| {r.model_all_threads:.0f} | {driver} |"
        )


if __name__ == "__main__":
    sys.exit(main())
