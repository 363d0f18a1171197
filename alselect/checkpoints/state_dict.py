"""Plain state_dicts for a named architecture (``--arch NAME --num-classes C``)."""

from __future__ import annotations

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
from alselect.errors import CheckpointError
from alselect.models import build_model
from alselect.preprocess import Preprocess

WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net")
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """Find the tensor mapping in common training-script wrappers, prefixes stripped.

    Wrappers (first match wins): ``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``,
    ``module``, ``net``. Prefixes ``module.`` (DataParallel/DDP), ``_orig_mod.`` (torch.compile)
    and a common ``model.`` are stripped when every key carries them.
    """
    if not isinstance(obj, Mapping):
        return None
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and _all_tensors(inner):
            return strip_prefixes(dict(inner))
    if obj and _all_tensors(obj):
        return strip_prefixes(dict(obj))
    return None


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_weights(module: nn.Module, state: Mapping[str, Any], path: Path, num_classes: int) -> None:
    """Strict load with messages that say what does not match (classes, arch)."""
    state = strip_prefixes(dict(state))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the architecture ({len(missing)} missing keys, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); check --arch"
        )
    for key, tensor in state.items():
        want = expected[key].shape
        if want == tensor.shape:
            continue
        detail = f"{key} is {tuple(tensor.shape)} in the checkpoint, {tuple(want)} in the model"
        head_only = tensor.ndim == len(want) >= 1 and tensor.shape[1:] == want[1:] and want[0] == num_classes
        if head_only:
            raise CheckpointError(
                f"{path}: checkpoint has {tensor.shape[0]} classes but --num-classes is "
                f"{num_classes} ({detail})"
            )
        raise CheckpointError(f"{path}: weights do not fit the architecture: {detail}; check --arch")
    module.load_state_dict(state, strict=True)


class FinalLayerHook:
    """Captures the input of a model's final classifier layer: the penultimate embedding."""

    def __init__(self, module: nn.Module) -> None:
        self.layer = final_classifier_layer(module)
        self.value: torch.Tensor | None = None
        if self.layer is not None:
            self.layer.register_forward_hook(self._capture)

    def _capture(self, _layer: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        features = inputs[0]
        if features.ndim == 4:  # conv classifiers (squeezenet): global average pool
            features = features.mean(dim=(2, 3))
        self.value = features.flatten(1)

    def __call__(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value


def final_classifier_layer(module: nn.Module) -> nn.Module | None:
    """The last Linear (or 1×1 Conv2d) registered: torchvision's classifier in every family."""
    last: nn.Module | None = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear) or (isinstance(sub, nn.Conv2d) and sub.kernel_size == (1, 1)):
            last = sub
    return last


def wrap_model(
    module: nn.Module,
    *,
    kind: str,
    arch: str,
    num_classes: int,
    classes: list[str] | None,
    meta: Mapping[str, Any] | None,
) -> LoadedModel:
    """A classifier with its feature hook, or a torchvision detector / segmenter (by ``arch``),
    whose preprocessing is a letterbox (``alselect.tasks.default_preprocess``) unless ``meta``
    names one."""
    from alselect.models import task_of_arch
    from alselect.tasks import CLASSIFICATION, default_preprocess

    task = task_of_arch(arch) or CLASSIFICATION
    meta = dict(meta or {})
    if task == CLASSIFICATION or meta.get("resize") == "letterbox":
        preprocess = Preprocess.from_metadata(meta)
    else:
        preprocess = default_preprocess(task, None, module)
    return wrap_classifier(
        module,
        kind=kind,
        arch=arch,
        num_classes=num_classes,
        classes=classes,
        preprocess=preprocess,
        task=None if task == CLASSIFICATION else task,
    )


def wrap_classifier(
    module: nn.Module,
    *,
    kind: str,
    arch: str | None,
    num_classes: int | None,
    classes: list[str] | None,
    preprocess: Preprocess,
    task: str | None = None,
) -> LoadedModel:
    """Eval mode plus, for a classifier (``task`` None), a feature hook on the final layer;
    detectors and segmenters are run by ``alselect.tasks`` runners with hooks of their own."""
    module.eval()
    hook = FinalLayerHook(module) if task is None else None
    if classes is not None and len(classes) != num_classes:
        raise CheckpointError(f"checkpoint lists {len(classes)} class names for {num_classes} classes")
    return LoadedModel(
        module=module,
        kind=kind,
        arch=arch,
        num_classes=num_classes,
        classes=[str(c) for c in classes] if classes is not None else None,
        preprocess=preprocess,
        feature_hook=hook,
        task=task,
    )


@register_loader(order=40)
def load_state_dict(ckpt: CheckpointFile, options: CheckpointOptions) -> LoadedModel | None:
    """Claim tensor mappings (optionally wrapped); needs ``--arch`` and ``--num-classes``."""
    if ckpt.zip_names and not ckpt.has_member("data.pkl"):
        return None
    state = unwrap_state_dict(ckpt.obj)
    if state is None:
        return None
    if options.arch is None or options.num_classes is None:
        raise CheckpointError(
            f"{ckpt.path} is a plain state_dict: pass --arch NAME (e.g. resnet18) and "
            "--num-classes C so alselect can rebuild the model"
        )
    module = build_model(options.arch, options.num_classes, state)
    load_weights(module, state, ckpt.path, options.num_classes)
    meta = ckpt.obj.get("alselect", {}) if isinstance(ckpt.obj, Mapping) else {}
    meta = meta if isinstance(meta, Mapping) else {}
    return wrap_model(
        module,
        kind="state_dict",
        arch=options.arch,
        num_classes=options.num_classes,
        classes=meta.get("classes"),
        meta=meta,
    )


@register_loader(order=50)
def load_pickled_module(ckpt: CheckpointFile, options: CheckpointOptions) -> LoadedModel | None:
    """A whole ``nn.Module`` saved with ``torch.save(model)``: only with ``--trust-checkpoint``."""
    if ckpt.zip_names and not ckpt.has_member("data.pkl"):
        return None
    obj = ckpt.obj
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in ("model", "module", "net") if isinstance(obj.get(k), nn.Module)), obj)
    if not isinstance(obj, nn.Module):
        return None
    num_classes = options.num_classes
    layer = final_classifier_layer(obj)
    if num_classes is None and isinstance(layer, nn.Linear):
        num_classes = layer.out_features
    return wrap_classifier(
        obj,
        kind="pickled-module",
        arch=type(obj).__name__,
        num_classes=num_classes,  # None: learnt from the first batch
        classes=None,
        preprocess=Preprocess(),
    )
