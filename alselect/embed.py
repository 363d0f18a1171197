"""Batched inference over image files: decode in worker processes, run the model, hand back arrays."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alselect.checkpoints import LoadedModel
from alselect.errors import AlselectError, UsageError
from alselect.images import ImageDecodeError, load_image
from alselect.preprocess import Preprocess
from alselect.progress import NULL_REPORTER, Reporter


@dataclass(frozen=True)
class EmbedOptions:
    """Where and how to run the model."""

    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # None: min(4, CPU count); 0: decode in this process

    def worker_count(self) -> int:
        if self.workers is not None:
            if self.workers < 0:
                raise UsageError(f"--workers must be >= 0, got {self.workers}")
            return self.workers
        return min(4, os.cpu_count() or 1)


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit CUDA device that is missing is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AlselectError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AlselectError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec}: use auto, cpu, cuda or cuda:N")
    return device


Decoded = tuple[int, "np.ndarray | None", "str | None"]


class _ImageFiles(Dataset[Decoded]):
    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        try:
            return index, load_image(self.paths[index], self.preprocess), None
        except ImageDecodeError as exc:
            return index, None, str(exc)


def _keep_as_list(batch: list[Decoded]) -> list[Decoded]:
    return batch


BatchSink = Callable[[list[int], np.ndarray, np.ndarray, list[tuple[int, str]]], None]


def run_model(
    model: LoadedModel,
    paths: Sequence[Path],
    preprocess: Preprocess,
    options: EmbedOptions,
    on_batch: BatchSink,
    reporter: Reporter = NULL_REPORTER,
) -> None:
    """Decode ``paths`` and call ``on_batch(indices, probs [n, C], embeddings [n, D], failures)``.

    ``failures`` lists ``(index, reason)`` for files that could not be decoded; they never stop
    the loop. Batches are handed over in input order, one per ``batch_size`` files.
    """
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {options.batch_size}")
    device = resolve_device(options.device)
    model.to(device)
    workers = options.worker_count()
    loader = DataLoader(
        _ImageFiles(paths, preprocess),
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_keep_as_list,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1) * 255.0
    done = 0
    reporter.progress("embed", 0, len(paths))
    for batch in loader:
        ok = [(i, arr) for i, arr, _ in batch if arr is not None]
        failures = [(i, reason) for i, arr, reason in batch if arr is None and reason is not None]
        if ok:
            pixels = torch.from_numpy(np.stack([arr for _, arr in ok]))
            pixels = pixels.to(device, non_blocking=True).float().sub_(mean).div_(std)
            probs, embedding = model.predict(pixels)
            on_batch([i for i, _ in ok], probs.cpu().numpy(), embedding.cpu().numpy(), failures)
        else:
            on_batch([], np.empty((0, 0), np.float32), np.empty((0, 0), np.float32), failures)
        done += len(batch)
        reporter.progress("embed", done, len(paths))
