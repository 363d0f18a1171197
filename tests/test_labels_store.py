"""``label`` against a real store: which folder a path means, export formats, exact file input, m002."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest

from alselect.errors import DataError
from alselect.export import export_latest
from alselect.labels import LabelResult, import_labels, parse_label_input
from alselect.store import Store, migrations
from tests.conftest import write_image
from tests.helpers import cli, export_text, score


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def labeled(store_path: Path) -> set[str]:
    with Store.open(store_path) as store:
        return {row[0] for row in store.rows("SELECT sha256 FROM labels")}


def label(store_path: Path, text: str) -> LabelResult:
    with Store.open(store_path, write=True) as store:
        return import_labels(store, text, "test")


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
def test_cwd_relative_path_labels_the_image_in_the_working_folder(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch, inside: str, listed: str
) -> None:
    pool = pools[0].parent / inside
    monkeypatch.chdir(pool)
    result = label(store_path, listed + "\n")
    assert (result.newly_labeled, result.unknown, result.ambiguous) == (1, [], [])
    assert labeled(store_path) == {digest(pool / "img_0001.png")}


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


def test_bare_relpath_prefers_the_latest_runs_folder(
    pools: tuple[Path, Path], store_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool_a, pool_b = pools
    monkeypatch.chdir(pool_a.parent / "elsewhere")
    assert label(store_path, "img_0001.png\n").newly_labeled == 1
    assert labeled(store_path) == {digest(pool_b / "img_0001.png")}
    score(store_path, pool_a, tiny_checkpoint)  # poolA is now the latest run's folder
    assert label(store_path, "img_0002.png\n").newly_labeled == 1
    assert labeled(store_path) == {digest(pool_b / "img_0001.png"), digest(pool_a / "img_0002.png")}


def test_relpath_in_several_folders_but_not_the_latest_is_ambiguous(
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
    assert (code, out) == (0, "")
    assert "labeled 0 image(s) (1 already labeled)" in err
    warnings = [line for line in err.splitlines() if "several folders" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "1 listed path(s) match images in several folders and "
        "were not labeled (give absolute paths, or run from inside the image folder): 'img_0002.png'"
    )

    listing.write_text("img_0002.png\n")
    code, _, err = cli(capsys, "--store", str(store_path), "label", str(listing))
    assert code == 1 and "match images in several folders" in err and len(err.strip().splitlines()) == 1
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
    paths, shas = parse_label_input(text)
    assert (paths, len(shas)) == ([], 2)
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
def test_tsv_and_jsonl_path_only_records_resolve_against_the_latest_run(
    pools: tuple[Path, Path], store_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    _, pool_b = pools
    if fmt == "tsv":
        text = "rank\tpath\tsha256\r\n1\timg_0001.png\t\r\n2\timg_0002.png\tnot-a-hash\r\n"
    else:
        text = '{"rank": 1, "path": "img_0001.png"}\n\n{"path": "img_0002.png", "sha256": null}\n'
    monkeypatch.chdir(pools[0].parent / "elsewhere")
    assert label(store_path, text).newly_labeled == 2
    assert labeled(store_path) == {digest(pool_b / "img_0001.png"), digest(pool_b / "img_0002.png")}


def test_parse_tsv_with_quoted_tabs_and_newlines() -> None:
    text = 'rank\tpath\tsha256\r\n1\t"tab\there.png"\t\r\n2\t"new\nline.png"\t\r\n3\tplain, comma.png\t\r\n'
    assert parse_label_input(text) == (["tab\there.png", "new\nline.png", "plain, comma.png"], [])


def test_parse_jsonl_keeps_exact_paths_and_prefers_sha256() -> None:
    good = hashlib.sha256(b"x").hexdigest()
    records = [
        {"path": "a\r\nb.png", "sha256": ""},
        {"path": "line\u2028sep.png"},
        {"path": "ignored.png", "sha256": good.upper()},
        {"rank": 4},
    ]
    text = "\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
    assert parse_label_input(text) == (["a\r\nb.png", "line\u2028sep.png"], [good])


def test_parse_plain_list_starting_with_a_brace_stays_a_list() -> None:
    assert parse_label_input("{draft}.png\nb.png\n") == (["{draft}.png", "b.png"], [])
    assert parse_label_input('{"path": 1}x.png\n') == (['{"path": 1}x.png'], [])


def test_parse_jsonl_with_a_broken_later_line_is_an_error() -> None:
    with pytest.raises(DataError, match="line 3"):
        parse_label_input('{"path": "a.png"}\n\n{"path": "b.png"\n')


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
    code, _, err = cli(capsys, "--store", str(store_path), "label", str(listing))
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
    listed = [*bogus[:700], "img_0001.png", str(pool_a / "img_0002.png"), *bogus[700:], *odd, "img_0001.png"]
    result = label(store_path, "".join(f"{path}\n" for path in listed))
    assert (result.requested, result.newly_labeled, result.ambiguous) == (len(listed), 2, [])
    assert result.unknown == [*bogus, *odd]
    assert labeled(store_path) == {digest(pool_b / "img_0001.png"), digest(pool_a / "img_0002.png")}
