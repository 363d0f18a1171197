"""Decoding that survives files changing underneath it, huge 16-bit images and dying worker processes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import get_worker_info

import alselect.embed as embed
from alselect.checkpoints import load_checkpoint
from alselect.embed import EmbedOptions, run_model
from alselect.images import CHANGED_WHILE_READING, OUT_OF_MEMORY, ImageDecodeError, decode_image, load_image
from alselect.preprocess import Preprocess
from tests.conftest import REPO, write_image
from tests.helpers import decode_peak_growth, needs_proc

PP = Preprocess(image_size=16, resize_size=16)
Reported = dict[int, str]  # index -> "ok" or the failure reason


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decode_reason(call: Callable[[], Any]) -> str:
    with pytest.raises(ImageDecodeError) as exc:
        call()
    return str(exc.value)


# --- expected_sha256: decode exactly the bytes that were hashed ---------------------------------


def test_matching_hash_decodes_the_same_as_a_plain_load(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", seed=1)
    expected = load_image(path, PP)
    np.testing.assert_array_equal(load_image(path, PP, sha256(path)), expected)
    np.testing.assert_array_equal(load_image(path, PP, sha256(path).upper()), expected)
    np.testing.assert_array_equal(decode_image(path.read_bytes(), PP), expected)


def test_file_changed_since_hashing_is_not_decoded(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", seed=1)
    hashed = sha256(path)
    write_image(path, seed=2)  # rewritten between sync (hash) and embed (decode)
    assert decode_reason(lambda: load_image(path, PP, hashed)) == CHANGED_WHILE_READING
    path.write_bytes(b"")  # truncated to nothing: it changed, it is not an empty file that was hashed
    assert decode_reason(lambda: load_image(path, PP, hashed)) == CHANGED_WHILE_READING


def test_failure_reasons_with_expected_hash(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert decode_reason(lambda: load_image(empty, PP, sha256(empty))) == "empty file"
    gone = tmp_path / "gone.png"
    assert decode_reason(lambda: load_image(gone, PP, "0" * 64)) == "vanished while reading"
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert decode_reason(lambda: load_image(noise, PP, sha256(noise))) == "not an image (unrecognised format)"
    data = write_image(tmp_path / "full.png", seed=3, size=(64, 64)).read_bytes()
    half = tmp_path / "half.png"
    half.write_bytes(data[: len(data) // 2])
    assert decode_reason(lambda: load_image(half, PP, sha256(half))).startswith("truncated or corrupt")
    assert decode_reason(lambda: decode_image(b"", PP)) == "empty file"
    assert decode_reason(lambda: decode_image(data[: len(data) // 2], PP)).startswith("truncated or corrupt")


def test_memory_error_while_decoding_is_a_failure_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*_args: Any, **_kwargs: Any) -> Image.Image:
        raise MemoryError

    data = Image.new("RGB", (8, 8)).tobytes()
    monkeypatch.setattr(Image, "open", exhausted)
    assert decode_reason(lambda: decode_image(data, PP)) == OUT_OF_MEMORY


# --- large images: box-reduced first, close to the direct resize --------------------------------


def float_reference(img: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """The previous decode path: full-size float64 scaling to 8 bits, then one bilinear resample."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            values = values * 255.0 if values.max() <= 1.0 else values
        elif img.mode.startswith("I;16") or values.max() > 255:
            values = values * 255.0 / 65535.0
        img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    rgb = img.convert("RGB")
    width, height = rgb.size
    scale = preprocess.resize_size / min(width, height)
    crop = preprocess.image_size / scale
    left, top = (width - crop) / 2, (height - crop) / 2
    out = rgb.resize(
        (preprocess.image_size,) * 2, Image.Resampling.BILINEAR, box=(left, top, left + crop, top + crop)
    )
    return np.asarray(out).transpose(2, 0, 1)


def smooth_grey(width: int, height: int) -> np.ndarray:
    """0..1 floats: gradients, waves and a bright off-centre patch."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    grey = 0.5 + 0.25 * np.sin(x / width * 9.0) * np.cos(y / height * 7.0) + 0.2 * (x / width - 0.5)
    grey[height // 3 : height // 2, width // 4 : width // 2] = 0.95
    return grey.clip(0, 1)


def big_images() -> dict[str, Image.Image]:
    grey = smooth_grey(1003, 701)  # sizes that leave partial blocks at the right and bottom edges
    rgb = np.stack([grey, grey[::-1], 1 - grey], axis=-1)
    rgba = np.dstack([(rgb * 255).astype(np.uint8), np.full(grey.shape, 90, np.uint8)])
    return {
        "grey16": Image.fromarray((grey * 65535).astype(np.uint16)),
        "int32": Image.fromarray((grey * 60000).astype(np.int32)),
        "int32-8bit": Image.fromarray((grey * 255).astype(np.int32)),
        "float": Image.fromarray(grey.astype(np.float32)),
        "rgb": Image.fromarray((rgb * 255).astype(np.uint8)),
        "rgba": Image.fromarray(rgba, "RGBA"),
        "palette": Image.fromarray((rgb * 255).astype(np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE),
    }


@pytest.mark.parametrize("name", sorted(big_images()))
@pytest.mark.parametrize(("size", "resize"), [(16, 16), (40, 46), (96, 110)])
def test_large_images_stay_close_to_the_direct_resize(
    tmp_path: Path, name: str, size: int, resize: int
) -> None:
    img = big_images()[name]
    path = tmp_path / ("img.tif" if img.mode in ("I", "F") else "img.png")
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == img.mode or (name == "grey16" and check.mode.startswith("I;16"))
    preprocess = Preprocess(image_size=size, resize_size=resize)
    out = load_image(path, preprocess).astype(int)
    with Image.open(path) as full:
        expected = float_reference(full, preprocess).astype(int)
    assert out.shape == expected.shape == (3, size, size)
    assert np.abs(out - expected).mean() < 2.0


def test_sixteen_bit_extremes_survive_the_reduce(tmp_path: Path) -> None:
    values = np.zeros((400, 400), dtype=np.uint16)
    values[:, 200:] = 65535
    path = tmp_path / "halves16.png"
    Image.fromarray(values).save(path)
    out = load_image(path, Preprocess(image_size=16, resize_size=16))[0].astype(int)
    assert np.all(out[:, :7] == 0) and np.all(out[:, 9:] == 255)


@needs_proc
def test_sixteen_bit_decode_peak_memory_stays_near_the_image_size(tmp_path: Path) -> None:
    """6000x6000 16-bit (72 MB of pixels): the float64 path peaked about 900 MB higher."""
    path = tmp_path / "big16.png"
    side = np.arange(6000, dtype=np.uint16)
    Image.fromarray(np.add.outer(side * 3, side * 7)).save(path, compress_level=1)  # wraps mod 65536
    growth = decode_peak_growth(path)
    assert 6000 * 6000 * 2 / 2 < growth < 2.5 * 6000 * 6000 * 2, f"peak RSS grew by {growth / 2**20:.0f} MB"


# --- dying DataLoader workers -------------------------------------------------------------------


def in_worker() -> bool:
    return get_worker_info() is not None


def run_and_collect(
    checkpoint: Path, paths: list[Path], workers: int, batch_size: int = 2, **kwargs: Any
) -> tuple[Reported, dict[int, np.ndarray], list[list[int]]]:
    """Every reported index (asserting none twice), the embeddings, and each batch's indices."""
    reported: Reported = {}
    embeddings: dict[int, np.ndarray] = {}
    batches: list[list[int]] = []

    def on_batch(indices: list[int], outputs: dict[str, np.ndarray], failures: list[tuple[int, str]]) -> None:
        embedded = outputs.get("embedding")
        batch = sorted([*indices, *(i for i, _ in failures)])
        batches.append(batch)
        for row, index in enumerate(indices):
            assert index not in reported, f"index {index} reported twice"
            reported[index] = "ok"
            assert embedded is not None
            embeddings[index] = embedded[row]
        for index, reason in failures:
            assert index not in reported, f"index {index} reported twice"
            reported[index] = reason

    model = load_checkpoint(checkpoint)
    options = EmbedOptions(device="cpu", batch_size=batch_size, workers=workers)
    run_model(model, paths, model.preprocess, options, on_batch, **kwargs)
    return reported, embeddings, batches


def kill_worker_on(
    name: str, monkeypatch: pytest.MonkeyPatch, in_process: Callable[[], Any] | None = None
) -> None:
    """Decoding ``name`` SIGKILLs the DataLoader worker doing it (inherited through fork)."""
    original = embed.load_image_geometry

    def deadly(
        path: Path, preprocess: Preprocess, expected: str | None = None, **options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        if path.name == name:
            if in_worker():
                time.sleep(0.3)  # let the main process get into a batch of its own first
                os.kill(os.getpid(), signal.SIGKILL)
            elif in_process is not None:
                in_process()
        return original(path, preprocess, expected, **options)

    monkeypatch.setattr(embed, "load_image_geometry", deadly)


needs_fork = pytest.mark.skipif(
    sys.platform != "linux", reason="the patched decode reaches workers only through fork"
)


@needs_fork
def test_run_survives_a_worker_killed_mid_run(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [write_image(tmp_path / f"img_{i}.png", seed=i) for i in range(9)]
    expected, expected_embeddings, expected_batches = run_and_collect(tiny_checkpoint, paths, workers=0)
    kill_worker_on("img_5.png", monkeypatch)
    reported, embeddings, batches = run_and_collect(tiny_checkpoint, paths, workers=2)
    assert reported == expected == dict.fromkeys(range(9), "ok")
    assert batches == expected_batches == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    for index, vector in expected_embeddings.items():
        np.testing.assert_allclose(embeddings[index], vector, rtol=1e-5, atol=1e-6)


@needs_fork
def test_out_of_memory_in_the_fallback_is_one_failure(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [write_image(tmp_path / f"img_{i}.png", seed=i) for i in range(7)]

    def exhausted() -> None:
        raise MemoryError

    kill_worker_on("img_2.png", monkeypatch, in_process=exhausted)
    reported, _, batches = run_and_collect(tiny_checkpoint, paths, workers=2)
    assert reported == {**dict.fromkeys(range(7), "ok"), 2: OUT_OF_MEMORY}
    assert batches == [[0, 1], [2, 3], [4, 5], [6]]


@needs_fork
def test_worker_death_during_on_batch_never_interrupts_it(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's SIGCHLD handler raises wherever the main thread is; on_batch must not be that place."""
    paths = [write_image(tmp_path / f"img_{i}.png", seed=i) for i in range(6)]
    kill_worker_on("img_3.png", monkeypatch)  # the second batch, on the second worker
    interrupted: list[BaseException] = []
    reported: Reported = {}

    def slow_on_batch(
        indices: list[int], _outputs: dict[str, np.ndarray], failures: list[tuple[int, str]]
    ) -> None:
        try:
            time.sleep(1.5)  # the worker dies while the first batch is being "stored"
        except BaseException as exc:
            interrupted.append(exc)
            raise
        for index in [*indices, *(i for i, _ in failures)]:
            assert index not in reported
            reported[index] = "ok"

    model = load_checkpoint(tiny_checkpoint)
    run_model(model, paths, model.preprocess, EmbedOptions("cpu", batch_size=2, workers=2), slow_on_batch)
    assert interrupted == []
    assert sorted(reported) == list(range(6))


@needs_fork
def test_changed_file_fails_in_workers_and_in_process(tmp_path: Path, tiny_checkpoint: Path) -> None:
    paths = [write_image(tmp_path / f"img_{i}.png", seed=i) for i in range(5)]
    hashes = [sha256(p) for p in paths]
    write_image(paths[1], seed=99)
    for workers in (0, 2):
        reported, _, _ = run_and_collect(tiny_checkpoint, paths, workers=workers, expected_sha256=hashes)
        assert reported == {**dict.fromkeys(range(5), "ok"), 1: CHANGED_WHILE_READING}
    with pytest.raises(ValueError, match="expected_sha256"):
        run_and_collect(tiny_checkpoint, paths, workers=0, expected_sha256=hashes[:2])


def process_state(pid: int) -> str | None:
    """``R``, ``S``, ``Z``... from /proc, or None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


@needs_fork
def test_workers_die_with_a_killed_main_process(tmp_path: Path, tiny_checkpoint: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    write_image(tmp_path / "pool" / "a.png", seed=1)
    script = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        import alselect.embed as embed
        from alselect.checkpoints import load_checkpoint

        def stuck(path, preprocess, expected=None, **options):  # a decode that takes "forever"
            Path(sys.argv[2]).write_text(str(os.getpid()))
            time.sleep(120)

        embed.load_image_geometry = stuck
        model = load_checkpoint(sys.argv[1])
        embed.run_model(model, [Path(sys.argv[3])], model.preprocess,
                        embed.EmbedOptions("cpu", batch_size=1, workers=1), lambda *a: None)
        """
    )
    main = subprocess.Popen(
        [sys.executable, "-c", script, str(tiny_checkpoint), str(pid_file), str(tmp_path / "pool" / "a.png")],
        cwd=REPO,
    )
    worker = 0
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            assert main.poll() is None, "the main process ended early"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        main.kill()
        main.wait()
        deadline = time.monotonic() + 10
        while process_state(worker) not in (None, "Z", "X") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_state(worker) in (None, "Z", "X"), "the worker outlived its killed parent"
    finally:
        if main.poll() is None:
            main.kill()
        if worker and process_state(worker) not in (None, "Z", "X"):
            os.kill(worker, signal.SIGKILL)
