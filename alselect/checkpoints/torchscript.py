"""TorchScript archives (``torch.jit.save``): deprecated since torch 2.15 but still common."""

from __future__ import annotations

import warnings

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


@register_loader(order=20)
def load_torchscript(ckpt: CheckpointFile, options: CheckpointOptions) -> LoadedModel | None:
    """Claim zips with ``constants.pkl`` and ``code/``; read ``alselect.json`` if present."""
    if not (ckpt.has_member("constants.pkl") and any("/code/" in n for n in ckpt.zip_names)):
        return None
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            module = torch.jit.load(str(ckpt.path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises bare RuntimeError/ValueError for bad archives
        raise CheckpointError(f"{ckpt.path}: cannot load TorchScript archive: {exc}") from exc
    module.eval()
    meta = parse_metadata(extra.get(METADATA_FILE), ckpt.path)
    return model_from_archive(module, "torchscript", meta, options)
