"""Learning loss (Yoo & Kweon, CVPR 2019): a module that predicts each image's training loss.

The module taps the backbone's stages (the four ResNet stages; the three conv blocks of
``small_cnn``; the last block at each resolution of a ``features`` sequence): per stage global
average pooling → FC(128) → ReLU, the stage vectors concatenated → FC(1). It is trained jointly with
the classifier on the margin ranking loss of ``pair_ranking_loss`` and, at inference, gives the
per-image ``loss_pred`` that the ``learning-loss`` strategy ranks by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from alselect.errors import CheckpointError, UsageError

HEAD_NAME = "loss_prediction"  # key under a checkpoint's "heads"
OUTPUT_NAME = "loss_pred"  # the per-image array it gives the store
DEFAULT_HIDDEN = 128
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
MAX_STAGES = 4


class LossPredictionModule(nn.Module):
    """Stage features ``[N, C_s, H_s, W_s]`` (or ``[N, C_s]``) → predicted loss ``[N]``."""

    def __init__(self, channels: Sequence[int], hidden: int = DEFAULT_HIDDEN) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.hidden = int(hidden)
        self.stages = nn.ModuleList(nn.Linear(c, self.hidden) for c in self.channels)
        self.out = nn.Linear(self.hidden * len(self.channels), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.stages):
            raise ValueError(f"expected {len(self.stages)} stage features, got {len(features)}")
        parts = []
        for fc, feature in zip(self.stages, features, strict=True):
            pooled = feature.float().mean(dim=(2, 3)) if feature.ndim == 4 else feature.float().flatten(1)
            parts.append(torch.relu(fc(pooled)))
        return self.out(torch.cat(parts, dim=1)).squeeze(1)


def pair_ranking_loss(predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Yoo & Kweon's loss-prediction loss on the ``B/2`` pairs of a batch.

    Pairs are ``(i, i + B/2)`` for ``i < B/2`` (an odd last sample is left out). Per pair
    ``max(0, −sign(l_i − l_j)·(l̂_i − l̂_j) + ξ)`` with ``ξ = margin``; the mean over pairs. ``target``
    (the true per-sample losses) is detached: only the prediction learns from it. Equal true losses
    give ``ξ`` with no gradient. A batch of one sample gives 0.
    """
    half = predicted.shape[0] // 2
    if half == 0:
        return predicted.sum() * 0.0
    target = target.detach()
    pred_i, pred_j = predicted[:half], predicted[half : 2 * half]
    sign = torch.sign(target[:half] - target[half : 2 * half])
    return torch.clamp(-sign * (pred_i - pred_j) + margin, min=0.0).mean()


class StageTaps:
    """Forward hooks that keep the latest output of each named stage of a backbone."""

    def __init__(self, module: nn.Module, stages: Sequence[str]) -> None:
        named = dict(module.named_modules())
        missing = [s for s in stages if s not in named]
        if missing:
            raise CheckpointError(f"loss-prediction stages {missing} are not in the model")
        self.stages = list(stages)
        self.values: list[torch.Tensor | None] = [None] * len(stages)
        self.detach = False
        self.handles = [named[name].register_forward_hook(self._hook(i)) for i, name in enumerate(stages)]

    def _hook(self, index: int) -> Any:
        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.values[index] = output.detach() if self.detach else output

        return capture

    def take(self) -> list[torch.Tensor]:
        """The stage outputs of the last forward pass (each read once)."""
        if any(v is None for v in self.values):
            raise RuntimeError("no forward pass since the stage features were last read")
        values = [v for v in self.values if v is not None]
        self.values = [None] * len(self.stages)
        return values

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def find_stages(module: nn.Module, image_size: int) -> tuple[list[str], list[int]]:
    """The backbone stages the module taps, and their channel counts.

    ResNet-style models (``layer1``–``layer4``) use those four; ``small_cnn`` its three conv blocks;
    models with a ``features`` (or RegNet's ``trunk_output``) sequence the last block at each of
    the last four spatial resolutions. Channels are read off one dummy forward pass in eval mode.
    """
    from alselect.models.small_cnn import SmallCNN

    children = dict(module.named_children())
    if all(name in children for name in RESNET_STAGES):
        stages = list(RESNET_STAGES)
    elif isinstance(module, SmallCNN):
        stages = [f"features.{i}" for i in range(len(module.features))]
    else:
        container = next(
            (n for n in ("features", "trunk_output") if isinstance(children.get(n), nn.Sequential)), None
        )
        if container is None:
            raise UsageError(
                f"loss prediction needs a backbone with stages: ResNet-style (layer1..layer4), "
                f"small_cnn, or a 'features' sequence; {type(module).__name__} has none"
            )
        blocks = [f"{container}.{name}" for name, _ in children[container].named_children()]
        shapes = _output_shapes(module, blocks, image_size)
        last_at: dict[tuple[int, ...], str] = {}
        for name in blocks:
            shape = shapes.get(name)
            if shape is not None and len(shape) == 4:
                last_at.pop(shape[2:], None)
                last_at[shape[2:]] = name
        stages = list(last_at.values())[-MAX_STAGES:]
    shapes = _output_shapes(module, stages, image_size)
    channels = [int(shapes[name][1]) for name in stages]
    return stages, channels


def _output_shapes(module: nn.Module, names: Sequence[str], image_size: int) -> dict[str, tuple[int, ...]]:
    named = dict(module.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, _i: Any, out: Any, key: str = name) -> None:
            if isinstance(out, torch.Tensor):
                shapes[key] = tuple(out.shape)

        handles.append(named[name].register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        device = next(module.parameters()).device
        with torch.no_grad():
            module(torch.zeros(2, 3, image_size, image_size, device=device))
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


class LossPredictor:
    """A loaded model's ``loss_pred`` output: the module applied to the stage features just tapped."""

    def __init__(self, taps: StageTaps, head: LossPredictionModule) -> None:
        self.taps = taps
        self.head = head.eval()

    def to(self, device: torch.device) -> LossPredictor:
        self.head.to(device)
        return self

    def read(self) -> torch.Tensor:
        """``loss_pred [n]`` float32 for the batch the backbone just ran."""
        return self.head(self.taps.take()).float()


def head_entry(stages: Sequence[str], head: LossPredictionModule) -> dict[str, Any]:
    """The checkpoint's ``heads["loss_prediction"]`` entry (plain types and tensors only)."""
    return {
        "stages": list(stages),
        "channels": list(head.channels),
        "hidden": head.hidden,
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
    }


def attach_from_entry(module: nn.Module, entry: Mapping[str, Any], path: object) -> LossPredictor:
    """Rebuild the module from a checkpoint entry and tap ``module``'s stages."""
    try:
        stages = [str(s) for s in entry["stages"]]
        channels = [int(c) for c in entry["channels"]]
        hidden = int(entry.get("hidden", DEFAULT_HIDDEN))
        state = entry["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed loss-prediction head ({exc})") from exc
    head = LossPredictionModule(channels, hidden)
    try:
        head.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: loss-prediction head weights do not fit: {exc}") from exc
    return LossPredictor(StageTaps(module, stages), head)
