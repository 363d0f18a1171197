"""``export`` around the rows: run sidecars, nothing-to-export, pipes, platform options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from alselect import __version__
from alselect.errors import AlselectError
from alselect.store import Store
from tests.conftest import REPO, TINY_CLASSES
from tests.helpers import MakeImages, cli, exported_count, exports, run_alselect, score


@pytest.fixture
def scored_store(tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages) -> Path:
    make_images(tmp_path / "pool", 5)
    score(tmp_path / "store", tmp_path / "pool", tiny_checkpoint)
    return tmp_path / "store"


# --- run sidecar ----------------------------------------------------------------------------------


def test_file_export_writes_a_run_sidecar(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "batch.csv"
    code, out, err = cli(capsys, "--store", str(scored_store), "export", "--top", "3", "-o", str(target))
    assert (code, out) == (0, ""), err
    sidecar = json.loads((tmp_path / "batch.csv.run.json").read_text(encoding="utf-8"))
    with Store.open(scored_store) as handle:
        run = handle.latest_run()
        model = handle.model(run["model_key"]) if run else None
    assert run is not None and model is not None
    assert sidecar["alselect_version"] == __version__
    assert sidecar["format"] == "csv" and sidecar["files"] == [str(target)]
    assert (sidecar["exported"], sidecar["recorded"]) == (3, True)
    assert sidecar["score_direction"].startswith("higher score = annotate first")
    assert sidecar["run"]["id"] == run["id"] and sidecar["run"]["strategy"] == "entropy"
    assert sidecar["run"]["params"] == run["params"]
    assert (sidecar["run"]["pool_size"], sidecar["run"]["selected"]) == (5, 5)
    assert sidecar["run"]["folder"] == run["root"]
    assert sidecar["model"]["checkpoint_sha256"] == model["checkpoint_sha256"]
    assert sidecar["model"]["classes"] == TINY_CLASSES
    assert sidecar["options"]["top"] == 3
    assert sidecar["command"].endswith(f"export --top 3 -o {target}")
    assert sidecar["created_at"].endswith("+00:00")
    assert "run details in" in err
    assert exports(scored_store) == [("csv", str(target), 3)]


def test_sidecar_follows_the_layout_and_skips_streams(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", str(scored_store)]
    code, out, _ = cli(capsys, *store, "export", "--dry-run", "--top", "1")
    assert code == 0 and out and list(tmp_path.glob("*.run.json")) == []
    code, _, err = cli(capsys, *store, "export", "--dry-run", "-f", "labelbox", "-o", f"{tmp_path}/lb/")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "lb").iterdir()) == [
        "data_rows.json",
        "priorities.csv",
        "run.json",
    ]
    sidecar = json.loads((tmp_path / "lb" / "run.json").read_text())
    assert sidecar["recorded"] is False and sidecar["exported"] == 5
    assert f"to {tmp_path}/lb/data_rows.json, {tmp_path}/lb/priorities.csv (not recorded)" in err
    code, _, err = cli(capsys, *store, "export", "-f", "labelbox", "-o", str(tmp_path / "night"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("night*")) == [
        "night.data_rows.json",
        "night.priorities.csv",
        "night.run.json",
    ]
    assert exports(scored_store) == [("labelbox", str(tmp_path / "night"), 5)]


# --- nothing to export ----------------------------------------------------------------------------


def test_nothing_left_says_why_and_what_next(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", str(scored_store)]
    assert cli(capsys, *store, "export", "-o", str(tmp_path / "all.csv"))[0] == 0
    code, out, err = cli(capsys, *store, "export", "-o", str(tmp_path / "again.csv"))
    assert (code, out) == (0, "")
    assert "nothing to export" in err and "5 already exported and not yet labeled" in err
    assert "--include-exported" in err and "alselect label" in err
    assert (tmp_path / "again.csv").read_text().startswith("rank,path")  # an empty batch, as before
    assert exported_count(scored_store) == 5

    code, out, err = cli(capsys, *store, "export", "--fail-if-empty", "-o", str(tmp_path / "cron.csv"))
    assert (code, out) == (3, "")
    assert err.startswith("alselect: error: nothing to export") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cron.csv").exists() and not (tmp_path / "cron.csv.run.json").exists()


def test_nothing_left_because_everything_is_labeled(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", str(scored_store)]
    code, out, _ = cli(capsys, *store, "export", "--dry-run", "-f", "paths", "--absolute")
    listing = tmp_path / "done.txt"
    listing.write_text(out)
    assert cli(capsys, *store, "label", str(listing))[0] == 0
    code, out, err = cli(capsys, *store, "export", "--fail-if-empty")
    assert (code, out) == (3, "")
    assert "5 labeled" in err and "alselect score" in err and "already exported" not in err


def test_empty_run(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pool").mkdir()
    score(tmp_path / "store", tmp_path / "pool", tiny_checkpoint)
    code, out, err = cli(capsys, "--store", str(tmp_path / "store"), "export", "--fail-if-empty")
    assert (code, out) == (3, "") and "ranked no images" in err


def test_a_budget_run_with_every_unlabeled_image_pending_says_so_in_score_and_export(
    scored_store: Path, tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", str(scored_store)]
    assert cli(capsys, *store, "export", "-o", str(tmp_path / "all.csv"))[0] == 0  # all 5 pending
    code, out, err = cli(
        capsys, *store, "score", str(tmp_path / "pool"), "-m", str(tiny_checkpoint), "-s", "coreset",
        "--budget", "2", "--workers", "0",
    )  # fmt: skip
    assert (code, out) == (0, ""), err
    reason = "all 5 unlabeled image(s) were exported and are not labeled yet (a --budget run leaves them out)"
    assert f"warning: no image to rank: {reason}" in err
    assert "the run is empty" not in err and "next: alselect export" not in err
    code, out, err = cli(capsys, *store, "export", "--fail-if-empty")
    assert (code, out) == (3, "")
    assert err.startswith("alselect: error: nothing to export: run 2 ranked no images: " + reason), err
    assert "'alselect label <their export>'" in err and "'alselect export --include-exported'" in err
    assert "was labeled, or the folder holds none" not in err


# --- pipes: what counts as delivered --------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
@pytest.mark.parametrize("command", [("export",), ("export", "-f", "jsonl"), ("status",), ("strategies",)])
def test_reader_gone_nothing_recorded_and_export_says_so(
    scored_store: Path, command: tuple[str, ...]
) -> None:
    """Like ``| head -1`` that has already exited, every write gets EPIPE. An export says in one line
    that nothing was recorded (issue 5); commands that record nothing end quietly (defect 12)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = run_alselect("--store", str(scored_store), *command, stdout=write_end)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    if command[0] == "export":
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "broken pipe" in lines[0] and "--dry-run" in lines[0], done.stderr
    else:
        assert done.stderr == ""
    assert exported_count(scored_store) == 0


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("command", [("export",), ("export", "--dry-run"), ("status",), ("strategies",)])
def test_a_full_stdout_is_one_error_line_and_nothing_is_recorded(
    scored_store: Path, command: tuple[str, ...]
) -> None:
    """Defect 12: ``> /dev/full`` was an internal error (export) or a silent success (status)."""
    with open("/dev/full", "w") as full:
        done = run_alselect("--store", str(scored_store), *command, stdout=full.fileno())
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and lines == [
        "alselect: error: cannot write to stdout: No space left on device; the output is incomplete"
    ], done.stderr
    assert exported_count(scored_store) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors")
def test_a_closed_stdout_is_one_error_line(scored_store: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "alselect", "--store", str(scored_store), "export"],
        stderr=subprocess.PIPE, text=True, env=env, timeout=120, preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "alselect: error: cannot write to stdout: stdout is closed; the output is incomplete"
    ], done.stderr
    assert exported_count(scored_store) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
def test_rows_accepted_by_a_pipe_count_as_delivered(scored_store: Path) -> None:
    """The documented rule: a reader that reads one line but keeps the pipe open took delivery."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-m", "alselect", "--store", str(scored_store), "export"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        header = proc.stdout.readline()
        code = proc.wait(timeout=120)  # all rows fit the pipe buffer: the export finishes
        err = proc.stderr.read().decode()
    assert header.startswith(b"rank,path") and code == 0, err
    assert exported_count(scored_store) == 5


# --- platform options through the CLI -------------------------------------------------------------


def test_ls_print_config_matches_the_model(scored_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(
        capsys, "--store", str(scored_store), "export", "-f", "label-studio", "--ls-print-config",
        "--ls-from-name", "cls", "--ls-to-name", "img",
    )  # fmt: skip
    assert code == 0
    root = ET.fromstring(out)
    assert [c.get("value") for c in root.iter("Choice")] == TINY_CLASSES
    assert exported_count(scored_store) == 0


def test_platform_errors_are_one_line_usage_errors(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", str(scored_store)]
    for args, needle in (
        (["-f", "sagemaker"], "--uri-prefix"),
        (["-f", "sagemaker", "--uri-prefix", "https://h/p/"], "s3://"),
        (
            ["-f", "labelbox", "-o", str(tmp_path / "x"), "--uri-prefix", "s3://b/p/"],
            "Labelbox rejects s3://",
        ),
        (["-f", "superannotate", "-o", str(tmp_path / "x")], "--uri-prefix"),
        (["-f", "labelbox"], "-o FOLDER/ or -o PREFIX"),
    ):
        code, out, err = cli(capsys, *store, "export", *args)
        assert (code, out) == (2, ""), args
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert exported_count(scored_store) == 0


@pytest.mark.parametrize(
    ("args", "flag", "readers"),
    [
        (["-f", "csv", "--ls-config", "CONFIG"], "--ls-config", "label-studio"),
        (["-f", "paths", "--predictions"], "--predictions", "label-studio"),
        (["-f", "jsonl", "--ls-from-name", "choice"], "--ls-from-name", "label-studio"),
        (["-f", "cvat", "--ls-to-name", "img"], "--ls-to-name", "label-studio"),
        (
            ["-f", "labelbox", "-o", "OUT/", "--document-root", "ROOT"],
            "--document-root",
            "cvat, label-studio",
        ),
        (
            ["-f", "cvat", "--uri-prefix", "s3://b/p/"],
            "--uri-prefix",
            "csv, jsonl, label-studio, labelbox, paths, sagemaker, superannotate, tsv",
        ),
        (["-f", "label-studio", "--absolute"], "--absolute", "csv, jsonl, paths, tsv"),
        (["-f", "fiftyone", "-o", "OUT/", "--absolute"], "--absolute", "csv, jsonl, paths, tsv"),
    ],
)
def test_an_option_the_format_ignores_is_a_usage_error_naming_who_reads_it(
    scored_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    flag: str,
    readers: str,
) -> None:
    """Defect 17: platform options given to a format that does not read them were silently ignored."""
    config = tmp_path / "config.xml"
    config.write_text("<View/>")
    where = {"CONFIG": str(config), "OUT/": f"{tmp_path / 'out'}/", "ROOT": str(tmp_path)}
    args = [where.get(a, a) for a in args]
    code, out, err = cli(capsys, "--store", str(scored_store), "export", *args)
    assert (code, out) == (2, "")
    fmt = args[1]
    assert err.strip().endswith(f"{flag} does not apply to --format {fmt} (formats that read it: {readers})")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert exported_count(scored_store) == 0


def test_options_a_format_reads_are_accepted(scored_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", str(scored_store), "export", "--dry-run"]
    assert cli(capsys, *store, "-f", "csv", "--uri-prefix", "s3://b/p/", "--absolute")[0] == 0
    assert cli(capsys, *store, "-f", "label-studio", "--predictions", "--ls-from-name", "c")[0] == 0
    assert cli(capsys, *store, "-f", "cvat", "--document-root", str(scored_store.parent))[0] == 0


def test_label_studio_export_through_the_cli(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "tasks.json"
    code, _, err = cli(
        capsys, "--store", str(scored_store), "export", "-f", "label-studio", "--predictions",
        "-o", str(target), "--ls-document-root", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    tasks = json.loads(target.read_text(encoding="utf-8"))
    assert [t["data"]["image"].split("?d=")[1].split("/")[0] for t in tasks] == ["pool"] * 5
    assert all(t["predictions"][0]["result"][0]["value"]["choices"][0] in TINY_CLASSES for t in tasks)
    assert "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT" in err
    assert exports(scored_store) == [("label-studio", str(target), 5)]


def test_an_unwritable_sidecar_target_is_refused_before_anything_is_written(
    scored_store: Path, tmp_path: Path
) -> None:
    """Defect 11: the data file used to be written first, then the sidecar failed."""
    target = tmp_path / "batch.csv"
    (tmp_path / "batch.csv.run.json").mkdir()  # the sidecar's place is taken by a folder
    done = run_alselect("--store", str(scored_store), "export", "-o", str(target))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "batch.csv.run.json" in lines[0] and "nothing was written" in lines[0]
    assert not target.exists() and exported_count(scored_store) == 0
    out = tmp_path / "lb"
    out.mkdir()
    (out / "run.json").mkdir()
    done = run_alselect("--store", str(scored_store), "export", "-f", "labelbox", "-o", f"{out}/")
    assert done.returncode == 1 and "run.json" in done.stderr and "nothing was written" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["run.json"] and exported_count(scored_store) == 0


def test_a_failing_sidecar_write_leaves_the_data_file_as_it_was(
    scored_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alselect.export as export_module

    target = tmp_path / "batch.csv"
    target.write_text("before\n")

    def broken(path: Path, **fields: object) -> None:
        raise AlselectError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(export_module, "write_sidecar", broken)
    with Store.open(scored_store, write=True) as store, pytest.raises(AlselectError, match=r"run\.json"):
        export_module.export_latest(store, "csv", output=target)
    assert target.read_text() == "before\n" and exported_count(scored_store) == 0


@pytest.mark.parametrize(
    "prefix",
    ["s3:/bucket/pool/", "ftp://host/pool/", "", "https://host/pool/?sig=1", "s3://", "pool/", "https:///x"],
)
def test_a_bad_uri_prefix_is_a_usage_error_listing_the_schemes(scored_store: Path, prefix: str) -> None:
    """Defect 16."""
    for command in (["export", "--dry-run", "-f", "paths"], ["label", "no-such-file.txt"]):
        done = run_alselect("--store", str(scored_store), *command, "--uri-prefix", prefix)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (command, done.stderr)
        assert all(s in lines[0] for s in ("http://", "https://", "s3://", "gs://")), lines[0]
