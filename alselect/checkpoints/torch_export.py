"""``torch.export`` programs (``torch.export.save``, usually ``.pt2``).

A program checks its input shape against what it was exported with. Rather than failing mid-run
("Guard failed: x.size()[0] == 4"), the loader reads the input's exported shape: a static batch
size is run in chunks of that size (``LoadedModel.fixed_batch``), a static square image size
becomes the default crop size (``LoadedModel.input_size``), and anything alselect cannot feed is
refused at load time with what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from alselect.checkpoints.base import (
    METADATA_FILE,
    CheckpointFile,
    CheckpointOptions,
    LoadedModel,
    model_from_archive,
    parse_metadata,
    register_loader,
)
from alselect.errors import CheckpointError


@register_loader(order=10)
def load_exported_program(ckpt: CheckpointFile, options: CheckpointOptions) -> LoadedModel | None:
    """Claim zips with an ``archive_format`` member; any batch size, or a fixed one, works."""
    if not ckpt.has_member("/archive_format"):
        return None
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(str(ckpt.path), extra_files=extra)
        module = program.module()
    except Exception as exc:  # torch raises many types for bad archives
        raise CheckpointError(f"{ckpt.path}: cannot load torch.export program: {exc}") from exc
    meta = parse_metadata(extra.get(METADATA_FILE), ckpt.path)
    batch, size = input_shape(program, ckpt.path)
    if size is not None:
        declared = meta.get("image_size")
        if declared is not None and str(declared) != str(size):  # a bad value is reported later
            raise CheckpointError(
                f"{ckpt.path}: the program takes {size}x{size} inputs but {METADATA_FILE} says "
                f"image_size {declared}; fix one of them"
            )
        meta = {**meta, "image_size": size}
    model = model_from_archive(ShapeGuarded(module, ckpt.path), "torch.export", meta, options)
    model.fixed_batch, model.input_size = batch, size
    return model


def input_shape(program: Any, path: Path) -> tuple[int | None, int | None]:
    """``(batch, image size)`` the program's one input was exported with; None where dynamic.

    Refuses programs alselect cannot feed one ``[N, 3, S, S]`` float batch to.
    """
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        raise CheckpointError(
            f"{path}: the program takes {len(names)} inputs; alselect feeds one image batch [N, 3, H, W]"
        )
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0]), None)
    value = node.meta.get("val") if node is not None else None
    if value is None or not hasattr(value, "shape"):
        return None, None  # no recorded shape: nothing to check
    dims = [d if isinstance(d, int) else None for d in value.shape]
    if len(dims) != 4 or dims[1] not in (3, None):
        raise CheckpointError(
            f"{path}: the program takes input of shape {_shape(dims)}; alselect feeds RGB batches "
            "[N, 3, H, W]"
        )
    height, width = dims[2], dims[3]
    if (height is None) != (width is None) or (height is not None and height != width):
        raise CheckpointError(
            f"{path}: the program takes {_shape(dims)} inputs; alselect feeds square crops: export it "
            "with a square or dynamic height and width"
        )
    return dims[0], height


def _shape(dims: list[int | None]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in dims) + "]"


class ShapeGuarded(nn.Module):
    """Runs the program; a shape guard it still trips becomes a ``CheckpointError`` saying what to do."""

    def __init__(self, program: nn.Module, path: Path) -> None:
        super().__init__()
        self.program = program
        self.path = path

    def forward(self, batch: torch.Tensor) -> Any:
        try:
            return self.program(batch)
        except AssertionError as exc:
            if "Guard failed" not in str(exc):
                raise
            raise CheckpointError(
                f"{self.path}: the torch.export program refuses an input of shape {tuple(batch.shape)} "
                f"({exc}); export it with dynamic shapes (torch.export.Dim) for the batch and image size"
            ) from exc
