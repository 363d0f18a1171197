"""Append-only array segment files: raw little-endian rows, committed length kept in SQLite.

A segment is written (appended, fsynced) before its new length is committed, so a crash leaves
at most an uncommitted tail, which the next writer truncates. Reads memory-map committed rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from alselect.errors import StoreError
from alselect.fsutil import fsync_directory

SEGMENT_MAX_BYTES = 256 * 1024 * 1024


def append_rows(path: Path, committed_rows: int, rows: np.ndarray) -> None:
    """Append ``rows`` after the first ``committed_rows`` rows, dropping any crash leftovers."""
    row_bytes = rows.shape[1] * rows.dtype.itemsize
    expected = committed_rows * row_bytes
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        actual = os.fstat(fd).st_size
        if actual < expected:
            raise StoreError(
                f"array file {path} is shorter than the store records ({actual} < {expected} "
                "bytes): it was truncated outside alselect"
            )
        if actual > expected:
            os.ftruncate(fd, expected)  # uncommitted tail of a killed writer
        contiguous = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
        data = memoryview(contiguous.data).cast("B")
        written = os.pwrite(fd, data, expected)  # the array's own buffer: no copy
        while written < len(data):
            written += os.pwrite(fd, data[written:], expected + written)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_directory(path.parent)  # the new file's name must survive power loss too


def read_rows(path: Path, dtype: str, width: int, rows: int, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of a segment with ``rows`` committed rows, via a read-only memory map."""
    if rows == 0 or len(index) == 0:
        return np.empty((len(index), width), dtype=np.dtype(dtype))
    try:
        mapped = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", shape=(rows, width))
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read array file {path}: {exc}") from exc
    return np.asarray(mapped[index], dtype=np.dtype(dtype))


def rows_fit(committed_rows: int, width: int, itemsize: int, extra: int) -> bool:
    return (committed_rows + extra) * width * itemsize <= SEGMENT_MAX_BYTES or committed_rows == 0
