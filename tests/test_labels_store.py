"""``label`` against a real store: which folder a path means, export formats, exact file input, m002."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from alselect.annotations import read_annotations
from alselect.errors import DataError
from alselect.export import export_latest
from alselect.labels import LabelResult, import_labels
from alselect.store import Store, migrations
from tests.conftest import write_image
from tests.helpers import cli, export_text, run_alselect, score


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def labeled(store_path: Path) -> set[str]:
    with Store.open(store_path) as store:
        return {row[0] for row in store.rows("SELECT sha256 FROM labels")}


def cli_label(store_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = run_alselect("--store", str(store_path), "label", *args)
    return done.returncode, done.stdout, done.stderr


def label(store_path: Path, text: str, **options: Any) -> LabelResult:
    with Store.open(store_path, write=True) as store:
        return import_labels(store, text, "test", **options)


@pytest.fixture
def pools(tmp_path: Path, store_path: Path, tiny_checkpoint: Path) -> tuple[Path, Path]:
    """``poolA`` and ``poolB`` both hold ``img_0000..2.png``; only ``img_0000`` has equal content.

    Both are scored, ``poolB`` last; ``elsewhere`` is an empty working directory outside both.
    """
    for name, offset in (("poolA", 100), ("poolB", 200)):
        write_image(tmp_path / name / "img_0000.png", seed=0)
        for i in (1, 2):
            write_image(tmp_path / name / f"img_{i:04d}.png", seed=offset + i)
        score(store_path, tmp_path / name, tiny_checkpoint)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "poolA", tmp_path / "poolB"


@pytest.mark.parametrize("listed", ["img_0001.png", "./img_0001.png"])
@pytest.mark.parametrize("inside", ["poolA", "poolB"])
def test_cwd_relative_name_another_scored_folder_also_holds_is_ambiguous(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch, inside: str, listed: str
) -> None:
    """Defect 2: run inside poolB with poolA's list, the cwd reading used to label poolB's image."""
    pool = pools[0].parent / inside
    monkeypatch.chdir(pool)
    result = label(store_path, listed + "\n")
    assert (result.newly_labeled, result.unknown, result.ambiguous) == (0, [], [listed])
    assert labeled(store_path) == set()


@pytest.mark.parametrize("inside", ["poolA", "poolB"])
def test_cwd_relative_name_with_one_content_labels_it(
    pools: tuple[Path, Path],
    store_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    inside: str,
) -> None:
    pool = pools[0].parent / inside
    write_image(pool / "sub" / "only here.png", seed=70)
    score(store_path, pool, tiny_checkpoint)
    monkeypatch.chdir(pool)
    # img_0000 is the same content in both folders; 'sub/only here.png' is in this folder only
    result = label(store_path, "./img_0000.png\nsub/only here.png\n")
    assert (result.newly_labeled, result.unknown, result.ambiguous) == (2, [], [])
    assert labeled(store_path) == {digest(pool / "img_0000.png"), digest(pool / "sub" / "only here.png")}


def test_list_of_one_folder_read_inside_another_labels_nothing_wrong(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 2, the CLI way: poolA's paths export labeled from inside poolB."""
    pool_a, pool_b = pools
    listing = pool_a.parent / "a.txt"
    listing.write_text("img_0001.png\nimg_0002.png\n")
    monkeypatch.chdir(pool_b)
    code, _, err = cli_label(store_path, str(listing))
    assert code == 3 and "2 match images in several folders" in err
    assert labeled(store_path) == set()
    monkeypatch.chdir(pool_a.parent / "elsewhere")
    code, _, err = cli_label(store_path, str(listing), "--folder", str(pool_a))
    assert code == 0, err
    assert labeled(store_path) == {digest(pool_a / "img_0001.png"), digest(pool_a / "img_0002.png")}


def test_cwd_relative_path_from_a_parent_folder(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool_a, _ = pools
    monkeypatch.chdir(pool_a.parent)
    assert label(store_path, "poolA/img_0002.png\n").newly_labeled == 1
    assert labeled(store_path) == {digest(pool_a / "img_0002.png")}


def test_absolute_path_through_a_symlinked_folder(
    pools: tuple[Path, Path], store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool_a, _ = pools
    link = tmp_path / "linkA"
    link.symlink_to(pool_a, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = label(store_path, f"{link / 'img_0001.png'}\n")
    assert (result.newly_labeled, result.unknown) == (1, [])
    assert labeled(store_path) == {digest(pool_a / "img_0001.png")}


def test_path_through_a_symlinked_subfolder_inside_a_pool(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk records ``linked/x.png`` (link name), though the file resolves outside the pool."""
    outside = write_image(tmp_path / "outside" / "x.png", seed=5)
    write_image(tmp_path / "pool" / "y.png", seed=6)
    (tmp_path / "pool" / "linked").symlink_to(outside.parent, target_is_directory=True)
    score(store_path, tmp_path / "pool", tiny_checkpoint)
    monkeypatch.chdir(tmp_path)
    result = label(store_path, f"{tmp_path / 'pool' / 'linked' / 'x.png'}\n")
    assert (result.newly_labeled, result.unknown) == (1, [])
    assert labeled(store_path) == {digest(outside)}


def test_bare_relpath_in_two_folders_is_ambiguous_even_for_the_latest_run(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #5: a path-only list used to label the latest run's images, silently."""
    monkeypatch.chdir(pools[0].parent / "elsewhere")
    result = label(store_path, "img_0001.png\nimg_0002.png\n")
    assert (result.newly_labeled, result.unknown) == (0, [])
    assert result.ambiguous == ["img_0001.png", "img_0002.png"]
    assert labeled(store_path) == set()


def test_path_export_of_either_folder_labels_nothing_wrong(
    pools: tuple[Path, Path], store_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Yesterday's ``--format paths`` export of poolA, labeled after poolB was scored last."""
    pool_a, pool_b = pools
    score(store_path, pool_a, tiny_checkpoint)
    yesterday = export_text(store_path, "paths", top=3)
    score(store_path, pool_b, tiny_checkpoint)
    monkeypatch.chdir(pool_a.parent / "elsewhere")
    result = label(store_path, yesterday)
    # img_0000 is the same content in both folders; the other two are different images
    assert (result.newly_labeled, sorted(result.ambiguous)) == (1, ["img_0001.png", "img_0002.png"])
    assert labeled(store_path) == {digest(pool_a / "img_0000.png")}


def test_ambiguous_and_unknown_paths_are_reported_and_the_rest_labeled(
    pools: tuple[Path, Path],
    store_path: Path,
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_image(tmp_path / "poolC" / "other.png", seed=9)
    score(store_path, tmp_path / "poolC", tiny_checkpoint)
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = label(store_path, "img_0001.png\nimg_0000.png\nnope.png\n")
    # img_0000.png has the same content in both folders: labeling it is unambiguous
    assert (result.newly_labeled, result.unknown, result.ambiguous) == (1, ["nope.png"], ["img_0001.png"])
    assert labeled(store_path) == {digest(tmp_path / "poolA" / "img_0000.png")}

    listing = tmp_path / "list.txt"
    listing.write_text("img_0002.png\nimg_0000.png\n")
    code, out, err = cli(capsys, "--store", str(store_path), "label", str(listing))
    assert (code, out) == (4, "")  # partial: what matched was applied, the rest reported
    assert "labeled 0 image(s) (1 already labeled)" in err
    warnings = [line for line in err.splitlines() if "several folders" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "1 listed path(s) match images in several folders and were not labeled (pass --folder DIR, "
        "give absolute paths, or run from inside the image folder): 'img_0002.png'"
    )

    listing.write_text("img_0002.png\n")
    code, _, err = cli(capsys, "--store", str(store_path), "label", str(listing))
    assert code == 3 and "match images in several folders" in err and len(err.strip().splitlines()) == 1
    assert labeled(store_path) == {digest(tmp_path / "poolA" / "img_0000.png")}


def test_absolute_path_outside_every_folder_is_unknown(
    pools: tuple[Path, Path], store_path: Path, tmp_path: Path
) -> None:
    result = label(store_path, f"{tmp_path / 'elsewhere' / 'img_0001.png'}\n")
    assert (result.newly_labeled, result.unknown, result.ambiguous) == (
        0,
        [str(tmp_path / "elsewhere" / "img_0001.png")],
        [],
    )


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_tsv_and_jsonl_exports_label_the_exported_images(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    _, pool_b = pools
    buffer = io.StringIO(newline="")
    with Store.open(store_path, write=True) as store:
        export_latest(store, fmt, stdout=lambda: buffer, top=2)
    text = buffer.getvalue()
    records = read_annotations(text).records
    assert [bool(r.sha256) for r in records] == [True, True]
    monkeypatch.chdir(pools[0])  # even from inside poolA, the hashes name poolB's images
    result = label(store_path, text)
    assert (result.requested, result.newly_labeled, result.unknown) == (2, 2, [])
    exported = [row["path"] for row in rows_of(text, fmt)]
    assert labeled(store_path) == {digest(pool_b / path) for path in exported}


def rows_of(text: str, fmt: str) -> list[dict[str, str]]:
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    return list(csv.DictReader(io.StringIO(text, newline=""), dialect="excel-tab"))


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_tsv_and_jsonl_path_only_records_need_their_folder(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Without a folder the paths are ambiguous (poolB was scored last: no matter); with one, exact."""
    pool_a, _ = pools
    if fmt == "tsv":
        text = "rank\tpath\tsha256\r\n1\timg_0001.png\t\r\n2\timg_0002.png\tnot-a-hash\r\n"
        with_folder = f"path\tfolder\r\nimg_0001.png\t{pool_a}\r\nimg_0002.png\t{pool_a}\r\n"
    else:
        text = '{"rank": 1, "path": "img_0001.png"}\n\n{"path": "img_0002.png", "sha256": null}\n'
        names = ("img_0001.png", "img_0002.png")
        with_folder = "".join(json.dumps({"path": name, "folder": str(pool_a)}) + "\n" for name in names)
    monkeypatch.chdir(pool_a.parent / "elsewhere")
    result = label(store_path, text)
    assert (result.newly_labeled, result.ambiguous) == (0, ["img_0001.png", "img_0002.png"])
    assert labeled(store_path) == set()
    result = label(store_path, with_folder)
    assert (result.newly_labeled, result.complete) == (2, True)
    assert labeled(store_path) == {digest(pool_a / "img_0001.png"), digest(pool_a / "img_0002.png")}


def test_csv_path_with_a_bare_cr_labels_from_a_file(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pool = tmp_path / "pool"
    odd = write_image(pool / "cr\rname.png", seed=3)
    write_image(pool / "cr\nname.png", seed=4)
    score(store_path, pool, tiny_checkpoint)
    stream = io.StringIO(newline="")
    writer = csv.writer(stream, lineterminator="\r\n")
    writer.writerows([["path"], ["cr\rname.png"]])
    listing = tmp_path / "done.csv"
    listing.write_bytes(stream.getvalue().encode("utf-8"))
    monkeypatch.chdir(tmp_path)
    # a one-column table is read as a table when --format says so (detected, 'path' is a path)
    code, _, err = cli(capsys, "--store", str(store_path), "label", str(listing), "--format", "csv")
    assert code == 0 and "labeled 1 image(s)" in err, err
    assert labeled(store_path) == {digest(odd)}


def test_label_with_the_cli_reads_a_csv_export_file(
    pools: tuple[Path, Path], store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "batch.csv"
    listing.write_text(export_text(store_path, "csv", top=3), encoding="utf-8", newline="")
    code, _, err = cli(capsys, "--store", str(store_path), "label", str(listing))
    assert code == 0 and "labeled 3 image(s) (0 already labeled)" in err
    assert len(labeled(store_path)) == 3


def test_migration_m002_adds_the_relpath_index_and_lookups_use_it(store_path: Path) -> None:
    with Store.open(store_path, write=True, create=True) as store:
        names = {row[1] for row in store.rows("PRAGMA index_list(images)")}
        applied = [row[0] for row in store.rows("SELECT name FROM migrations ORDER BY name")]
        plan = store.rows(
            "EXPLAIN QUERY PLAN SELECT root, relpath, sha256, status FROM images "
            "WHERE relpath IN (?, ?) AND sha256 IS NOT NULL",
            ("a.png", "b.png"),
        )
    assert "images_relpath" in names
    assert "m002_images_relpath_index" in applied
    assert any("USING INDEX images_relpath" in row[-1] for row in plan), plan


def test_migration_m002_upgrades_an_existing_store(store_path: Path) -> None:
    """A store written before m002 (images already there) gains the index on its next write open."""
    store_path.mkdir()
    conn = sqlite3.connect(store_path / "alselect.db", isolation_level=None)
    conn.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    migrations.m001_initial(conn)
    conn.execute("INSERT INTO migrations VALUES ('m001_initial', 'then')")
    conn.execute(
        "INSERT INTO images (root, relpath, sha256, size, mtime_ns, status, first_seen, last_seen) "
        "VALUES ('/r', 'a.png', ?, 1, 1, 'present', 'then', 'then')",
        ("0" * 64,),
    )
    conn.close()
    with Store.open(store_path, write=True) as store:
        assert "images_relpath" in {row[1] for row in store.rows("PRAGMA index_list(images)")}
        assert store.scalar("SELECT sha256 FROM images WHERE relpath = 'a.png'") == "0" * 64


def test_existing_unscored_file_in_the_working_folder_is_not_matched_elsewhere(
    pools: tuple[Path, Path], store_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool_a, pool_b = pools
    write_image(pool_b / "new.png", seed=50)
    write_image(pool_b / "sub" / "deep.png", seed=51)
    score(store_path, pool_b, tiny_checkpoint)
    write_image(pool_a / "new.png", seed=52)  # on disk in poolA, never scored
    monkeypatch.chdir(pool_a)
    result = label(store_path, "new.png\nsub/deep.png\n")
    # new.png is poolA's own unscored file; sub/deep.png is no file here, so it is a stored relpath
    assert (result.newly_labeled, result.unknown, result.ambiguous) == (1, ["new.png"], [])
    assert labeled(store_path) == {digest(pool_b / "sub" / "deep.png")}


def test_many_paths_are_looked_up_in_batches_and_odd_ones_are_unknown(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool_a, pool_b = pools
    monkeypatch.chdir(pool_a.parent / "elsewhere")
    bogus = [f"missing/{i:05d}.png" for i in range(1200)]
    odd = ["bad\udcffname.png", "nul\0.png"]
    listed = [*bogus[:700], "../poolB/img_0001.png", str(pool_a / "img_0002.png"), *bogus[700:], *odd]
    listed.append(listed[700])
    result = label(store_path, "".join(f"{path}\n" for path in listed))
    assert (result.requested, result.newly_labeled, result.ambiguous) == (len(listed), 2, [])
    assert result.unknown == [*bogus, *odd]
    assert labeled(store_path) == {digest(pool_b / "img_0001.png"), digest(pool_a / "img_0002.png")}


def test_an_image_named_like_a_comment_is_labeled(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #5: ``#1.png`` from a ``--format paths`` export was dropped as a comment line."""
    pool = tmp_path / "pool"
    hashed = write_image(pool / "#1.png", seed=1)
    write_image(pool / "# two.png", seed=2)
    write_image(pool / "plain.png", seed=3)
    score(store_path, pool, tiny_checkpoint)
    listing = export_text(store_path, "paths")
    assert sorted(listing.splitlines()) == ["# two.png", "#1.png", "plain.png"]
    monkeypatch.chdir(tmp_path)
    result = label(store_path, listing)
    assert (result.newly_labeled, result.unknown) == (3, [])
    assert digest(hashed) in labeled(store_path)


def test_folder_option_labels_exactly_that_folders_images(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool_a, pool_b = pools
    monkeypatch.chdir(pool_a.parent / "elsewhere")
    result = label(store_path, "img_0001.png\n", folder=str(pool_a))
    assert (result.newly_labeled, result.complete) == (1, True)
    # relative --folder (to the working directory), and a folder above the scored one
    result = label(store_path, "poolB/img_0002.png\n", folder="..")
    assert (result.newly_labeled, result.complete) == (1, True)
    assert labeled(store_path) == {digest(pool_a / "img_0001.png"), digest(pool_b / "img_0002.png")}


def test_folder_option_never_looks_elsewhere(
    pools: tuple[Path, Path], store_path: Path, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    pool_a, pool_b = pools
    write_image(pool_b / "only_b.png", seed=77)
    score(store_path, pool_b, tiny_checkpoint)
    result = label(store_path, "only_b.png\nimg_0001.png\n", folder=str(pool_a))
    assert (result.newly_labeled, result.unknown, result.ambiguous) == (1, ["only_b.png"], [])
    assert labeled(store_path) == {digest(pool_a / "img_0001.png")}


def test_a_folder_column_wins_over_the_folder_option(pools: tuple[Path, Path], store_path: Path) -> None:
    pool_a, pool_b = pools
    text = f"path,folder\r\nimg_0001.png,{pool_b}\r\nimg_0002.png,\r\n"
    result = label(store_path, text, folder=str(pool_a))
    assert (result.newly_labeled, result.complete) == (2, True)
    assert labeled(store_path) == {digest(pool_b / "img_0001.png"), digest(pool_a / "img_0002.png")}


def test_a_folder_that_holds_no_scored_images_is_an_error(
    pools: tuple[Path, Path], store_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="no scored folder is at, inside or above"):
        label(store_path, "img_0001.png\n", folder=str(tmp_path / "elsewhere"))
    assert labeled(store_path) == set()


def test_label_exit_statuses(
    pools: tuple[Path, Path],
    store_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """0 all matched; 4 some matched, the rest reported; 3 none matched; 1 bad --folder; 2 unknown format."""
    pool_a, _ = pools
    monkeypatch.chdir(tmp_path / "elsewhere")
    listing = tmp_path / "list.txt"
    store = ("--store", str(store_path), "label")

    listing.write_text("img_0001.png\n")
    code, _, err = cli(capsys, *store, str(listing), "--folder", str(pool_a))
    assert code == 0 and "labeled 1 image(s) (0 already labeled) from paths input" in err

    listing.write_text("img_0001.png\nimg_0002.png\nnope.png\n")
    code, _, err = cli(capsys, *store, str(listing))
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    assert (
        "none of the 3 listed image(s) could be labeled: 1 are not in the store (e.g. 'nope.png'); "
        "2 match images in several folders (e.g. 'img_0001.png'; pass --folder DIR" in err
    )

    code, _, err = cli(capsys, *store, str(listing), "--folder", str(pool_a))
    assert code == 4, err
    assert "labeled 1 image(s) (1 already labeled)" in err
    assert "warning: 1 listed image(s) are not in the store: 'nope.png'" in err

    code, _, err = cli(capsys, *store, str(listing), "--folder", str(tmp_path / "elsewhere"))
    assert code == 1 and "no scored folder is at, inside or above" in err

    code, _, err = cli(capsys, *store, str(listing), "--format", "xml")
    assert code == 2 and "unknown label format 'xml'" in err
    assert labeled(store_path) == {digest(pool_a / "img_0001.png"), digest(pool_a / "img_0002.png")}
