"""Run a segmenter over a batch and keep per-image summaries of its per-pixel uncertainty (torch).

Per pixel: the class distribution (softmax of the logits, or the model's probabilities), its
entropy, least confidence ``1 - p1``, margin score ``1 - (p1 - p2)`` and ratio ``p2 / p1``. Per
image only summaries are kept (``alselect.tasks.SEGMENTATION_ARRAYS``): the exact mean of each
measure, a histogram of each over ``HISTOGRAM_BINS`` equal bins of [0, its upper bound] (enough to
compute the mean of the top q% most uncertain pixels later, within one bin width), and the number
of pixels predicted as each class. Letterbox padding is left out. The maps are processed in strips
of rows, so no full-resolution probability map is ever held, not even for one image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from alselect.checkpoints import LoadedModel
from alselect.errors import CheckpointError
from alselect.tasks import HISTOGRAM_BINS, MEASURES, measure_bound
from alselect.tasks.features import BackboneFeatures, content_fractions, whole_input

STRIP_ELEMENTS = 1 << 22  # class scores per strip (16 MiB of float32): bounds the work memory


class SegmentationRunner:
    """``forward_outputs(batch, geometry)`` → ``seg_mean``, ``seg_hist``, ``seg_class_pixels``,
    ``geometry`` and, where available, ``embedding``."""

    needs_geometry = True

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        module = model.module
        self.torchvision = hasattr(module, "backbone") and hasattr(module, "classifier")
        levels = ["high"] if type(module).__name__ == "LRASPP" else ["out"]
        self.features = BackboneFeatures(module, levels) if self.torchvision else None
        self.probabilities = model.outputs == "probabilities"

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def to(self, device: torch.device) -> SegmentationRunner:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def forward_outputs(
        self, batch: torch.Tensor, geometry: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        geometry = whole_input(batch) if geometry is None else geometry
        raw = self.model.module(batch)
        maps, embedding = segmentation_outputs(raw)
        if maps.ndim != 4 or maps.shape[0] != batch.shape[0]:
            raise CheckpointError(
                f"segmentation output has shape {tuple(maps.shape)}; "
                f"expected [N, C, H, W] for N = {batch.shape[0]}"
            )
        side = int(batch.shape[-1])
        if embedding is None and self.features is not None:
            embedding = self.features.pooled(content_fractions(geometry, side))
        out = summarise_batch(maps, geometry, side, probabilities=self.probabilities)
        if embedding is not None:
            out["embedding"] = embedding.float().flatten(1).cpu()
        return out


def segmentation_outputs(raw: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(maps [N, C, H, W], embedding [N, D] | None)`` from logits, ``(logits, embedding)``, or a
    dict with ``out`` / ``logits`` / ``probs`` (torchvision's ``aux`` is ignored) and ``embedding``."""
    if isinstance(raw, torch.Tensor):
        return raw, None
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        embedding = raw[1] if len(raw) > 1 and isinstance(raw[1], torch.Tensor) else None
        return raw[0], embedding
    if isinstance(raw, Mapping):
        maps = next(
            (raw[k] for k in ("out", "logits", "probs") if isinstance(raw.get(k), torch.Tensor)), None
        )
        if maps is not None:
            embedding = raw.get("embedding")
            return maps, embedding if isinstance(embedding, torch.Tensor) else None
    raise CheckpointError(
        "segmentation output is not logits [N, C, H, W], (logits, embedding), or a dict with 'out'/'logits'; "
        f"got {type(raw).__name__}"
    )


def summarise_batch(
    maps: torch.Tensor, geometry: torch.Tensor, input_size: int, *, probabilities: bool = False
) -> dict[str, torch.Tensor]:
    """The stored segmentation arrays of a batch of score maps ``[N, C, H, W]`` (any resolution:
    the image's region is scaled from the letterbox ``geometry``)."""
    n, classes, height, width = maps.shape
    fractions = content_fractions(geometry, input_size)
    means = torch.zeros(n, len(MEASURES))
    hists = torch.zeros(n, len(MEASURES), HISTOGRAM_BINS, dtype=torch.int32)
    pixels = torch.zeros(n, classes, dtype=torch.int32)
    for i in range(n):
        rows = min(height, max(1, math.ceil(float(fractions[i, 0]) * height - 1e-6)))
        cols = min(width, max(1, math.ceil(float(fractions[i, 1]) * width - 1e-6)))
        mean, hist, count = summarise_map(maps[i, :, :rows, :cols], probabilities=probabilities)
        means[i], hists[i], pixels[i] = mean, hist, count
    return {
        "seg_mean": means,
        "seg_hist": hists,
        "seg_class_pixels": pixels,
        "geometry": geometry.to(torch.int32).cpu(),
    }


def summarise_map(
    scores: torch.Tensor, *, probabilities: bool = False, strip_elements: int = STRIP_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's ``(mean [4], hist [4, B] int32, class_pixels [C] int32)`` from ``scores [C, H, W]``
    (logits, or probabilities with ``probabilities``), in strips of at most ``strip_elements``
    class scores."""
    classes, height, width = scores.shape
    device = scores.device
    bounds = torch.tensor([measure_bound(m, classes) for m in MEASURES], device=device)
    sums = torch.zeros(len(MEASURES), dtype=torch.float64, device=device)
    hist = torch.zeros(len(MEASURES), HISTOGRAM_BINS, dtype=torch.int64, device=device)
    counts = torch.zeros(classes, dtype=torch.int64, device=device)
    step = max(1, strip_elements // max(classes * width, 1))
    for top in range(0, height, step):
        strip = scores[:, top : top + step, :].reshape(classes, -1).float()
        values, predicted = pixel_measures(strip, probabilities=probabilities)  # [4, P], [P]
        sums += values.double().sum(dim=1)
        bins = (values / bounds[:, None] * HISTOGRAM_BINS).floor().clamp_(0, HISTOGRAM_BINS - 1).long()
        offsets = torch.arange(len(MEASURES), device=device)[:, None] * HISTOGRAM_BINS
        hist += torch.bincount((bins + offsets).flatten(), minlength=len(MEASURES) * HISTOGRAM_BINS).view_as(
            hist
        )
        counts += torch.bincount(predicted, minlength=classes)
    total = max(height * width, 1)
    return (sums / total).float().cpu(), hist.to(torch.int32).cpu(), counts.to(torch.int32).cpu()


def pixel_measures(strip: torch.Tensor, *, probabilities: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``([4, P] measures in MEASURES order, [P] predicted class)`` for class scores ``[C, P]``."""
    classes = strip.shape[0]
    if probabilities:
        p = strip.clamp_min(0.0)
        p = p / p.sum(dim=0, keepdim=True).clamp_min(1e-30)
        logp = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    else:
        logp = torch.log_softmax(strip, dim=0)
        p = logp.exp()
    entropy = (-(p * logp).sum(dim=0)).clamp_min(0.0)
    if classes >= 2:
        top = p.topk(2, dim=0)
        p1, p2, predicted = top.values[0], top.values[1], top.indices[0]
    else:
        p1, p2, predicted = p[0], torch.zeros_like(p[0]), torch.zeros_like(p[0], dtype=torch.long)
    ratio = torch.where(p1 > 0, p2 / p1.clamp_min(1e-30), torch.zeros_like(p1))
    return torch.stack([entropy, 1.0 - p1, 1.0 - (p1 - p2), ratio]), predicted
