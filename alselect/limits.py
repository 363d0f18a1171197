"""Bounds on options that set how much memory a run takes, checked before any work starts.

A typo such as ``--image-size 100000`` used to take the machine down: a decoding worker was killed
for memory, then the main process ran out too. These checks turn it into a usage error that says
the limit and why. Torch-free, so the CLI can check before loading anything.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from alselect.errors import UsageError

# A crop side beyond any image classifier's input (ViTs and CNNs take 224-1024 px); at this size
# one image is 48 MB as bytes and 192 MB as the float tensor the model gets.
MAX_IMAGE_SIZE = 4096
# Images with more pixels are refused as decompression bombs (``--max-pixels``). 500 MP is 2.5 times
# the largest phone sensors (200 MP) and over 3 times medium-format backs (150 MP). JPEGs of any size
# decode at 1/8 scale (draft); other formats are box-reduced right after loading (alselect.images).
DEFAULT_MAX_PIXELS = 500_000_000
# gc --keep-runs: past any real store's run count; SQLite integers stop at 2**63 - 1.
MAX_KEEP_RUNS = 1_000_000_000
# Decoded batches a DataLoader worker keeps ready ahead of the model (its prefetch_factor).
PREFETCH_BATCHES = 4
# Share of the machine's memory the image batches may take; the rest is for the model and the system.
MEMORY_SHARE = 0.5

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


# Decoding processes at most by default (each keeps PREFETCH_BATCHES batches in memory).
MAX_DEFAULT_WORKERS = 32


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a container's CPU quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            count = min(count, max(1, -(-int(quota) // int(period))))
    return max(1, count)


def default_workers(accelerator: bool = False, cpus: int | None = None) -> int:
    """Decoding processes when ``--workers`` is not given.

    With a GPU the model costs the CPUs nothing, so decoding gets all but one (the main process
    feeds the GPU and stores results). On the CPU the model and decoding share the cores: half of
    them decode (at least one, at most 4), and ``default_threads`` gives the model the rest.
    """
    cpus = usable_cpus() if cpus is None else cpus
    if accelerator:
        return max(1, min(MAX_DEFAULT_WORKERS, cpus - 1))
    return max(1, min(4, cpus // 2))


def default_threads(workers: int, accelerator: bool = False, cpus: int | None = None) -> int:
    """Torch threads of the model when ``--threads`` is not given: the CPUs the workers leave.

    Never more threads than CPUs in all: a model whose threads wait on each other at every layer
    loses far more than the CPU time a decoding worker takes when they share a core.
    """
    cpus = usable_cpus() if cpus is None else cpus
    if accelerator:
        return max(1, min(4, cpus - workers))
    return max(1, cpus - workers)


def check_image_size(size: int, what: str = "--image-size") -> None:
    if size < 1:
        raise UsageError(f"{what} must be positive, got {size}")
    if size > MAX_IMAGE_SIZE:
        raise UsageError(
            f"{what} {size} is over the limit of {MAX_IMAGE_SIZE} px: no image classifier takes inputs "
            f"that large, and one such image would be {_size(3 * 4 * size * size)} as model input"
        )


def batch_memory(batch_size: int, image_size: int, workers: int) -> int:
    """Bytes of image data in memory at once: the batches decoding workers keep ready (uint8),
    plus the batch in hand: its decoded images, their stack, and the float32 tensor for the model."""
    image = 3 * image_size * image_size
    return batch_size * image * (workers * PREFETCH_BATCHES + 1 + 1 + 4)


def check_batch_memory(batch_size: int, image_size: int, workers: int, available: int | None = None) -> None:
    """Refuse options whose image batches alone would take more than half of the machine's memory."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    available = usable_memory() if available is None else available
    if available is None:
        return
    needed = batch_memory(batch_size, image_size, workers)
    if needed > MEMORY_SHARE * available:
        raise UsageError(
            f"--batch-size {batch_size} at {image_size} px with {workers} decoding worker(s) needs about "
            f"{_size(needed)} for image batches alone, over half of this machine's {_size(available)}: "
            "lower --batch-size, --workers or --image-size"
        )


def usable_memory() -> int | None:
    """Physical memory, or the container's (cgroup) memory limit when that is lower; None if unknown."""
    sizes = []
    with contextlib.suppress(ValueError, OSError, AttributeError):  # no sysconf name on this OS
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for name in _CGROUP_LIMITS:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    return min(sizes) if sizes else None


def _size(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}"
        count /= 1000
    return f"{count:,.0f} TB"
