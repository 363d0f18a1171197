"""Small wrappers over the library used by several test modules."""

from __future__ import annotations

import csv
import io
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alselect.embed import EmbedOptions
from alselect.export import export_latest
from alselect.pipeline import ModelSpec, ScoreResult, score_folder
from alselect.store import Store

MakeImages = Callable[..., list[Path]]
FAST = EmbedOptions(device="cpu", batch_size=4, workers=0)


def score(
    store_path: Path, folder: Path, checkpoint: Path, strategy: str = "entropy", **kwargs: Any
) -> ScoreResult:
    spec = kwargs.pop("spec", None) or ModelSpec(checkpoint)
    with Store.open(store_path, write=True, create=True) as store:
        return score_folder(store, folder, spec, strategy, options=FAST, **kwargs)


def export_text(store_path: Path, fmt: str = "csv", **kwargs: Any) -> str:
    buffer = io.StringIO(newline="")
    with Store.open(store_path, write=True) as store:
        export_latest(store, fmt, stdout=lambda: buffer, **kwargs)
    return buffer.getvalue()


def export_rows(store_path: Path, **kwargs: Any) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(export_text(store_path, "csv", **kwargs), newline="")))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``alselect`` in-process; returns (exit code, stdout, stderr)."""
    from alselect.cli import main

    with pytest.raises(SystemExit) as stop:
        main(list(args))
    out, err = capsys.readouterr()
    return int(stop.value.code or 0), out, err


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
