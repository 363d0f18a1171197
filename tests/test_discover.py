"""``hash_files``: contents hashed on several threads, in input order, unreadable paths said in one line."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from alselect import discover
from alselect.discover import hash_files
from tests.helpers import MakeImages, cli


def test_a_few_files_are_still_hashed_on_several_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A few large new files (TIFF scans added to a pool) must not be read one after another on a
    # single thread because they fit in one group of small files.
    names = [f"{i}.tif" for i in range(4)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    meet = threading.Barrier(2, timeout=5)  # passes only while two files are hashed at once
    real = discover.sha256_file

    def hashed_in_pairs(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
        meet.wait()
        return real(path, chunk)

    monkeypatch.setattr(discover, "sha256_file", hashed_in_pairs)
    got = list(hash_files(tmp_path, names, 2))
    assert got == [(name, hashlib.sha256(name.encode()).hexdigest(), None) for name in names]


def test_hashes_come_back_in_input_order_across_groups(tmp_path: Path) -> None:
    names = [f"{i:04d}.png" for i in range(discover.HASH_CHUNK + 77)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    got = list(hash_files(tmp_path, reversed(names), 3))
    assert got == [(n, hashlib.sha256(n.encode()).hexdigest(), None) for n in reversed(names)]


def test_unreadable_paths_fail_with_the_reason_and_the_rest_are_hashed(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(b"abc")
    (tmp_path / "dir.png").mkdir()
    os.symlink("missing.png", tmp_path / "dangling.png")
    os.symlink("loop.png", tmp_path / "loop.png")
    names = ["dir.png", "dangling.png", "loop.png", "ok.png", "gone.png", "ok.png/x.png"]
    got = dict((name, (sha, reason)) for name, sha, reason in hash_files(tmp_path, names, 2))
    assert got == {
        "dir.png": (None, "unreadable: Is a directory"),
        "dangling.png": (None, "unreadable: No such file or directory"),
        "loop.png": (None, "unreadable: Too many levels of symbolic links"),
        "ok.png": (hashlib.sha256(b"abc").hexdigest(), None),
        "gone.png": (None, "unreadable: No such file or directory"),
        "ok.png/x.png": (None, "unreadable: Not a directory"),
    }


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_image_named_fifos_and_devices_are_skipped_and_said_not_read(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Reading a FIFO blocks until a writer comes, a link to /dev/zero never ends: a nightly run
    # must neither hang on one nor take it for an image.
    pool = tmp_path / "pool"
    make_images(pool, 2)
    os.mkfifo(pool / "pipe.png")
    (pool / "zeros.jpg").symlink_to("/dev/zero")
    problems = discover.WalkProblems()
    found = [f.relpath for f in discover.walk_images(pool, problems)]
    assert found == ["img_0000.png", "img_0001.png"]
    assert problems.special_files == ["pipe.png", "zeros.jpg"]

    code, _, err = cli(capsys, "--store", str(store_path), "embed", str(pool), "-m", str(tiny_checkpoint))
    assert code == 0, err
    assert "embedded 2 " in err
    said = "2 image-named path(s) that are no regular file (FIFO, socket, device) skipped, e.g. pipe.png"
    assert said in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_score_says_a_scans_skipped_paths_once_and_those_of_labeled_folders(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Two ensemble members share one scan: its skipped FIFO is one warning, not one per model; a
    # FIFO in a --labeled-dir is said too, with that folder's path.
    import torch

    from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
    from alselect.models.small_cnn import SmallCNN
    from alselect.preprocess import Preprocess
    from tests.conftest import TINY_CLASSES

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    preprocess = Preprocess(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    save_alselect_checkpoint(
        other,
        SmallCNN(num_classes=3),
        arch="small_cnn",
        num_classes=3,
        classes=TINY_CLASSES,
        preprocess=preprocess,
    )
    pool, labeled = tmp_path / "pool", tmp_path / "labeled"
    make_images(pool, 3)
    make_images(labeled, 2, start=10)
    os.mkfifo(pool / "pipe.png")
    os.mkfifo(labeled / "pipe2.png")
    code, _, err = cli(
        capsys, "--store", str(store_path), "score", str(pool), "-m", str(tiny_checkpoint), "-m", str(other),
        "-s", "entropy", "--workers", "0", "--labeled-dir", str(labeled),
    )  # fmt: skip
    assert code == 0, err
    said = "1 image-named path(s) that are no regular file (FIFO, socket, device) skipped, e.g. "
    assert err.count(said) == 2
    assert f"{said}pipe.png\n" in err
    assert f"{said}{labeled.resolve()}/pipe2.png\n" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_that_replaced_an_image_after_the_walk_fails_at_once(tmp_path: Path) -> None:
    # Between the walk and the read a file can become a FIFO: hashing and decoding must fail with
    # a reason, not wait forever for a writer.
    from alselect.images import ImageDecodeError, read_image_file

    fifo = tmp_path / "late.png"
    os.mkfifo(fifo)
    outcome: dict[str, object] = {}

    def read_both() -> None:
        outcome["hash"] = list(hash_files(tmp_path, ["late.png"]))
        try:
            read_image_file(fifo)
        except ImageDecodeError as exc:
            outcome["decode"] = str(exc)

    reader = threading.Thread(target=read_both, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert outcome == {
        "hash": [("late.png", None, "unreadable: not a regular file")],
        "decode": "unreadable: not a regular file",
    }
