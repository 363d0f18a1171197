"""File names that are not UTF-8 (legal on Linux) are images like any other, named exactly everywhere."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alselect.store.names import from_db, to_db
from tests.conftest import write_image

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux file names are bytes")

LATIN1 = b"caf\xe9.png"  # 'café' written by a Latin-1 system
NESTED = b"d\xe9j\xe0/vu.png"
INVALID = b"\xff\xfe.png"


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "alselect", *args], input=stdin, capture_output=True, timeout=300
    )


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """A folder whose own name is not UTF-8, holding images with such names, and one plain one."""
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/pool\xff"))
    for seed, name in enumerate((LATIN1, NESTED, INVALID, b"plain.png")):
        write_image(root / os.fsdecode(name), seed=seed)
    return root


def test_name_round_trip() -> None:
    for raw in (LATIN1, NESTED, INVALID, "ümlaut/ß.png".encode(), b"plain.png"):
        name = os.fsdecode(raw)
        stored = to_db(name)
        stored.encode("utf-8")  # storable as SQLite text
        assert from_db(stored) == name
    assert to_db("ümlaut.png") == "ümlaut.png"  # valid UTF-8 is stored as is


def test_non_utf8_names_are_scored_exported_and_labeled(
    pool: Path, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    store = ["--store", str(tmp_path / "store")]
    scored = run(*store, "score", str(pool), "-m", str(tiny_checkpoint), "-s", "entropy", "--workers", "0")
    assert scored.returncode == 0, scored.stderr
    assert b"4 image file(s): 4 new" in scored.stderr and b"warning" not in scored.stderr
    assert b"ranked 4 of 4" in scored.stderr

    target = tmp_path / "batch.csv"
    exported = run(*store, "export", "-o", str(target))
    assert exported.returncode == 0, exported.stderr
    data = target.read_bytes()
    for name in (LATIN1, NESTED, INVALID):
        assert b"," + name + b"," in data  # the original bytes, as ls would show them
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline="")))
    assert sorted(os.fsencode(r["path"]) for r in rows) == sorted([LATIN1, NESTED, INVALID, b"plain.png"])
    assert all((pool / r["path"]).is_file() for r in rows)

    jsonl = run(*store, "export", "--format", "jsonl", "--include-exported", "--absolute", "--dry-run")
    assert jsonl.returncode == 0, jsonl.stderr
    records = [json.loads(line) for line in jsonl.stdout.decode("utf-8").splitlines()]  # strict UTF-8
    assert all(Path(r["path"]).is_file() for r in records)
    assert sorted(os.fsencode(Path(r["path"]).relative_to(pool)) for r in records) == sorted(
        [LATIN1, NESTED, INVALID, b"plain.png"]
    )

    paths = run(*store, "export", "--format", "paths", "--include-exported", "--dry-run")
    assert sorted(paths.stdout.splitlines()) == sorted([LATIN1, NESTED, INVALID, b"plain.png"])

    labeled = run(*store, "label", str(target))
    assert labeled.returncode == 0 and b"labeled 4 image(s)" in labeled.stderr, labeled.stderr
    assert run(*store, "label", "-", stdin=jsonl.stdout).stderr.count(b"(4 already labeled)") == 1

    status = run(*store, "status")
    assert status.returncode == 0 and b"4 present" in status.stdout, status.stderr


def test_failed_and_moved_non_utf8_names(pool: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    (pool / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    store = ["--store", str(tmp_path / "store")]
    args = ["embed", str(pool), "-m", str(tiny_checkpoint), "--workers", "0"]
    assert run(*store, *args).returncode == 0
    status = run(*store, "status", "--failed")
    assert status.returncode == 0, status.stderr
    assert b"/bad\xff.png\tnot an image" in status.stdout
    info = json.loads(run(*store, "status", "--json", "--failed").stdout.decode("utf-8"))
    assert [os.fsencode(Path(item["path"]).name) for item in info["failed_images"]] == [b"bad\xff.png"]

    os.rename(pool / os.fsdecode(LATIN1), pool / os.fsdecode(b"caf\xe9-renamed.png"))
    again = run(*store, *args)
    assert again.returncode == 0 and b"1 moved" in again.stderr and b"embedded 0 " in again.stderr


def test_uri_and_platform_exports_of_non_utf8_names_are_valid_or_skipped_with_a_reason(
    pool: Path, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Defects 3 and 4: join_uri crashed on such names; labelbox/fiftyone/label-studio crashed or
    wrote files that are not UTF-8, and were recorded as exported all the same."""
    from alselect.annotations import ReadOptions, read_annotations
    from alselect.exporters import ExportOptions
    from tests.helpers import export_text, exported_count, score

    store = tmp_path / "store"
    score(store, pool, tiny_checkpoint)
    raw = sorted([LATIN1, NESTED, INVALID, b"plain.png"])

    # https: the raw bytes percent-encoded; label reads them back to the same names
    text = export_text(store, "paths", options=ExportOptions(uri_prefix="https://h/p/"), record=False)
    text.encode("ascii")
    back = read_annotations(text, options=ReadOptions(uri_prefix="https://h/p/"))
    assert sorted(os.fsencode(r.path or "") for r in back.records) == raw

    # s3: an object key is UTF-8, so those names are left out with the reason, and not recorded
    out = tmp_path / "s3.txt"
    done = run("--store", str(store), "export", "-f", "paths", "--uri-prefix", "s3://b/p/", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"s3://b/p/plain.png\n"
    assert (
        b"3 image(s) left out of the paths export and not recorded: file name is not valid UTF-8"
        in done.stderr
    )
    assert exported_count(store) == 1

    for fmt, prefix, expected in [
        ("label-studio", [], 1),  # local files: Label Studio decodes d= as UTF-8
        ("label-studio", ["--uri-prefix", "https://h/p/"], 4),
        ("labelbox", [], 0),  # absolute local paths to upload; the folder's own name is not UTF-8
        ("labelbox", ["--uri-prefix", "https://h/p/"], 4),
        ("cvat", [], 1),
        ("fiftyone", [], 0),  # absolute paths, and the folder's own name is not UTF-8
        ("superannotate", ["--uri-prefix", "https://h/p/"], 4),
    ]:
        target = tmp_path / f"{fmt}-{len(prefix)}"
        args = ["--store", str(store), "export", "-f", fmt, "--include-exported", *prefix]
        done = run(*args, "-o", str(target) + ("/" if fmt not in ("label-studio", "cvat") else ""))
        assert done.returncode == 0 and b"Traceback" not in done.stderr, (fmt, done.stderr)
        files = [target] if target.is_file() else [f for f in target.iterdir() if f.is_file()]
        for file in files:
            content = file.read_bytes().decode("utf-8")  # strict: valid UTF-8
            if file.suffix == ".json":
                json.loads(content)
        sidecar = json.loads(
            (
                target.with_name(target.name + ".run.json") if target.is_file() else target / "run.json"
            ).read_text()
        )
        assert sidecar["exported"] == expected, (fmt, prefix, done.stderr)
        if expected < 4:
            assert b"not valid UTF-8" in done.stderr, (fmt, done.stderr)
