"""alselect's own checkpoint: a ``torch.save`` dict with arch, weights, classes and preprocessing.

Layout (all plain types, loadable with ``weights_only=True``)::

    {"alselect_checkpoint": 1, "arch": "small_cnn" | <torchvision name>, "num_classes": C,
     "state_dict": {...}, "classes": [names] | None, "preprocess": {image_size, resize_size,
     mean, std},
     # optional, written by ``alselect train``:
     "heads": {"loss_prediction": {"stages": [...], "channels": [...], "hidden": 128,
                                   "state_dict": {...}}},
     "training": {"config": {...}, "history": [{epoch, train_loss, val_accuracy, ...}],
                  "validation": {"accuracy", "count", "files"}, ...}}

The optional entries keep version 1: older readers ignore them, and checkpoints without them load
as before. Heads this alselect does not know are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alselect.checkpoints.base import (
    CheckpointFile,
    CheckpointOptions,
    LoadedModel,
    register_loader,
)
from alselect.checkpoints.state_dict import load_weights, wrap_model
from alselect.errors import CheckpointError
from alselect.models import build_model, loss_prediction
from alselect.preprocess import Preprocess

FORMAT_KEY = "alselect_checkpoint"
FORMAT_VERSION = 1


def save_alselect_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    num_classes: int,
    classes: list[str] | None = None,
    preprocess: Preprocess | None = None,
    *,
    heads: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights in alselect's format (atomically: temp file, then rename).

    Without ``preprocess``, a torchvision detector or segmenter gets its task's letterbox
    (``alselect.tasks.default_preprocess``), anything else the classification default.
    ``heads`` (e.g. ``{"loss_prediction": models.loss_prediction.head_entry(...)}``) and
    ``training`` (config, history, validation) are optional entries of plain types and tensors.
    """
    if preprocess is None:
        from alselect.models import task_of_arch
        from alselect.tasks import CLASSIFICATION, default_preprocess

        task = task_of_arch(arch) or CLASSIFICATION
        preprocess = Preprocess() if task == CLASSIFICATION else default_preprocess(task, None, model)
    payload: dict[str, Any] = {
        FORMAT_KEY: FORMAT_VERSION,
        "arch": arch,
        "num_classes": int(num_classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": list(classes) if classes is not None else None,
        "preprocess": preprocess.to_dict(),
    }
    if heads:
        payload["heads"] = dict(heads)
    if training:
        payload["training"] = dict(training)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, target)


@register_loader(order=30)
def load_alselect_dict(ckpt: CheckpointFile, options: CheckpointOptions) -> LoadedModel | None:
    """Claim dicts carrying the ``alselect_checkpoint`` marker."""
    if ckpt.zip_names and not ckpt.has_member("data.pkl"):
        return None
    obj, path = ckpt.obj, ckpt.path
    if not isinstance(obj, dict) or FORMAT_KEY not in obj:
        return None
    version = obj[FORMAT_KEY]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: alselect checkpoint version {version} is not supported by this alselect "
            f"(reads version {FORMAT_VERSION}); upgrade alselect"
        )
    try:
        arch = str(obj["arch"])
        num_classes = int(obj["num_classes"])
        state = obj["state_dict"]
    except KeyError as exc:
        raise CheckpointError(f"{path}: alselect checkpoint lacks the {exc} entry") from exc
    if options.num_classes is not None and options.num_classes != num_classes:
        raise CheckpointError(
            f"{path}: checkpoint has {num_classes} classes but --num-classes is {options.num_classes}"
        )
    module = build_model(arch, num_classes, state)
    load_weights(module, state, path, num_classes)
    loaded = wrap_model(
        module,
        kind="alselect",
        arch=arch,
        num_classes=num_classes,
        classes=obj.get("classes"),
        meta=obj.get("preprocess"),
    )
    heads = obj.get("heads") or {}
    if not isinstance(heads, Mapping):
        raise CheckpointError(f"{path}: the 'heads' entry must be a mapping")
    entry = heads.get(loss_prediction.HEAD_NAME)
    if entry is not None:
        loaded.heads[loss_prediction.OUTPUT_NAME] = loss_prediction.attach_from_entry(module, entry, path)
    return loaded
