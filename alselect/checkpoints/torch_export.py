"""``torch.export`` programs (``torch.export.save``, usually ``.pt2``)."""

from __future__ import annotations

import torch

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
    """Claim zips with an ``archive_format`` member; the program must accept any batch size."""
    if not ckpt.has_member("/archive_format"):
        return None
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(str(ckpt.path), extra_files=extra)
        module = program.module()
    except Exception as exc:  # torch raises many types for bad archives
        raise CheckpointError(f"{ckpt.path}: cannot load torch.export program: {exc}") from exc
    meta = parse_metadata(extra.get(METADATA_FILE), ckpt.path)
    return model_from_archive(module, "torch.export", meta, options)
