"""Registered outputs go through ``outputs_log`` (migration m008) and are merged into ``outputs``.

Every reader sees a content's latest slot whether its row is merged or not: checked against a
dictionary of what was registered, through random batches, re-registrations and merges, from the
writer and from a concurrent read-only reader; a writer killed mid-merge loses nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from alselect.gc import count_outputs
from alselect.status import store_status
from alselect.store import Store
from alselect.store.keys import first_occurrences, last_occurrences, lookup

KEY = "b" * 64


def sha(i: int) -> str:
    return f"{(i * 0x9E3779B97F4A7C15) % (1 << 256):064x}"


def open_with_model(path: Path) -> Store:
    store = Store.open(path, write=True, create=True)
    if store.model(KEY) is None:
        store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
    return store


def register(store: Store, ids: list[int], value: float) -> None:
    n = len(ids)
    store.add_outputs(
        KEY,
        [sha(i) for i in ids],
        {
            "probs": np.full((n, 3), value, np.float32),
            "embedding": np.array([[i, value] for i in ids], np.float32),
        },
    )


def logged(store: Store) -> int:
    return int(store.scalar("SELECT COUNT(*) FROM outputs_log"))


def expect_latest(store: Store, latest: dict[int, float]) -> None:
    """Every reader's view equals the brute-force record of the last registration per content."""
    ids = sorted(latest)
    found, arrays = store.outputs_of(KEY, ["embedding"], [sha(i) for i in ids] + [sha(10**6)])
    assert found.tolist() == [True] * len(ids) + [False]
    np.testing.assert_array_equal(arrays["embedding"], [[i, latest[i]] for i in ids])
    store.upsert_images("/pool", [(f"{i:05d}.png", sha(i), 1, 1, "present", None) for i in ids])
    pool = store.pool_rows("/pool", [KEY])
    np.testing.assert_array_equal(store.pool_array(pool, KEY, "embedding"), [[i, latest[i]] for i in ids])
    assert count_outputs(store, KEY) == len(ids)
    assert store_status(store)["models"][0]["embedded"] == len(ids)


def test_rows_wait_in_the_log_until_the_threshold_and_readers_see_them(store_path: Path) -> None:
    with mock.patch("alselect.store.OUTPUTS_LOG_ROWS", 10), open_with_model(store_path) as store:
        register(store, [1, 2, 3, 4], 1.0)
        assert logged(store) == 4 and store.scalar("SELECT COUNT(*) FROM outputs") == 0
        expect_latest(store, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
        register(store, [5, 6, 7, 8, 9, 10], 1.0)  # 10 logged rows: merged after the commit
        assert logged(store) == 0 and store.scalar("SELECT COUNT(*) FROM outputs") == 10
        register(store, [2, 11], 2.0)  # content 2 again: its new slot is in the log, the old merged
        assert logged(store) == 2
        latest = dict.fromkeys(range(1, 11), 1.0) | {2: 2.0, 11: 2.0}
        expect_latest(store, latest)
        assert store.missing_outputs("/pool", KEY) == []
    with Store.open(store_path) as reader:  # closing the writer merged the log
        assert logged(reader) == 0
        expect_latest_readonly(reader, latest)


def expect_latest_readonly(store: Store, latest: dict[int, float]) -> None:
    ids = sorted(latest)
    found, arrays = store.outputs_of(KEY, ["embedding"], [sha(i) for i in ids])
    assert found.all()
    np.testing.assert_array_equal(arrays["embedding"], [[i, latest[i]] for i in ids])
    pool = store.pool_rows("/pool", [KEY])
    np.testing.assert_array_equal(store.pool_array(pool, KEY, "embedding"), [[i, latest[i]] for i in ids])
    assert count_outputs(store, KEY) == len(ids)
    assert store_status(store)["models"][0]["embedded"] == len(ids)


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_re_registrations_and_merges_match_a_dictionary(store_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    latest: dict[int, float] = {}
    with (
        mock.patch("alselect.store.OUTPUTS_LOG_ROWS", int(rng.integers(5, 40))),
        open_with_model(store_path) as store,
    ):
        store.upsert_images("/pool", [(f"{i:05d}.png", sha(i), 1, 1, "present", None) for i in range(60)])
        for step in range(25):
            ids = rng.choice(60, size=int(rng.integers(1, 12)), replace=False).tolist()
            if rng.random() < 0.2:
                ids.append(ids[0])  # a content twice in one batch: the later row wins
            register(store, ids, float(step))
            latest |= dict.fromkeys(ids, float(step))
            if rng.random() < 0.15:
                store.merge_outputs()
            if step % 6 == 5:
                expect_latest(store, latest)
        # a concurrent reader (the writer still open, its log not merged) sees the same
        with Store.open(store_path) as reader:
            expect_latest_readonly(reader, latest)
        expect_latest(store, latest)


def test_missing_outputs_of_a_reader_counts_logged_rows_as_embedded(store_path: Path) -> None:
    with open_with_model(store_path) as store:
        store.upsert_images("/pool", [(f"{i}.png", sha(i), 1, 1, "present", None) for i in range(4)])
        register(store, [0, 2], 1.0)
        assert logged(store) == 2
        with Store.open(store_path) as reader:
            assert [s for s, _ in reader.missing_outputs("/pool", KEY)] == [sha(1), sha(3)]
        assert [s for s, _ in store.missing_outputs("/pool", KEY)] == [sha(1), sha(3)]
        assert logged(store) == 0  # a writer merges first


KILL_SCRIPT = """
import sys
import numpy as np
from alselect.store import Store
key = "b" * 64
store = Store.open(sys.argv[1], write=True, create=True)
store.register_model(key, key, "/m.pt", "test", None, 3, None, {})
shas = [f"{(i * 0x9E3779B97F4A7C15) % (1 << 256):064x}" for i in range(30)]
for start in range(0, 30, 10):
    part = shas[start : start + 10]
    store.add_outputs(key, part, {"probs": np.ones((10, 3), np.float32),
                                  "embedding": np.arange(start, start + 10, dtype=np.float32)[:, None]})
store.merge_outputs()
"""


def test_a_writer_killed_while_merging_loses_nothing(store_path: Path) -> None:
    env = {**os.environ, "ALSELECT_FAULT": "merge-outputs:1"}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(store_path)], env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    with Store.open(store_path) as reader:  # read-only: the rows are still in the log
        assert logged(reader) == 30 and reader.scalar("SELECT COUNT(*) FROM outputs") == 0
        found, arrays = reader.outputs_of(KEY, ["embedding"], [sha(i) for i in range(30)])
        assert found.all() and arrays["embedding"].ravel().tolist() == list(range(30))
    with Store.open(store_path, write=True) as writer:  # the next writer merges them
        assert logged(writer) == 0 and writer.scalar("SELECT COUNT(*) FROM outputs") == 30
        found, arrays = writer.outputs_of(KEY, ["embedding"], [sha(i) for i in range(30)])
        assert found.all() and arrays["embedding"].ravel().tolist() == list(range(30))


def test_last_occurrences_and_sorted_lookup_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 5, size=(9000, 4)).astype(np.uint64)  # many repeats and first-word clashes
    as_tuples = [tuple(k) for k in keys.tolist()]
    last: dict[tuple[int, ...], int] = {}
    first: dict[tuple[int, ...], int] = {}
    for i, k in enumerate(as_tuples):
        last[k] = i
        first.setdefault(k, i)
    assert last_occurrences(keys).tolist() == sorted(last.values())
    assert first_occurrences(keys).tolist() == sorted(first.values())
    table = np.array(sorted(set(as_tuples[:4000])), dtype=np.uint64)  # sorted by all four words
    pos, found = lookup(table, keys)  # > 4096 needles: the ascending search
    where = {k: i for i, k in enumerate(map(tuple, table.tolist()))}
    assert found.tolist() == [k in where for k in as_tuples]
    assert [int(p) for p, f in zip(pos, found, strict=True) if f] == [
        where[k] for k in as_tuples if k in where
    ]


def merge_after_first_read_of_outputs(reader: Store, writer: Store) -> None:
    """The writer merges its log right after the reader's first statement on ``outputs`` (as a
    concurrent ``score`` would at the end of its pass), deterministically."""
    real_rows = reader.rows
    merged = []

    def rows(sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        result = real_rows(sql, params)
        if not merged and "FROM outputs " in sql and "outputs_log" not in sql:
            merged.append(True)
            writer.merge_outputs()
        return result

    reader.rows = rows  # type: ignore[method-assign]


@pytest.mark.parametrize("reading", ["pool_rows", "outputs_of"])
def test_a_reader_sees_every_row_while_a_writer_merges_between_its_statements(
    store_path: Path, reading: str
) -> None:
    with open_with_model(store_path) as writer:
        ids = list(range(12))
        writer.upsert_images("/pool", [(f"{i:05d}.png", sha(i), 1, 1, "present", None) for i in ids])
        register(writer, ids[:5], 1.0)
        writer.merge_outputs()
        register(writer, ids[5:], 2.0)  # in the log; the writer merges while the reader reads
        assert logged(writer) == 7
        with Store.open(store_path) as reader:
            merge_after_first_read_of_outputs(reader, writer)
            if reading == "pool_rows":
                pool = reader.pool_rows("/pool", [KEY])
                got = reader.pool_array(pool, KEY, "embedding")
            else:
                found, arrays = reader.outputs_of(KEY, ["embedding"], [sha(i) for i in ids])
                assert found.all()
                got = arrays["embedding"]
            assert logged(writer) == 0  # the merge did happen mid-read
        np.testing.assert_array_equal(got, [[i, 1.0 if i < 5 else 2.0] for i in ids])


def test_readers_read_a_full_log_once_not_once_per_image(store_path: Path) -> None:
    """The log is keyed by slot: a search by content reads all of the model's log rows. A reader's
    ``missing_outputs`` and an export's ``outputs_of`` over many contents must read it once, not
    once per image or per chunk (quadratic: a 262,144-row log made a 50,000-row lookup take 6 s).
    Counted in SQLite virtual-machine steps, which do not depend on the machine's speed."""
    n = 3000
    with open_with_model(store_path) as writer:
        model_id = writer.scalar("SELECT id FROM models")
        with writer.transaction() as conn:  # a killed writer's log: rows only, as add_outputs leaves them
            conn.executemany(
                "INSERT INTO outputs_log VALUES (?, ?, ?)", [(model_id, i, sha(i)) for i in range(n)]
            )
            conn.execute("UPDATE models SET slots = ? WHERE id = ?", (n, model_id))
        writer.upsert_images("/pool", [(f"{i:05d}.png", sha(i), 1, 1, "present", None) for i in range(n + 5)])
        with Store.open(store_path) as reader:
            steps = [0]

            def step() -> int:
                steps[0] += 1
                return 0

            reader.conn.set_progress_handler(step, 1000)  # one call per 1,000 steps
            assert reader.slots_of(KEY, [sha(i) for i in range(n)]).tolist() == list(range(n))
            assert steps[0] < 20 * n // 100, steps  # linear: ~5 steps per row; per chunk: ~60
            steps[0] = 0
            assert [s for s, _ in reader.missing_outputs("/pool", KEY)] == [sha(i) for i in range(n, n + 5)]
            assert steps[0] < 20 * n // 100, steps  # per image: ~n * n / 400


def test_gc_steps_called_alone_merge_the_log_first(store_path: Path) -> None:
    from alselect.gc import compact_model, drop_absent_outputs

    with open_with_model(store_path) as store:
        register(store, [1, 2, 3], 1.0)
        store.merge_outputs()
        register(store, [2, 4], 2.0)  # content 2 again, and a new one: both only in the log
        store.upsert_images("/pool", [(f"{i:05d}.png", sha(i), 1, 1, "present", None) for i in (1, 2, 4)])
        assert drop_absent_outputs(store) == 1  # content 3 is present nowhere; 4 (logged) is kept
        assert compact_model(store, KEY)  # slot of content 2's first registration is dropped
        assert logged(store) == 0
        expect_latest(store, {1: 1.0, 2: 2.0, 4: 2.0})


def test_output_count_counts_a_content_logged_twice_once(store_path: Path) -> None:
    """The fast count (log rows not merged yet) must not count a content registered twice before a
    merge twice, nor a logged content that is merged already (brute force: the set of contents)."""
    with mock.patch("alselect.store.OUTPUTS_LOG_ROWS", 1000), open_with_model(store_path) as store:
        register(store, [1, 2], 1.0)
        store.merge_outputs()
        register(store, [2, 3], 2.0)  # 2 is merged and logged again
        assert store.output_count(KEY) == 3
        register(store, [3, 4], 3.0)  # 3 logged twice, not merged
        assert logged(store) == 4
        assert store.output_count(KEY) == len({1, 2, 3, 4})
        assert store.output_count("f" * 64) == 0  # a model the store does not know


def test_output_count_of_hashes_that_are_not_64_hex_digits_is_exact(store_path: Path) -> None:
    """A library caller's content names need not be SHA-256 hex: the count falls back to SQL."""
    with mock.patch("alselect.store.OUTPUTS_LOG_ROWS", 1000), open_with_model(store_path) as store:
        names = ["a" * 32, "b" * 64, "b" * 64, "c" * 96, "not hex at all"]
        n = len(names)
        store.add_outputs(
            KEY, names, {"probs": np.full((n, 3), 0.5, np.float32), "embedding": np.ones((n, 2), np.float32)}
        )
        assert logged(store) == n
        assert store.output_count(KEY) == len(set(names))
