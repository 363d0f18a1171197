"""MC dropout with the same T masks for every image: full passes, or head-only on cached embeddings.

Two ways to draw T stochastic predictions ``mc_probs [N, T, C]`` per image:

- **full**: for a model whose dropout layers are reachable (``nn.Dropout`` and ``nn.Dropout1d/2d/3d``
  modules of a torchvision / alselect / state_dict / pickled model), T forward passes where only
  those layers drop (batch norm and everything else stay in eval mode). Pass t uses one mask per
  layer, drawn once from a fixed seed and shared by every image (channel masks for DropoutNd), so
  the joint predictive that BatchBALD needs is well defined across the pool and across nights.
  The result is stored as a named array (float16) under its own model key and cached.
- **head**: dropout with rate p on the cached penultimate embedding, then the final linear layer,
  T times. No image pass at all; computed at scoring time, not stored. Needs the final layer's
  weights ``W [C, D]``, ``b [C]``: they are looked up in the loaded module and accepted only if
  ``softmax(embedding @ W.T + b)`` reproduces the stored probabilities (so the embedding really is
  that layer's input).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from alselect.checkpoints import LoadedModel
from alselect.errors import UsageError

MASK_SEED = 20190704  # fixed: masks must be the same on every night for cached passes to stay valid
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
DEFAULT_SAMPLES = 20
DEFAULT_HEAD_RATE = 0.5
HEAD_CHECK_ROWS = 256
HEAD_CHECK_TOLERANCE = 2e-3
# Outputs stored in bf16/fp16 were made with the final layer in that format: its probabilities differ
# from an fp32 recomputation by its rounding (bf16 keeps 8 significant bits). A wrong layer still
# misses by far more.
HEAD_CHECK_TOLERANCES = {"fp32": HEAD_CHECK_TOLERANCE, "fp16": 1e-2, "bf16": 5e-2}


def dropout_layers(module: nn.Module) -> list[nn.Module]:
    """The reachable dropout modules with a rate above zero, in registration order."""
    return [m for m in module.modules() if isinstance(m, DROPOUT_TYPES) and float(getattr(m, "p", 0)) > 0]


def mc_key(model_key: str, samples: int) -> str:
    """Store key of a model's full-pass MC-dropout samples (depends on T and the mask seed)."""
    return hashlib.sha256(f"{model_key}:mc-dropout:T={samples}:seed={MASK_SEED}".encode()).hexdigest()


@dataclass
class ConsistentMasks:
    """Forward hooks that make eval-mode dropout layers drop with pass ``t``'s fixed masks."""

    layers: list[nn.Module]
    pass_index: int = 0
    _masks: dict[tuple[int, int, tuple[int, ...], str], torch.Tensor] = field(default_factory=dict)

    def mask(self, layer: int, layer_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        channelwise = type(layer_module) is not nn.Dropout
        shape = tuple(x.shape[1:2]) + (1,) * (x.ndim - 2) if channelwise else tuple(x.shape[1:])
        key = (layer, self.pass_index, shape, str(x.device))
        cached = self._masks.get(key)
        if cached is None:
            rate = float(getattr(layer_module, "p", 0.0))
            generator = torch.Generator().manual_seed(MASK_SEED + 1_000_003 * layer + self.pass_index)
            keep = torch.rand(shape, generator=generator) >= rate
            cached = (keep.float() / (1.0 - rate)).to(x.device)
            self._masks[key] = cached
        return cached

    @contextmanager
    def active(self) -> Iterator[None]:
        handles = []
        for index, layer in enumerate(self.layers):

            def hook(
                module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: object, i: int = index
            ) -> object:
                x = inputs[0]
                return x * self.mask(i, module, x).to(x.dtype)

            handles.append(layer.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class FullPassModel:
    """Wraps a loaded model so ``forward_outputs`` gives ``mc_probs [n, T, C]`` (float16)."""

    def __init__(self, model: LoadedModel, samples: int) -> None:
        layers = dropout_layers(model.module)
        if not layers:
            raise UsageError("the model has no dropout layers for full MC-dropout passes")
        self.model = model
        self.samples = samples
        self.masks = ConsistentMasks(layers)

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def to(self, device: torch.device) -> FullPassModel:
        self.model.to(device)
        return self

    def forward_outputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.model.module.eval()  # batch norm stays in eval mode; only the hooked layers drop
        passes = []
        with self.masks.active():
            for t in range(self.samples):
                self.masks.pass_index = t
                probs, _ = self.model.predict(batch)
                passes.append(probs)
        return {"mc_probs": torch.stack(passes, dim=1).to(torch.float16)}


def head_layer(
    model: LoadedModel, probs: np.ndarray, embeddings: np.ndarray, *, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """The final linear layer ``(W [C, D], b [C])`` whose softmax over ``embeddings`` gives ``probs``.

    Candidates are every (weight, bias) parameter pair of shape ``[C, D]``/``[C]`` in the module,
    last first; the first that reproduces the stored probabilities on a sample of rows (within
    the rounding of the ``precision`` they were made in) wins.
    """
    tolerance = HEAD_CHECK_TOLERANCES[precision]
    n, num_classes = probs.shape
    dim = embeddings.shape[1]
    params: dict[str, torch.Tensor] = dict(model.module.named_parameters())
    params.update({k: v for k, v in model.module.named_buffers() if k not in params})
    sample = (
        np.linspace(0, n - 1, num=min(n, HEAD_CHECK_ROWS)).astype(np.int64) if n else np.zeros(0, np.int64)
    )
    for name in reversed(list(params)):
        weight = params[name]
        if not name.endswith("weight") or tuple(weight.shape) != (num_classes, dim):
            continue
        bias_tensor = params.get(name[: -len("weight")] + "bias")
        w = weight.detach().float().cpu().numpy()
        b = (
            bias_tensor.detach().float().cpu().numpy()
            if bias_tensor is not None and tuple(bias_tensor.shape) == (num_classes,)
            else np.zeros(num_classes, dtype=np.float32)
        )
        if not len(sample):
            return w, b
        got = softmax(embeddings[sample].astype(np.float32) @ w.T + b)
        if np.abs(got - probs[sample]).max() <= tolerance:
            return w, b
    raise UsageError(
        f"head-only MC dropout needs the model's final linear layer ({num_classes}×{dim}) fed by the "
        "stored embedding; none was found in this checkpoint. It works for alselect, state_dict and "
        "pickled checkpoints, and for TorchScript / torch.export programs whose embedding output is "
        "the final layer's input; otherwise use a model with dropout layers (--mc-mode full)"
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def head_masks(samples: int, dim: int, rate: float) -> np.ndarray:
    """``[T, D]`` keep-and-rescale masks, the same for every image (fixed seed)."""
    if not 0.0 <= rate < 1.0:
        raise UsageError(f"--mc-dropout must be in [0, 1), got {rate}")
    rng = np.random.default_rng(MASK_SEED)
    return (rng.random((samples, dim)) >= rate).astype(np.float32) / np.float32(1.0 - rate)


def head_mc_probs(
    embeddings: np.ndarray, weight: np.ndarray, bias: np.ndarray, samples: int, rate: float, chunk: int = 8192
) -> np.ndarray:
    """``mc_probs [N, T, C]`` float32: T dropout masks on the embedding, then the final layer.

    Chunked over images, so the work memory beyond the output is ``chunk·T·max(D, C)`` floats.
    """
    n, dim = embeddings.shape
    masks = head_masks(samples, dim, rate)
    out = np.empty((n, samples, weight.shape[0]), dtype=np.float32)
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    b = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    m = torch.from_numpy(masks)
    for start in range(0, n, chunk):
        e = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + chunk], dtype=np.float32))
        logits = (e[:, None, :] * m[None]) @ w.T + b  # [n, T, C]
        out[start : start + chunk] = torch.softmax(logits, dim=-1).numpy()
    return out
