"""Run a detector over a batch and keep what scoring needs (torch).

Two kinds of model:

- **torchvision detectors** (Faster R-CNN, RetinaNet, FCOS, SSD, SSDlite, built by alselect from
  an alselect checkpoint or a state_dict with ``--arch``): each letterboxed square image is handed
  to the model unnormalised (its own transform normalises); its resize is set to keep the square
  at alselect's ``--image-size``. Faster R-CNN and SSD score each box from a softmax over the
  classes (background included): alselect keeps that distribution per box by matching each output
  box to the candidate it came from. RetinaNet and FCOS give a score only. The embedding is the
  masked average of every backbone feature level, concatenated.
- **TorchScript / torch.export programs** following the contract in the README: a batch
  ``[N, 3, S, S]`` in (or a list of ``[3, S, S]`` with ``"input": "list"`` in ``alselect.json``),
  per-image boxes, scores, labels and optionally per-box ``probs [n, C]`` and an ``embedding``
  out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from alselect.checkpoints import LoadedModel
from alselect.errors import CheckpointError
from alselect.tasks import TaskSettings
from alselect.tasks.boxes import ImageDetections, pack_detections
from alselect.tasks.features import BackboneFeatures, content_fractions, whole_input

PROBS_KEYS = ("probs", "class_probs", "probabilities")


class DetectionRunner:
    """``forward_outputs(batch, geometry)`` → the detection arrays of ``alselect.tasks`` (+ ``embedding``)."""

    needs_geometry = True

    def __init__(self, model: LoadedModel, settings: TaskSettings) -> None:
        self.model = model
        self.settings = settings
        module: Any = model.module
        self.torchvision = hasattr(module, "transform") and hasattr(module, "backbone")
        self.features = BackboneFeatures(module) if self.torchvision else None
        self.distributions = DistributionCapture(module) if self.torchvision else None
        self.resized: tuple[int, int, int, int] | None = None
        if self.torchvision:
            module.transform.register_forward_hook(self._transformed)
        self.list_input = model.metadata.get("input") == "list"

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def to(self, device: torch.device) -> DetectionRunner:
        self.model.to(device)
        return self

    def _transformed(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        images = output[0]
        height, width = images.image_sizes[0]
        self.resized = (int(height), int(width), int(images.tensors.shape[-2]), int(images.tensors.shape[-1]))

    @torch.inference_mode()
    def forward_outputs(
        self, batch: torch.Tensor, geometry: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        module = self.model.module
        side = int(batch.shape[-1])
        geometry = whole_input(batch) if geometry is None else geometry
        embedding = None
        if self.torchvision:
            keep_square(module, side)
            raw = module(list(batch))
            images = detections_from(raw, len(batch))[0]
            if self.distributions is not None:
                self.distributions.attach(images)
            if self.features is not None and self.resized is not None:
                height, width, padded_h, padded_w = self.resized
                embedding = self.features.pooled(
                    content_fractions(geometry, side), (height / padded_h, width / padded_w)
                )
        else:
            raw = module(list(batch)) if self.list_input else module(batch)
            images, embedding = detections_from(raw, len(batch))
        out = pack_detections(images, geometry, side, self.settings.max_detections)
        if embedding is not None:
            out["embedding"] = embedding.float().flatten(1).cpu()
        return out


def keep_square(module: nn.Module, side: int) -> None:
    """Make a torchvision detector's own resize keep alselect's square input as it is (SSD's fixed
    size stays: its anchors are made for it)."""
    transform: Any = module.transform
    if getattr(transform, "fixed_size", None) is None:
        transform.min_size = (side,)
        transform.max_size = side


def detections_from(raw: Any, n: int) -> tuple[list[ImageDetections], torch.Tensor | None]:
    """Per-image detections (and an embedding, if the model gives one) from a detector's output.

    Accepted: a list of ``n`` dicts (``boxes``, ``scores``, ``labels``, optional ``probs``); a
    dict of padded batch tensors (``boxes [N, K, 4]``, ``scores [N, K]``, ``labels [N, K]``,
    optional ``probs [N, K, C]``, ``num_detections [N]`` or padding rows with label < 0,
    optional ``embedding [N, D]``); either as ``(detections, embedding)``; or a scripted
    torchvision detector's ``(losses, detections)``.
    """
    embedding = None
    if (
        isinstance(raw, (tuple, list))
        and len(raw) == 2
        and isinstance(raw[0], Mapping)
        and isinstance(raw[1], list)
    ):
        raw = raw[1]  # scripted torchvision detectors return (losses, detections)
    elif isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[1], torch.Tensor):
        raw, embedding = raw
    if isinstance(raw, Mapping):
        images, given = padded_detections(raw, n)
        return images, embedding if embedding is not None else given
    if isinstance(raw, (list, tuple)) and all(isinstance(item, Mapping) for item in raw):
        if len(raw) != n:
            raise CheckpointError(f"detector returned {len(raw)} results for a batch of {n} images")
        return [image_detections(item, f"detections[{i}]") for i, item in enumerate(raw)], embedding
    raise CheckpointError(
        "detector output is not a list of per-image dicts (boxes, scores, labels) nor a dict of padded "
        f"batch tensors; got {type(raw).__name__} (see the README's detection contract)"
    )


def _tensor(item: Mapping[str, Any], key: str, where: str) -> torch.Tensor:
    value = item.get(key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: missing tensor {key!r} (need boxes, scores, labels)")
    return value


def _probs(item: Mapping[str, Any]) -> torch.Tensor | None:
    return next((item[k] for k in PROBS_KEYS if isinstance(item.get(k), torch.Tensor)), None)


def image_detections(item: Mapping[str, Any], where: str) -> ImageDetections:
    det = ImageDetections(
        boxes=_tensor(item, "boxes", where),
        scores=_tensor(item, "scores", where),
        labels=_tensor(item, "labels", where),
        probs=_probs(item),
    )
    det.check(where)
    return det


def padded_detections(raw: Mapping[str, Any], n: int) -> tuple[list[ImageDetections], torch.Tensor | None]:
    """Split padded ``[N, K, ...]`` outputs into per-image detections."""
    boxes, scores, labels = (_tensor(raw, k, "detector output") for k in ("boxes", "scores", "labels"))
    probs = _probs(raw)
    if (
        boxes.ndim != 3
        or scores.shape != boxes.shape[:2]
        or labels.shape != boxes.shape[:2]
        or len(boxes) != n
    ):
        raise CheckpointError(
            f"padded detector output must be boxes [N, K, 4], scores and labels [N, K] for N = {n}; got "
            f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    counts = raw.get("num_detections")
    images = []
    for i in range(n):
        if isinstance(counts, torch.Tensor):
            valid = torch.arange(boxes.shape[1], device=boxes.device) < counts.reshape(-1)[i]
        else:
            valid = labels[i] >= 0
        images.append(
            ImageDetections(
                boxes=boxes[i][valid],
                scores=scores[i][valid],
                labels=labels[i][valid],
                probs=probs[i][valid] if probs is not None else None,
            )
        )
        images[-1].check(f"detector output image {i}")
    embedding = raw.get("embedding")
    return images, embedding if isinstance(embedding, torch.Tensor) else None


class DistributionCapture:
    """Keeps the class distribution behind each box of a torchvision Faster R-CNN or SSD.

    Both turn a softmax over the classes (background included) of each candidate (a proposal, an
    anchor) into per-class boxes scored by that class's probability. ``postprocess_detections`` is
    wrapped on the instance: it runs unchanged, and its inputs give every candidate's
    distribution. Each output box (label c, score s) is matched to the candidate whose probability
    of c is closest to s (they are equal: the score is that very value), and gets its
    distribution. Other detectors (RetinaNet, FCOS: per-class sigmoids) keep score-only boxes.
    """

    def __init__(self, module: nn.Module) -> None:
        self.captured: list[torch.Tensor] | None = None
        roi_heads = getattr(module, "roi_heads", None)
        if roi_heads is not None and hasattr(roi_heads, "postprocess_detections"):
            self._wrap(roi_heads, self._rcnn)
        elif type(module).__name__ == "SSD" and hasattr(module, "postprocess_detections"):
            self._wrap(module, self._ssd)

    @staticmethod
    def _wrap(owner: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace ``owner.postprocess_detections`` on this instance only (the class is untouched)."""
        owner.postprocess_detections = make(owner.postprocess_detections)

    def _rcnn(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def postprocess(
            class_logits: torch.Tensor,
            box_regression: torch.Tensor,
            proposals: list[torch.Tensor],
            image_shapes: Any,
        ) -> Any:
            boxes, scores, labels = original(class_logits, box_regression, proposals, image_shapes)
            candidates = torch.softmax(class_logits.float(), -1).split([len(p) for p in proposals])
            self.captured = [
                matched(probs, lab, sc) for probs, lab, sc in zip(candidates, labels, scores, strict=True)
            ]
            return boxes, scores, labels

        return postprocess

    def _ssd(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def postprocess(head_outputs: dict[str, torch.Tensor], anchors: Any, image_shapes: Any) -> Any:
            detections = original(head_outputs, anchors, image_shapes)
            candidates = torch.softmax(head_outputs["cls_logits"].float(), -1)
            self.captured = [
                matched(probs, d["labels"], d["scores"])
                for probs, d in zip(candidates, detections, strict=True)
            ]
            return detections

        return postprocess

    def attach(self, images: Sequence[ImageDetections]) -> None:
        """Give each image's boxes the distributions captured during the forward pass just run."""
        captured, self.captured = self.captured, None
        if captured is None:
            return
        if len(captured) != len(images):
            raise CheckpointError("detector post-processing and output disagree on the number of images")
        for det, probs in zip(images, captured, strict=True):
            if probs.shape[0] == det.scores.shape[0]:
                det.probs = probs


def matched(candidates: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``[n, C]``: for each output box, the distribution of the candidate whose probability of the
    box's label is closest to its score."""
    if labels.numel() == 0 or candidates.numel() == 0:
        return candidates.new_zeros((labels.numel(), candidates.shape[-1]))
    gap = (candidates[:, labels.long()] - scores.float()[None, :]).abs()  # [P, n]
    return candidates[gap.argmin(dim=0)]
