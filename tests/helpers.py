"""Small wrappers over the library used by several test modules."""

from __future__ import annotations

import csv
import io
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alselect.embed import EmbedOptions
from alselect.export import export_latest
from alselect.pipeline import ModelSpec, ScoreResult, score_folder
from alselect.store import DB_FILE, Store
from tests.conftest import REPO

MakeImages = Callable[..., list[Path]]
needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
FAST = EmbedOptions(device="cpu", batch_size=4, workers=0)


def assert_stored_as_direct_forward(
    store_path: Path, folder: Path, model_key: str, checkpoint: Path, files: list[Path]
) -> None:
    """The folder's pool is ``files`` in order, with the ``probs`` and ``embedding`` of the
    checkpoint's plain fp32 forward on each (decoded and normalised as an embedding pass does)."""
    import numpy as np
    import torch

    from alselect.checkpoints import load_checkpoint
    from alselect.images import load_image

    model = load_checkpoint(checkpoint)
    pixels = torch.from_numpy(np.stack([load_image(f, model.preprocess) for f in files])).float()
    mean = torch.tensor(model.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.preprocess.std).view(1, 3, 1, 1) * 255
    probs, embedding = model.predict((pixels - mean) / std)
    with Store.open(store_path) as store:
        pool = store.pool(str(folder.resolve()), model_key)
    assert pool.relpaths == [f.name for f in files]
    np.testing.assert_allclose(pool.probs, probs.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool.embeddings, embedding.numpy(), rtol=1e-5, atol=1e-6)


def embedding_count(store: Path) -> int:
    """Contents with registered outputs, merged or still in the log (migration m008)."""
    with sqlite3.connect(store / DB_FILE) as conn:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM (SELECT model, sha256 FROM outputs "
                "UNION SELECT model, sha256 FROM outputs_log)"
            ).fetchone()[0]
        )


def score(
    store_path: Path, folder: Path, checkpoint: Path, strategy: str = "entropy", **kwargs: Any
) -> ScoreResult:
    spec = kwargs.pop("spec", None) or ModelSpec(checkpoint)
    options = kwargs.pop("options", FAST)
    with Store.open(store_path, write=True, create=True) as store:
        return score_folder(store, folder, spec, strategy, options=options, **kwargs)


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


# Legal on Linux, hostile to URLs, CSV, shells, XML, and platform name rules.
HOSTILE_NAMES = [
    "plain.png",
    "with space.png",
    "hash#1.png",
    "percent%20literal.png",
    "plus+sign.png",
    "amp&and=eq;semi.png",
    "comma,name.png",
    'double"quote.png',
    "single'quote.png",
    "café/日本語 ñ.png",
    "emoji 🐝.png",
    "question?mark.png",
    "star*glob.png",
    "colon:x.png",
    "back\\slash.png",
    "dollar$bang!.png",
    "<angle>&amp;.png",
    "sub dir/inner #%+&.png",
    " leading space.png",
    "tab\there.png",
    "x" * 150 + ".png",
]


def hostile_store(base: Path, checkpoint: Path) -> tuple[Path, Path]:
    """Score a folder ``base/pool`` holding every hostile name; returns ``(store, resolved folder)``."""
    from tests.conftest import write_image

    folder = base / "pool"
    for seed, name in enumerate(HOSTILE_NAMES):
        write_image(folder / name, seed=seed, size=(24 + seed, 20))
    score(base / "store", folder, checkpoint)
    return base / "store", folder.resolve()


def exported_count(store: Path) -> int:
    with Store.open(store) as handle:
        return int(handle.scalar("SELECT COUNT(DISTINCT sha256) FROM exported") or 0)


def exports(store: Path) -> list[tuple[str, str, int]]:
    with Store.open(store) as handle:
        return [tuple(r) for r in handle.rows("SELECT format, destination, count FROM exports ORDER BY id")]


def run_alselect(*args: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "alselect", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
    )


def decode_peak_growth(path: Path, image_size: int = 224, resize_size: int = 256) -> int:
    """Bytes by which a fresh process's peak RSS grows while ``load_image`` decodes ``path``.

    VmHWM, not ru_maxrss: a child's ru_maxrss starts from the (large) pytest process it forked from.
    """
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from alselect.images import load_image
        from alselect.preprocess import Preprocess

        def peak():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

        before = peak()
        load_image(Path(sys.argv[1]), Preprocess(image_size=int(sys.argv[2]), resize_size=int(sys.argv[3])))
        print(peak() - before)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(image_size), str(resize_size)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return int(done.stdout.strip())


def cli_score(
    capsys: pytest.CaptureFixture[str], store: Path, folder: Path, checkpoint: Path, *extra: str
) -> str:
    """``alselect --store STORE score FOLDER -m CHECKPOINT -s entropy --workers 0``; its stderr."""
    code, _, err = cli(
        capsys,
        "--store",
        str(store),
        "score",
        str(folder),
        "-m",
        str(checkpoint),
        "-s",
        "entropy",
        "--workers",
        "0",
        *extra,
    )
    assert code == 0, err
    return err


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
