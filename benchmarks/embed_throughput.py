"""Embed throughput (images/s): end-to-end library path vs. model-only roofs vs. a naive pipeline.

Prints machine facts and a Markdown table to stdout; progress goes to stderr. See README.md.

    python benchmarks/embed_throughput.py [--device auto|cpu|cuda] [--cases resnet18,smallcnn]
        [--batch-size 64] [--workers N] [--threads N] [--precision auto]
        [--repeats 3] [--jpegs 200] [--small 6000] [--model-images 512] [--no-naive]
        [--json results.json]
    python benchmarks/embed_throughput.py --device cuda --cases resnet50 --jpegs 50000 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
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
from alselect.inference import Accelerated, fast_precision
from alselect.limits import usable_cpus
from alselect.models import build_model
from alselect.pipeline import ModelSpec, embed_folder
from alselect.preprocess import Preprocess
from alselect.store import Store

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "sample_data"
JPEG_SIZE = (1024, 768)  # width, height
BASE_JPEGS = 200  # distinct generated pictures; more files are copies with a unique JPEG comment
WARMUP_BATCHES = 1
CASES = ("resnet18", "smallcnn", "resnet50")


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
    end_to_end: dict[str, list[float]] = field(default_factory=dict)  # per decode mode
    naive: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    model_only: dict[str, list[float]] = field(default_factory=dict)  # per model variant
    embedded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average before each repeat


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max of one metric over repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- inputs ----------------------------------------------------------------------------------


def _jpeg_picture(seed: int) -> bytes:
    """One 1024×768 quality-90 JPEG: smooth colour gradients, soft blobs and mild noise."""
    rng = np.random.default_rng(seed)
    width, height = JPEG_SIZE
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs /= width
    ys /= height
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
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    """``jpeg`` with a COM segment after SOI: other bytes (a distinct image to the store), same pixels."""
    payload = text.encode()
    segment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEG files: ``min(count, BASE_JPEGS)`` generated pictures (in parallel), then copies
    that differ by a JPEG comment, so a large pool costs little to make and decodes like real files."""
    folder.mkdir(parents=True, exist_ok=True)
    base = min(count, BASE_JPEGS)
    with multiprocessing.get_context("fork").Pool(max(1, min(base, usable_cpus()))) as pool:
        pictures = pool.map(_jpeg_picture, range(seed, seed + base))
    for i in range(count):
        data = pictures[i] if i < base else with_comment(pictures[i % base], f"copy {i}")
        (folder / f"img_{i:06d}.jpg").write_bytes(data)


def make_fashion_pool(folder: Path, sample_images: Path, count: int) -> None:
    """``count`` distinct 28×28 greyscale PNGs: the sample Fashion-MNIST images, each copy with its
    index written into two corner pixels (the content, and so the store's identity, differs)."""
    sources = sorted((sample_images / "fashion").glob("*.png"))
    if not sources:
        raise SystemExit(f"no Fashion-MNIST PNGs under {sample_images / 'fashion'}")
    pictures = [np.asarray(Image.open(p).convert("L")) for p in sources]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = pictures[i % len(pictures)].copy()
        pixels[0, 0], pixels[0, 1] = i % 256, (i // 256) % 256
        Image.fromarray(pixels, "L").save(folder / f"f_{i:06d}.png")


def make_checkpoint(path: Path, arch: str) -> None:
    """A random-weight torchvision classifier saved as an alselect checkpoint (224 crop of 256)."""
    torch.manual_seed(0)
    model = build_model(arch, 1000)
    save_alselect_checkpoint(path, model, arch, 1000, preprocess=Preprocess(image_size=224, resize_size=256))


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


class NaiveFiles(torch.utils.data.Dataset[torch.Tensor]):
    """The common idiom: ``Image.open().convert("RGB")``, torchvision Resize + CenterCrop +
    ToTensor + Normalize, per file."""

    def __init__(self, paths: list[Path], preprocess: Preprocess) -> None:
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize(preprocess.resize_size),
                transforms.CenterCrop(preprocess.image_size),
                transforms.ToTensor(),
                transforms.Normalize(preprocess.mean, preprocess.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as img:
            return self.transform(img.convert("RGB"))


def time_naive(paths: list[Path], model: LoadedModel, batch_size: int, device: torch.device) -> float:
    """Seconds for the naive pipeline: default DataLoader (no workers), fp32 ``predict``, no store."""
    loader = torch.utils.data.DataLoader(NaiveFiles(paths, model.preprocess), batch_size=batch_size)
    model.to(device)
    synchronize(device)
    start = time.perf_counter()
    for batch in loader:
        probs, embedding = model.predict(batch.to(device))
        probs.cpu().numpy(), embedding.cpu().numpy()
    synchronize(device)
    return time.perf_counter() - start


def model_variants(device: torch.device) -> dict[str, tuple[str, bool]]:
    """Model-only variants measured side by side: name → (precision, channels_last)."""
    reduced = fast_precision(device)
    reduced = "bf16" if reduced == "fp32" else reduced  # measured even where it is not the fast one
    return {"fp32": ("fp32", False), "fp32+cl": ("fp32", True), f"{reduced}+cl": (reduced, True)}


def time_model(
    model: LoadedModel,
    count: int,
    batch_size: int,
    size: int,
    device: torch.device,
    variant: tuple[str, bool],
) -> Callable[[], float]:
    """A timer for the forward over ``count`` images from a pre-normalised on-device batch, through
    the same ``Accelerated`` wrapper the pipeline uses (precision, channels_last)."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    sizes = [batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else [])
    precision, channels_last = variant

    def run() -> float:
        fast = Accelerated(model, precision, channels_last=channels_last).to(device)
        for n in [batch_size] * WARMUP_BATCHES + sorted(set(sizes) - {batch_size}):
            fast.forward_outputs(batch[:n])  # warm-up: allocator, kernel selection, each batch shape
        synchronize(device)
        start = time.perf_counter()
        for n in sizes:
            outputs = fast.forward_outputs(batch[:n])
        synchronize(device)
        seconds = time.perf_counter() - start
        del outputs
        model.module.to(memory_format=torch.contiguous_format)
        return seconds

    return run


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def measure(case: Case, args: argparse.Namespace, device: torch.device, scratch: Path) -> CaseResult:
    """Run every measurement ``args.repeats`` times, interleaved, for one case."""
    root = case.folder.resolve()
    paths = [root / found.relpath for found in walk_images(root)]
    count = len(paths)
    if count == 0:
        raise SystemExit(f"{case.name}: no images under {case.folder}")
    model = load_checkpoint(case.checkpoint)
    pre = model.preprocess
    result = CaseResult(case.name, case.description, count, model.arch, pre.image_size, pre.resize_size)
    variants = model_variants(device)
    model_count = min(count, args.model_images)
    timers = {
        name: time_model(model, model_count, args.batch_size, pre.image_size, device, variant)
        for name, variant in variants.items()
    }
    log(f"[{case.name}] {count} images, {model.arch} at {pre.image_size} px, {args.repeats} repeat(s)")
    for repeat in range(1, args.repeats + 1):
        result.load.append(load_average())
        line = [f"  repeat {repeat} (load {result.load[-1]:.2f}):"]
        for decode in args.decode:
            options = EmbedOptions(
                device=str(device),
                batch_size=args.batch_size,
                workers=args.workers,
                precision=args.precision,
                threads=args.threads,
                decode=decode,
            )
            seconds, embedded, failed = time_end_to_end(case, scratch / f"store-{case.name}", options, device)
            result.end_to_end.setdefault(decode, []).append(count / seconds)
            line.append(f"end-to-end[{decode}] {count / seconds:.1f}")
            if decode == args.decode[0]:
                result.embedded.append(embedded)
                result.failed.append(failed)
                if embedded + failed != count:
                    log(
                        f"  note: embedded {embedded} + failed {failed} != {count} files (duplicate content?)"
                    )
        for name, timer in timers.items():
            seconds = timer()
            result.model_only.setdefault(name, []).append(model_count / seconds)
            line.append(f"model[{name}] {model_count / seconds:.1f}")
        if args.naive:
            seconds = time_naive(paths, model, args.batch_size, device)
            result.naive.append(count / seconds)
            line.append(f"naive {count / seconds:.1f}")
        if args.decode_only:
            decode_s = time_decode(paths[: args.decode_only], pre)
            result.decode.append(min(count, args.decode_only) / decode_s)
            line.append(f"decode {result.decode[-1]:.0f}")
        log(", ".join(line))
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
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "cpu": cpu_name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name,
        "fast_precision": fast_precision(device),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def num(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def fmt(values: list[float]) -> str:
    """``median (min–max)`` with precision suited to the magnitude."""
    if not values:
        return "—"
    stats = summary(values)
    if len(values) == 1:
        return num(stats["median"])
    return f"{num(stats['median'])} ({num(stats['min'])}–{num(stats['max'])})"


def ratios(r: CaseResult) -> dict[str, float]:
    """End-to-end (best decode mode) over the model-only roofs and over the naive pipeline."""
    best_e2e = max(statistics.median(v) for v in r.end_to_end.values())
    medians = {name: statistics.median(v) for name, v in r.model_only.items()}
    reduced = next(name for name in medians if name not in ("fp32", "fp32+cl"))
    out = {
        "e2e_over_best_of_fp32_and_reduced_cl": best_e2e / max(medians["fp32"], medians[reduced]),
        "e2e_over_best_model_only": best_e2e / max(medians.values()),
    }
    if r.naive:
        out["e2e_over_naive"] = best_e2e / statistics.median(r.naive)
    return out


def markdown(facts: dict[str, Any], settings: dict[str, Any], results: list[CaseResult]) -> str:
    """The stdout report: machine facts, settings, one table per case."""
    lines = [
        "## Embed throughput",
        "",
        f"- CPU: {facts['cpu']} ({facts['cpu_capability']}) — {facts['cpu_count']} CPUs "
        f"({facts['cpus_usable']} usable)",
        f"- device: {facts['device']} ({facts['device_name']}); "
        f"auto precision here: {facts['fast_precision']}",
        f"- torch {facts['torch']} (CUDA {facts['torch_cuda']}); Pillow {facts['pillow']}; "
        f"numpy {facts['numpy']}; Python {facts['python']}",
        f"- batch size {settings['batch_size']}, workers {settings['workers']}, "
        f"threads {settings['threads']}, "
        f"precision {settings['precision']}, {settings['repeats']} repeat(s): median (min–max), images/s",
        "",
    ]
    for r in results:
        load = f"load average {min(r.load):.2f}–{max(r.load):.2f}" if r.load else ""
        lines += [
            f"### {r.description}: {r.arch} @ {r.image_size} px, {r.images} images ({load})",
            "",
            "| measurement | images/s |",
            "|---|---:|",
        ]
        for decode, values in r.end_to_end.items():
            lines.append(f"| end-to-end (`embed_folder`, decode {decode}) | {fmt(values)} |")
        for name, values in r.model_only.items():
            lines.append(f"| model only, {name} | {fmt(values)} |")
        if r.naive:
            lines.append(
                f"| naive pipeline (PIL convert + transforms, default DataLoader, fp32) | {fmt(r.naive)} |"
            )
        if r.decode:
            lines.append(f"| decode only, 1 process | {fmt(r.decode)} |")
        lines.append("")
        for name, value in ratios(r).items():
            lines.append(f"- {name.replace('_', ' ')}: **{value:.2f}**")
        lines.append("")
    return "\n".join(lines)


def to_json(facts: dict[str, Any], settings: dict[str, Any], results: list[CaseResult]) -> dict[str, Any]:
    """Everything measured, raw per-repeat rates included."""
    cases = []
    for r in results:
        data = asdict(r)
        data["ratios"] = ratios(r)
        cases.append(data)
    return {"machine": facts, "settings": settings, "unit": "images/s", "cases": cases}


# -- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated from {', '.join(CASES)} (default: resnet50 on CUDA, else resnet18,smallcnn)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: library's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: library's)")
    parser.add_argument("--precision", default="auto", help="end-to-end precision (default: auto)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement (default: 3)")
    parser.add_argument("--jpegs", type=int, default=200, help="1024×768 JPEG files (default: 200)")
    parser.add_argument(
        "--small", type=int, default=6000, help="28 px Fashion-MNIST PNG files (default: 6000)"
    )
    parser.add_argument(
        "--model-images",
        type=int,
        default=512,
        metavar="N",
        help="images per model-only timing, at most the case's (default: 512)",
    )
    parser.add_argument(
        "--decode",
        default="auto",
        metavar="LIST",
        help="end-to-end decode modes measured side by side, e.g. gpu,cpu on CUDA (default: auto)",
    )
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive pipeline")
    parser.add_argument(
        "--decode-only",
        type=int,
        default=200,
        metavar="N",
        help="files for the 1-process decode rate (0: skip)",
    )
    parser.add_argument(
        "--sample-data",
        type=Path,
        default=SAMPLE_DATA,
        metavar="DIR",
        help="folder with images/ and model.pt (default: the repository's sample_data)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write results as JSON")
    args = parser.parse_args(argv)
    for name in ("batch_size", "repeats", "jpegs", "small", "model_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    args.decode = [d for d in args.decode.split(",") if d]
    if not args.decode or set(args.decode) - {"auto", "cpu", "gpu"}:
        parser.error("--decode: a comma-separated list of auto, cpu, gpu")
    for needed in (args.sample_data / "images", args.sample_data / "model.pt"):
        if not needed.exists():
            parser.error(f"{needed} not found (see --sample-data; scripts/make_sample_data.py makes it)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Generate inputs, measure the cases, print the report."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.init()  # context creation is not part of any timing
    names = (args.cases or ("resnet50" if device.type == "cuda" else "resnet18,smallcnn")).split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)} (choose from {', '.join(CASES)})")
    facts = machine_facts(device)
    options = EmbedOptions(device=str(device), workers=args.workers, threads=args.threads)
    workers = options.worker_count()
    default = " (library default)"
    settings = {
        "batch_size": args.batch_size,
        "workers": f"{workers}{default if args.workers is None else ''}",
        "threads": f"{options.thread_count(workers, device)}{default if args.threads is None else ''}",
        "precision": args.precision,
        "decode": args.decode,
        "repeats": args.repeats,
        "jpegs": args.jpegs,
        "small": args.small,
        "command": " ".join(sys.argv),
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alselect-bench-") as tmp:
        scratch = Path(tmp)
        cases = []
        gen_start = time.perf_counter()
        if {"resnet18", "resnet50"} & set(names):
            log(f"generating {args.jpegs} JPEGs {JPEG_SIZE[0]}×{JPEG_SIZE[1]} in {tmp}")
            make_jpegs(scratch / "jpegs", args.jpegs)
        for arch in ("resnet18", "resnet50"):
            if arch in names:
                make_checkpoint(scratch / f"{arch}.pt", arch)
                cases.append(
                    Case(
                        arch,
                        scratch / "jpegs",
                        scratch / f"{arch}.pt",
                        f"JPEG {JPEG_SIZE[0]}×{JPEG_SIZE[1]} q90",
                    )
                )
        if "smallcnn" in names:
            log(f"generating {args.small} Fashion-MNIST PNGs")
            make_fashion_pool(scratch / "fashion", args.sample_data / "images", args.small)
            cases.append(
                Case(
                    "smallcnn", scratch / "fashion", args.sample_data / "model.pt", "Fashion-MNIST PNG 28×28"
                )
            )
        log(f"  generated in {time.perf_counter() - gen_start:.1f} s")
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
