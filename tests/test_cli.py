"""The command line: exit codes, one-line errors, stdout carries data only, light imports."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alselect.strategies import available
from tests.conftest import SAMPLE_DATA
from tests.helpers import MakeImages, cli


def installed_alselect() -> str:
    beside = Path(sys.executable).parent / "alselect"
    found = str(beside) if beside.exists() else shutil.which("alselect")
    assert found, "the alselect console script is not installed (pip install -e .)"
    return found


def test_installed_executable_runs_the_readme_flow_on_sample_data(tmp_path: Path) -> None:
    exe = installed_alselect()
    env = {**os.environ, "ALSELECT_STORE": str(tmp_path / "store")}
    scored = subprocess.run(
        [
            exe,
            "score",
            str(SAMPLE_DATA / "images"),
            "--model",
            str(SAMPLE_DATA / "model.pt"),
            "--strategy",
            "entropy",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert scored.returncode == 0, scored.stderr
    assert scored.stdout == ""  # progress and summaries go to stderr
    exported = subprocess.run(
        [exe, "export", "--top", "20", "--format", "csv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [int(r["rank"]) for r in rows] == list(range(1, 21))
    assert all((SAMPLE_DATA / "images" / r["path"]).is_file() for r in rows)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "exported 20" in exported.stderr


def test_light_commands_do_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "tasks.json").write_text('[{"data": {"image": "a.png"}, "annotations": [{}]}]')
    code = f"""
import sys
from alselect.cli import main
for argv in (["--help"], ["strategies"], ["--store", {str(tmp_path / "s")!r}, "status"],
             ["--store", {str(tmp_path / "s")!r}, "export"],
             ["--store", {str(tmp_path / "s")!r}, "export", "-f", "label-studio", "--ls-print-config"],
             ["--store", {str(tmp_path / "s")!r}, "preview", "-o", {str(tmp_path / "p.png")!r}],
             ["--store", {str(tmp_path / "s")!r}, "label", {str(tmp_path / "none.txt")!r}],
             ["--store", {str(tmp_path / "s")!r}, "label", {str(tmp_path / "tasks.json")!r}, "-f", "cvat"]):
    try:
        main(argv)
    except SystemExit:
        pass
    assert "torch" not in sys.modules, argv
print("clean")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("clean"), done.stderr


@pytest.fixture
def scored_store(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> Path:
    make_images(tmp_path / "pool", 5)
    code, _, err = cli(
        capsys,
        "--store",
        str(tmp_path / "store"),
        "score",
        str(tmp_path / "pool"),
        "--model",
        str(tiny_checkpoint),
        "--strategy",
        "entropy",
        "--workers",
        "0",
    )
    assert code == 0, err
    return tmp_path / "store"


def bad_state_dict(tmp_path: Path) -> Path:
    from alselect.models.small_cnn import SmallCNN

    path = tmp_path / "sd.pt"
    torch.save(SmallCNN(num_classes=3).state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("case", "expected_code", "needle"),
    [
        ("missing folder", 1, "image folder not found"),
        ("missing checkpoint", 1, "checkpoint not found"),
        ("checkpoint is a folder", 1, "is a folder, not a checkpoint file; it holds junk.pt, sd.pt"),
        ("malformed checkpoint", 1, "junk.pt is a text file (it starts with 'this is not a checkpoint"),
        ("wrong num classes", 1, "checkpoint has 3 classes but --num-classes is 5"),
        ("state dict without arch", 1, "--arch"),
        ("unknown strategy", 2, "known strategies: " + ", ".join(available())),
        ("top zero", 2, "--top"),
        ("unknown format", 2, "known formats: csv"),
        ("unknown command", 2, "No such command"),
        ("export without run", 1, "no scoring run"),
        ("export without store", 1, "no alselect store"),
        ("cuda without gpu", 1, "CUDA is not available"),
    ],
)
def test_errors_are_one_line_with_the_documented_exit_code(
    case: str,
    expected_code: int,
    needle: str,
    tmp_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if case == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    make_images(tmp_path / "pool", 2)
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    store = ["--store", str(tmp_path / "store")]
    score = [*store, "score", str(tmp_path / "pool"), "--strategy", "entropy", "--workers", "0"]
    args = {
        "missing folder": [
            *store,
            "score",
            str(tmp_path / "nope"),
            "--model",
            str(tiny_checkpoint),
            "--strategy",
            "entropy",
        ],
        "missing checkpoint": [*score, "--model", str(tmp_path / "nope.pt")],
        "checkpoint is a folder": [*score, "--model", str(tmp_path)],
        "malformed checkpoint": [*score, "--model", str(tmp_path / "junk.pt")],
        "wrong num classes": [
            *score,
            "--model",
            str(bad_state_dict(tmp_path)),
            "--arch",
            "small_cnn",
            "--num-classes",
            "5",
        ],
        "state dict without arch": [*score, "--model", str(bad_state_dict(tmp_path))],
        "unknown strategy": [
            *store,
            "score",
            str(tmp_path / "pool"),
            "--model",
            str(tiny_checkpoint),
            "--strategy",
            "psychic",
        ],
        "top zero": [*store, "export", "--top", "0"],
        "unknown format": [*store, "export", "--format", "docx"],
        "unknown command": ["frobnicate"],
        "export without run": None,
        "export without store": [*store, "export"],
        "cuda without gpu": [*score, "--model", str(tiny_checkpoint), "--device", "cuda"],
    }[case]
    if args is None:  # a store that exists but has no run yet
        from alselect.store import Store

        Store.open(tmp_path / "store", write=True, create=True).close()
        args = [*store, "export"]
    code, out, err = cli(capsys, *args)
    assert code == expected_code, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err


def test_verbose_adds_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--verbose", "--store", str(tmp_path / "s"), "export")
    assert code == 1 and "Traceback" in err and err.strip().endswith("score' first, or pass --store)")


def test_output_file_quiet_mode_label_and_status(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "batch.csv"
    code, out, err = cli(
        capsys, "--quiet", "--store", str(scored_store), "export", "--top", "2", "-o", str(target)
    )
    assert (code, out, err) == (0, "", "")
    rows = list(csv.DictReader(target.open(newline="", encoding="utf-8")))
    assert len(rows) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".batch")] == []

    labeled = subprocess.run(
        [sys.executable, "-m", "alselect", "--store", str(scored_store), "label", "-"],
        input=target.read_text(encoding="utf-8"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert labeled.returncode == 0 and "labeled 2 image(s)" in labeled.stderr

    code, out, _ = cli(capsys, "--store", str(scored_store), "status", "--json")
    import json

    info = json.loads(out)
    expected = {
        "present": 5,
        "absent": 0,
        "failed": 0,
        "distinct": 5,
        "duplicates": 0,
        "moved": 0,
        "copies_removed": 0,
    }
    assert info["images"] == expected
    assert (info["labeled"], info["exported"], info["runs"]) == (2, 2, 1)
    assert info["latest_run"]["strategy"] == "entropy"

    code, out, _ = cli(capsys, "--store", str(scored_store), "export", "--format", "paths")
    assert code == 0 and len(out.splitlines()) == 3  # 5 minus 2 exported-and-labeled


def test_label_of_unknown_paths_only_is_an_error(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "done.txt"
    listing.write_text("nope.png\nalso/nope.png\n")
    code, _, err = cli(capsys, "--store", str(scored_store), "label", str(listing))
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "none of the 2 listed image(s) could be labeled: 2 are not in the store (e.g. 'nope.png')" in err


def test_strategies_lists_every_registered_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "strategies")
    names = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and names == list(available())
    assert {
        "entropy",
        "least-confidence",
        "margin",
        "random",
        "ratio",
        "bald",
        "batchbald",
        "learning-loss",
        "coreset",
        "badge",
    } <= set(names)


def test_python_dash_m_reports_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "alselect", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("alselect ")


def test_max_pixels_reaches_the_decoder(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import write_image

    make_images(tmp_path / "pool", 2)  # 24x20 = 480 pixels each
    write_image(tmp_path / "pool" / "big.png", seed=7, size=(30, 30))  # 900 pixels
    store = ["--store", str(tmp_path / "store")]
    args = ["score", str(tmp_path / "pool"), "-m", str(tiny_checkpoint), "-s", "entropy", "--workers", "0"]
    code, _, err = cli(capsys, *store, *args, "--max-pixels", "899")
    assert code == 0, err
    assert "1 file(s) skipped (1 decompression bomb)" in err
    code, out, _ = cli(capsys, *store, "status", "--failed")
    reason = "decompression bomb: 30x30 = 900 pixels is over the limit of 899 pixels (--max-pixels)"
    assert out.count(reason) == 1 and "big.png" in out


def test_status_failed_lists_one_line_per_file_with_control_characters_escaped(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 17: a name with a line break (or a reason with one) split an item over two lines."""
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("bad\nname.png", "tab\tand\x1besc.png", "back\\slash.png"):
        (pool / name).write_bytes(b"not an image")
    store = tmp_path / "store"
    code, _, err = cli(
        capsys, "--store", str(store), "embed", str(pool), "-m", str(tiny_checkpoint), "--workers", "0"
    )
    assert code in (0, 3), err
    code, out, err = cli(capsys, "--store", str(store), "status", "--failed")
    assert code == 0, err
    listed = [line for line in out.splitlines() if line.startswith(str(pool.resolve()))]
    root = str(pool.resolve())
    assert sorted(listed) == sorted(
        [
            f"{root}/back\\\\slash.png\tnot an image (unrecognised format)",
            f"{root}/bad\\nname.png\tnot an image (unrecognised format)",
            f"{root}/tab\\tand\\x1besc.png\tnot an image (unrecognised format)",
        ]
    )
