"""Architectures by name: alselect's own (``small_cnn``), torchvision classifiers, and small-image
ResNets (``resnet18_cifar`` etc.: a 3×3 stride-1 stem and no max-pool, as in the CIFAR papers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from alselect.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification architectures (detection, video etc. excluded)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


CIFAR_SUFFIX = "_cifar"


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Instantiate ``arch`` with ``num_classes`` outputs and random weights (nothing downloaded).

    ``<resnet>_cifar`` (e.g. ``resnet18_cifar``) is torchvision's ResNet with the stem for 32-px
    images of the CIFAR experiments (Yoo & Kweon's ResNet-18): a 3×3 stride-1 first convolution
    and no max-pool, so 32 px reach the last stage as 4×4 instead of 1×1.
    """
    if num_classes < 1:
        raise CheckpointError(f"--num-classes must be at least 1, got {num_classes}")
    if arch == "small_cnn":
        from alselect.models.small_cnn import SmallCNN

        return SmallCNN(num_classes=num_classes)
    import torchvision.models as tvm

    if arch.endswith(CIFAR_SUFFIX):
        base = arch[: -len(CIFAR_SUFFIX)]
        if not base.startswith(("resnet", "resnext", "wide_resnet")) or base not in torchvision_classifiers():
            raise CheckpointError(
                f"unknown architecture {arch!r}: the {CIFAR_SUFFIX} variants exist for ResNets"
            )
        from torch import nn as torch_nn

        resnet: nn.Module = tvm.get_model(base, weights=None, num_classes=num_classes)
        stem = resnet.conv1
        if not isinstance(stem, torch_nn.Conv2d):
            raise CheckpointError(f"{base} has no conv1 stem to adapt")
        resnet.conv1 = torch_nn.Conv2d(3, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = torch_nn.Identity()
        return resnet

    known = torchvision_classifiers()
    if arch not in known:
        raise CheckpointError(
            f"unknown architecture {arch!r}; use small_cnn or a torchvision classifier "
            f"such as resnet18, efficientnet_b0, convnext_tiny, vit_b_16 ({len(known)} known)"
        )
    kwargs = {"aux_logits": False, "init_weights": False} if arch in {"inception_v3", "googlenet"} else {}
    model: nn.Module = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    return model
