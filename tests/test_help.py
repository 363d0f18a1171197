"""Help that teaches: examples, metavars, names listed, nothing cut, global options anywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import MakeImages, cli


def command_names() -> list[str]:
    import typer

    from alselect.cli import register_commands
    from alselect.cli.app import app

    register_commands()

    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def help_text(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = cli(capsys, *args, "--help")
    assert code == 0, err
    return out


@pytest.fixture(autouse=True)
def _eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def test_every_command_is_covered() -> None:
    assert sorted(command_names()) == [
        "benchmark",
        "embed",
        "export",
        "gc",
        "label",
        "preview",
        "score",
        "status",
        "strategies",
        "train",
    ]


@pytest.mark.parametrize("command", ["", *command_names()])
def test_help_is_plain_fits_80_columns_and_has_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(capsys, *([command] if command else []))
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    body = [line for line in lines if not line.startswith("Usage:")]
    assert not [line for line in body if "..." in line or "…" in line], "help text cut off"
    assert not re.search(r"<(bool|str|int|path|float|int range)>", text), "type placeholders"
    assert not re.search(r" [.,;:)](\s|$)", text, re.M), "a stray space before punctuation"
    assert "--no-" not in text
    assert "\\[" not in text, "a rich-markup escape shown literally"
    assert "default: no-" not in text
    examples = text.split("Examples:", 1)
    assert len(examples) == 2, "no examples"
    assert any(line.strip().startswith("alselect ") for line in examples[1].splitlines())


def test_usage_line_names_arguments_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    assert help_text(capsys, "score").splitlines()[0] == "Usage: alselect score [OPTIONS] DIR"
    assert help_text(capsys, "label").splitlines()[0] == "Usage: alselect label [OPTIONS] FILE"


def test_strategy_help_lists_every_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    from alselect.strategies import available

    text = " ".join(help_text(capsys, "score").split())
    assert ", ".join(available()) in text


def test_examples_of_score_run(
    tmp_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first example of 'score --help' works as written (with the user's folder and model)."""
    text = help_text(capsys, "score")
    line = next(x.strip() for x in text.split("Examples:")[1].splitlines() if "alselect score" in x)
    make_images(tmp_path / "photos", 3)
    monkeypatch.chdir(tmp_path)
    args = line.split()[1:]
    args[args.index("model.pt")] = str(tiny_checkpoint)
    code, _, err = cli(capsys, *args, "--workers", "0")
    assert code == 0, err
    assert "ranked 3 of 3" in err


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--store", "{store}"],
        ["status", "--store={store}"],
        ["status", "--json", "--quiet", "--store", "{store}"],
        ["-q", "status", "-v", "--store", "{store}"],
    ],
)
def test_global_options_after_the_command(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from alselect.store import Store

    store = tmp_path / "team-store"
    Store.open(store, write=True, create=True).close()
    code, out, err = cli(capsys, *(a.format(store=store) for a in args))
    assert code == 0, err
    assert str(store) in out


def test_quiet_after_the_command_silences_score(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    make_images(tmp_path / "pool", 2)
    common = [str(tmp_path / "pool"), "-m", str(tiny_checkpoint), "-s", "entropy", "--workers", "0"]
    code, out, err = cli(capsys, "score", *common, "--store", str(tmp_path / "s"), "--quiet")
    assert (code, out, err) == (0, "", "")
    assert (tmp_path / "s" / "alselect.db").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["score", "dir", "--quiet"], ["--quiet", "score", "dir"]),
        (
            ["--store", "a", "score", "dir", "-v", "--store", "b"],
            ["--store", "a", "-v", "--store", "b", "score", "dir"],
        ),
        (["export", "-o", "--quiet"], ["export", "-o", "--quiet"]),  # a file named --quiet
        (["label", "--", "-q"], ["label", "--", "-q"]),
        (["score", "--store=x", "d"], ["--store=x", "score", "d"]),
        (["frobnicate", "--quiet"], ["frobnicate", "--quiet"]),
        (["--quiet"], ["--quiet"]),
    ],
)
def test_hoist_global_options(args: list[str], expected: list[str]) -> None:
    from alselect.cli import register_commands
    from alselect.cli.app import build_command, hoist_global_options

    register_commands()
    assert hoist_global_options(build_command(args), args) == expected


def test_global_store_after_the_command_wins_over_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from alselect.store import Store

    Store.open(tmp_path / "mine", write=True, create=True).close()
    monkeypatch.setenv("ALSELECT_STORE", str(tmp_path / "elsewhere"))
    code, out, err = cli(capsys, "status", "--store", str(tmp_path / "mine"))
    assert code == 0, err
    assert str(tmp_path / "mine") in out
