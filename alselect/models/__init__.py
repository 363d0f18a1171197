"""Architectures by name: alselect's own (``small_cnn``) first, then any torchvision classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING

from alselect.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification architectures (detection, video etc. excluded)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Instantiate ``arch`` with ``num_classes`` outputs and random weights (nothing downloaded)."""
    if num_classes < 1:
        raise CheckpointError(f"--num-classes must be at least 1, got {num_classes}")
    if arch == "small_cnn":
        from alselect.models.small_cnn import SmallCNN

        return SmallCNN(num_classes=num_classes)
    import torchvision.models as tvm

    known = torchvision_classifiers()
    if arch not in known:
        raise CheckpointError(
            f"unknown architecture {arch!r}; use small_cnn or a torchvision classifier "
            f"such as resnet18, efficientnet_b0, convnext_tiny, vit_b_16 ({len(known)} known)"
        )
    kwargs = {"aux_logits": False, "init_weights": False} if arch in {"inception_v3", "googlenet"} else {}
    model: nn.Module = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    return model
