"""The Ray engine on a local Ray instance (2 CPUs, no GPU) started once for this module.

Same images, failures (and reasons), arrays and exports as the local engine; a model actor killed
mid-run is restarted by Ray and its chunk retried; a driver killed mid-run loses only what was not
registered, and the next run resumes; an unreachable cluster is one line and exit 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alselect.checkpoints import load_checkpoint
from alselect.embed import EmbedOptions, RayOptions, open_engine, run_model
from alselect.pipeline import McDropout, ModelSpec, ScoreModels, embed_folder, score_folder
from alselect.store import DB_FILE, Store
from tests.conftest import REPO, SAMPLE_DATA, write_image
from tests.helpers import MakeImages, closed_port, embedding_count, export_text

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'alselect[ray]' runs these tests")
pytestmark = pytest.mark.ray

BATCH = 16
LOCAL = EmbedOptions(device="cpu", batch_size=BATCH, workers=0)
RAY = EmbedOptions(device="cpu", batch_size=BATCH, engine="ray", ray=RayOptions(actors=1))


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One local Ray instance for the module; yields its address for other processes to join."""
    if ray.is_initialized():
        ray.shutdown()
    context = ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test-only models travel by value
    yield str(context.address_info["gcs_address"])
    ray.shutdown()


def add_broken_files(folder: Path, good: Path) -> None:
    """An empty file, a text file named .jpg and a truncated copy of ``good``."""
    (folder / "broken").mkdir(parents=True, exist_ok=True)
    (folder / "broken" / "empty.png").write_bytes(b"")
    (folder / "broken" / "text.jpg").write_text("not an image at all")
    data = good.read_bytes()
    (folder / "broken" / f"truncated{good.suffix}").write_bytes(data[: len(data) // 2])


def image_table(store_path: Path) -> list[tuple[str, str | None, str, str | None]]:
    with sqlite3.connect(store_path / DB_FILE) as conn:
        return conn.execute("SELECT relpath, sha256, status, reason FROM images ORDER BY relpath").fetchall()


def jpeg_folder(folder: Path, count: int) -> Path:
    """Photo-like JPEGs (smooth gradients, noise) of a few sizes, as a camera folder would hold."""
    from PIL import Image

    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    for i in range(count):
        width, height = [(640, 480), (480, 640), (800, 600)][i % 3]
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack(
            [np.sin(xs / rng.uniform(20, 90) + c) * np.cos(ys / rng.uniform(20, 90)) for c in range(3)], -1
        )
        pixels = np.clip((0.5 + 0.4 * base + 0.05 * rng.standard_normal(base.shape)) * 255, 0, 255).astype(
            np.uint8
        )
        Image.fromarray(pixels).save(folder / f"photo_{i:03d}.jpg", quality=88)
    return folder


@pytest.mark.parametrize("case", ["sample_data", "jpegs"])
def test_ray_run_gives_the_local_engine_results(
    case: str, cluster: str, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    if case == "sample_data":
        folder = tmp_path / "pool"
        shutil.copytree(SAMPLE_DATA / "images", folder)
        checkpoint = SAMPLE_DATA / "model.pt"
        add_broken_files(folder, next(folder.rglob("*.png")))
    else:
        folder = jpeg_folder(tmp_path / "pool", 24)
        checkpoint = tiny_checkpoint
        add_broken_files(folder, folder / "photo_000.jpg")
    runs = {}
    for name, options in (("local", LOCAL), ("ray", RAY)):
        with Store.open(tmp_path / name, write=True, create=True) as store:
            runs[name] = score_folder(store, folder, ModelSpec(checkpoint), "entropy", options=options)
    local, remote = runs["local"], runs["ray"]
    assert remote.embed.embedded == local.embed.embedded > 20
    assert remote.embed.failures == local.embed.failures
    assert sorted(reason.split(":")[0] for _, reason in remote.embed.failures) == [
        "empty file",
        "not an image (unrecognised format)",
        "truncated or corrupt",
    ]
    assert image_table(tmp_path / "ray") == image_table(tmp_path / "local")
    root = str(folder.resolve())
    with Store.open(tmp_path / "local") as a, Store.open(tmp_path / "ray") as b:
        key = remote.embed.model_key
        want, got = a.pool(root, key), b.pool(root, key)
    assert got.relpaths == want.relpaths
    np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.embeddings, want.embeddings, rtol=1e-5, atol=1e-5)
    assert export_text(tmp_path / "ray") == export_text(tmp_path / "local")


def test_full_mc_dropout_passes_run_on_ray_from_the_recipe(
    cluster: str, tmp_path: Path, make_images: MakeImages
) -> None:
    from tests.test_mc_dropout import NeedsMc, small_cnn_with_dropout

    make_images(tmp_path / "pool", 10)
    checkpoint, _ = small_cnn_with_dropout(tmp_path)
    seen = {}
    for name, options in (("local", LOCAL), ("ray", RAY)):
        strategy = NeedsMc()
        with Store.open(tmp_path / name, write=True, create=True) as store:
            models = ScoreModels(task=[ModelSpec(checkpoint)], mc=McDropout(samples=4, mode="full"))
            score_folder(store, tmp_path / "pool", models, strategy, options=options)
        (inputs,) = strategy.seen
        seen[name] = inputs
    assert seen["ray"].mc_probs is not None and seen["ray"].mc_probs.shape == (10, 4, 3)
    np.testing.assert_allclose(seen["ray"].mc_probs, seen["local"].mc_probs, atol=1e-3)  # float16 stored
    np.testing.assert_allclose(seen["ray"].probs, seen["local"].probs, atol=1e-6)


class DiesOnce:
    """Wraps a model; the first actor that runs it is SIGKILLed at its second batch."""

    def __init__(self, model: Any, marker: Path) -> None:
        self.model = model
        self.marker = marker
        self.calls = 0

    def to(self, device: Any) -> DiesOnce:
        self.model.to(device)
        return self

    def forward_outputs(self, batch: Any) -> Any:
        self.calls += 1
        if self.calls == 2 and not ray.get_runtime_context().was_current_actor_reconstructed:
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.model.forward_outputs(batch)


def test_a_model_actor_that_dies_is_restarted_and_its_chunk_retried(
    cluster: str, tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    paths = make_images(tmp_path / "pool", 40)
    model = load_checkpoint(tiny_checkpoint)
    got: dict[int, np.ndarray] = {}

    def on_batch(indices: list[int], outputs: dict[str, np.ndarray], failures: list[tuple[int, str]]) -> None:
        assert not failures
        for row, index in enumerate(indices):
            assert index not in got, f"image {index} handed over twice"
            got[index] = outputs["probs"][row]

    marker = tmp_path / "died"
    options = EmbedOptions(device="cpu", batch_size=4, engine="ray", ray=RayOptions(actors=1))
    with open_engine(options) as engine:  # no recipe: the wrapper object itself is sent to the actor
        engine.run(DiesOnce(model, marker), paths, model.preprocess, on_batch)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # an actor process really died
    assert sorted(got) == list(range(40))
    want: dict[int, np.ndarray] = {}
    run_model(
        model,
        paths,
        model.preprocess,
        EmbedOptions("cpu", 4, 0),
        lambda i, o, _: want.update(zip(i, o["probs"], strict=True)),
    )
    for index, probs in want.items():
        np.testing.assert_array_equal(got[index], probs)


def test_a_checkpoint_that_differs_on_a_worker_is_one_clear_error(
    cluster: str,
    tmp_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import alselect.pipeline as pipeline
    from alselect.errors import CheckpointError

    make_images(tmp_path / "pool", 6)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    sync = pipeline.sync_folder

    def sync_then_replace(*args: Any, **kwargs: Any) -> Any:
        checkpoint.write_bytes(tiny_checkpoint.read_bytes() + b"\0")  # after the driver loaded it
        return sync(*args, **kwargs)

    monkeypatch.setattr(pipeline, "sync_folder", sync_then_replace)
    with Store.open(tmp_path / "store", write=True, create=True) as store:
        with pytest.raises(CheckpointError, match="every node must see the same checkpoint"):
            embed_folder(store, tmp_path / "pool", ModelSpec(checkpoint), RAY)
        assert embedding_count(tmp_path / "store") == 0


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 420
) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "alselect", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        cwd=REPO,
    )


def test_a_killed_ray_driver_resumes_in_the_next_run_local_or_ray(
    cluster: str, tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 30)
    base = [
        "--store",
        str(tmp_path / "store"),
        "embed",
        str(tmp_path / "pool"),
        "--model",
        str(tiny_checkpoint),
    ]
    # 15 chunks of 2: more than two registrations can hold, even grouped (alselect.store.writer)
    ray_args = [*base, "--device", "cpu", "--batch-size", "2", "--engine", "ray", "--ray-actors", "1"]
    killed = run_cli(*ray_args, "--ray-address", cluster, env={"ALSELECT_FAULT": "after-append:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    registered = embedding_count(tmp_path / "store")  # merged or still in the log (m008)
    assert 0 < registered < 30 and registered % 2 == 0  # whole chunks, the one in flight lost

    resumed = run_cli(*ray_args)  # starts a Ray instance of its own, shuts it down at the end
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == ""  # stdout carries data only
    assert "starting a local Ray instance" in resumed.stderr
    assert f"embedded {30 - registered} " in resumed.stderr
    with Store.open(tmp_path / "store") as store:
        assert embedding_count(tmp_path / "store") == 30
        key = store.rows("SELECT key FROM models")[0][0]
        got = store.pool(str((tmp_path / "pool").resolve()), key)
    with Store.open(tmp_path / "clean", write=True, create=True) as store:
        embed_folder(store, tmp_path / "pool", ModelSpec(tiny_checkpoint), EmbedOptions("cpu", 2, 0))
        want = store.pool(str((tmp_path / "pool").resolve()), key)
    np.testing.assert_array_equal(got.probs, want.probs)
    np.testing.assert_array_equal(got.embeddings, want.embeddings)

    again = run_cli(*base, "--device", "cpu")  # and the local engine finds nothing left to do
    assert again.returncode == 0 and "embedded 0 " in again.stderr and "(30 already embedded)" in again.stderr


def test_an_unreachable_cluster_is_one_line_and_exit_1(tmp_path: Path, tiny_checkpoint: Path) -> None:
    port = closed_port()
    write_image(tmp_path / "pool" / "a.png", seed=0)
    args = ["--store", str(tmp_path / "store"), "embed", str(tmp_path / "pool"), "-m", str(tiny_checkpoint)]
    done = run_cli(*args, "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"alselect: error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"
    ]
    auto = run_cli(
        *args, "--engine", "ray", "--ray-address", "auto", env={"RAY_ADDRESS": f"127.0.0.1:{port}"}
    )
    assert auto.returncode == 1
    (line,) = auto.stderr.splitlines()  # "auto" resolves 127.0.0.1 to this machine's address
    assert line.startswith("alselect: error: cannot reach the Ray cluster at auto (") and line.endswith(
        "refused"
    )
    with sqlite3.connect(tmp_path / "store" / DB_FILE) as conn:
        assert conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0  # failed before hashing
