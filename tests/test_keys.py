"""Content keys: numeric order equals text order, dedupe and lookup exact even when first words clash."""

from __future__ import annotations

import hashlib

import numpy as np

from alselect.store.keys import (
    content_keys,
    first_occurrences,
    full_order,
    key_bytes,
    key_hex,
    lookup,
    member,
)


def digests(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def test_numeric_order_is_text_order_and_bytes_round_trip() -> None:
    shas = [*digests(200), "00" * 32, "ff" * 32, "00" * 31 + "01"]
    keys = content_keys(shas)
    assert [shas[i] for i in full_order(keys)] == sorted(shas)
    assert [key_hex(b) for b in key_bytes(keys).tolist()] == shas


def test_first_occurrences_keep_the_first_row_of_each_content() -> None:
    shas = digests(50)
    rows = [shas[i % 17] for i in range(60)]  # repeats, first seen at rows 0..16
    assert first_occurrences(content_keys(rows)).tolist() == list(range(17))


def clashing(n: int) -> list[str]:
    """Distinct digests that share their first 64 bits."""
    return [("ab" * 8) + hashlib.sha256(str(i).encode()).hexdigest()[16:] for i in range(n)]


def test_contents_sharing_the_first_word_stay_apart() -> None:
    shas = clashing(6)
    rows = [shas[0], shas[3], shas[0], shas[5], shas[3], shas[1]]
    assert first_occurrences(content_keys(rows)).tolist() == [0, 1, 3, 5]
    table = content_keys(shas[:4] + digests(5))
    table = table[full_order(table)]
    pos, found = lookup(table, content_keys([shas[3], shas[5], shas[0]]))
    assert found.tolist() == [True, False, True]
    assert [key_hex(b) for b in key_bytes(table[pos[found]]).tolist()] == [shas[3], shas[0]]
    assert member(shas[:2], content_keys(rows)).tolist() == [True, False, True, False, False, True]


def test_lookup_agrees_with_a_dictionary() -> None:
    rng = np.random.default_rng(0)
    table_shas = digests(1000)
    queries = [table_shas[i] for i in rng.integers(0, 1000, 300)] + digests(1300)[1000:]
    table = content_keys(table_shas)
    order = full_order(table)
    pos, found = lookup(table[order], content_keys(queries))
    index = {sha: i for i, sha in enumerate(table_shas)}
    assert found.tolist() == [q in index for q in queries]
    assert order[pos[found]].tolist() == [index[q] for q in queries if q in index]
