"""Architectures by name: alselect's own (``small_cnn``), torchvision classifiers, small-image
ResNets (``resnet18_cifar`` etc.: a 3×3 stride-1 stem and no max-pool, as in the CIFAR papers), and
torchvision detection and segmentation models."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from alselect.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn

# torchvision detection families alselect runs (Mask/Keypoint R-CNN add outputs it does not read)
DETECTION_PREFIXES = ("fasterrcnn_", "retinanet_", "fcos_", "ssd300_", "ssdlite320_")
SEGMENTATION_PREFIXES = ("deeplabv3_", "fcn_", "lraspp_")


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification architectures (detection, video etc. excluded)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


CIFAR_SUFFIX = "_cifar"


def torchvision_detectors() -> list[str]:
    """torchvision detection architectures alselect runs: Faster R-CNN, RetinaNet, FCOS, SSD."""
    import torchvision.models as tvm

    return sorted(n for n in tvm.list_models(module=tvm.detection) if n.startswith(DETECTION_PREFIXES))


def torchvision_segmenters() -> list[str]:
    """torchvision semantic segmentation architectures: DeepLabV3, FCN, LR-ASPP."""
    import torchvision.models as tvm

    return sorted(n for n in tvm.list_models(module=tvm.segmentation) if n.startswith(SEGMENTATION_PREFIXES))


def task_of_arch(arch: str | None) -> str | None:
    """``detection`` / ``segmentation`` for those torchvision families (by name, without importing
    torchvision), ``classification`` for any other name, None for no name."""
    if arch is None:
        return None
    if arch.startswith(DETECTION_PREFIXES):
        return "detection"
    if arch.startswith(SEGMENTATION_PREFIXES):
        return "segmentation"
    return "classification"


def build_model(arch: str, num_classes: int, state_keys: Iterable[str] = ()) -> nn.Module:
    """Instantiate ``arch`` with ``num_classes`` outputs and random weights (nothing downloaded).

    Detection models count the background in ``num_classes`` (torchvision's convention: class 0).
    ``state_keys`` (the checkpoint's weight names) tell whether a segmentation model was trained
    with an auxiliary classifier, so its weights load strictly.

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

    task = task_of_arch(arch)
    if task == "detection":
        known = torchvision_detectors()
        if arch in known:
            detector: nn.Module = tvm.get_model(
                arch, weights=None, weights_backbone=None, num_classes=num_classes
            )
            return detector
        raise CheckpointError(f"unknown detection architecture {arch!r}; known: {', '.join(known)}")
    if task == "segmentation":
        known = torchvision_segmenters()
        if arch in known:
            aux = any(key.startswith("aux_classifier.") for key in state_keys)
            kwargs = {} if arch.startswith("lraspp_") else {"aux_loss": aux}
            segmenter: nn.Module = tvm.get_model(
                arch, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
            )
            return segmenter
        raise CheckpointError(f"unknown segmentation architecture {arch!r}; known: {', '.join(known)}")
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
            f"unknown architecture {arch!r}; use small_cnn, a torchvision classifier such as resnet18, "
            f"efficientnet_b0, convnext_tiny, vit_b_16 ({len(known)} known), a detector "
            "(fasterrcnn_*, retinanet_*, fcos_*, ssd300_vgg16, ssdlite320_mobilenet_v3_large) or a "
            "segmenter (deeplabv3_*, fcn_*, lraspp_*)"
        )
    kwargs = {"aux_logits": False, "init_weights": False} if arch in {"inception_v3", "googlenet"} else {}
    model: nn.Module = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    return model
