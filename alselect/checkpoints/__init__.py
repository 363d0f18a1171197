"""Load a user's checkpoint in any supported format; see ``load_checkpoint``."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from pathlib import Path

from alselect.checkpoints.base import (
    CheckpointFile,
    CheckpointOptions,
    LoadedModel,
    registered_loaders,
)
from alselect.errors import CheckpointError

__all__ = ["CheckpointOptions", "LoadedModel", "file_sha256", "load_checkpoint"]


def _import_loader_modules() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, options: CheckpointOptions | None = None) -> LoadedModel:
    """Identify the format of ``path`` and load it on the CPU in eval mode."""
    options = options or CheckpointOptions()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty: {path}")
    _import_loader_modules()
    ckpt = CheckpointFile(path, trust=options.trust_checkpoint)
    for _order, _name, loader in registered_loaders():
        model = loader(ckpt, options)
        if model is not None:
            model.sha256 = file_sha256(path)
            model.path = str(path)
            return model
    raise CheckpointError(
        f"{path}: not a checkpoint alselect understands (torch.export .pt2, TorchScript, "
        "alselect checkpoint, or a state_dict with --arch/--num-classes)"
    )
