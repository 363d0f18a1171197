"""``alselect gc``: what is dropped, what is kept, compaction, and kill -9 safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from alselect.errors import UsageError
from alselect.gc import collect
from alselect.store import Store
from tests.helpers import MakeImages, cli, score
from tests.test_score_models import other_checkpoint  # noqa: F401  (fixture)

KEY = "c" * 64


def files_of(store_path: Path) -> set[str]:
    return {str(p.relative_to(store_path)) for p in (store_path / "arrays").glob("**/*") if p.is_file()}


def test_models_no_recent_run_used_are_dropped_and_the_rest_kept(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    other_checkpoint: Path,  # noqa: F811
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_images(tmp_path / "pool", 6)
    old = score(store_path, tmp_path / "pool", tiny_checkpoint)
    for _ in range(3):
        new = score(store_path, tmp_path / "pool", other_checkpoint)
    root = str((tmp_path / "pool").resolve())
    with Store.open(store_path) as store:
        kept_before = store.pool(root, new.embed.model_key)
        old_files = {
            r[0]
            for r in store.rows("SELECT file FROM array_segments WHERE model_key = ?", (old.embed.model_key,))
        }
    sizes = sum((store_path / f).stat().st_size for f in old_files)
    with Store.open(store_path, write=True) as store:
        dry = collect(store, keep_runs=3, dry_run=True)
        assert files_of(store_path) >= old_files  # a dry run changes nothing
        result = collect(store, keep_runs=3)
        assert result.dropped_models == dry.dropped_models == [old.embed.model_display]
        assert result.dropped_rows == dry.dropped_rows == 6
        assert not files_of(store_path) & old_files
        assert result.freed >= sizes
        kept_after = store.pool(root, new.embed.model_key)
        assert (
            store.scalar(
                "SELECT COUNT(*) FROM outputs o JOIN models m ON m.id = o.model WHERE m.key = ?",
                (old.embed.model_key,),
            )
            == 0
        )
    np.testing.assert_array_equal(kept_after.embeddings, kept_before.embeddings)
    again = score(store_path, tmp_path / "pool", tiny_checkpoint)  # a dropped model embeds again
    assert again.embed.embedded == 6
    code, out, _ = cli(capsys, "--store", str(store_path), "gc", "-m", old.embed.model_display)
    assert code == 0 and old.embed.model_display in out and "freed" in out
    code, _, err = cli(capsys, "--store", str(store_path), "gc", "-m", "nosuchmodel")
    assert code == 2 and "no model" in err


def test_fewer_runs_than_kept_drop_nothing(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 3)
    score(store_path, tmp_path / "pool", tiny_checkpoint)
    with Store.open(store_path, write=True) as store:
        assert collect(store, keep_runs=3).dropped_models == []
        with pytest.raises(UsageError):
            collect(store, keep_runs=-1)


def fill(store: Store, rows: int, start: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(start)
    arrays = {
        "probs": rng.random((rows, 3)).astype(np.float32),
        "embedding": rng.random((rows, 8)).astype(np.float16),
    }
    store.add_outputs(KEY, [f"{i:064x}" for i in range(start, start + rows)], arrays)
    return arrays


def test_compaction_drops_unreferenced_rows_and_merges_small_segments(store_path: Path) -> None:
    with (
        mock.patch("alselect.store.arrays.SEGMENT_MAX_BYTES", 64),
        Store.open(store_path, write=True, create=True) as store,
    ):
        store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
        for start in range(0, 40, 4):  # forty contents, in ten batches
            fill(store, 4, start)
        latest = fill(store, 10, 0)  # contents 0..9 again (a retry): their first rows are garbage now
        store.upsert_images("/p", [(f"{i:03d}.png", f"{i:064x}", 1, 1, "present", None) for i in range(40)])
        before = store.pool("/p", KEY)
        segments_before = store.scalar("SELECT COUNT(*) FROM array_segments")
    with (
        mock.patch("alselect.store.arrays.SEGMENT_MAX_BYTES", 1 << 20),
        Store.open(store_path, write=True) as store,
    ):
        result = collect(store, keep_runs=3)
        assert result.compacted_models == [KEY[:12]]
        after = store.pool("/p", KEY)
        assert store.scalar("SELECT COUNT(*) FROM array_segments") == 2 < segments_before
        assert store.scalar("SELECT slots FROM models") == 40
        np.testing.assert_array_equal(after.probs, before.probs)
        np.testing.assert_array_equal(after.embeddings, before.embeddings)
        np.testing.assert_array_equal(after.probs[:10], latest["probs"])
        fill(store, 5, 100)  # appending continues after compaction
        store.upsert_images(
            "/p", [(f"x{i}.png", f"{i:064x}", 1, 1, "present", None) for i in range(100, 105)]
        )
        assert len(store.pool("/p", KEY).relpaths) == 45
        assert collect(store, keep_runs=3).compacted_models == []  # nothing left to gain


def test_drop_absent_keeps_labeled_contents(store_path: Path) -> None:
    with Store.open(store_path, write=True, create=True) as store:
        store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
        fill(store, 6)
        rows = [(f"{i}.png", f"{i:064x}", 1, 1, "present" if i < 3 else "absent", None) for i in range(6)]
        store.upsert_images("/p", rows)
        store.add_labels([f"{4:064x}"], "test")
        result = collect(store, keep_runs=3, drop_absent=True)
        assert result.dropped_rows == 2  # contents 3 and 5: absent, unlabeled
        kept = {r[0] for r in store.rows("SELECT sha256 FROM outputs")}
        assert kept == {f"{i:064x}" for i in (0, 1, 2, 4)}


def test_gc_killed_before_its_commit_loses_nothing(store_path: Path) -> None:
    with (
        mock.patch("alselect.store.arrays.SEGMENT_MAX_BYTES", 64),
        Store.open(store_path, write=True, create=True) as store,
    ):
        store.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
        for start in range(0, 12, 3):
            fill(store, 3, start)
        store.upsert_images("/p", [(f"{i:03d}.png", f"{i:064x}", 1, 1, "present", None) for i in range(12)])
        before = store.pool("/p", KEY)
        files_before = files_of(store_path)
    code = "from alselect.store import Store; from alselect.gc import collect\n" \
        f"with Store.open({str(store_path)!r}, write=True) as s: collect(s)"  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "ALSELECT_FAULT": "gc-before-commit:1"}, timeout=60
    )
    assert killed.returncode == -signal.SIGKILL
    leftovers = files_of(store_path) - files_before  # the new files exist, uncommitted
    assert leftovers and files_of(store_path) > files_before
    with Store.open(store_path, write=True) as store:
        np.testing.assert_array_equal(store.pool("/p", KEY).embeddings, before.embeddings)
        result = collect(store)
        assert result.orphan_files == len(leftovers)
        np.testing.assert_array_equal(store.pool("/p", KEY).embeddings, before.embeddings)
        assert all((store_path / r[0]).exists() for r in store.rows("SELECT file FROM array_segments"))


@pytest.mark.parametrize("keep", [str(2**63), str(10**30), "1000000001"])
def test_a_huge_keep_runs_is_a_usage_error(
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
    keep: str,
) -> None:
    """Defect 13: it overflowed SQLite's integers (an internal error with a traceback)."""
    make_images(store_path.parent / "pool", 2)
    score(store_path, store_path.parent / "pool", tiny_checkpoint)
    code, _, err = cli(capsys, "--store", str(store_path), "gc", "--keep-runs", keep, "--dry-run")
    assert code == 2 and "--keep-runs" in err and "Traceback" not in err and "internal" not in err
    with Store.open(store_path, write=True) as store, pytest.raises(UsageError, match="--keep-runs"):
        collect(store, keep_runs=int(keep), dry_run=True)
