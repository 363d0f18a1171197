"""Per-box uncertainty components and the fixed-shape per-image arrays a detector stores (torch).

A detector returns a variable number of boxes per image. alselect keeps the ``K`` highest-scoring
ones (ties: the model's order) as ``[K, ...]`` arrays padded with zeros (labels -1) and a count,
so every image has the same shapes in the store and no padding is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alselect.errors import CheckpointError


@dataclass
class ImageDetections:
    """One image's boxes in model-input pixels (x1, y1, x2, y2), scores ``[n]``, integer labels
    ``[n]`` and, when the model gives them, class probability vectors ``probs [n, C]``."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor | None = None

    def check(self, where: str) -> None:
        n = self.scores.shape[0] if self.scores.ndim == 1 else -1
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4 or self.boxes.shape[0] != n:
            raise CheckpointError(
                f"{where}: boxes must be [n, 4] with scores [n]; got {tuple(self.boxes.shape)} and "
                f"{tuple(self.scores.shape)}"
            )
        if self.labels.shape != (n,):
            raise CheckpointError(f"{where}: labels must be [n] like scores; got {tuple(self.labels.shape)}")
        if self.probs is not None and (self.probs.ndim != 2 or self.probs.shape[0] != n):
            raise CheckpointError(f"{where}: per-box probs must be [n, C]; got {tuple(self.probs.shape)}")


def box_components(
    scores: torch.Tensor, probs: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top1, top2, entropy)`` per box, float32.

    With a class distribution ``probs [n, C]`` (rows renormalised to sum to 1): its largest and
    second-largest probability and its entropy in nats. Without one, the box's own two-outcome
    distribution (object of its class with probability s, or not): ``top1 = s``, ``top2 = 1 - s``
    and the binary entropy of s. Least confidence is then ``1 - top1``, margin ``1 - |top1 - top2|``
    and ratio ``min / max`` of the two, whichever applies.
    """
    if probs is None:
        s = scores.float().clamp(0.0, 1.0)
        return s, 1.0 - s, binary_entropy(s)
    p = probs.float().clamp_min(0.0)
    total = p.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, p / total.clamp_min(1e-30), torch.full_like(p, 1.0 / max(p.shape[1], 1)))
    if p.shape[1] >= 2:
        top = p.topk(2, dim=1).values
        top1, top2 = top[:, 0], top[:, 1]
    else:
        top1, top2 = p[:, 0], torch.zeros_like(p[:, 0])
    return top1, top2, entropy_rows(p)


def entropy_rows(p: torch.Tensor) -> torch.Tensor:
    """``-Σ p log p`` over dim 1 in nats, ``0 log 0 = 0``."""
    logs = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    return (-(p * logs).sum(dim=1)).clamp_min(0.0)


def binary_entropy(s: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of a Bernoulli(s), ``s`` in [0, 1]."""
    return entropy_rows(torch.stack([s, 1.0 - s], dim=1))


def pack_detections(
    images: list[ImageDetections], geometry: torch.Tensor, input_size: int, max_detections: int
) -> dict[str, torch.Tensor]:
    """The stored per-image detection arrays of a batch (``alselect.tasks.DETECTION_ARRAYS``).

    Boxes in model-input pixels become fractions of the image: the image occupies the top-left
    ``content_height × content_width`` of the letterboxed input (``geometry`` columns 2, 3), so
    x is divided by the content width and y by the content height, then clipped to [0, 1].
    ``input_size`` is unused for the division but bounds boxes outside the input.
    """
    n, k = len(images), max_detections
    out = {
        "det_boxes": torch.zeros(n, k, 4),
        "det_scores": torch.zeros(n, k),
        "det_labels": torch.full((n, k), -1, dtype=torch.int32),
        "det_top1": torch.zeros(n, k),
        "det_top2": torch.zeros(n, k),
        "det_entropy": torch.zeros(n, k),
        "det_count": torch.zeros(n, dtype=torch.int32),
        "det_classes": torch.zeros(n, dtype=torch.int32),
        "geometry": geometry.to(torch.int32).cpu(),
    }
    for i, det in enumerate(images):
        scores = det.scores.detach().float().cpu()
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        m = int(order.numel())
        boxes = det.boxes.detach().float().cpu()[order].clamp(0.0, float(input_size))
        height, width = float(geometry[i, 2]), float(geometry[i, 3])
        scale = torch.tensor([width, height, width, height])
        out["det_boxes"][i, :m] = (boxes / scale).clamp(0.0, 1.0)
        out["det_scores"][i, :m] = scores[order]
        out["det_labels"][i, :m] = det.labels.detach().cpu()[order].to(torch.int32)
        probs = det.probs.detach().cpu()[order] if det.probs is not None else None
        top1, top2, entropy = box_components(scores[order], probs)
        out["det_top1"][i, :m] = top1
        out["det_top2"][i, :m] = top2
        out["det_entropy"][i, :m] = entropy
        out["det_count"][i] = m
        out["det_classes"][i] = 0 if det.probs is None else int(det.probs.shape[1])
    return out
