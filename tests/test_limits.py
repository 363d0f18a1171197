"""Options that would exhaust memory are usage errors up front, saying the limit and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from alselect import limits
from alselect.errors import CheckpointError, UsageError
from alselect.preprocess import Preprocess
from tests.helpers import MakeImages, cli


def test_batch_memory_counts_prefetched_batches_and_the_batch_in_hand() -> None:
    image = 3 * 224 * 224
    # 4 workers x 4 prefetched uint8 batches, plus the batch in hand: images, their stack, float32
    assert limits.batch_memory(64, 224, 4) == 64 * image * (16 + 1 + 1 + 4)
    assert limits.batch_memory(64, 224, 0) == 64 * image * 6


def test_check_batch_memory_against_half_the_machine() -> None:
    gigabyte = 10**9
    limits.check_batch_memory(64, 224, 4, available=gigabyte)  # 212 MB
    with pytest.raises(UsageError) as exc:
        limits.check_batch_memory(256, 224, 4, available=gigabyte)  # 848 MB > 500 MB
    assert str(exc.value) == (
        "--batch-size 256 at 224 px with 4 decoding worker(s) needs about 848 MB for image batches "
        "alone, over half of this machine's 1 GB: lower --batch-size, --workers or --image-size"
    )
    limits.check_batch_memory(256, 224, 0, available=gigabyte)  # 231 MB without workers


def test_image_size_limit() -> None:
    limits.check_image_size(limits.MAX_IMAGE_SIZE)
    with pytest.raises(UsageError, match=r"^--image-size 4097 is over the limit of 4096 px: "):
        limits.check_image_size(4097)
    with pytest.raises(UsageError, match="over the limit of 4096 px"):
        Preprocess().override(image_size=100000)


def test_checkpoint_metadata_with_an_absurd_image_size_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match=r"image_size 100000 is outside 1\.\.4096"):
        Preprocess.from_metadata({"image_size": 100000})


def test_usable_memory_takes_the_lower_cgroup_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    physical = limits.usable_memory()
    assert physical is not None and physical > 10**8
    cgroup = tmp_path / "memory.max"
    monkeypatch.setattr(limits, "_CGROUP_LIMITS", (str(cgroup),))
    cgroup.write_text("max\n")
    assert limits.usable_memory() == physical
    cgroup.write_text("1000000\n")
    assert limits.usable_memory() == 1000000


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--image-size", "100000"], "--image-size 100000 is over the limit of 4096 px"),
        (["--image-size", "224", "--batch-size", "10000000"], "over half of this machine's"),
        (["--batch-size", "100000000"], "over half of this machine's"),  # size from the checkpoint
    ],
)
def test_cli_refuses_options_that_cannot_fit_in_memory(
    options: list[str],
    needle: str,
    tmp_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_images(tmp_path / "pool", 2)
    args = ["score", str(tmp_path / "pool"), "-m", str(tiny_checkpoint), "-s", "entropy", *options]
    code, out, err = cli(capsys, "--store", str(tmp_path / "store"), *args)
    assert code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "store" / "arrays").exists() or not any((tmp_path / "store" / "arrays").iterdir())


@pytest.mark.parametrize(
    ("cpus", "workers", "threads", "gpu_workers", "gpu_threads"),
    [
        (1, 1, 1, 1, 1),
        (2, 1, 1, 1, 1),
        (4, 2, 2, 3, 1),
        (8, 4, 4, 7, 1),
        (16, 4, 12, 15, 1),
        (64, 4, 60, 32, 4),
    ],
)
def test_workers_and_threads_never_ask_for_more_cores_than_there_are(
    cpus: int, workers: int, threads: int, gpu_workers: int, gpu_threads: int
) -> None:
    assert limits.default_workers(cpus=cpus) == workers
    assert limits.default_threads(workers, cpus=cpus) == threads
    assert workers + threads <= max(cpus, 2)  # one core: one worker and one thread cannot be fewer
    assert limits.default_workers(accelerator=True, cpus=cpus) == gpu_workers
    assert limits.default_threads(gpu_workers, accelerator=True, cpus=cpus) == gpu_threads


def test_usable_cpus_is_this_process_share() -> None:
    import os

    assert 1 <= limits.usable_cpus() <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert limits.usable_cpus() <= len(os.sched_getaffinity(0))
