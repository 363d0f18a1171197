"""Load a user's checkpoint in any supported format; see ``load_checkpoint``."""

from __future__ import annotations

from pathlib import Path

from alselect.checkpoints.base import (
    CheckpointFile,
    CheckpointOptions,
    LoadedModel,
    registered_loaders,
)
from alselect.checkpoints.identify import check_checkpoint_path
from alselect.discover import sha256_file
from alselect.errors import CheckpointError
from alselect.plugins import import_submodules

__all__ = ["CheckpointOptions", "LoadedModel", "load_checkpoint"]


def load_checkpoint(path: str | Path, options: CheckpointOptions | None = None) -> LoadedModel:
    """Identify the format of ``path`` and load it on the CPU in eval mode."""
    options = options or CheckpointOptions()
    path = Path(path)
    check_checkpoint_path(path)
    import_submodules(__name__, __path__)
    ckpt = CheckpointFile(path, trust=options.trust_checkpoint)
    if ckpt.damage:  # before any loader: torch.load itself never checks the zip checksums
        raise CheckpointError(ckpt.damage)
    for _order, _name, loader in registered_loaders():
        model = loader(ckpt, options)
        if model is not None:
            model.sha256 = sha256_file(path)
            model.path = str(path)
            return model
    raise CheckpointError(
        f"{path}: not a checkpoint alselect understands (torch.export .pt2, TorchScript, "
        "alselect checkpoint, or a state_dict with --arch/--num-classes)"
    )
