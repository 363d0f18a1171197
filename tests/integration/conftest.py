"""Integration checks against the labeling platforms' own software.

Each platform's package lives in its own virtual environment, made by ``.ci/integration``, which
passes each venv's interpreter in an environment variable (``ALSELECT_IT_LABEL_STUDIO``...). A test
whose venv could not be made skips with the reason ``.ci/integration`` recorded in
``<VAR>_ERROR``. alselect itself runs in the interpreter running pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import hostile_store


def venv_python(var: str) -> str:
    """The venv interpreter named by ``var``, or skip with the reason it is missing."""
    path = os.environ.get(var, "")
    if path and Path(path).is_file():
        return path
    reason = (
        os.environ.get(f"{var}_ERROR") or f"{var} is not set: run .ci/integration to make the platform venvs"
    )
    pytest.skip(reason)


def run_script(
    python: str, code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> Any:
    """Run ``code`` in ``python`` with ``args``; the script prints one JSON document as its last line."""
    done = subprocess.run(
        [python, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[Path, Path]:
    """``(store, folder)`` with every hostile file name scored (folder = ``<base>/pool``)."""
    return hostile_store(tmp_path_factory.mktemp("it"), tiny_checkpoint)
