"""A run's ranking as one array file: written in a fraction of a second for a million images.

One record per ranked image, in rank order (rank = position + 1): the image row id, the content
hash (32 raw bytes), the score, the predicted class (-1 for none) and its probability. 56 bytes per
image; read back memory-mapped, so an export of the top 1000 touches only the first pages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alselect.fsutil import fsync_directory
from alselect.store.keys import key_bytes

RANKING_DTYPE = np.dtype(
    [("image_id", "<i8"), ("sha256", "S32"), ("score", "<f8"), ("predicted", "<i4"), ("confidence", "<f4")]
)


@dataclass(frozen=True)
class Ranking:
    """Ranked images, annotate-first order, aligned ``[n]`` arrays (``keys [n, 4]`` content keys)."""

    image_ids: np.ndarray
    keys: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)

    def records(self) -> np.ndarray:
        out = np.empty(len(self), dtype=RANKING_DTYPE)
        out["image_id"] = self.image_ids
        out["sha256"] = key_bytes(self.keys) if len(self) else np.zeros(0, dtype="S32")
        out["score"] = self.scores
        out["predicted"] = self.predicted
        out["confidence"] = self.confidence
        return out


def write_ranking(path: Path, ranking: Ranking) -> None:
    """Write atomically and durably: temp file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, ranking.records(), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def read_ranking(path: Path) -> np.ndarray:
    """The records of a ranking file, memory-mapped (read-only)."""
    try:
        records = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # an empty ranking: nothing to map
        records = np.load(path, allow_pickle=False)
    if records.dtype != RANKING_DTYPE:
        raise ValueError(f"{path} is not a ranking file")
    return records
