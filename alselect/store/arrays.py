"""Append-only array segment files: raw little-endian rows, committed length kept in SQLite.

A segment is written (appended, fsynced) before its new length is committed, so a crash leaves
at most an uncommitted tail, which the next writer truncates. Reads memory-map committed rows.
"""

from __future__ import annotations

import mmap
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


LARGE_BYTES = 64 * 1024 * 1024


def empty_rows(rows: int, width: int, dtype: np.dtype | str) -> np.ndarray:
    """An uninitialised ``[rows, width]`` array for a large read, in plain anonymous memory.

    numpy asks the kernel for transparent huge pages on large arrays; on the VMs measured
    (docs/benchmarks.md, the store at a million images) the first touch of such an array was about 3x
    slower than of ordinary pages, which made loading a million embeddings take 6 s instead of 2.
    Arrays under 64 MiB are ordinary numpy allocations.
    """
    np_dtype = np.dtype(dtype)
    size = rows * width * np_dtype.itemsize
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
    if size < LARGE_BYTES or anonymous is None:
        return np.empty((rows, width), dtype=np_dtype)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | anonymous)
    return np.frombuffer(buffer, dtype=np_dtype).reshape(rows, width)


def read_rows(
    path: Path, dtype: str, width: int, rows: int, index: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows ``index`` of a segment with ``rows`` committed rows, into ``out`` (``[len(index), width]``).

    An ascending ``index`` made of few contiguous runs (a pool read in slot order) is read with
    positioned reads straight into ``out``: page-cache copy speed, no page faults of a memory map.
    Anything else is gathered through a read-only memory map.
    """
    np_dtype = np.dtype(dtype)
    if out is None:
        out = np.empty((len(index), width), dtype=np_dtype)
    if rows == 0 or len(index) == 0:
        return out
    index = np.asarray(index, dtype=np.int64)
    if index[0] < 0 or index[-1] >= rows:
        raise StoreError(f"array file {path}: row outside its {rows} committed rows")
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    if len(breaks) + 1 <= max(1, len(index) // 64) and np.all(np.diff(index) > 0) and out.flags.c_contiguous:
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(index)]))
        row_bytes = width * np_dtype.itemsize
        target = memoryview(out.data).cast("B")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"cannot read array file {path}: {exc}") from exc
        try:
            for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
                _read_exactly(fd, target[lo * row_bytes : hi * row_bytes], int(index[lo]) * row_bytes, path)
        finally:
            os.close(fd)
        if not np.little_endian and np_dtype.itemsize > 1:  # the files are little-endian
            out.byteswap(inplace=True)
        return out
    try:
        mapped = np.memmap(path, dtype=np_dtype.newbyteorder("<"), mode="r", shape=(rows, width))
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read array file {path}: {exc}") from exc
    if mapped.dtype == out.dtype:
        np.take(mapped, index, axis=0, out=out)
    else:
        out[...] = mapped[index]
    return out


def _read_exactly(fd: int, target: memoryview, offset: int, path: Path) -> None:
    """Fill ``target`` from ``offset`` (reads of at most 1 GiB: the kernel caps one read near 2 GiB)."""
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done : done + (1 << 30)]], offset + done)
        if got == 0:
            raise StoreError(f"array file {path} ended early: it was truncated outside alselect")
        done += got


def rows_fit(committed_rows: int, width: int, itemsize: int, extra: int) -> bool:
    return (committed_rows + extra) * width * itemsize <= SEGMENT_MAX_BYTES or committed_rows == 0
