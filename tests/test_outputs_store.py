"""Named per-model arrays, the m004 upgrade of old stores, and multi-model pools."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from alselect.errors import StoreError
from alselect.store import DB_FILE, Store, migrations
from alselect.store.arrays import append_rows

KEY = "a" * 64


def open_with_model(path: Path, key: str = KEY) -> Store:
    store = Store.open(path, write=True, create=True)
    store.register_model(key, key, "/m.pt", "test", None, 3, None, {})
    return store


def add_images(store: Store, root: str, shas: list[str]) -> None:
    store.upsert_images(
        root, [(f"img_{i:03d}.png", sha, 1, 1, "present", None) for i, sha in enumerate(shas)]
    )


def sha(i: int) -> str:
    return f"{i:064x}"


def test_any_named_arrays_round_trip_across_segments(store_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 50
    arrays = {
        "probs": rng.random((n, 3)).astype(np.float32),
        "embedding": rng.random((n, 4)).astype(np.float16),
        "mc_probs": rng.random((n, 5, 3)).astype(np.float16),
        "loss_pred": rng.random(n).astype(np.float32),
        "box_count": rng.integers(0, 9, n).astype(np.int32),
    }
    shas = [sha(i) for i in range(n)]
    # small segments: every array rolls over to new files at different rows
    with mock.patch("alselect.store.arrays.SEGMENT_MAX_BYTES", 200), open_with_model(store_path) as store:
        for start in range(0, n, 7):
            stop = min(start + 7, n)
            store.add_outputs(KEY, shas[start:stop], {k: v[start:stop] for k, v in arrays.items()})
        add_images(store, "/pool", shas)
        pool = store.pool_rows("/pool", [KEY])
        assert pool.sha256 == shas
        for name, expected in arrays.items():
            got = store.pool_array(pool, KEY, name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
        segments = store.scalar("SELECT COUNT(*) FROM array_segments WHERE name = 'mc_probs'")
        assert segments > 3
        assert store.model(KEY)["num_classes"] == 3 and store.model(KEY)["dim"] == 4


def test_a_model_keeps_one_layout(store_path: Path) -> None:
    with open_with_model(store_path) as store:
        store.add_outputs(KEY, [sha(1)], {"probs": np.ones((1, 3), np.float32)})
        with pytest.raises(StoreError, match="stores probs float32"):
            store.add_outputs(KEY, [sha(2)], {"probs": np.ones((1, 3), np.float32), "x": np.ones(1)})
        with pytest.raises(StoreError, match="declares 3"):
            other = "b" * 64
            store.register_model(other, other, "/m.pt", "test", None, 3, None, {})
            store.add_outputs(other, [sha(2)], {"probs": np.ones((1, 4), np.float32)})


def test_pool_aligns_several_models_and_labeled_folders(store_path: Path) -> None:
    other = "b" * 64
    with open_with_model(store_path) as store:
        store.register_model(other, other, "/e.pt", "test", None, None, None, {})
        add_images(store, "/pool", [sha(i) for i in range(5)])
        add_images(store, "/labeled", [sha(i) for i in (3, 10, 11)])  # sha 3 is in both folders
        # the first model misses content 2, and writes in another order than the second
        first = [sha(i) for i in (4, 0, 1, 3, 10, 11)]
        store.add_outputs(KEY, first, {"probs": np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]})
        second = [sha(i) for i in (0, 1, 2, 3, 4, 10, 11)]
        store.add_outputs(other, second, {"embedding": np.arange(7, dtype=np.float32)[:, None] * [1, 1]})
        store.add_labels([sha(1)], "test")
        pool = store.pool_rows("/pool", [KEY, other], ["/labeled"])
        assert pool.sha256 == [sha(i) for i in (0, 1, 3, 4, 10, 11)]
        assert pool.roots == ["/pool"] * 4 + ["/labeled"] * 2
        assert pool.labeled.tolist() == [False, True, False, False, True, True]
        np.testing.assert_array_equal(store.pool_array(pool, other, "embedding")[:, 0], [0, 1, 3, 4, 5, 6])
        np.testing.assert_array_equal(store.pool_array(pool, KEY, "probs").argmax(1), [1, 2, 0, 0, 1, 2])


def test_upgrade_of_a_first_release_store_keeps_every_array(store_path: Path, tmp_path: Path) -> None:
    """A store written before named arrays (m001–m003) reads the same after m004."""
    store_path.mkdir()
    conn = sqlite3.connect(store_path / DB_FILE, isolation_level=None)
    with mock.patch("alselect.store.migrations.MIGRATIONS", migrations.MIGRATIONS[:3]):
        migrations.apply(conn)
    rng = np.random.default_rng(1)
    probs, emb = rng.random((7, 3)).astype(np.float32), rng.random((7, 5)).astype(np.float32)
    conn.execute(
        "INSERT INTO models (key, checkpoint_sha256, path, kind, num_classes, dim, preprocess, added_at) "
        "VALUES (?, ?, '/m.pt', 'alselect', 3, 5, '{}', 'now')",
        (KEY, KEY),
    )
    # probs in one segment; embeddings rolled over after 4 rows, as the old writer did by size
    layout = [("probs", 0, 7, probs), ("embedding", 0, 4, emb), ("embedding", 4, 7, emb)]
    for seg_id, (name, lo, hi, data) in enumerate(layout, start=1):
        file = f"arrays/{KEY[:16]}/{name}-{seg_id:06d}.f32"
        (store_path / file).parent.mkdir(parents=True, exist_ok=True)
        append_rows(store_path / file, 0, data[lo:hi])
        conn.execute(
            "INSERT INTO segments (id, model_key, array, file, dtype, width, rows, sealed) "
            "VALUES (?, ?, ?, ?, 'float32', ?, ?, ?)",
            (seg_id, KEY, name, file, data.shape[1], hi - lo, int(seg_id == 2)),
        )
    for i in range(7):
        e_seg, e_row = (2, i) if i < 4 else (3, i - 4)
        conn.execute(
            "INSERT INTO embeddings VALUES (?, ?, 1, ?, ?, ?, 'now')", (sha(i), KEY, i, e_seg, e_row)
        )
    rows = [(f"img_{i}.png", sha(i), "present", None) for i in range(7)]
    rows += [("nan.png", sha(99), "failed", "model output not finite (NaN or infinity)")]
    rows += [("bad.png", sha(98), "failed", "not an image (unrecognised format)")]
    conn.executemany(
        "INSERT INTO images (root, relpath, sha256, size, mtime_ns, status, reason, first_seen, last_seen) "
        "VALUES ('/pool', ?, ?, 1, 1, ?, ?, 'now', 'now')",
        rows,
    )
    conn.execute(
        "INSERT INTO runs (id, created_at, root, model_key, strategy, params, pool_size, labeled_count, "
        "selected, alselect_version) VALUES (1, 'now', '/pool', ?, 'entropy', '{}', 7, 0, 2, '0.1.0')",
        (KEY,),
    )
    conn.executemany(
        "INSERT INTO run_items VALUES (1, ?, (SELECT id FROM images WHERE relpath = ?), ?, ?, ?, 1, 0.5)",
        [(1, "img_4.png", "img_4.png", sha(4), 0.9), (2, "img_2.png", "img_2.png", sha(2), 0.8)],
    )
    conn.close()

    with Store.open(store_path, write=True) as store:
        # a run ranked before ranking files exists still exports from its rows
        assert [row[:4] for row in store.exportable_items(1, include_exported=False)] == [
            (1, "img_4.png", sha(4), 0.9),
            (2, "img_2.png", sha(2), 0.8),
        ]
        pool = store.pool("/pool", KEY)
        np.testing.assert_array_equal(pool.probs, probs)
        np.testing.assert_array_equal(pool.embeddings, emb)
        status = dict(store.rows("SELECT relpath, status FROM images"))
        assert status["nan.png"] == "present"  # was one model's failure: retried per model now
        assert status["bad.png"] == "failed"  # the file's own failure stays
        assert [s for s, _ in store.missing_outputs("/pool", KEY)] == [sha(98 + 1)]
        # appending continues after the migrated rows, in step across both arrays
        store.add_outputs(KEY, [sha(99)], {"probs": probs[:1] * 0, "embedding": emb[:1] * 0})
        pool = store.pool("/pool", KEY)
        assert pool.relpaths[-1] == "nan.png"
        row = len(pool.relpaths) - 1
        assert not pool.probs[row].any() and not pool.embeddings[row].any()
        np.testing.assert_array_equal(np.delete(pool.embeddings, row, axis=0), emb)
