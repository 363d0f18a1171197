"""Peak RSS of `alselect score` on a pool of small images (issue #11, item 5).

Generates ``--images`` distinct 28×28 greyscale PNGs (the sample Fashion-MNIST images, each copy
with its index written into three corner pixels, 1,000 per folder), then runs
``alselect score --strategy entropy`` with the sample CNN twice in fresh processes: the first run
embeds every image, the second is the nightly no-op (nothing new). For each it prints the wall
time and the peak RSS of the largest process (``ru_maxrss`` from ``os.wait4``: the main process or
one decoding worker, whichever peaked higher). A ``python -c 'import torch, torchvision'`` run
gives the fixed part that any command importing torch pays.

    python benchmarks/score_memory.py --images 100000 [--folder DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "sample_data"


def make_pool(folder: Path, count: int) -> None:
    """``count`` distinct 28×28 PNGs under ``folder/dNNN/``."""
    sources = sorted((SAMPLE / "images" / "fashion").glob("*.png"))
    pictures = [np.asarray(Image.open(p).convert("L")) for p in sources]
    for i in range(count):
        pixels = pictures[i % len(pictures)].copy()
        pixels[0, 0], pixels[0, 1], pixels[0, 2] = i % 256, (i // 256) % 256, (i // 65536) % 256
        sub = folder / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(sub / f"f_{i:06d}.png", compress_level=1)


def measured(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, exit status and peak RSS (KiB) of ``command`` and the processes it waited for."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        sys.stderr.write(stderr.decode(errors="replace"))
    return seconds, process.returncode, int(usage.ru_maxrss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="pool size (default: 100000)")
    parser.add_argument("--folder", type=Path, default=None, help="where to build it (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the pool and the store")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    base = args.folder or Path(tempfile.mkdtemp(prefix="alselect-score-mem-"))
    pool, store = base / "pool", base / "store"
    env_python = [sys.executable]
    try:
        start = time.perf_counter()
        make_pool(pool, args.images)
        print(f"generated {args.images} PNGs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        seconds, _, rss = measured([*env_python, "-c", "import torch, torchvision"])
        print(f"import torch, torchvision: {rss / 1024:.0f} MiB peak, {seconds:.1f} s")
        score = [*env_python, "-m", "alselect", "--store", str(store), "score", str(pool)]
        score += ["--model", str(SAMPLE / "model.pt"), "--strategy", "entropy"]
        for label in ("score, first run (embeds every image)", "score, no-op rerun"):
            seconds, status, rss = measured(score)
            print(f"{label}: {rss / 1024:.0f} MiB peak, {seconds:.1f} s, exit {status}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(base if args.folder is None else pool, ignore_errors=True)
            shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
