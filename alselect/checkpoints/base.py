"""Loader registry and the loaded-model interface every checkpoint format produces."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from alselect.errors import CheckpointError
from alselect.preprocess import Preprocess

METADATA_FILE = "alselect.json"


@dataclass(frozen=True)
class CheckpointOptions:
    """What the command line says about a checkpoint beyond its path."""

    arch: str | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False


class OutputHead(Protocol):
    """An extra per-image output computed from what the backbone just ran (e.g. ``loss_pred``)."""

    def to(self, device: torch.device) -> Any: ...

    def read(self) -> torch.Tensor: ...


@dataclass
class LoadedModel:
    """A model ready for inference: ``predict(x [N,3,H,W]) -> (probs [N,C], embedding [N,D])``.

    ``outputs`` says whether the raw model emits ``logits`` (softmax applied here) or
    ``probabilities``. When a model exposes no features, the embedding is its logits.
    ``heads`` name extra outputs (``loss_pred`` of a learning-loss checkpoint), each read after the
    backbone's pass over the batch.
    """

    module: nn.Module
    kind: str
    arch: str | None
    num_classes: int | None
    classes: list[str] | None
    preprocess: Preprocess
    outputs: str = "logits"
    feature_hook: Callable[[], torch.Tensor | None] | None = None
    sha256: str = ""
    path: str = ""
    heads: dict[str, OutputHead] = field(default_factory=dict)

    def to(self, device: torch.device) -> LoadedModel:
        self.module.to(device)
        for head in self.heads.values():
            head.to(device)
        return self

    def output_names(self) -> frozenset[str]:
        """The named arrays ``forward_outputs`` gives: ``probs``, ``embedding`` and any heads'."""
        return frozenset({"probs", "embedding", *self.heads})

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.module(batch)
        scores, embedding, are_probs = split_outputs(raw)
        if embedding is None and self.feature_hook is not None:
            embedding = self.feature_hook()
        if scores.ndim != 2:
            raise CheckpointError(f"model output has shape {tuple(scores.shape)}; expected [batch, classes]")
        scores = scores.float()
        already = are_probs or self.outputs == "probabilities"
        probs = scores if already else torch.softmax(scores, dim=1)
        if embedding is None:
            embedding = scores
        return probs, embedding.float().flatten(1)

    @torch.inference_mode()
    def forward_outputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named per-image arrays the store keeps for this model: ``probs``, ``embedding``, and
        one per head (``loss_pred [n]``)."""
        probs, embedding = self.predict(batch)
        outputs = {"probs": probs, "embedding": embedding}
        for name, head in self.heads.items():
            outputs[name] = head.read().float()
        return outputs


def split_outputs(raw: Any) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Accept logits, ``(logits, embedding)``, or a dict with ``logits`` (or ``probs`` /
    ``probabilities``, already normalised) and ``embedding``. Returns (scores, embedding, are_probs).
    """
    if isinstance(raw, torch.Tensor):
        return raw, None, False
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        emb = raw[1] if len(raw) > 1 and isinstance(raw[1], torch.Tensor) else None
        return raw[0], emb, False
    if isinstance(raw, dict):
        key = next((k for k in ("logits", "probs", "probabilities") if k in raw), None)
        scores = raw.get(key) if key else None
        if isinstance(scores, torch.Tensor):
            emb = next((raw[k] for k in ("embedding", "embeddings", "features") if k in raw), None)
            return scores, emb if isinstance(emb, torch.Tensor) else None, key != "logits"
    raise CheckpointError(
        f"model output is not logits, (logits, embedding), or a dict with 'logits': got {type(raw).__name__}"
    )


class CheckpointFile:
    """A checkpoint on disk, with its zip member names and (lazily) its unpickled object."""

    def __init__(self, path: Path, trust: bool) -> None:
        self.path = path
        self.trust = trust

    @cached_property
    def zip_names(self) -> list[str]:
        if not zipfile.is_zipfile(self.path):
            return []
        with zipfile.ZipFile(self.path) as archive:
            return archive.namelist()

    def has_member(self, suffix: str) -> bool:
        return any(name.endswith(suffix) for name in self.zip_names)

    @cached_property
    def obj(self) -> Any:
        """``torch.load`` with ``weights_only=True`` unless the user trusts the file."""
        try:
            return torch.load(self.path, map_location="cpu", weights_only=not self.trust)
        except pickle.UnpicklingError as exc:
            if self.trust:
                raise CheckpointError(f"{self.path}: cannot unpickle checkpoint: {exc}") from exc
            raise CheckpointError(
                f"{self.path}: refusing to unpickle arbitrary objects (weights_only=True failed). "
                "Pass --trust-checkpoint only if you trust where this file came from"
            ) from exc
        except Exception as exc:  # torch.load raises anything from IndexError to RuntimeError
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({exc})") from exc


Loader = Callable[[CheckpointFile, CheckpointOptions], "LoadedModel | None"]
_LOADERS: list[tuple[int, str, Loader]] = []


def register_loader(order: int) -> Callable[[Loader], Loader]:
    """Register a loader; loaders are asked in ascending ``order`` whether a file is theirs."""

    def decorate(func: Loader) -> Loader:
        _LOADERS.append((order, func.__name__, func))
        _LOADERS.sort(key=lambda item: item[0])
        return func

    return decorate


def registered_loaders() -> list[tuple[int, str, Loader]]:
    return list(_LOADERS)


def parse_metadata(text: str | bytes | None, path: Path) -> dict[str, Any]:
    """Parse an embedded ``alselect.json`` (classes, preprocessing, outputs)."""
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: {METADATA_FILE} inside the archive is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: {METADATA_FILE} must hold a JSON object")
    outputs = meta.get("outputs", "logits")
    if outputs not in ("logits", "probabilities"):
        raise CheckpointError(f"{path}: {METADATA_FILE} 'outputs' must be logits or probabilities")
    return meta


def model_from_archive(
    module: nn.Module, kind: str, meta: dict[str, Any], options: CheckpointOptions
) -> LoadedModel:
    """Wrap a self-describing program (TorchScript, torch.export) with its metadata."""
    classes = meta.get("classes")
    num_classes = len(classes) if isinstance(classes, list) else meta.get("num_classes")
    if options.num_classes is not None and num_classes is not None and num_classes != options.num_classes:
        raise CheckpointError(
            f"checkpoint metadata says {num_classes} classes but --num-classes is {options.num_classes}"
        )
    return LoadedModel(
        module=module,
        kind=kind,
        arch=meta.get("arch"),
        num_classes=num_classes if num_classes is not None else options.num_classes,
        classes=[str(c) for c in classes] if isinstance(classes, list) else None,
        preprocess=Preprocess.from_metadata(meta),
        outputs=meta.get("outputs", "logits"),
    )
