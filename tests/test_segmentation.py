"""Segmentation: per-pixel summaries against brute force, planted uncertain regions, bounded memory,
torchvision segmenters and TorchScript fakes through the pipeline."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.pipeline import ModelSpec, prepare_model
from alselect.store import Store
from alselect.tasks import HISTOGRAM_BINS, MEASURES, SEGMENTATION_ARRAYS, Reduction, default_preprocess
from alselect.tasks.reduce import top_fraction_mean
from alselect.tasks.segmentation import STRIP_ELEMENTS, summarise_batch, summarise_map
from tests.helpers import export_rows, score

LN3 = math.log(3.0)


class FakeSegmenter(nn.Module):
    """Logits = 20 × the normalised pixel: a pure red pixel is confidently class 0, a grey pixel
    (equal channels) is uniform over the 3 classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * x


def save_fake(path: Path, side: int = 32) -> Path:
    meta = {"task": "segmentation", "classes": ["road", "grass", "sky"], "image_size": side}
    meta.update(mean=[0, 0, 0], std=[1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(
            torch.jit.script(FakeSegmenter()), str(path), _extra_files={"alselect.json": json.dumps(meta)}
        )
    return path


def brute_force(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-pixel measures of ``logits [C, H, W]`` computed naively in float64."""
    p = torch.softmax(logits.double(), dim=0).reshape(logits.shape[0], -1).numpy()
    ordered = np.sort(p, axis=0)[::-1]
    p1, p2 = ordered[0], ordered[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0).sum(axis=0)
    return {
        "entropy": entropy,
        "least_confidence": 1 - p1,
        "margin": 1 - (p1 - p2),
        "ratio": p2 / p1,
        "predicted": p.argmax(axis=0),
    }


def test_summaries_match_brute_force_and_strips_do_not_matter() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 37, 23) * 3
    exact = brute_force(logits)
    mean, hist, pixels = summarise_map(logits)
    small = summarise_map(logits, strip_elements=50)  # one row per strip
    for got, again in zip((mean, hist, pixels), small, strict=True):
        torch.testing.assert_close(got, again)
    for index, measure in enumerate(MEASURES):
        assert float(mean[index]) == pytest.approx(exact[measure].mean(), rel=1e-5)
        assert int(hist[index].sum()) == 37 * 23
        bound = [math.log(4), 0.75, 1.0, 1.0][index]
        for percent in (1.0, 10.0):
            top = top_fraction_mean(hist[index].numpy()[None, :], bound, percent)[0]
            k = math.ceil(percent / 100 * exact[measure].size)
            assert abs(top - np.sort(exact[measure])[::-1][:k].mean()) <= bound / HISTOGRAM_BINS
    np.testing.assert_array_equal(pixels.numpy(), np.bincount(exact["predicted"], minlength=4))


def test_letterbox_padding_is_left_out() -> None:
    maps = torch.zeros(1, 3, 8, 8)
    maps[0, 0, :4, :] = 20.0  # the image's top half (4 of 8 rows) is confidently class 0
    out = summarise_batch(maps, torch.tensor([[10, 20, 4, 8]]), 8)  # content: 4 rows x 8 columns
    assert out["seg_class_pixels"].tolist() == [[32, 0, 0]]
    assert float(out["seg_mean"][0, 0]) < 1e-6
    # logits at half the input resolution: the region scales with them
    half = summarise_batch(maps[:, :, ::2, ::2], torch.tensor([[10, 20, 4, 8]]), 8)
    assert half["seg_class_pixels"].tolist() == [[8, 0, 0]]


class LargestAllocation(TorchDispatchMode):
    """Records the largest new storage (in elements) any operation creates; views of an input
    share its storage and do not count."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [*args, *(kwargs or {}).values()]
        shared = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for item in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(item, torch.Tensor) and item.untyped_storage().data_ptr() not in shared:
                self.largest = max(self.largest, item.untyped_storage().nbytes() // item.element_size())
        return out


def test_memory_is_bounded_for_a_2048_input() -> None:
    classes, side = 3, 2048
    logits = torch.randn(1, classes, side, side)
    with LargestAllocation() as watch:
        out = summarise_batch(logits, torch.tensor([[side, side, side, side]]), side)
    # strips of at most STRIP_ELEMENTS class scores: the largest work tensor is a strip's 4
    # measures, never a map of the whole image (C·H·W = 12.6M here)
    assert watch.largest <= len(MEASURES) * STRIP_ELEMENTS // classes + side
    assert watch.largest < classes * side * side / 2
    assert int(out["seg_class_pixels"].sum()) == side * side
    # what is stored per image does not grow with the resolution
    small = summarise_batch(torch.randn(1, classes, 16, 16), torch.tensor([[16, 16, 16, 16]]), 16)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in small.items()}


def test_planted_uncertain_region_ranks_first_and_topq(tmp_path: Path) -> None:
    ckpt = save_fake(tmp_path / "seg.pt")
    pool = tmp_path / "pool"
    pool.mkdir()
    for name, rows in (("a_small_region.png", 2), ("b_large_region.png", 8), ("c_none.png", 0)):
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        pixels[..., 0] = 255  # red: confident
        pixels[:rows] = 128  # grey rows: uniform over the classes
        Image.fromarray(pixels).save(pool / name)
    store = tmp_path / "store"
    score(store, pool, ckpt, "entropy")
    rows = export_rows(store, include_exported=True)
    assert [r["path"] for r in rows] == ["b_large_region.png", "a_small_region.png", "c_none.png"]
    confident = float(brute_force(torch.tensor([20.0, 0.0, 0.0]).reshape(3, 1, 1))["entropy"][0])
    for row, share in zip(rows, (8 / 32, 2 / 32, 0.0), strict=True):
        assert float(row["score"]) == pytest.approx(share * LN3 + (1 - share) * confident, rel=1e-4, abs=1e-6)
    # grey pixels tie over the classes: the first wins, so every pixel counts as road
    assert rows[0]["predicted_label"] == "road" and float(rows[0]["confidence"]) == 1.0
    # top 5%: both planted regions cover 5% of their image, so both score ~ln 3 (one bin)
    again = score(store, pool, ckpt, "entropy", reduction=Reduction(reduce="topq", top_percent=5))
    assert again.embed.embedded == 0
    rows = export_rows(store, include_exported=True)
    assert [r["path"] for r in rows][2] == "c_none.png"
    for row in rows[:2]:
        assert abs(float(row["score"]) - LN3) <= LN3 / HISTOGRAM_BINS


def test_2048_image_through_the_pipeline_stores_fixed_shapes(tmp_path: Path) -> None:
    ckpt = save_fake(tmp_path / "seg.pt", side=2048)
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.new("RGB", (2048, 1024), (128, 128, 128)).save(pool / "wide.png")
    result = score(tmp_path / "store", pool, ckpt, "margin")
    with Store.open(tmp_path / "store") as store:
        layout = store.model(result.embed.model_key)["outputs"]
        rows = store.pool_rows(str(pool.resolve()), [result.embed.model_key])
        pixels = store.pool_array(rows, result.embed.model_key, "seg_class_pixels")
    assert set(layout) == set(SEGMENTATION_ARRAYS)
    assert layout["seg_hist"]["shape"] == [4, HISTOGRAM_BINS] and layout["seg_class_pixels"]["shape"] == [3]
    assert int(pixels.sum()) == 2048 * 1024  # the letterbox padding is not counted


def test_torchvision_segmenter_from_an_alselect_checkpoint(tmp_path: Path, make_images) -> None:
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3)
    path = tmp_path / "lraspp.pt"
    save_alselect_checkpoint(
        path,
        model,
        "lraspp_mobilenet_v3_large",
        3,
        None,
        default_preprocess("segmentation", {"image_size": 48}),
    )
    prepared = prepare_model(ModelSpec(path))
    assert prepared.task == "segmentation" and prepared.preprocess.image_size == 48
    make_images(tmp_path / "pool", 3)
    result = score(tmp_path / "store", tmp_path / "pool", path, "least-confidence")
    assert result.selected == 3
    with Store.open(tmp_path / "store") as store:
        layout = store.model(result.embed.model_key)["outputs"]
    assert layout["embedding"]["shape"] == [960]  # the pooled "high" features of LR-ASPP's backbone
    model = tvm.get_model(
        "deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3, aux_loss=True
    )
    state_path = tmp_path / "deeplab_state.pt"
    torch.save(model.state_dict(), state_path)
    loaded = prepare_model(
        ModelSpec(state_path, arch="deeplabv3_mobilenet_v3_large", num_classes=3, image_size=32)
    )
    out = loaded.runner.forward_outputs(torch.rand(2, 3, 32, 32), torch.tensor([[32, 32, 32, 32]] * 2))
    assert out["seg_class_pixels"].sum(dim=1).tolist() == [1024, 1024] and out["embedding"].shape == (2, 960)
