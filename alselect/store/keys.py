"""Content hashes as numbers, so pools of a million images align with sorts, not Python loops.

A sha256 hex digest becomes four big-endian uint64 words ``[n, 4]``: numeric order of the words is
the text order of the digests (SQLite's order for the ``sha256`` columns). Sorting and searching use
the first word and then verify all four, with an exact fallback for the (astronomically rare) case of
two different contents sharing a first word.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def content_keys(shas: Sequence[str]) -> np.ndarray:
    """``[n, 4]`` uint64 words of each hex digest (``[0, 4]`` for none)."""
    try:
        keys = hex_words("".join(shas), 4)
    except ValueError:
        keys = None
    if keys is None or len(keys) != len(shas):
        raise ValueError("content hashes must be 64 hex digits each")
    return keys


def hex_words(text: str, words: int) -> np.ndarray:
    """``[n, words]`` uint64 of concatenated fixed-width hex (16 digits per word), e.g. SQLite's
    ``group_concat`` of digests or ``printf('%016x', ...)`` numbers: one parse, no per-row objects."""
    raw = bytes.fromhex(text)
    if len(raw) % (8 * words):
        raise ValueError(f"hex text of {len(raw)} bytes is not a whole number of {words}-word rows")
    return np.frombuffer(raw, dtype=">u8").reshape(-1, words).astype(np.uint64)


def key_bytes(keys: np.ndarray) -> np.ndarray:
    """``[n]`` 32-byte values (``S32``) of ``[n, 4]`` keys, for storage."""
    return np.ascontiguousarray(keys.astype(">u8")).view("S32").reshape(-1)


def record_keys(records: np.ndarray) -> np.ndarray:
    """``[n, 4]`` keys of ranking records' ``sha256`` (``S32``) field, without per-row Python work."""
    raw = np.ascontiguousarray(records["sha256"]).view(np.uint8).reshape(len(records), 32)
    return np.ascontiguousarray(raw).view(">u8").reshape(-1, 4).astype(np.uint64)


def key_hex(raw: bytes) -> str:
    """The hex digest of a stored 32-byte key (NUL padding restored: ``S32`` strips trailing NULs)."""
    return raw.ljust(32, b"\0").hex()


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b).all(axis=1)


def full_order(keys: np.ndarray) -> np.ndarray:
    """Stable order of ``keys`` by all 256 bits."""
    first = keys[:, 0]
    if len(first) and bool(np.all(first[1:] > first[:-1])):
        return np.arange(len(first))  # already in order, distinct first words (a table read in order)
    order = np.argsort(first, kind="stable")
    first = first[order]
    clash = (first[1:] == first[:-1]) & ~_same(keys[order[1:]], keys[order[:-1]])
    if clash.any():  # two contents share the first 64 bits: sort by every word
        order = np.lexsort(keys.T[::-1])
    return order


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Ascending indices of the first row of each distinct key."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    order = full_order(keys)
    ordered = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = ~_same(ordered[1:], ordered[:-1])
    # within a group the stable sort keeps input order, so its first member is the smallest index
    return np.sort(order[starts])


def last_occurrences(keys: np.ndarray) -> np.ndarray:
    """Ascending indices of the last row of each distinct key."""
    n = len(keys)
    return np.sort(n - 1 - first_occurrences(keys[::-1]))


def lookup(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(position, found)`` of each of ``keys`` in ``table`` (keys sorted by ``full_order``)."""
    if not len(table) or not len(keys):
        return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
    needles = keys[:, 0]
    if len(needles) > 4096:  # searching in ascending order keeps the table's lines in cache
        ascending = np.argsort(needles)
        pos = np.empty(len(needles), dtype=np.int64)
        pos[ascending] = np.searchsorted(table[:, 0], needles[ascending], side="left")
    else:
        pos = np.searchsorted(table[:, 0], needles, side="left")
    pos = np.minimum(pos, len(table) - 1)
    found = _same(table[pos], keys)
    unsure = np.flatnonzero(~found & (table[pos, 0] == keys[:, 0]))
    for i in unsure.tolist():  # first words collide: look through the run of equal first words
        j = int(pos[i])
        while j < len(table) and table[j, 0] == keys[i, 0]:
            if _same(table[j : j + 1], keys[i : i + 1])[0]:
                pos[i], found[i] = j, True
                break
            j += 1
    return pos, found


def member(table_shas: Sequence[str], keys: np.ndarray) -> np.ndarray:
    """``[n]`` bool: which of ``keys`` appear among ``table_shas`` (any order)."""
    table = content_keys(table_shas)
    return lookup(table[full_order(table)], keys)[1]
