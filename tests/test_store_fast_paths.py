"""The store's fast paths at scale agree with brute force: array reads by runs, folder counts from
the ``(root, status, sha256)`` index, and a run's item states from the rows changed since it."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from alselect.pipeline import ranking_of
from alselect.status import folder_counts
from alselect.store import Store

KEY = "b" * 64


def sha(i: int) -> str:
    return f"{i * 7919 % 1000:03d}{i:061x}"


@pytest.mark.parametrize("order", ["slot", "shuffled", "gaps", "reversed"])
def test_array_reads_match_a_plain_gather_in_any_slot_order(store_path: Path, order: str) -> None:
    rng = np.random.default_rng(3)
    n = 400
    emb = rng.standard_normal((n, 6)).astype(np.float32)
    probs = rng.random((n, 3)).astype(np.float32)
    with (
        mock.patch("alselect.store.arrays.SEGMENT_MAX_BYTES", 24 * 37),
        Store.open(store_path, write=True, create=True) as store,
    ):
        store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
        for lo in range(0, n, 29):
            part = {"embedding": emb[lo : lo + 29], "probs": probs[lo : lo + 29]}
            store.add_outputs(KEY, [sha(i) for i in range(lo, min(lo + 29, n))], part)
        assert store.scalar("SELECT COUNT(*) FROM array_segments WHERE name = 'embedding'") > 5
        slots = {
            "slot": np.arange(n),
            "shuffled": rng.permutation(n),
            "gaps": np.sort(rng.choice(n, 150, replace=False)),
            "reversed": np.arange(n)[::-1],
        }[order]
        for name, reference in (("embedding", emb), ("probs", probs)):
            got = store.read_outputs(KEY, name, slots)
            np.testing.assert_array_equal(got, reference[slots])


def brute_force_counts(store: Store) -> dict[str, tuple[int, ...]]:
    """The definitions of ``alselect.status``, computed row by row in Python."""
    rows = store.rows("SELECT root, sha256, status FROM images")
    result = {}
    for root in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == root]
        present = [r[1] for r in mine if r[2] == "present"]
        failed = sum(r[2] == "failed" for r in mine)
        absent_rows = [r[1] for r in mine if r[2] == "absent"]
        moved = sum(s in set(present) for s in absent_rows)
        result[root] = (
            len(present),
            len(set(present)),
            len(present) - len(set(present)),
            failed,
            len(absent_rows) - moved,
            moved,
        )
    return result


def test_folder_counts_match_brute_force(store_path: Path) -> None:
    rng = np.random.default_rng(5)
    with Store.open(store_path, write=True, create=True) as store:
        for root in ("/b", "/a", "/c d"):
            statuses = rng.choice(["present", "absent", "failed"], 300, p=[0.7, 0.2, 0.1])
            contents = rng.integers(0, 120, 300)  # many duplicates, absent paths with present copies
            store.upsert_images(
                root,
                [
                    (f"x/{i:04d}.png", sha(int(c)), 1, 1, str(st), "bad" if st == "failed" else None)
                    for i, (c, st) in enumerate(zip(contents, statuses, strict=True))
                ],
            )
        expected = brute_force_counts(store)
        got = {
            f.folder: (f.present, f.distinct, f.duplicates, f.failed, f.absent, f.moved)
            for f in folder_counts(store)
        }
        assert got == expected
        assert [f.folder for f in folder_counts(store)] == sorted(expected)
        assert folder_counts(store, "/a")[0].folder == "/a" and len(folder_counts(store, "/a")) == 1


def brute_force_states(store: Store, run_id: int) -> dict[str, int]:
    """Every image row read: which ranked (image id, content) pairs are still present."""
    records = store.ranking_records(run_id)
    assert records is not None
    now = {i: (s, st) for i, s, st in store.rows("SELECT id, sha256, status FROM images")}
    labels = {r[0] for r in store.rows("SELECT sha256 FROM labels")}
    sent = {r[0] for r in store.rows("SELECT sha256 FROM exported")}
    counts = dict.fromkeys(("gone", "labeled", "exported", "open"), 0)
    for image_id, raw in zip(records["image_id"].tolist(), records["sha256"].tolist(), strict=True):
        content = raw.ljust(32, b"\0").hex()
        if now.get(image_id) != (content, "present"):
            counts["gone"] += 1
        elif content in labels:
            counts["labeled"] += 1
        elif content in sent:
            counts["exported"] += 1
        else:
            counts["open"] += 1
    return {"ranked": len(records), **counts}


def record(store: Store, root: str) -> int:
    store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
    pool = store.pool_rows(root, [KEY])
    probs = np.full((len(pool), 3), 1 / 3, dtype=np.float32)
    order = np.arange(len(pool))
    run = {"root": root, "model_key": KEY, "strategy": "t", "params": {}, "budget": None, "version": "t"}
    ranking = ranking_of(pool, probs, order, np.zeros(len(pool)))
    return store.record_run(**run, pool_size=len(pool), labeled_count=0, ranking=ranking, command=None)


def test_run_states_read_only_changed_rows_yet_match_brute_force(store_path: Path) -> None:
    root = "/pool"
    names = [f"{i:03d}.png" for i in range(60)]
    with Store.open(store_path, write=True, create=True) as store:
        store.upsert_images(root, [(n, sha(i), 1, 1, "present", None) for i, n in enumerate(names)])
        store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
        store.add_outputs(KEY, [sha(i) for i in range(60)], {"probs": np.ones((60, 3), np.float32) / 3})
        first = record(store, root)
        assert store.run_item_states(first) == brute_force_states(store, first)
        # After the run: edits (same path, new content), deletions, decode failures, a file that
        # comes back, labels and exports, and rows changed before a second run.
        store.upsert_images(root, [(names[0], sha(900), 2, 2, "present", None)])  # edited
        store.mark_absent(root, [names[1], names[2]])  # deleted
        store.upsert_images(root, [(names[2], sha(2), 1, 1, "present", None)])  # back, same content
        store.mark_failed(root, [(sha(3), "bad")])
        store.add_labels([sha(4), sha(5), sha(900)], "t")
        store.record_export(first, "csv", "-", [(sha(5), 6), (sha(6), 7), (sha(7), 8)])
        states = store.run_item_states(first)
        assert states == brute_force_states(store, first)
        assert states["gone"] == 3 and states["labeled"] == 2 and states["exported"] == 2
        second = record(store, root)
        store.upsert_images(root, [(names[10], sha(901), 2, 2, "present", None)])
        store.retry_failures(root, KEY)  # 003.png present again
        for run in (first, second):
            assert store.run_item_states(run) == brute_force_states(store, run)
        # an untouched row is never read: only changed and non-present rows are candidates
        changed = store.rows("SELECT relpath FROM images WHERE changed >= ?", (second,))
        assert sorted(r[0] for r in changed) == sorted([names[3], names[10]])


def test_pool_paths_are_read_on_demand_even_after_the_store_closed(store_path: Path) -> None:
    names = ["b.png", "a.png", "c/d.png"]
    with Store.open(store_path, write=True, create=True) as store:
        store.upsert_images("/pool", [(n, sha(i), 1, 1, "present", None) for i, n in enumerate(names)])
        store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
        store.add_outputs(KEY, [sha(i) for i in range(3)], {"probs": np.ones((3, 3), np.float32) / 3})
        pool = store.pool_rows("/pool", [KEY])
    assert pool.relpaths == ["a.png", "b.png", "c/d.png"] and pool.roots == ["/pool"] * 3
    assert pool.sha256 == [sha(1), sha(0), sha(2)]


def test_large_reads_land_in_writable_plain_memory(store_path: Path) -> None:
    from alselect.store import arrays

    with (
        mock.patch.object(arrays, "LARGE_BYTES", 1),
        Store.open(store_path, write=True, create=True) as store,
    ):
        store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
        emb = np.arange(40, dtype=np.float32).reshape(10, 4)
        store.add_outputs(KEY, [sha(i) for i in range(10)], {"embedding": emb})
        got = store.read_outputs(KEY, "embedding", np.arange(10))
        np.testing.assert_array_equal(got, emb)
        assert got.flags.writeable
        got[0, 0] = -1  # callers may normalise in place
        np.testing.assert_array_equal(store.read_outputs(KEY, "embedding", np.arange(10)), emb)
