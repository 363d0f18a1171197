"""Store robustness: kill -9 mid-embed, concurrent writers, migrations, array tails."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from alselect.errors import StoreError
from alselect.store import DB_FILE, Store, migrations
from alselect.store.arrays import append_rows, read_rows
from alselect.store.writer import QUEUE_BATCHES
from tests.helpers import MakeImages, embedding_count


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alselect", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def embed_args(store: Path, folder: Path, ckpt: Path) -> list[str]:
    return [
        "--store",
        str(store),
        "embed",
        str(folder),
        "--model",
        str(ckpt),
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]


def segment_state(store: Path) -> list[tuple[str, int, int]]:
    """(file, committed rows × row bytes, actual bytes) per array segment."""
    with sqlite3.connect(store / DB_FILE) as conn:
        rows = conn.execute("SELECT file, rows, shape, dtype FROM array_segments ORDER BY id").fetchall()
    return [
        (file, n * int(np.prod(json.loads(shape))) * np.dtype(dtype).itemsize, (store / file).stat().st_size)
        for file, n, shape, dtype in rows
    ]


def test_kill_between_array_append_and_commit_loses_only_that_batch(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 30)  # 15 batches: more than two registrations can hold
    killed = run_cli(
        *embed_args(store_path, tmp_path / "pool", tiny_checkpoint), env={"ALSELECT_FAULT": "after-append:3"}
    )
    assert killed.returncode == -signal.SIGKILL
    # Registrations 1 and 2 committed (a batch of 2 each, or up to 1 + QUEUE_BATCHES batches when
    # the writer grouped those waiting: alselect.store.writer), the third was killed between its
    # append and its commit.
    registered = embedding_count(store_path)
    assert 4 <= registered <= 2 * 2 * (1 + QUEUE_BATCHES) and registered % 2 == 0  # whole batches
    assert all(actual > committed for _, committed, actual in segment_state(store_path))  # orphan tail

    resumed = run_cli(*embed_args(store_path, tmp_path / "pool", tiny_checkpoint))
    assert resumed.returncode == 0, resumed.stderr
    assert f"embedded {30 - registered} " in resumed.stderr
    assert embedding_count(store_path) == 30
    assert all(actual == committed for _, committed, actual in segment_state(store_path))

    clean = tmp_path / "clean"
    assert run_cli(*embed_args(clean, tmp_path / "pool", tiny_checkpoint)).returncode == 0
    root = str((tmp_path / "pool").resolve())
    with Store.open(store_path) as resumed_store, Store.open(clean) as clean_store:
        key = resumed_store.rows("SELECT key FROM models")[0][0]
        a, b = resumed_store.pool(root, key), clean_store.pool(root, key)
    assert a.relpaths == b.relpaths
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_kill_after_commit_resumes_with_the_rest(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 29)
    killed = run_cli(
        *embed_args(store_path, tmp_path / "pool", tiny_checkpoint), env={"ALSELECT_FAULT": "after-commit:2"}
    )
    assert killed.returncode == -signal.SIGKILL
    registered = embedding_count(store_path)  # two registrations of one or more whole batches each
    assert 4 <= registered <= 2 * 2 * (1 + QUEUE_BATCHES) and registered % 2 == 0
    resumed = run_cli(*embed_args(store_path, tmp_path / "pool", tiny_checkpoint))
    assert resumed.returncode == 0 and f"embedded {29 - registered} " in resumed.stderr
    assert embedding_count(store_path) == 29


def test_second_writer_gives_up_after_timeout_with_one_line(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 3)
    with Store.open(store_path, write=True, create=True):
        blocked = run_cli(
            "--store",
            str(store_path),
            "score",
            str(tmp_path / "pool"),
            "--model",
            str(tiny_checkpoint),
            "--strategy",
            "entropy",
            env={"ALSELECT_LOCK_TIMEOUT": "0.5"},
        )
    assert blocked.returncode == 1
    lines = blocked.stderr.strip().splitlines()
    assert len(lines) == 1 and "busy" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert "Traceback" not in blocked.stderr
    assert embedding_count(store_path) == 0
    after = run_cli(
        "--store",
        str(store_path),
        "score",
        str(tmp_path / "pool"),
        "--model",
        str(tiny_checkpoint),
        "--strategy",
        "entropy",
    )
    assert after.returncode == 0, after.stderr


def test_concurrent_writers_serialise_without_corruption(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 12)
    args = [
        sys.executable,
        "-m",
        "alselect",
        "--store",
        str(store_path),
        "score",
        str(tmp_path / "pool"),
        "--model",
        str(tiny_checkpoint),
        "--strategy",
        "margin",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    embedded = sorted(int(err.split("embedded ")[1].split()[0]) for _, err in results)
    assert embedded == [0, 12]  # the second waited, then found everything embedded
    assert embedding_count(store_path) == 12
    with sqlite3.connect(store_path / DB_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
    with Store.open(store_path) as store:
        rankings = [store.ranking_records(run) for run in (1, 2)]
        assert [len(r) for r in rankings if r is not None] == [12, 12]


def test_migrations_are_recorded_and_newer_stores_refused(store_path: Path) -> None:
    with Store.open(store_path, write=True, create=True) as store:
        from alselect.store.migrations import MIGRATIONS

        applied = [r[0] for r in store.rows("SELECT name FROM migrations ORDER BY name")]
        assert applied == [name for name, _ in MIGRATIONS] and applied[0] == "m001_initial"
        assert store.scalar("PRAGMA journal_mode") == "wal"
    with Store.open(store_path, write=True):  # reopening applies nothing twice
        pass
    with sqlite3.connect(store_path / DB_FILE) as conn:
        conn.execute("INSERT INTO migrations VALUES ('m999_from_the_future', 'x')")
    with pytest.raises(StoreError, match="newer alselect"):
        Store.open(store_path, write=True)


def test_reading_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no alselect store"):
        Store.open(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_append_rows_drops_uncommitted_tail_and_detects_truncation(tmp_path: Path) -> None:
    path = tmp_path / "seg.f32"
    first = np.arange(6, dtype=np.float32).reshape(3, 2)
    append_rows(path, 0, first)
    with open(path, "ab") as handle:
        handle.write(b"\x00" * 12)  # a crashed writer's partial row
    second = np.full((2, 2), 9.0, dtype=np.float32)
    append_rows(path, 3, second)
    assert path.stat().st_size == 5 * 2 * 4
    np.testing.assert_array_equal(read_rows(path, "float32", 2, 5, np.arange(5)), np.vstack([first, second]))
    with pytest.raises(StoreError, match="shorter"):
        append_rows(path, 7, second)


def test_kill_with_decode_workers_releases_the_lock(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    """Forked DataLoader workers must not keep the writer lock alive after the writer dies."""
    make_images(tmp_path / "pool", 24)
    args = embed_args(store_path, tmp_path / "pool", tiny_checkpoint)
    args[args.index("--workers") + 1] = "2"
    killed = run_cli(*args, env={"ALSELECT_FAULT": "after-append:2"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(*args, env={"ALSELECT_LOCK_TIMEOUT": "5"})
    assert resumed.returncode == 0, resumed.stderr
    assert embedding_count(store_path) == 24


def test_one_process_cannot_open_two_writers_on_a_store(store_path: Path) -> None:
    from alselect.errors import StoreLockedError

    with (
        Store.open(store_path, write=True, create=True),
        pytest.raises(StoreLockedError, match="already open for writing in this process"),
    ):
        Store.open(store_path, write=True)
    with Store.open(store_path, write=True):  # released on close
        pass


def test_only_recent_run_rankings_are_kept(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    from alselect.store import KEEP_RUN_RANKINGS
    from tests.helpers import score

    make_images(tmp_path / "pool", 3)
    for _ in range(KEEP_RUN_RANKINGS + 2):
        score(store_path, tmp_path / "pool", tiny_checkpoint)
    with Store.open(store_path) as store:
        runs = store.scalar("SELECT COUNT(*) FROM runs")
        kept = [run for run in range(1, runs + 1) if store.ranking_records(run) is not None]
        files = sorted(p.name for p in (store_path / "rankings").iterdir())
    assert runs == KEEP_RUN_RANKINGS + 2
    assert kept == list(range(3, KEEP_RUN_RANKINGS + 3))
    assert files == [f"run-{run:08d}.npy" for run in kept]  # pruned rankings leave no file behind


def test_a_reader_applies_migrations_added_by_an_upgrade(store_path: Path) -> None:
    from alselect.store.migrations import MIGRATIONS

    store_path.mkdir()
    conn = sqlite3.connect(store_path / DB_FILE, isolation_level=None)
    with mock.patch("alselect.store.migrations.MIGRATIONS", MIGRATIONS[:1]):  # the first release
        migrations.apply(conn)
    conn.close()
    with Store.open(store_path) as store:  # e.g. 'alselect status' right after upgrading
        applied = {r[0] for r in store.rows("SELECT name FROM migrations")}
        indexes = {r[1] for r in store.rows("PRAGMA index_list(images)")}
    assert applied == {name for name, _ in MIGRATIONS}
    assert "images_relpath" in indexes
