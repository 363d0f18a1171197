"""Pooled backbone embeddings of detection and segmentation models (torch).

A forward hook on ``model.backbone`` keeps its feature maps; each map is averaged over the part
that shows the image (the letterbox padding is left out), and the levels are concatenated. Every
image of a batch has the same input size, so an image's embedding does not depend on the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


class BackboneFeatures:
    """Captures ``module.backbone``'s output (a tensor or a mapping of named levels).

    ``levels`` picks names from a mapping (None: every level, in order).
    """

    def __init__(self, module: nn.Module, levels: Sequence[str] | None = None) -> None:
        self.levels = levels
        self.value: list[torch.Tensor] | None = None
        backbone = getattr(module, "backbone", None)
        self.available = isinstance(backbone, nn.Module)
        if isinstance(backbone, nn.Module):
            backbone.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.value = [output]
        elif isinstance(output, Mapping):
            names = [n for n in (self.levels or list(output)) if n in output]
            self.value = [output[n] for n in names if isinstance(output[n], torch.Tensor)]
        else:
            self.value = None

    def pooled(self, fractions: torch.Tensor, scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor | None:
        """``[n, D]`` masked average of every captured level, concatenated; None when nothing was
        captured. ``fractions [n, 2]``: the share of the input's height and width the image
        occupies; ``scale``: the share of the maps' extent the input covers (below 1 when the
        model pads its input, e.g. to a multiple of 32)."""
        maps, self.value = self.value, None
        if not maps:
            return None
        return torch.cat([masked_mean(level, fractions, scale) for level in maps], dim=1).float()


def masked_mean(
    maps: torch.Tensor, fractions: torch.Tensor, scale: tuple[float, float] = (1.0, 1.0)
) -> torch.Tensor:
    """``[n, ch]``: each map ``[ch, h, w]`` averaged over its top-left region covering
    ``fractions[i] * scale`` of it (at least one cell); the rest is padding."""
    n, _, h, w = maps.shape
    out = []
    for i in range(n):
        fy, fx = float(fractions[i, 0]) * scale[0], float(fractions[i, 1]) * scale[1]
        rows = min(h, max(1, math.ceil(fy * h - 1e-6)))
        cols = min(w, max(1, math.ceil(fx * w - 1e-6)))
        out.append(maps[i, :, :rows, :cols].float().mean(dim=(1, 2)))
    return torch.stack(out)


def content_fractions(geometry: torch.Tensor, input_size: int) -> torch.Tensor:
    """``[n, 2]`` share of the square model input's height and width that shows the image."""
    return geometry[:, 2:4].float() / float(input_size)


def whole_input(batch: torch.Tensor) -> torch.Tensor:
    """Geometry (``alselect.images.GEOMETRY``) for a batch given without any: each image is the
    whole square input."""
    side = int(batch.shape[-1])
    return torch.tensor([[side, side, side, side]] * len(batch), dtype=torch.int64)
