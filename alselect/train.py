"""Train a classifier (optionally with a loss-prediction module) and write an alselect checkpoint.

The library behind ``alselect train`` and the retraining step of ``alselect benchmark``. Images
arrive as uint8 ``[N, c, S, S]`` batches (c = 1 or 3), already resized and centre-cropped exactly as
``score`` will feed them (``alselect.images.load_image`` with the checkpoint's preprocessing), and are
normalised on the device. Augmentation (on by default) is a random crop with ``S/8`` zero padding and
a horizontal flip. Validation uses the unaugmented, scoring-time pixels, so the accuracy recorded in
the checkpoint is what ``score`` reproduces on those images.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from alselect import __version__
from alselect.checkpoints import LoadedModel
from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.checkpoints.base import CheckpointFile
from alselect.checkpoints.state_dict import (
    final_classifier_layer,
    strip_prefixes,
    unwrap_state_dict,
    wrap_classifier,
)
from alselect.datasets import LabeledFiles
from alselect.embed import resolve_device
from alselect.errors import CheckpointError, DataError, UsageError
from alselect.images import ImageDecodeError, load_image
from alselect.models import build_model
from alselect.models.loss_prediction import (
    HEAD_NAME,
    OUTPUT_NAME,
    LossPredictionModule,
    LossPredictor,
    StageTaps,
    find_stages,
    head_entry,
    pair_ranking_loss,
)
from alselect.preprocess import Preprocess
from alselect.progress import NULL_REPORTER, Reporter
from alselect.strategies.base import check_seed

PRELOAD_BYTES = 2 << 30  # decoded training images up to this size are kept in memory
EVAL_BATCH = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run (recorded in the checkpoint).

    ``schedule``: ``cosine`` (to 0 over the epochs), ``step`` (× ``gamma`` at each of
    ``milestones``, in epochs) or ``constant``. Loss prediction: ``lp_weight`` λ, ``lp_margin`` ξ,
    and from epoch ``round(lp_stop_fraction · epochs)`` on the module's gradient no longer reaches
    the backbone (the paper: 120 of 200).
    """

    arch: str | None = None  # None: the --init checkpoint's, else resnet18
    epochs: int = 30
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.1
    augment: bool = True
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    loss_prediction: bool = False
    lp_weight: float = 1.0
    lp_margin: float = 1.0
    lp_stop_fraction: float = 0.6
    workers: int | None = None

    def check(self) -> None:
        check_seed(self.seed, "--seed")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise UsageError(f"--batch-size must be at least 2, got {self.batch_size}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.optimizer not in ("sgd", "adam"):
            raise UsageError(f"--optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise UsageError(f"--schedule must be cosine, step or constant, got {self.schedule!r}")
        if not 0.0 <= self.lp_stop_fraction <= 1.0:
            raise UsageError(
                f"the loss-prediction stop fraction must be in [0, 1], got {self.lp_stop_fraction}"
            )

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        return self.lr

    @property
    def lp_stop_epoch(self) -> int:
        return round(self.lp_stop_fraction * self.epochs)


# -- image sources ----------------------------------------------------------------------------


class ImageSource(Protocol):
    """Preprocessed uint8 images by index, in batches: ``(indices [b], pixels [b, c, S, S])``.

    An index whose image cannot be decoded is left out of its batch (the returned indices say
    which images the pixels are).
    """

    def __len__(self) -> int: ...

    def batches(self, indices: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]: ...


class ArraySource:
    """Images held in memory: uint8 ``[N, c, S, S]``."""

    def __init__(self, images: np.ndarray) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 [N, c, S, S], got {images.dtype} {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, indices: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, self.images[torch.from_numpy(chunk)]


class _Decode(Dataset[tuple[int, "np.ndarray | None", "str | None"]]):
    def __init__(self, paths: Sequence[Path], indices: np.ndarray, preprocess: Preprocess) -> None:
        self.paths = paths
        self.indices = indices
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[int, np.ndarray | None, str | None]:
        index = int(self.indices[item])
        try:
            return index, load_image(self.paths[index], self.preprocess), None
        except ImageDecodeError as exc:
            return index, None, str(exc)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


class FileSource:
    """Images decoded from files in ``workers`` processes each time they are asked for."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, workers: int = 0) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.workers = workers
        self.failures: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, indices: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        loader = DataLoader(
            _Decode(self.paths, indices, self.preprocess),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_as_list,
        )
        for batch in loader:
            good = [(i, a) for i, a, _ in batch if a is not None]
            for i, _, reason in batch:
                if reason is not None:
                    self.failures[i] = reason
            if good:
                yield (
                    np.array([i for i, _ in good], dtype=np.int64),
                    torch.from_numpy(np.stack([a for _, a in good])),
                )


def load_files(
    files: LabeledFiles, preprocess: Preprocess, workers: int, reporter: Reporter = NULL_REPORTER
) -> tuple[ImageSource, np.ndarray, list[tuple[str, str]]]:
    """An image source for ``files``: decoded once into memory when that fits in ``PRELOAD_BYTES``,
    else decoded per epoch. Returns (source, labels, undecodable ``(path, reason)``); undecodable
    images are dropped (from the labels too, when preloaded)."""
    streaming = FileSource(files.paths, preprocess, workers)
    size = preprocess.image_size
    if len(files) * 3 * size * size > PRELOAD_BYTES:
        reporter.info(f"{len(files)} images at {size} px do not fit in memory: decoding them every epoch")
        return streaming, files.labels, []
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(files), dtype=bool)
    done = 0
    reporter.progress("decode", 0, len(files))
    for indices, pixels in streaming.batches(np.arange(len(files)), 64):
        images[indices] = pixels.numpy()
        ok[indices] = True
        done = int(ok.sum()) + len(streaming.failures)
        reporter.progress("decode", done, len(files))
    failed = [(str(files.paths[i]), reason) for i, reason in sorted(streaming.failures.items())]
    return ArraySource(images[ok]), files.labels[ok], failed


# -- training ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """A trained classifier and its optional loss-prediction module.

    ``history`` holds one dict per epoch: ``epoch``, ``lr``, ``train_loss`` (cross-entropy),
    ``lp_loss`` (pair loss, with loss prediction), ``train_accuracy``, ``val_accuracy`` (None
    without a validation split), ``seconds``.
    """

    module: nn.Module
    head: LossPredictionModule | None
    stages: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def val_accuracy(self) -> float | None:
        return self.history[-1]["val_accuracy"] if self.history else None


def normalizer(preprocess: Preprocess, device: torch.device) -> Any:  # Callable[[torch.Tensor], torch.Tensor]
    """uint8 ``[b, c, S, S]`` → float ``[b, 3, S, S]``, normalised as ``embed`` does (grey → 3 channels)."""
    mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1) * 255.0

    def apply(pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(device, non_blocking=True).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - mean) / std

    return apply


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding of ``S/8`` (at least 1) pixels, and a horizontal flip, per image."""
    n, _, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None]  # [n, h]
    cols = dx[:, None] + torch.arange(w, device=x.device)[None]  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def fit(
    module: nn.Module,
    source: ImageSource,
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    preprocess: Preprocess,
    config: TrainConfig,
    reporter: Reporter = NULL_REPORTER,
) -> TrainResult:
    """Train ``module`` in place on ``train_idx`` and validate on ``val_idx`` after each epoch.

    Deterministic for a given ``config.seed`` on the CPU: shuffling and augmentation draw from a
    local generator; dropout draws from torch's global generator, which is forked (the caller's
    state is left as it was) and seeded.
    """
    config.check()
    if len(train_idx) == 0:
        raise DataError("no training images")
    device = resolve_device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        cuda = device.type == "cuda"
        module.to(device)
        if cuda:
            module.to(memory_format=torch.channels_last)
        head: LossPredictionModule | None = None
        taps: StageTaps | None = None
        stages: list[str] = []
        if config.loss_prediction:
            stages, channels = find_stages(module, preprocess.image_size)
            head = LossPredictionModule(channels).to(device)
            taps = StageTaps(module, stages)
        params = list(module.parameters()) + (list(head.parameters()) if head is not None else [])
        optimizer = make_optimizer(params, config)
        generator = torch.Generator().manual_seed(config.seed)
        normalize = normalizer(preprocess, device)
        targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        steps = math.ceil(len(train_idx) / config.batch_size)
        total = steps * config.epochs
        result = TrainResult(module=module, head=head, stages=stages)
        reporter.progress("train", 0, total)
        try:
            for epoch in range(config.epochs):
                start = time.perf_counter()
                lr = config.lr_at(epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                module.train()
                if head is not None:
                    head.train()
                if taps is not None:
                    taps.detach = epoch >= config.lp_stop_epoch
                order = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
                seen = correct = 0
                ce_sum = lp_sum = 0.0
                for step, (indices, pixels) in enumerate(source.batches(order, config.batch_size)):
                    if len(indices) < 2:
                        continue  # batch norm cannot train on one image
                    x = normalize(pixels)
                    if config.augment:
                        x = augment(x, generator)
                    if cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    y = targets[torch.from_numpy(indices)].to(device)
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                        logits = module(x)
                        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
                        loss = per_sample.mean()
                        if head is not None and taps is not None:
                            pair = pair_ranking_loss(head(taps.take()), per_sample, config.lp_margin)
                            loss = loss + config.lp_weight * pair
                            lp_sum += float(pair.detach()) * len(indices)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    seen += len(indices)
                    ce_sum += float(per_sample.detach().sum())
                    correct += int((logits.detach().argmax(1) == y).sum())
                    reporter.progress("train", epoch * steps + step + 1, total)
                val = evaluate(module, source, labels, val_idx, preprocess, device) if len(val_idx) else None
                record = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": ce_sum / max(seen, 1),
                    "train_accuracy": correct / max(seen, 1),
                    "val_accuracy": val,
                    "seconds": round(time.perf_counter() - start, 3),
                }
                if head is not None:
                    record["lp_loss"] = lp_sum / max(seen, 1)
                result.history.append(record)
                reporter.info(epoch_line(record, config.epochs))
        finally:
            if taps is not None:
                taps.remove()
        module.eval()
        if head is not None:
            head.eval()
        return result


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    text = (
        f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}, "
        f"train accuracy {record['train_accuracy']:.2%}"
    )
    if "lp_loss" in record:
        text += f", loss-prediction loss {record['lp_loss']:.4f}"
    if record["val_accuracy"] is not None:
        text += f", val accuracy {record['val_accuracy']:.2%}"
    return text + f" ({record['seconds']:.1f} s)"


@torch.inference_mode()
def predict_logits(
    module: nn.Module, source: ImageSource, indices: np.ndarray, preprocess: Preprocess, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode float32 logits of the decodable ``indices``: (kept indices, logits ``[n, C]``)."""
    module.eval()
    module.to(device)
    normalize = normalizer(preprocess, device)
    kept, outputs = [], []
    for chunk, pixels in source.batches(np.asarray(indices, dtype=np.int64), EVAL_BATCH):
        kept.append(chunk)
        outputs.append(module(normalize(pixels).contiguous()).float().cpu().numpy())
    if not kept:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(kept), np.concatenate(outputs)


def evaluate(
    module: nn.Module,
    source: ImageSource,
    labels: np.ndarray,
    indices: np.ndarray,
    preprocess: Preprocess,
    device: torch.device,
) -> float:
    """Top-1 accuracy on ``indices`` with scoring-time pixels (no augmentation, eval mode, float32)."""
    kept, logits = predict_logits(module, source, indices, preprocess, device)
    if len(kept) == 0:
        return float("nan")
    return float((logits.argmax(1) == np.asarray(labels)[kept]).mean())


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: ``round(fraction · n_c)`` of each class to validation, at least one
    when ``fraction > 0``, and always at least one left for training; seeded, sorted."""
    if fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = min(len(members) - 1, max(1, round(fraction * len(members))))
        if n_val > 0:
            val.append(rng.choice(members, size=n_val, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


# -- models and checkpoints -------------------------------------------------------------------


def new_model(arch: str, num_classes: int, seed: int) -> nn.Module:
    """``build_model`` with weights drawn from ``seed`` (torch's global generator left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, num_classes)


def init_checkpoint(path: Path, trust: bool) -> tuple[str | None, dict[str, torch.Tensor], Preprocess | None]:
    """(arch, weights, preprocessing) of a checkpoint to fine-tune from: an alselect checkpoint or a
    (wrapped) state_dict; TorchScript, torch.export and pickled modules cannot be retrained here."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    obj = CheckpointFile(path, trust).obj
    if isinstance(obj, dict) and "alselect_checkpoint" in obj:
        state = unwrap_state_dict(obj.get("state_dict"))
        if state is None:
            raise CheckpointError(f"{path}: alselect checkpoint without weights")
        return str(obj.get("arch")), state, Preprocess.from_metadata(obj.get("preprocess"))
    state = unwrap_state_dict(obj)
    if state is None:
        raise CheckpointError(
            f"{path}: fine-tuning starts from an alselect checkpoint or a state_dict (with --arch); "
            "TorchScript, torch.export and pickled models cannot be retrained"
        )
    return None, state, None


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Copy every weight whose name and shape match; returns the names left at their fresh values
    (the classifier, when the class count differs). Refuses weights of another architecture."""
    state = strip_prefixes(dict(state))
    own = module.state_dict()
    matching = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    layer = final_classifier_layer(module)
    head_keys = {
        f"{name}.{p}" for name, m in module.named_modules() if m is layer for p in ("weight", "bias")
    }
    body = [k for k in own if k not in head_keys and not k.endswith("num_batches_tracked")]
    missing_body = [k for k in body if k not in matching]
    if missing_body:
        raise CheckpointError(
            f"{path}: weights do not fit the architecture ({len(missing_body)} of {len(body)} backbone "
            f"tensors missing or of another shape, e.g. {missing_body[:3]}); check --arch"
        )
    module.load_state_dict(matching, strict=False)
    return sorted(set(own) - set(matching))


def loaded_model(result: TrainResult, arch: str, classes: list[str], preprocess: Preprocess) -> LoadedModel:
    """The trained model as ``score`` would load it (feature hook, and ``loss_pred`` when trained)."""
    model = wrap_classifier(
        result.module,
        kind="alselect",
        arch=arch,
        num_classes=len(classes),
        classes=classes,
        preprocess=preprocess,
    )
    if result.head is not None:
        model.heads[OUTPUT_NAME] = LossPredictor(StageTaps(result.module, result.stages), result.head)
    return model


@dataclass
class TrainSummary:
    """What ``train_checkpoint`` did: sizes, accuracy, undecodable images, where it wrote."""

    output: Path
    classes: list[str]
    train_count: int
    val_count: int
    val_accuracy: float | None
    history: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    reset: list[str]
    seconds: float


def train_checkpoint(
    files: LabeledFiles,
    output: str | Path,
    config: TrainConfig,
    *,
    image_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    init: str | Path | None = None,
    trust_checkpoint: bool = False,
    reporter: Reporter = NULL_REPORTER,
) -> TrainSummary:
    """Train on labeled files and write an alselect checkpoint that ``score`` loads directly.

    ``init``: start from that checkpoint's weights (fine-tuning); its architecture and preprocessing
    are the defaults, and a classifier of another class count is replaced by a fresh one.
    Preprocessing defaults otherwise: 32 px for ``small_cnn`` and ``*_cifar``, 224 px else, ImageNet
    mean/std; the whole shorter side is kept (resize = crop).
    """
    started = time.perf_counter()
    config.check()
    target = Path(output)
    if target.is_dir():
        raise UsageError(f"-o {output} is a folder; name the checkpoint file")
    if not target.parent.is_dir():
        raise UsageError(f"-o: folder {target.parent} does not exist")
    resolve_device(config.device)
    init_arch, init_state, init_pre = (None, None, None)
    if init is not None:
        init_arch, init_state, init_pre = init_checkpoint(Path(init), trust_checkpoint)
    arch = config.arch or init_arch or "resnet18"
    if len(files.classes) < 2:
        raise DataError(f"training needs at least 2 classes, found {len(files.classes)}: {files.classes}")
    if init_pre is not None:
        preprocess = init_pre.override(image_size, mean, std)
    else:
        size = image_size or (32 if arch == "small_cnn" or arch.endswith("_cifar") else 224)
        preprocess = Preprocess(image_size=size, resize_size=size).override(None, mean, std)
    workers = config.workers if config.workers is not None else min(4, os.cpu_count() or 1)
    source, labels, failed = load_files(files, preprocess, workers, reporter)
    failed_paths = {f for f, _ in failed}
    kept_paths = [p for p in files.paths if str(p) not in failed_paths]
    if failed:
        reporter.warning(
            f"{len(failed)} image(s) could not be decoded and were left out, e.g. {failed[0][0]}"
        )
    train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed)
    module = new_model(arch, len(files.classes), config.seed)
    reset: list[str] = []
    if init_state is not None:
        reset = load_matching(module, init_state, Path(init or ""))
        if reset:
            reporter.info(f"fine-tuning: {len(reset)} tensor(s) start fresh ({', '.join(reset[:4])})")
    reporter.info(
        f"training {arch} on {len(train_idx)} image(s), validating on {len(val_idx)}, "
        f"{len(files.classes)} classes, {config.epochs} epoch(s)"
    )
    result = fit(module, source, labels, train_idx, val_idx, preprocess, config, reporter)
    if isinstance(source, FileSource) and source.failures:
        reporter.warning(f"{len(source.failures)} image(s) could not be decoded and were skipped")
    training = {
        "alselect_version": __version__,
        "config": {**asdict(config), "arch": arch, "milestones": list(config.milestones)},
        "history": result.history,
        "data": {"source": files.source, "count": len(labels), "classes": files.class_counts()},
        "validation": {
            "accuracy": result.val_accuracy,
            "count": len(val_idx),
            "files": [str(kept_paths[i]) for i in val_idx.tolist()],
        },
        "init": str(init) if init is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    heads = {HEAD_NAME: head_entry(result.stages, result.head)} if result.head is not None else None
    result.module.to("cpu")
    if result.head is not None:
        result.head.to("cpu")
    save_alselect_checkpoint(
        target,
        result.module.to(memory_format=torch.contiguous_format),
        arch=arch,
        num_classes=len(files.classes),
        classes=files.classes,
        preprocess=preprocess,
        heads=heads,
        training=training,
    )
    return TrainSummary(
        output=target,
        classes=files.classes,
        train_count=len(train_idx),
        val_count=len(val_idx),
        val_accuracy=result.val_accuracy,
        history=result.history,
        skipped=files.skipped + failed,
        reset=reset,
        seconds=time.perf_counter() - started,
    )
