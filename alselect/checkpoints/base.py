"""Loader registry and the loaded-model interface every checkpoint format produces."""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from alselect.errors import CheckpointError, UsageError
from alselect.preprocess import Preprocess

METADATA_FILE = "alselect.json"


@dataclass(frozen=True)
class CheckpointOptions:
    """What the command line says about a checkpoint beyond its path."""

    arch: str | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False
    task: str | None = None  # --task: overrides what the checkpoint says


class OutputHead(Protocol):
    """An extra per-image output computed from what the backbone just ran (e.g. ``loss_pred``)."""

    def to(self, device: torch.device) -> Any: ...

    def read(self) -> torch.Tensor: ...


@dataclass
class LoadedModel:
    """A model ready for inference: ``predict(x [N,3,H,W]) -> (probs [N,C], embedding [N,D])``.

    ``outputs`` says whether the raw model emits ``logits`` (softmax applied here) or
    ``probabilities``. When a model exposes no features, the embedding is its logits.
    ``task``: what the model predicts (``classification``, ``detection``, ``segmentation``) when
    its checkpoint says (metadata or a torchvision detection/segmentation ``arch``), else None;
    detectors and segmenters are run by ``alselect.tasks`` runners, not ``predict``.
    ``metadata``: the archive's ``alselect.json`` (empty for other formats).
    ``fixed_batch``: the model only takes batches of this size (a torch.export program exported
    with a static batch); ``predict`` then runs it on chunks of that size, padding the last.
    ``input_size``: the only crop size the model takes, when it has one.
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
    task: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    fixed_batch: int | None = None
    input_size: int | None = None
    heads: dict[str, OutputHead] = field(default_factory=dict)

    def to(self, device: torch.device) -> LoadedModel:
        self.module.to(device)
        for head in self.heads.values():
            head.to(device)
        return self

    def check_input_size(self, image_size: int) -> None:
        """Refuse a crop size the model cannot take, before any image is decoded."""
        if self.input_size is not None and image_size != self.input_size:
            raise UsageError(
                f"this {self.kind} model only takes {self.input_size}x{self.input_size} inputs, but the "
                f"image size is {image_size}: drop --image-size, or export the model with dynamic "
                "height and width"
            )

    def output_names(self) -> frozenset[str]:
        """The named arrays ``forward_outputs`` gives: ``probs``, ``embedding`` and any heads'."""
        return frozenset({"probs", "embedding", *self.heads})

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs [N, C], embedding [N, D])`` for ``batch [N, 3, H, W]``."""
        size = self.fixed_batch
        if size is None or batch.shape[0] == size:
            return self._predict(batch)
        outputs = []
        for chunk in batch.split(size):
            real = chunk.shape[0]
            if real < size:  # repeat the last image: rows never influence each other in eval mode
                chunk = torch.cat([chunk, chunk[-1:].expand(size - real, *chunk.shape[1:])])
            probs, embedding = self._predict(chunk)
            outputs.append((probs[:real], embedding[:real]))
        return torch.cat([p for p, _ in outputs]), torch.cat([e for _, e in outputs])

    def _predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        except Exception as exc:  # torch.load raises anything from IndexError to RuntimeError
            raise self.load_error(exc) from exc

    def load_error(self, exc: Exception) -> CheckpointError:
        """Tell a file that needs trust from a damaged one: only the first should mention trust."""
        if self.damage:
            return CheckpointError(self.damage)
        detail = str(exc)
        found = _UNSAFE_GLOBAL.search(detail)
        name = found.group(1) if found else ""
        if isinstance(exc, pickle.UnpicklingError) and name and not self.trust and _plausible(name):
            return CheckpointError(
                f"{self.path} holds a pickled object of class {name}, not just tensors: loading it "
                "runs code from the file. Pass --trust-checkpoint only if you trust where it came from "
                "(or save the model's state_dict instead)"
            )
        if self.trust and isinstance(exc, (ModuleNotFoundError, AttributeError)):
            return CheckpointError(
                f"{self.path} holds pickled objects whose code is not importable here ({exc}): install "
                "or put on PYTHONPATH the module that defined them, or save the model's state_dict instead"
            )
        with open(self.path, "rb") as handle:
            head = handle.read(2)
        if not head.startswith((b"PK", b"\x80")):
            return CheckpointError(  # torch.save writes a zip archive, or (before torch 1.6) a pickle
                f"{self.path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle, the "
                f"two forms torch.save writes (it starts with bytes {head.hex(' ')})"
            )
        reason = _WEIGHTS_ERROR.search(detail)
        detail = first_sentence(" ".join((reason.group(1) if reason else detail).split()))
        return CheckpointError(
            f"{self.path} is damaged or not a PyTorch checkpoint: torch.load cannot read it "
            f"({type(exc).__name__}: {detail})"
        )

    @cached_property
    def damage(self) -> str | None:
        """A message naming the first zip member whose CRC-32 does not match, if any.

        ``torch.load`` does not check these checksums: a flipped bit in the weights loads silently.
        Reading every member costs about a third of hashing the file (0.15 s per 100 MB).
        """
        if not self.zip_names:
            return None
        try:
            with zipfile.ZipFile(self.path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            return f"{self.path} is damaged: its zip archive cannot be read ({exc})"
        if bad is None:
            return None
        return (
            f"{self.path} is damaged: {bad} inside it fails its checksum (a bad download or disk); "
            "copy or export the checkpoint again"
        )


# "Unsupported global: GLOBAL mymodule.Net was not an allowed global by default"
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+) was not an allowed global")
_KNOWN_PACKAGES = ("torch", "numpy", "builtins", "collections")


def _plausible(name: str) -> bool:
    """False for a name in torch, numpy or the standard containers that does not exist there:
    a damaged file (``torch.FloatStosage``), not one that needs trust. Other names are taken at
    their word; nothing is imported for them."""
    package = name.split(".", 1)[0]
    target: Any = sys.modules.get(package)
    if package not in _KNOWN_PACKAGES or target is None:
        return True
    for part in name.split(".")[1:]:
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is not None


_WEIGHTS_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|Check the documentation|$)", re.S)


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
    if meta.get("task", "classification") not in ("classification", "detection", "segmentation"):
        raise CheckpointError(
            f"{path}: {METADATA_FILE} 'task' must be classification, detection or segmentation"
        )
    if meta.get("input", "batch") not in ("batch", "list"):
        raise CheckpointError(f"{path}: {METADATA_FILE} 'input' must be batch or list")
    return meta


def model_from_archive(
    module: nn.Module, kind: str, meta: dict[str, Any], options: CheckpointOptions
) -> LoadedModel:
    """Wrap a self-describing program (TorchScript, torch.export) with its metadata.

    A detector or segmenter (``"task"``) is fed letterboxed images (``alselect.tasks``); its
    ``image_size`` is the letterbox side.
    """
    from alselect.tasks import CLASSIFICATION, default_preprocess

    classes = meta.get("classes")
    num_classes = len(classes) if isinstance(classes, list) else meta.get("num_classes")
    if options.num_classes is not None and num_classes is not None and num_classes != options.num_classes:
        raise CheckpointError(
            f"checkpoint metadata says {num_classes} classes but --num-classes is {options.num_classes}"
        )
    declared = meta.get("task")
    if options.task is not None and declared is not None and options.task != declared:
        raise UsageError(f"--task {options.task}: the checkpoint is a {declared} model (its {METADATA_FILE})")
    task = options.task or declared or CLASSIFICATION
    return LoadedModel(
        module=module,
        kind=kind,
        arch=meta.get("arch"),
        num_classes=num_classes if num_classes is not None else options.num_classes,
        classes=[str(c) for c in classes] if isinstance(classes, list) else None,
        preprocess=Preprocess.from_metadata(meta)
        if task == CLASSIFICATION
        else default_preprocess(task, meta),
        outputs=meta.get("outputs", "logits"),
        task=task,
        metadata=dict(meta),
    )


def first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence of an error message, whole words up to ``limit`` characters ("…" when cut)."""
    sentence = text.split(". ", 1)[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0] + "…"
