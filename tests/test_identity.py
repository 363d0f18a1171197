"""Identity and counts: one row per content, a real path represents it, every count adds up."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from alselect.status import describe_files
from alselect.store import Store
from alselect.sync import SyncResult, sync_folder
from tests.conftest import write_image
from tests.helpers import cli, cli_score


def status(capsys: pytest.CaptureFixture[str], store: Path) -> dict:
    code, out, err = cli(capsys, "--store", str(store), "status", "--json")
    assert code == 0, err
    return json.loads(out)


def exported_paths(capsys: pytest.CaptureFixture[str], store: Path, *extra: str) -> list[str]:
    code, out, err = cli(capsys, "--store", str(store), "export", "--dry-run", "--include-exported", *extra)
    assert code == 0, err
    return [row["path"] for row in csv.DictReader(io.StringIO(out, newline=""))]


def adds_up(sync: SyncResult) -> bool:
    return sync.found == sync.new + sync.moved + sync.changed + sync.restored + sync.unchanged


def test_duplicates_are_one_image_represented_by_a_real_path(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool, store = tmp_path / "pool", tmp_path / "store"
    write_image(pool / "c_real.png", seed=1)
    (pool / "a_link.png").symlink_to("c_real.png")  # sorts first, but is a symlink
    write_image(pool / "d.png", seed=2)
    shutil.copyfile(pool / "d.png", pool / "e.png")  # a byte-identical copy
    write_image(pool / "f.png", seed=3)
    write_image(pool / "sub" / "g.png", seed=4)
    (pool / "lnkdir").symlink_to("sub", target_is_directory=True)  # lnkdir/g.png sorts before sub/g.png

    err = cli_score(capsys, store, pool, tiny_checkpoint)
    assert "7 image file(s): 7 new, 0 moved, 0 changed, 0 restored, 0 unchanged; 0 vanished" in err
    assert "files 7 found: 7 present (4 image(s), 3 duplicate file(s)), 0 failed; 0 absent" in err
    assert "ranked 4 of 4 image(s) (0 labeled); 3 duplicate file(s) counted once" in err

    paths = exported_paths(capsys, store)
    assert sorted(paths) == ["c_real.png", "d.png", "f.png", "sub/g.png"]
    with Store.open(store) as opened:
        key = opened.rows("SELECT key FROM models")[0][0]
        pool_arrays = opened.pool(str(pool.resolve()), key)
    assert pool_arrays.relpaths == [
        "c_real.png",
        "d.png",
        "f.png",
        "sub/g.png",
    ]  # path order of the representatives

    info = status(capsys, store)
    assert info["images"] == {
        "present": 7,
        "absent": 0,
        "failed": 0,
        "distinct": 4,
        "duplicates": 3,
        "moved": 0,
        "copies_removed": 0,
    }
    assert [f["folder"] for f in info["folders"]] == [str(pool.resolve())]
    assert info["latest_run"]["folder"] == str(pool.resolve())


def test_moved_vanished_restored_and_changed_files_are_counted_once(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool, store = tmp_path / "pool", tmp_path / "store"
    for i in range(5):
        write_image(pool / f"img_{i}.png", seed=i)
    cli_score(capsys, store, pool, tiny_checkpoint)
    root = pool.resolve()

    def sync() -> SyncResult:
        with Store.open(store, write=True) as opened:
            result = sync_folder(opened, root)
        assert adds_up(result), result
        return result

    kept = (pool / "img_1.png").read_bytes()
    (pool / "img_0.png").rename(pool / "renamed.png")
    (pool / "img_1.png").unlink()
    result = sync()
    assert (result.found, result.moved, result.unchanged, result.vanished) == (4, 1, 3, 1)
    info = status(capsys, store)
    assert info["images"] == {
        "present": 4,
        "absent": 1,
        "failed": 0,
        "distinct": 4,
        "duplicates": 0,
        "moved": 1,
        "copies_removed": 0,
    }

    (pool / "img_1.png").write_bytes(kept)  # restored from a backup (new mtime, same bytes)
    result = sync()
    assert (result.found, result.restored, result.unchanged, result.vanished) == (5, 1, 4, 0)
    assert status(capsys, store)["images"]["absent"] == 0

    write_image(pool / "img_2.png", seed=99)  # edited: new content
    result = sync()
    assert (result.found, result.changed, result.unchanged) == (5, 1, 4)

    shutil.copyfile(pool / "img_3.png", pool / "img_3 copy.png")
    (pool / "img_3.png").unlink()  # the copy stays: the image is still here, nothing vanished
    result = sync()
    assert (result.found, result.new, result.unchanged, result.vanished) == (5, 0, 4, 0)
    assert result.moved == 1


def test_a_deleted_duplicate_copy_is_reported_as_a_removed_copy_not_a_move(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool, store = tmp_path / "pool", tmp_path / "store"
    write_image(pool / "a.png", seed=1)
    shutil.copyfile(pool / "a.png", pool / "b.png")  # a copy of a.png
    write_image(pool / "c.png", seed=2)
    cli_score(capsys, store, pool, tiny_checkpoint)
    (pool / "b.png").unlink()  # the copy goes; a.png keeps the image
    (pool / "c.png").rename(pool / "d.png")  # a real move alongside
    err = cli_score(capsys, store, pool, tiny_checkpoint)
    assert "2 image file(s): 0 new, 1 moved, 0 changed, 0 restored, 1 unchanged; 0 vanished, " in err
    assert "1 duplicate copy(ies) removed;" in err
    summary = "files 2 found: 2 present (2 image(s), 0 duplicate file(s)), 0 failed; 0 absent; "
    assert summary + "1 old path(s) of moved files; 1 removed duplicate copy(ies)" in err
    info = status(capsys, store)
    assert (info["images"]["moved"], info["images"]["copies_removed"], info["images"]["absent"]) == (1, 1, 0)
    assert info["folders"][0]["copies_removed"] == 1
    shutil.copyfile(pool / "a.png", pool / "b.png")  # the copy comes back: nothing is removed any more
    err = cli_score(capsys, store, pool, tiny_checkpoint)
    assert "1 restored" in err and "removed" not in err
    assert status(capsys, store)["images"]["copies_removed"] == 0
    (pool / "a.png").unlink()
    (pool / "b.png").unlink()  # every copy gone: the content vanished
    err = cli_score(capsys, store, pool, tiny_checkpoint)
    assert "2 vanished" in err and "removed" not in err, err
    assert status(capsys, store)["images"]["absent"] == 2


def test_an_image_edited_after_labeling_may_be_selected_again(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool, store = tmp_path / "pool", tmp_path / "store"
    for i in range(3):
        write_image(pool / f"img_{i}.png", seed=i)
    cli_score(capsys, store, pool, tiny_checkpoint)
    listing = tmp_path / "done.txt"
    listing.write_text("img_0.png\n")
    assert cli(capsys, "--store", str(store), "label", str(listing))[0] == 0
    cli_score(capsys, store, pool, tiny_checkpoint)
    assert "img_0.png" not in exported_paths(capsys, store)
    write_image(pool / "img_0.png", seed=50)  # re-shot / re-edited: new content
    err = cli_score(capsys, store, pool, tiny_checkpoint)
    assert "ranked 3 of 3 image(s) (0 labeled)" in err
    assert "img_0.png" in exported_paths(capsys, store)


def test_status_shows_folders_latest_run_and_what_is_left_to_export(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    for name, n in (("first", 2), ("second", 4)):
        for i in range(n):
            write_image(tmp_path / name / f"img_{i}.png", seed=10 * n + i)
    (tmp_path / "second" / "broken.png").write_bytes(b"not an image")
    cli_score(capsys, store, tmp_path / "first", tiny_checkpoint)
    cli_score(capsys, store, tmp_path / "second", tiny_checkpoint)
    assert cli(capsys, "--store", str(store), "export", "--top", "3", "-o", str(tmp_path / "b.csv"))[0] == 0

    info = status(capsys, store)
    second = str((tmp_path / "second").resolve())
    assert [(f["folder"], f["present"], f["failed"]) for f in info["folders"]] == [
        (str((tmp_path / "first").resolve()), 2, 0),
        (second, 4, 1),
    ]
    run = info["latest_run"]
    assert (run["folder"], run["selected"], run["unexported"]) == (second, 4, 1)

    code, out, _ = cli(capsys, "--store", str(store), "status")
    assert code == 0
    assert f"folder:    {second}  (latest run)" in out
    assert "  files:   5 found: 4 present (4 image(s), 0 duplicate file(s)), 1 failed; 0 absent" in out
    assert "ranked 4 of 4 image(s) (0 labeled); 1 still to export" in out


def scan_counts(err: str) -> str:
    """The counts the ``score`` summary line gives (``files N found: ...; M absent``)."""
    line = next(line for line in err.splitlines() if " image file(s): " in line)
    return line.split("; files ", 1)[1].split("; embedded ", 1)[0]


def test_scan_summary_and_status_count_failed_files_alike_night_after_night(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 14: files that fail to decode are failed, not present, in the summary of the run that
    finds them, the next run's, and ``status`` (text and JSON) after each; copies count per file."""
    pool, store = tmp_path / "pool", tmp_path / "store"
    for i in range(3):
        write_image(pool / f"good_{i}.png", seed=i)
    shutil.copyfile(pool / "good_0.png", pool / "copy.png")
    (pool / "empty.png").write_bytes(b"")
    (pool / "empty_too.png").write_bytes(b"")  # same (empty) content: one image, two failed files
    jpeg = write_image(tmp_path / "whole.jpg", seed=7, size=(64, 64)).read_bytes()
    (pool / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (pool / "text.png").write_text("not a picture")

    def night(expected: str, failed: int, reasons: dict[str, int]) -> str:
        err = cli_score(capsys, store, pool, tiny_checkpoint)
        assert scan_counts(err) == expected
        code, out, _ = cli(capsys, "--store", str(store), "status")
        assert code == 0 and f"  files:   {expected}\n" in out and f"files:     {expected}\n" in out
        info = status(capsys, store)
        (folder,) = info["folders"]
        assert describe_files(folder) == describe_files(info["images"]) == expected
        assert folder["failed"] == failed and info["failed_reasons"] == reasons
        return err

    reasons = {"empty file": 2, "not an image (unrecognised format)": 1, "truncated or corrupt": 1}
    first = night("8 found: 4 present (3 image(s), 1 duplicate file(s)), 4 failed; 0 absent", 4, reasons)
    assert "4 file(s) skipped (2 empty file, " in first  # per file, as status counts them
    second = night("8 found: 4 present (3 image(s), 1 duplicate file(s)), 4 failed; 0 absent", 4, reasons)
    assert "skipped" not in second and "8 unchanged" in second
    write_image(pool / "text.png", seed=9)  # one bad file fixed
    del reasons["not an image (unrecognised format)"]
    third = night("8 found: 5 present (4 image(s), 1 duplicate file(s)), 3 failed; 0 absent", 3, reasons)
    assert "1 changed, 0 restored, 7 unchanged" in third and "ranked 4 of 4 image(s)" in third


def test_a_file_that_becomes_a_symlink_stops_representing(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool, store = tmp_path / "pool", tmp_path / "store"
    write_image(pool / "a.png", seed=1)
    shutil.copyfile(pool / "a.png", pool / "b.png")
    cli_score(capsys, store, pool, tiny_checkpoint)
    assert exported_paths(capsys, store) == ["a.png"]
    stat = os.stat(pool / "a.png")
    (pool / "a.png").unlink()
    (pool / "a.png").symlink_to("b.png")  # same size and content: no rehash, but now a link
    os.utime(pool / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cli_score(capsys, store, pool, tiny_checkpoint)
    assert exported_paths(capsys, store) == ["b.png"]
