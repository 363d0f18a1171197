"""Embed throughput (images/s): end-to-end library path vs. decode-only vs. model-only.

Prints machine facts and a Markdown table to stdout; progress goes to stderr. See README.md.

    python benchmarks/embed_throughput.py [--device auto|cpu|cuda] [--batch-size 64] [--workers N]
        [--repeats 3] [--jpegs 200] [--sample-data DIR] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image

from alselect.checkpoints import LoadedModel, load_checkpoint
from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.discover import walk_images
from alselect.embed import EmbedOptions, resolve_device
from alselect.images import ImageDecodeError, load_image
from alselect.models import build_model
from alselect.pipeline import ModelSpec, embed_folder
from alselect.preprocess import Preprocess
from alselect.store import Store

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "sample_data"
JPEG_SIZE = (1024, 768)  # width, height
WARMUP_BATCHES = 2


def log(message: str) -> None:
    """Progress and notes: stderr only, so stdout stays a clean Markdown report."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Case:
    """One dataset + checkpoint pair to measure."""

    name: str
    folder: Path
    checkpoint: Path
    description: str


@dataclass
class CaseResult:
    """Raw per-repeat rates (images/s) for one case, plus what was embedded."""

    name: str
    description: str
    images: int
    arch: str | None
    image_size: int
    resize_size: int
    end_to_end: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    model_only: list[float] = field(default_factory=list)
    embedded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max of one metric over repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- inputs ----------------------------------------------------------------------------------


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` 1024×768 quality-90 JPEGs: smooth colour gradients, blobs and mild noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = JPEG_SIZE
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs /= width
    ys /= height
    for i in range(count):
        channels = []
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * math.pi)
            a, b = rng.uniform(-1, 1, size=2)
            wave = np.sin(2 * math.pi * (fx * xs + fy * ys) + phase)
            channels.append(0.5 + 0.25 * wave + 0.2 * (a * xs + b * ys))
        img = np.stack(channels, axis=-1)
        for _ in range(3):  # a few soft blobs so images differ in structure, not just colour
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
            blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))
            img += blob[..., None] * rng.uniform(-0.4, 0.4, size=3).astype(np.float32)
        img += 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
        pixels = np.clip(img * 255.0, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img_{i:05d}.jpg", quality=90)


def make_resnet_checkpoint(path: Path) -> None:
    """A random-weight torchvision resnet18 saved as an alselect checkpoint (224 crop of 256)."""
    torch.manual_seed(0)
    model = build_model("resnet18", 1000)
    preprocess = Preprocess(image_size=224, resize_size=256)
    save_alselect_checkpoint(path, model, "resnet18", 1000, preprocess=preprocess)


# -- measurements ----------------------------------------------------------------------------


def time_end_to_end(
    case: Case, store_dir: Path, options: EmbedOptions, device: torch.device
) -> tuple[float, int, int]:
    """Seconds for one ``embed_folder`` call into a fresh store; also embedded and failed counts."""
    if store_dir.exists():
        shutil.rmtree(store_dir)
    store = Store.open(store_dir, write=True, create=True)
    try:
        synchronize(device)
        start = time.perf_counter()
        result = embed_folder(store, case.folder, ModelSpec(case.checkpoint), options)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        store.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    return seconds, result.embedded, len(result.failures) + len(result.sync.unreadable)


def time_decode(paths: list[Path], preprocess: Preprocess) -> float:
    """Seconds to ``load_image`` every file once, sequentially in this process."""
    start = time.perf_counter()
    for path in paths:
        with contextlib.suppress(ImageDecodeError):  # a failed decode still costs its time
            load_image(path, preprocess)
    return time.perf_counter() - start


def time_model(
    model: LoadedModel, count: int, batch_size: int, size: int, device: torch.device
) -> Callable[[], float]:
    """Build a timer for ``predict`` over ``count`` images from a pre-decoded on-device batch."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    sizes = [batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else [])
    model.to(device)

    def run() -> float:
        for n in [batch_size] * WARMUP_BATCHES + sorted(set(sizes) - {batch_size}):
            model.predict(batch[:n])  # warm-up: allocator, kernel selection, each batch shape
        synchronize(device)
        start = time.perf_counter()
        for n in sizes:
            model.predict(batch[:n])
        synchronize(device)
        return time.perf_counter() - start

    return run


def measure(case: Case, args: argparse.Namespace, device: torch.device, scratch: Path) -> CaseResult:
    """Run all three measurements ``args.repeats`` times, interleaved, for one case."""
    root = case.folder.resolve()
    paths = [root / found.relpath for found in walk_images(root)]
    count = len(paths)
    if count == 0:
        raise SystemExit(f"{case.name}: no images under {case.folder}")
    model = load_checkpoint(case.checkpoint)
    pre = model.preprocess
    result = CaseResult(case.name, case.description, count, model.arch, pre.image_size, pre.resize_size)
    options = EmbedOptions(device=str(device), batch_size=args.batch_size, workers=args.workers)
    model_timer = time_model(model, count, args.batch_size, pre.image_size, device)
    log(f"[{case.name}] {count} images, {model.arch} at {pre.image_size} px, {args.repeats} repeat(s)")
    for repeat in range(1, args.repeats + 1):
        seconds, embedded, failed = time_end_to_end(case, scratch / f"store-{case.name}", options, device)
        result.end_to_end.append(count / seconds)
        result.embedded.append(embedded)
        result.failed.append(failed)
        if embedded + failed != count:
            log(f"  note: embedded {embedded} + failed {failed} != {count} files (duplicate content?)")
        decode_s = time_decode(paths, pre)
        result.decode.append(count / decode_s)
        model_s = model_timer()
        result.model_only.append(count / model_s)
        log(
            f"  repeat {repeat}: end-to-end {seconds:.2f} s ({count / seconds:.1f} img/s), "
            f"decode {decode_s:.2f} s ({count / decode_s:.1f} img/s), "
            f"model {model_s:.2f} s ({count / model_s:.1f} img/s)"
        )
    model.to(torch.device("cpu"))
    return result


# -- reporting -------------------------------------------------------------------------------


def machine_facts(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: CPUs, library versions, threads, accelerator."""
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu_name = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                cpu_name,
            )
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu": cpu_name,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def fmt(values: list[float]) -> str:
    """``median (min–max)`` with precision suited to the magnitude."""
    stats = summary(values)

    def num(v: float) -> str:
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"

    if len(values) == 1:
        return num(stats["median"])
    return f"{num(stats['median'])} ({num(stats['min'])}–{num(stats['max'])})"


def markdown(facts: dict[str, Any], settings: dict[str, Any], results: list[CaseResult]) -> str:
    """The stdout report: machine facts, settings, one table row per case."""
    lines = [
        "## Embed throughput",
        "",
        f"- CPU: {facts['cpu']} — {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable)",
        f"- device: {facts['device']} ({facts['device_name']})",
        f"- torch {facts['torch']} (CUDA {facts['torch_cuda']}), {facts['torch_threads']} threads; "
        f"Pillow {facts['pillow']}; numpy {facts['numpy']}; Python {facts['python']}",
        f"- batch size {settings['batch_size']}, DataLoader workers {settings['workers']}"
        f"{' (library default)' if settings['workers_default'] else ''}, "
        f"{settings['repeats']} repeat(s): median (min–max), images/s",
        "",
        "| dataset | images | model | end-to-end | decode only (1 process) | model only "
        "| end-to-end / model |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = statistics.median(r.end_to_end) / statistics.median(r.model_only)
        model = f"{r.arch} @ {r.image_size} px"
        lines.append(
            f"| {r.description} | {r.images} | {model} | {fmt(r.end_to_end)} | {fmt(r.decode)} "
            f"| {fmt(r.model_only)} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def to_json(facts: dict[str, Any], settings: dict[str, Any], results: list[CaseResult]) -> dict[str, Any]:
    """Everything measured, raw per-repeat rates included."""
    cases = []
    for r in results:
        data = asdict(r)
        data["summary"] = {
            "end_to_end": summary(r.end_to_end),
            "decode": summary(r.decode),
            "model_only": summary(r.model_only),
            "end_to_end_over_model": statistics.median(r.end_to_end) / statistics.median(r.model_only),
        }
        cases.append(data)
    return {"machine": facts, "settings": settings, "unit": "images/s", "cases": cases}


# -- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader decode workers (default: library default)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement (default: 3)")
    parser.add_argument("--jpegs", type=int, default=200, help="generated 1024×768 JPEGs (default: 200)")
    parser.add_argument(
        "--sample-data",
        type=Path,
        default=SAMPLE_DATA,
        metavar="DIR",
        help="folder with images/ and model.pt (default: the repository's sample_data)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write results as JSON")
    args = parser.parse_args(argv)
    for name in ("batch_size", "repeats", "jpegs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    for needed in (args.sample_data / "images", args.sample_data / "model.pt"):
        if not needed.exists():
            parser.error(f"{needed} not found (see --sample-data; scripts/make_sample_data.py makes it)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Generate inputs, measure both cases, print the report."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.init()  # context creation is not part of any timing
    facts = machine_facts(device)
    workers = EmbedOptions(workers=args.workers).worker_count()
    settings = {
        "batch_size": args.batch_size,
        "workers": workers,
        "workers_default": args.workers is None,
        "repeats": args.repeats,
        "jpegs": args.jpegs,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alselect-bench-") as tmp:
        scratch = Path(tmp)
        log(f"generating {args.jpegs} JPEGs {JPEG_SIZE[0]}×{JPEG_SIZE[1]} and a resnet18 checkpoint in {tmp}")
        gen_start = time.perf_counter()
        make_jpegs(scratch / "jpegs", args.jpegs)
        make_resnet_checkpoint(scratch / "resnet18.pt")
        log(f"  generated in {time.perf_counter() - gen_start:.1f} s")
        cases = [
            Case(
                "jpeg",
                scratch / "jpegs",
                scratch / "resnet18.pt",
                f"generated JPEG {JPEG_SIZE[0]}×{JPEG_SIZE[1]} q90",
            ),
            Case(
                "sample_data",
                args.sample_data / "images",
                args.sample_data / "model.pt",
                "sample_data/images",
            ),
        ]
        results = [measure(case, args, device, scratch) for case in cases]
    elapsed = time.perf_counter() - started
    settings["elapsed_s"] = round(elapsed, 1)
    log(f"done in {elapsed:.1f} s")
    print(markdown(facts, settings, results))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(facts, settings, results), indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
