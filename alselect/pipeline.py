"""Folder → embeddings → ranked run: the library behind ``alselect embed`` and ``alselect score``."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alselect import __version__
from alselect.checkpoints import CheckpointOptions, LoadedModel, load_checkpoint
from alselect.discover import resolve_root
from alselect.embed import EmbedOptions, resolve_device, run_model
from alselect.errors import UsageError
from alselect.images import CHANGED_WHILE_READING
from alselect.limits import check_batch_memory
from alselect.preprocess import Preprocess
from alselect.progress import NULL_REPORTER, Reporter
from alselect.status import FolderCounts, folder_counts
from alselect.store import Store, model_display_name
from alselect.store.names import to_db
from alselect.strategies import PoolInputs, make_strategy
from alselect.sync import SyncResult, sync_folder


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint plus the command-line options that shape how it is loaded and fed."""

    checkpoint: Path
    arch: str | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


@dataclass
class PreparedModel:
    model: LoadedModel
    preprocess: Preprocess
    key: str
    display: str


@dataclass
class EmbedResult:
    sync: SyncResult
    model_key: str
    model_display: str
    embedded: int = 0
    already_embedded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    counts: FolderCounts | None = None  # files, images and duplicates in the folder after the scan

    def failure_summary(self) -> str | None:
        """One line: how many images failed and why, or None when all decoded."""
        failed = self.failures + self.sync.unreadable
        if not failed:
            return None
        kinds = Counter(reason.split(":")[0] for _, reason in failed)
        detail = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        return f"{len(failed)} image(s) skipped ({detail}); 'alselect status --failed' lists them"


@dataclass
class ScoreResult:
    embed: EmbedResult
    run_id: int
    strategy: str
    pool_size: int
    labeled: int
    selected: int


def prepare_model(spec: ModelSpec) -> PreparedModel:
    """Load the checkpoint and derive its store key from weights and effective preprocessing."""
    model = load_checkpoint(
        spec.checkpoint,
        CheckpointOptions(spec.arch, spec.num_classes, spec.trust_checkpoint),
    )
    preprocess = model.preprocess.override(spec.image_size, spec.mean, spec.std)
    model.check_input_size(preprocess.image_size)
    key = model.sha256
    if preprocess != model.preprocess:
        settings = json.dumps(preprocess.to_dict(), sort_keys=True)
        key = hashlib.sha256(f"{model.sha256}:{settings}".encode()).hexdigest()
    display = model_display_name(model.sha256, key)
    return PreparedModel(model=model, preprocess=preprocess, key=key, display=display)


def embed_folder(
    store: Store,
    folder: str | Path,
    spec: ModelSpec,
    options: EmbedOptions | None = None,
    reporter: Reporter = NULL_REPORTER,
) -> EmbedResult:
    """Sync the folder and run the model over images not yet embedded with this model."""
    options = options or EmbedOptions()
    resolve_device(options.device)  # fail before any work when the device is missing
    root = resolve_root(folder)
    prepared = prepare_model(spec)
    return _embed(store, root, prepared, options, reporter)


def _embed(
    store: Store, root: Path, prepared: PreparedModel, options: EmbedOptions, reporter: Reporter
) -> EmbedResult:
    # before the folder is scanned: options that cannot fit in memory are a usage error, not an OOM kill
    check_batch_memory(options.batch_size, prepared.preprocess.image_size, options.worker_count())
    model = prepared.model
    store.register_model(
        prepared.key,
        model.sha256,
        model.path,
        model.kind,
        model.arch,
        model.num_classes,
        model.classes,
        prepared.preprocess.to_dict(),
    )
    sync = sync_folder(store, root, reporter)
    result = EmbedResult(sync=sync, model_key=prepared.key, model_display=prepared.display)
    result.counts = next(iter(folder_counts(store, str(root))), None)
    todo = store.missing_embeddings(str(root), prepared.key)
    result.already_embedded = int(
        store.scalar(
            "SELECT COUNT(DISTINCT i.sha256) FROM images i JOIN embeddings e "
            "ON e.sha256 = i.sha256 AND e.model_key = ? WHERE i.root = ? AND i.status = 'present'",
            (prepared.key, to_db(str(root))),
        )
        or 0
    )
    if not todo:
        return result
    reporter.info(f"embedding {len(todo)} image(s) with model {prepared.display}")
    shas = [sha for sha, _ in todo]
    paths = [root / rel for _, rel in todo]

    def persist(
        indices: list[int],
        probs: np.ndarray,
        embeddings: np.ndarray,
        failures: list[tuple[int, str]],
    ) -> None:
        finite = np.isfinite(probs).all(axis=1) & np.isfinite(embeddings).all(axis=1)
        if not finite.all():
            bad = "model output not finite (NaN or infinity)"
            failures = failures + [(i, bad) for i, ok in zip(indices, finite, strict=True) if not ok]
            indices = [i for i, ok in zip(indices, finite, strict=True) if ok]
            probs, embeddings = probs[finite], embeddings[finite]
        store.add_embeddings(prepared.key, [shas[i] for i in indices], probs, embeddings)
        if failures:
            # a file edited since hashing is not broken: the next sync hashes its new content
            lasting = [(shas[i], reason) for i, reason in failures if reason != CHANGED_WHILE_READING]
            store.mark_failed(str(root), lasting)
            result.failures.extend((todo[i][1], reason) for i, reason in failures)
        result.embedded += len(indices)

    run_model(model, paths, prepared.preprocess, options, persist, reporter, expected_sha256=shas)
    return result


def score_folder(
    store: Store,
    folder: str | Path,
    spec: ModelSpec,
    strategy_name: str,
    *,
    budget: int | None = None,
    seed: int = 0,
    options: EmbedOptions | None = None,
    reporter: Reporter = NULL_REPORTER,
    command: str | None = None,
    strategy_params: dict[str, Any] | None = None,
) -> ScoreResult:
    """Embed what is missing, score every present unlabeled image, record a ranked run."""
    strategy = make_strategy(strategy_name, seed=seed, **(strategy_params or {}))
    if budget is not None and budget < 1:
        raise UsageError(f"--budget must be at least 1, got {budget}")
    options = options or EmbedOptions()
    resolve_device(options.device)
    root = resolve_root(folder)
    prepared = prepare_model(spec)
    embedded = _embed(store, root, prepared, options, reporter)
    pool = store.pool(str(root), prepared.key, with_embeddings="embeddings" in strategy.needs)
    # With a budget the run holds only N images: leave out those already sent to annotators, so
    # each nightly run's N are new. Without one everything is ranked and export skips them.
    inputs = PoolInputs(
        probs=pool.probs,
        labeled=pool.labeled,
        embeddings=pool.embeddings if "embeddings" in strategy.needs else None,
        pending=pool.exported & ~pool.labeled if budget is not None else None,
    )
    reporter.progress("score", 0, pool.labeled.size)
    selection = strategy.select(budget, inputs)
    reporter.progress("score", pool.labeled.size, pool.labeled.size)
    predicted = pool.probs.argmax(axis=1) if pool.probs.size else np.zeros(0, dtype=np.int64)
    confidence = pool.probs.max(axis=1) if pool.probs.size else np.zeros(0)
    items = [
        (
            int(pool.image_ids[i]),
            pool.relpaths[i],
            pool.sha256[i],
            float(score),
            int(predicted[i]),
            float(confidence[i]),
        )
        for i, score in zip(selection.indices.tolist(), selection.scores.tolist(), strict=True)
    ]
    labeled = int(pool.labeled.sum())
    run_id = store.record_run(
        root=str(root),
        model_key=prepared.key,
        strategy=strategy.name,
        params=strategy.get_params(),
        budget=budget,
        pool_size=len(pool.relpaths),
        labeled_count=labeled,
        items=items,
        version=__version__,
        command=command,
    )
    if not items:
        reporter.warning("no unlabeled images to score: the run is empty")
    return ScoreResult(
        embed=embedded,
        run_id=run_id,
        strategy=strategy.name,
        pool_size=len(pool.relpaths),
        labeled=labeled,
        selected=len(items),
    )
