"""Shared fixtures: a tiny trained-shape model, image folders, an isolated store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"
TINY_CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits a store, a fault hook or a lock timeout from the environment."""
    for name in ("ALSELECT_STORE", "ALSELECT_FAULT", "ALSELECT_LOCK_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An alselect-format SmallCNN with 3 classes and 16 px input (random, seeded weights)."""
    import torch

    from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
    from alselect.models.small_cnn import SmallCNN
    from alselect.preprocess import Preprocess

    torch.manual_seed(0)
    model = SmallCNN(num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_alselect_checkpoint(
        path,
        model,
        arch="small_cnn",
        num_classes=3,
        classes=TINY_CLASSES,
        preprocess=Preprocess(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3),
    )
    return path


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> Path:
    """A random-noise image at ``path`` (format from the suffix)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture
def make_images() -> Callable[..., list[Path]]:
    """``make_images(folder, n, start=0, suffix='.png')`` writes distinct noise images."""

    def make(folder: Path, n: int, start: int = 0, suffix: str = ".png") -> list[Path]:
        return [write_image(folder / f"img_{i:04d}{suffix}", seed=i) for i in range(start, start + n)]

    return make


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"
