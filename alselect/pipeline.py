"""Folder → embeddings → ranked run: the library behind ``alselect embed`` and ``alselect score``."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from alselect import __version__
from alselect.checkpoints import CheckpointOptions, LoadedModel, load_checkpoint
from alselect.discover import resolve_root
from alselect.embed import EmbedOptions, Engine, OutputModel, open_engine, resolve_device
from alselect.errors import CheckpointError, NothingUsableError, UsageError
from alselect.export import all_pending_reason
from alselect.images import CHANGED_WHILE_READING
from alselect.limits import check_batch_memory
from alselect.mc_dropout import (
    DEFAULT_HEAD_RATE,
    DEFAULT_SAMPLES,
    FullPassModel,
    dropout_layers,
    head_layer,
    head_mc_probs,
    mc_key,
)
from alselect.preprocess import Preprocess
from alselect.progress import NULL_REPORTER, Reporter
from alselect.status import FolderCounts, folder_counts
from alselect.store import PoolRows, Store, model_display_name
from alselect.store.keys import content_keys
from alselect.store.rankings import Ranking
from alselect.store.writer import OutputWriter
from alselect.strategies import PoolInputs, Strategy, build_strategy
from alselect.sync import SyncResult, sync_folder
from alselect.tasks import (
    CLASSIFICATION,
    DEFAULT_MAX_DETECTIONS,
    DETECTION,
    Reduction,
    TaskSettings,
    check_task,
)
from alselect.tasks.pool import LazyArrays, task_pool

NOT_FINITE = "model output not finite (NaN or infinity)"
FLOAT16_RANGE = "embedding beyond float16's range (±65,504): store it with --embedding-dtype float32"
TASK_DEFAULTS = Reduction()  # detection / segmentation scoring options when none are given
STANDARD_INPUTS = frozenset({"probs", "embeddings", "mc_probs"})
# How to get a checkpoint that produces a per-image array a strategy needs.
ARRAY_SOURCES = {"loss_pred": "train one with 'alselect train --loss-prediction'"}


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
    task: str | None = None  # None: what the checkpoint says, else classification
    max_detections: int = DEFAULT_MAX_DETECTIONS


@dataclass(frozen=True)
class ModelRecipe:
    """How another process (a Ray actor) builds the same runner: load ``checkpoint`` (an absolute
    path every node can read) with ``options``, insist on the driver's ``sha256``, and wrap it for
    ``mc_samples`` MC-dropout passes where given. Small and picklable, unlike some loaded models
    (TorchScript)."""

    checkpoint: str
    options: CheckpointOptions
    sha256: str
    mc_samples: int | None = None
    settings: TaskSettings | None = None  # detectors and segmenters: their runner's settings

    def __call__(self) -> OutputModel:
        model = load_checkpoint(self.checkpoint, self.options)
        if model.sha256 != self.sha256:
            raise CheckpointError(
                f"{self.checkpoint} on {socket.gethostname()} has sha256 {model.sha256[:12]}, not "
                f"{self.sha256[:12]} as where alselect runs: every node must see the same checkpoint"
            )
        if self.mc_samples:
            return FullPassModel(model, self.mc_samples)
        runner = task_runner(model, self.settings) if self.settings is not None else None
        return runner or model


@dataclass
class PreparedModel:
    """A loaded checkpoint with its store key; ``runner`` (default: the model) computes its outputs;
    ``recipe`` rebuilds the runner elsewhere.

    ``task``: classification, detection or segmentation (detectors and segmenters have a runner).
    ``precision``: fp32, bf16 or fp16; outputs made in bf16 or fp16 have their own key.
    ``base_key``: for a derived model (another precision, MC-dropout samples), the key of the fp32
    single-pass model it comes from; ``mc_samples``: T stored MC-dropout samples per image.
    """

    model: LoadedModel
    preprocess: Preprocess
    key: str
    runner: OutputModel | None = None
    task: str = CLASSIFICATION
    precision: str = "fp32"  # the number format its outputs are made in (see ``with_precision``)
    embedding_dtype: str = "float32"  # the stored format of its ``embedding`` array
    recipe: ModelRecipe | None = None
    base_key: str | None = None
    mc_samples: int | None = None

    @property
    def derivation(self) -> dict[str, Any]:
        """How this model derives from its checkpoint beyond preprocessing: recorded with it, so
        ``status`` and exports name it as ``model_display_name`` says."""
        derived: dict[str, Any] = {}
        if self.precision != "fp32":
            derived["precision"] = self.precision
        if self.embedding_dtype != "float32":
            derived["embedding_dtype"] = self.embedding_dtype
        if self.base_key is not None and self.base_key != self.key:
            derived["base_key"] = self.base_key
        if self.mc_samples:
            derived["mc_samples"] = self.mc_samples
        return derived

    @property
    def display(self) -> str:
        return model_display_name(self.model.sha256, self.key, self.derivation)


@dataclass
class EmbedResult:
    """What one model's pass over a folder did. ``failures`` lists ``(relpath, reason)`` of this run."""

    sync: SyncResult
    model_key: str
    model_display: str
    embedded: int = 0
    already_embedded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed_before: int = 0  # contents skipped because they failed in an earlier run
    counts: FolderCounts | None = None  # the folder's files, images and duplicates after the pass

    def failure_summary(self) -> str | None:
        """One line: how many files failed in this pass and why, or None when all decoded.

        A failed file is counted once per path, as ``status`` counts failed files (two copies of a
        broken file are two failed files)."""
        failed = self.failures + self.sync.unreadable
        parts = []
        if failed:
            kinds = Counter(reason.split(":")[0] for _, reason in failed)
            detail = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
            parts.append(f"{len(failed)} file(s) skipped ({detail})")
        if self.failed_before:
            parts.append(f"{self.failed_before} that failed before not retried (--retry-failed)")
        if not parts:
            return None
        return "; ".join(parts) + "; 'alselect status --failed' lists them"


@dataclass
class ScoreResult:
    embed: EmbedResult  # the (first) task model's
    run_id: int
    strategy: str
    pool_size: int
    labeled: int
    selected: int
    embeds: list[EmbedResult] = field(default_factory=list)  # every model's, task model first
    labeled_syncs: list[tuple[str, SyncResult]] = field(default_factory=list)  # (--labeled-dir, its scan)


@dataclass(frozen=True)
class Safeguards:
    """Cron-grade checks that turn an unusable run into a documented failure (exit 3).

    ``allow_empty``: accept a folder with no images where the store knew some (an unmounted disk
    looks like that). ``max_failed``: the largest fraction (0–1) of the images a run tried that may
    fail; None accepts any number, but a run where every new image failed is refused unless
    ``allow_empty``.
    """

    allow_empty: bool = False
    max_failed: float | None = None


def prepare_model(spec: ModelSpec) -> PreparedModel:
    """Load the checkpoint and derive its store key from weights and effective settings.

    The key is the checkpoint's sha256 unless preprocessing is overridden or a detector keeps a
    non-default number of boxes: then a hash of both, so outputs made differently never mix.
    """
    check_task(spec.task)
    options = CheckpointOptions(spec.arch, spec.num_classes, spec.trust_checkpoint, spec.task)
    model = load_checkpoint(spec.checkpoint, options)
    task = model.task or CLASSIFICATION
    if spec.task is not None and spec.task != task:
        raise UsageError(
            f"--task {spec.task}: {spec.checkpoint} is a {task} model ({model.arch or model.kind})"
        )
    settings = TaskSettings(task, spec.max_detections)
    preprocess = model.preprocess.override(spec.image_size, spec.mean, spec.std)
    model.check_input_size(preprocess.image_size)
    key = model.sha256
    shaped = task == DETECTION and spec.max_detections != DEFAULT_MAX_DETECTIONS
    if preprocess != model.preprocess or shaped:
        settings_text = json.dumps(preprocess.to_dict(), sort_keys=True)
        if shaped:
            settings_text += ":" + settings.key_suffix()
        key = hashlib.sha256(f"{model.sha256}:{settings_text}".encode()).hexdigest()
    runner = task_runner(model, settings)
    recipe = ModelRecipe(str(Path(spec.checkpoint).resolve()), options, model.sha256, settings=settings)
    return PreparedModel(model=model, preprocess=preprocess, key=key, runner=runner, task=task, recipe=recipe)


def task_runner(model: LoadedModel, settings: TaskSettings) -> OutputModel | None:
    """The runner that computes a detector's or segmenter's stored arrays (None: a classifier)."""
    if settings.task == DETECTION:
        from alselect.tasks.detection import DetectionRunner

        return DetectionRunner(model, settings)
    if settings.task != CLASSIFICATION:
        from alselect.tasks.segmentation import SegmentationRunner

        return SegmentationRunner(model)
    return None


def embed_folder(
    store: Store,
    folder: str | Path,
    spec: ModelSpec,
    options: EmbedOptions | None = None,
    reporter: Reporter = NULL_REPORTER,
    *,
    retry_failed: bool = False,
    safeguards: Safeguards = Safeguards(),
    engine: Engine | None = None,
) -> EmbedResult:
    """Sync the folder and run the model over images not yet embedded with this model.

    ``engine`` (from ``open_engine``) lets several calls share one; by default the call opens the
    engine ``options`` name for itself.
    """
    options = options or EmbedOptions()
    options.check()  # fail before any work when the device or the engine is missing
    root = resolve_root(folder)
    prepared = with_precision(store, prepare_model(spec), options)
    # before the scan: options that cannot fit in memory are a usage error, not an OOM kill
    check_batch_memory(options.batch_size, prepared.preprocess.image_size, options.worker_count())
    register(store, prepared)
    with engine_for(options, engine) as running:  # an unreachable cluster fails before hashing
        sync = sync_folder(store, root, reporter, allow_empty=safeguards.allow_empty)
        result = embed_synced(store, root, sync, prepared, options, reporter, retry_failed, engine=running)
    check_failures([result], safeguards)
    return result


def precision_key(key: str, precision: str) -> str:
    """Store key of outputs made in ``precision``: fp32 keeps ``key`` (every store made before
    reduced precision existed stays valid); bf16 and fp16 outputs get keys of their own."""
    if precision == "fp32":
        return key
    return hashlib.sha256(f"{key}:precision={precision}".encode()).hexdigest()


def with_precision(store: Store, prepared: PreparedModel, options: EmbedOptions) -> PreparedModel:
    """``prepared`` keyed for the precision its outputs will be made in.

    ``options.precision`` is ``--precision``, resolved for ``options.device``. ``auto`` means the
    device's fast reduced precision for classifiers (``alselect.inference.resolve_precision``), but a
    store that already holds this model's fp32 outputs and none in that precision keeps fp32: an
    existing pool is never re-embedded, nor split between two number formats, because a newer alselect
    or another machine would pick differently. ``--precision bf16`` once moves it (``alselect gc`` then
    frees the fp32 arrays). A store with the float32-embedding fp32 pool keeps fp32 for its first
    ``--embedding-dtype float16`` pool too: that option changes how embeddings are stored, not the
    forward. The Ray engine runs models in fp32 (``EmbedOptions.check``).
    """
    from alselect.inference import resolve_precision

    unstored = prepared.key  # before ``--embedding-dtype`` gives the model a key of its own
    prepared = with_embedding_dtype(prepared, options.embedding_dtype)
    requested = options.precision
    if options.engine != "local":
        return prepared
    device = resolve_device(options.device)
    precision = resolve_precision(requested, device, reduced_ok=prepared.task == CLASSIFICATION)
    reduced = precision_key(prepared.key, precision)
    # the pool whose stored outputs decide: this one, or for a first float16 pool the float32 one
    decides = prepared.key
    if decides != unstored and not _has_outputs(store, decides) and not _has_outputs(store, reduced):
        decides = unstored
    fp32_pool = _has_outputs(store, decides) and not _has_outputs(store, precision_key(decides, precision))
    if requested == "auto" and precision != "fp32" and fp32_pool:
        precision = "fp32"
    if precision == "fp32":
        return prepared
    return replace(prepared, key=reduced, precision=precision, base_key=prepared.base_key or prepared.key)


def with_embedding_dtype(prepared: PreparedModel, dtype: str) -> PreparedModel:
    """``prepared`` keyed for embeddings stored as ``dtype``: float32 keeps its key; float16 (half
    the bytes to write and load) gets a key of its own, so a pool never mixes the two."""
    if dtype == "float32":
        return prepared
    key = hashlib.sha256(f"{prepared.key}:embedding={dtype}".encode()).hexdigest()
    return replace(prepared, key=key, embedding_dtype=dtype, base_key=prepared.base_key or prepared.key)


def _has_outputs(store: Store, key: str) -> bool:
    return int((store.model(key) or {}).get("slots") or 0) > 0


@contextlib.contextmanager
def engine_for(options: EmbedOptions, engine: Engine | None) -> Iterator[Engine]:
    """``engine`` when the caller has one open, else the one ``options`` name, open for the block."""
    if engine is not None:
        yield engine
        return
    with open_engine(options) as opened:
        yield opened


def register(store: Store, prepared: PreparedModel) -> None:
    model = prepared.model
    settings = {**prepared.preprocess.to_dict(), **prepared.derivation}
    store.register_model(
        prepared.key,
        model.sha256,
        os.path.abspath(model.path),  # as given, whatever the working directory of a later command
        model.kind,
        model.arch,
        model.num_classes,
        model.classes,
        settings,
    )


def embed_synced(
    store: Store,
    root: Path,
    sync: SyncResult,
    prepared: PreparedModel,
    options: EmbedOptions,
    reporter: Reporter,
    retry_failed: bool = False,
    *,
    engine: Engine | None = None,
) -> EmbedResult:
    """Run the model over the synced folder's images it has no outputs for; store them per batch.

    Whatever the engine, every batch goes through ``persist``: outputs that are not finite fail
    for this model, the rest are appended, fsynced and registered in one transaction, and decode
    failures are recorded for the content. ``failures`` end up in path order.
    """
    key = str(root)
    result = EmbedResult(sync=sync, model_key=prepared.key, model_display=prepared.display)
    if retry_failed:
        store.retry_failures(key, prepared.key)
    result.counts = next(iter(folder_counts(store, key)), None)
    todo = store.missing_outputs(key, prepared.key)
    result.failed_before = store.output_failure_count(key, prepared.key)
    # Every distinct present content is embedded, still to embed, or failed for this model before
    # (a success clears the failure): arithmetic instead of a join over the whole folder.
    distinct = result.counts.distinct if result.counts is not None else 0
    result.already_embedded = distinct - len(todo) - result.failed_before
    if not todo:
        return result
    reporter.info(f"embedding {len(todo)} image(s) with model {prepared.display}")
    shas = [sha for sha, _ in todo]
    paths = [root / rel for _, rel in todo]

    def persist(
        indices: list[int], outputs: Mapping[str, np.ndarray], failures: list[tuple[int, str]]
    ) -> None:
        finite = np.ones(len(indices), dtype=bool)
        for array in outputs.values():
            if array.dtype.kind == "f":
                finite &= np.isfinite(array.reshape(len(indices), -1)).all(axis=1)
        too_wide = np.zeros(len(indices), dtype=bool)
        if prepared.embedding_dtype != "float32" and "embedding" in outputs:
            with np.errstate(over="ignore"):  # an overflow is this image's failure, said below
                narrow = outputs["embedding"].astype(prepared.embedding_dtype)
            too_wide = finite & ~np.isfinite(narrow.reshape(len(indices), -1)).all(axis=1)
            finite &= ~too_wide
            outputs = {**outputs, "embedding": narrow}
        if not finite.all():
            reasons = [FLOAT16_RANGE if wide else NOT_FINITE for wide in too_wide.tolist()]
            bad = [(shas[i], reasons[j]) for j, i in enumerate(indices) if not finite[j]]
            writer.call(functools.partial(store.record_output_failures, prepared.key, bad))  # the model's
            result.failures.extend((todo[i][1], reasons[j]) for j, i in enumerate(indices) if not finite[j])
            indices = [i for i, ok in zip(indices, finite, strict=True) if ok]
            outputs = {name: array[finite] for name, array in outputs.items()}
        writer.put([shas[i] for i in indices], outputs)
        if failures:
            # a file edited since hashing is not broken: the next sync hashes its new content
            lasting = [(shas[i], reason) for i, reason in failures if reason != CHANGED_WHILE_READING]
            if lasting:  # a call between two batches keeps them from being registered together
                writer.call(lambda: result.failures.extend(store.mark_failed(key, lasting)))  # every copy
            result.failures.extend(
                (todo[i][1], reason) for i, reason in failures if reason == CHANGED_WHILE_READING
            )
        result.embedded += len(indices)

    runner = prepared.runner or prepared.model
    # Batches are registered on a writer thread, grouped when the model outpaces the disk
    # (alselect.store.writer); leaving the block waits for every batch handed over.
    with OutputWriter(store, prepared.key) as writer, engine_for(options, engine) as running:
        running.run(
            runner,
            paths,
            prepared.preprocess,
            persist,
            reporter,
            expected_sha256=shas,
            recipe=prepared.recipe,
            precision=prepared.precision,  # the precision its key was made for
        )
    store.merge_outputs()  # the pass's rows into the content-keyed table (migration m008)
    result.failures.sort()
    if result.failures:  # the counts after the pass: files that failed to decode are failed, not present
        result.counts = next(iter(folder_counts(store, key)), None)
    return result


def check_failures(results: Sequence[EmbedResult], safeguards: Safeguards) -> None:
    """Refuse (exit 3) a run whose failures exceed ``max_failed``, or with nothing usable at all.

    Nothing usable: images were tried, every one failed, and the model has no earlier outputs for
    the folder either (the run would be empty).
    """
    for result in results:
        failed = len(result.failures) + len(result.sync.unreadable)
        tried = result.embedded + failed
        if not tried or not failed:
            continue
        share = failed / tried
        if safeguards.max_failed is not None and share > safeguards.max_failed:
            raise NothingUsableError(
                f"{failed} of {tried} image(s) failed with model {result.model_display} "
                f"({share:.1%} > --max-failed {safeguards.max_failed:.1%}); no run recorded"
            )
        usable = result.embedded + result.already_embedded
        if safeguards.max_failed is None and not usable and not safeguards.allow_empty:
            raise NothingUsableError(
                f"all {tried} image(s) failed with model {result.model_display} and none is usable "
                "('alselect status --failed' says why); no run recorded "
                "(--max-failed 100% or --allow-empty to accept)"
            )


@dataclass(frozen=True)
class McDropout:
    """How a single model gives ``mc_probs``: ``mode`` full / head / auto (full when the model has
    reachable dropout layers, else head), ``samples`` T, head dropout ``rate``."""

    samples: int = DEFAULT_SAMPLES
    mode: str = "auto"
    rate: float = DEFAULT_HEAD_RATE

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UsageError(f"--mc-samples must be at least 1, got {self.samples}")
        if self.mode not in ("auto", "full", "head"):
            raise UsageError(f"--mc-mode must be auto, full or head, got {self.mode!r}")
        if not 0.0 <= self.rate < 1.0:
            raise UsageError(f"--mc-dropout must be in [0, 1), got {self.rate}")


@dataclass(frozen=True)
class ScoreModels:
    """The models one scoring run reads: task model(s) and an optional separate embedding model.

    Several task models form an ensemble: ``probs`` is their mean and ``mc_probs [N, M, C]``
    stacks the members. With one task model, strategies that need ``mc_probs`` get MC-dropout
    samples (``mc``). ``embedding`` is the ``embed`` model's when given, else the task model's.
    """

    task: Sequence[ModelSpec]
    embed: ModelSpec | None = None
    mc: McDropout = McDropout()


def score_folder(
    store: Store,
    folder: str | Path,
    spec: ModelSpec | ScoreModels,
    strategy_name: str | Strategy,
    *,
    budget: int | None = None,
    seed: int = 0,
    options: EmbedOptions | None = None,
    reporter: Reporter = NULL_REPORTER,
    command: str | None = None,
    strategy_params: Mapping[str, Any] | None = None,
    labeled_dirs: Sequence[str | Path] = (),
    retry_failed: bool = False,
    safeguards: Safeguards = Safeguards(),
    reduction: Reduction = TASK_DEFAULTS,
    engine: Engine | None = None,
) -> ScoreResult:
    """Embed what is missing, score every present unlabeled image, record a ranked run.

    ``strategy_name`` is a registered name (built with ``seed`` and ``strategy_params``) or a
    ready strategy (e.g. composed with a prefilter). ``labeled_dirs`` are folders of images
    already labeled (kept outside ``folder``): they are embedded too and enter the strategy as
    labeled rows (coreset covers them, DAL learns from them), never as candidates.
    ``reduction``: how a detector's boxes or a segmenter's pixels become per-image scores.
    ``engine`` as for ``embed_folder``: every model's embedding in this run shares it.
    """
    strategy = (
        strategy_name
        if isinstance(strategy_name, Strategy)
        else build_strategy(strategy_name, seed=seed, params=strategy_params)
    )
    if budget is not None and budget < 1:
        raise UsageError(f"--budget must be at least 1, got {budget}")
    if strategy.batch_aware and budget is None:
        raise UsageError(f"strategy {strategy.name!r} chooses a batch jointly: pass --budget N")
    warn_prefilter_caps_budget(strategy, budget, reporter)
    models = spec if isinstance(spec, ScoreModels) else ScoreModels(task=[spec])
    if not models.task:
        raise UsageError("scoring needs at least one --model")
    options = options or EmbedOptions()
    options.check()
    root = resolve_root(folder)
    extra_roots = [resolve_root(d) for d in labeled_dirs]
    task = [with_precision(store, prepare_model(s), options) for s in models.task]
    embedder = (
        with_precision(store, prepare_model(models.embed), options) if models.embed is not None else None
    )
    check_ensemble(task)
    check_task_run(strategy, task, reduction)
    check_outputs(strategy, task[0])
    mc_mode = mc_source(strategy, task, models.mc)
    mc_pass = full_pass_model(task[0], models.mc.samples) if mc_mode == "full" else None
    extras = [m for m in (embedder, mc_pass) if m is not None]
    everyone = list({p.key: p for p in [*task, *extras]}.values())
    for prepared in everyone:  # before any scan: options too big for memory are a usage error
        check_batch_memory(options.batch_size, prepared.preprocess.image_size, options.worker_count())
    for prepared in everyone:
        register(store, prepared)

    with engine_for(options, engine) as running:  # an unreachable cluster fails before hashing
        sync = sync_folder(store, root, reporter, allow_empty=safeguards.allow_empty)
        results = [
            embed_synced(store, root, sync, p, options, reporter, retry_failed, engine=running)
            for p in everyone
        ]
        for result in results:  # one scan, one folder: every model's summary shows the final counts
            result.counts = results[-1].counts
        check_failures(results, safeguards)
        labeled_syncs = []
        for other in extra_roots:
            other_sync = sync_folder(store, other, reporter)
            labeled_syncs.append((str(other), other_sync))
            for p in everyone:
                embed_synced(store, other, other_sync, p, options, reporter, retry_failed, engine=running)

    pool = store.pool_rows(str(root), [p.key for p in everyone], [str(r) for r in extra_roots])
    inputs = pool_inputs(
        store,
        pool,
        strategy,
        task,
        embedder,
        mc_pass,
        models.mc if mc_mode == "head" else None,
        budgeted=budget is not None,
        reduction=reduction,
    )
    reporter.progress("score", 0, len(pool))
    selection = strategy.select(budget, inputs)
    reporter.progress("score", len(pool), len(pool))
    ranking = ranking_of(pool, inputs.probs, selection.indices, selection.scores)
    labeled = int(pool.labeled.sum())
    roles: list[dict[str, Any]] = [
        {"key": p.key, "role": "task" if len(task) == 1 else "member"} for p in task
    ]
    if task[0].task != CLASSIFICATION:
        roles[0].update(reduction.record(task[0].task))
    if embedder is not None:
        roles.append({"key": embedder.key, "role": "embedding"})
    if mc_mode is not None:
        source = mc_pass.key if mc_pass is not None else task[0].key
        mc = models.mc
        roles.append({"key": source, "role": f"mc-dropout-{mc_mode}", "samples": mc.samples, "rate": mc.rate})
    run_id = store.record_run(
        root=str(root),
        model_key=task[0].key,
        strategy=strategy.name,
        params=strategy.get_params(),
        budget=budget,
        pool_size=len(pool),
        labeled_count=labeled,
        ranking=ranking,
        version=__version__,
        command=command,
        models=roles,
    )
    waiting = int((pool.exported & ~pool.labeled).sum()) if budget is not None else 0
    if not len(ranking) and waiting:
        reporter.warning(f"no image to rank: {all_pending_reason(waiting)}")
    elif not len(ranking):
        reporter.warning("no unlabeled images to score: the run is empty")
    return ScoreResult(
        embed=results[0],
        run_id=run_id,
        strategy=strategy.name,
        pool_size=len(pool),
        labeled=labeled,
        selected=len(ranking),
        embeds=results,
        labeled_syncs=labeled_syncs,
    )


def warn_prefilter_caps_budget(strategy: Strategy, budget: int | None, reporter: Reporter) -> None:
    """One warning when ``--prefilter STRATEGY:TOP`` keeps fewer candidates than ``--budget`` asks for:
    the run then ranks at most TOP images, which is easy to miss in a nightly export."""
    from alselect.strategies.compose import Prefiltered

    if isinstance(strategy, Prefiltered) and budget is not None and strategy.top < budget:
        reporter.warning(
            f"--prefilter {strategy.prefilter.name}:{strategy.top} keeps {strategy.top} candidate(s), "
            f"fewer than --budget {budget}: the run ranks at most {strategy.top}"
        )


def ranking_of(pool: PoolRows, probs: np.ndarray, indices: np.ndarray, scores: np.ndarray) -> Ranking:
    """The run's ranking: pool rows ``indices`` in annotate-first order, with the model's top class.

    A row of zeros (a detector's image without detections) has no class: -1, confidence NaN.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if probs.size:
        chosen = probs[indices]
        some = chosen.sum(axis=1) > 0
        predicted = np.where(some, chosen.argmax(axis=1), -1).astype(np.int32)
        confidence = np.where(some, chosen.max(axis=1), np.nan).astype(np.float32)
    else:
        predicted = np.full(len(indices), -1, dtype=np.int32)
        confidence = np.full(len(indices), np.nan, dtype=np.float32)
    keys = pool.keys if pool.keys is not None else content_keys(pool.sha256)
    return Ranking(
        image_ids=pool.image_ids[indices],
        keys=keys[indices],
        scores=np.asarray(scores, dtype=np.float64),
        predicted=predicted,
        confidence=confidence,
    )


def check_ensemble(task: Sequence[PreparedModel]) -> None:
    """Ensemble members must agree on their classes (count and, where named, names)."""
    if len(task) < 2:
        return
    counts = {p.model.num_classes for p in task if p.model.num_classes is not None}
    names = {tuple(p.model.classes) for p in task if p.model.classes is not None}
    if len(counts) > 1 or len(names) > 1:
        raise UsageError("ensemble members (--model given several times) must predict the same classes")


def check_task_run(strategy: Strategy, task: Sequence[PreparedModel], reduction: Reduction) -> None:
    """Detectors and segmenters: one model, no MC samples, a reduction that applies to the task."""
    kind = task[0].task
    if all(p.task == CLASSIFICATION for p in task):
        return
    if len(task) > 1:
        raise UsageError("ensembles (--model given several times) are supported for classifiers only")
    if "mc_probs" in strategy.needs:
        raise UsageError(
            f"strategy {strategy.name!r} needs several predictions per image, which alselect makes for "
            f"classifiers only; with a {kind} model use entropy, least-confidence, margin, ratio, random "
            "or a diversity strategy"
        )
    reduction.for_task(kind)


def check_outputs(strategy: Strategy, task: PreparedModel) -> None:
    """Refuse, before any work, a strategy that needs a per-image array the model does not produce."""
    missing = sorted(strategy.needs - STANDARD_INPUTS - task.model.output_names())
    if missing:
        hints = "; ".join(f"for {name}: {ARRAY_SOURCES[name]}" for name in missing if name in ARRAY_SOURCES)
        raise UsageError(
            f"strategy {strategy.name!r} needs {', '.join(missing)} per image, which checkpoint "
            f"{task.model.path} does not produce" + (f" ({hints})" if hints else "")
        )


def mc_source(strategy: Strategy, task: Sequence[PreparedModel], mc: McDropout) -> str | None:
    """How ``mc_probs`` are made for this run: None (not needed, or an ensemble), full or head."""
    if "mc_probs" not in strategy.needs or len(task) > 1:
        return None
    if mc.mode != "auto":
        if mc.mode == "full" and not dropout_layers(task[0].model.module):
            raise UsageError(
                "--mc-mode full needs a model with dropout layers (nn.Dropout, nn.Dropout1d/2d/3d) "
                "reachable in an alselect, state_dict or pickled checkpoint; use --mc-mode head"
            )
        return mc.mode
    return "full" if dropout_layers(task[0].model.module) else "head"


def full_pass_model(task: PreparedModel, samples: int) -> PreparedModel:
    """The task model's T consistent-mask dropout passes, stored under their own key.

    The passes hold no embedding, so they are keyed from the model with float32 embeddings: a
    ``--embedding-dtype float16`` run reuses them rather than making all T passes again."""
    outputs_key = task.key
    if task.embedding_dtype != "float32":
        outputs_key = precision_key(task.base_key or task.key, task.precision)
    return PreparedModel(
        model=task.model,
        preprocess=task.preprocess,
        key=mc_key(outputs_key, samples),
        runner=FullPassModel(task.model, samples),
        precision=task.precision,
        recipe=replace(task.recipe, mc_samples=samples) if task.recipe is not None else None,
        base_key=task.base_key or task.key,
        mc_samples=samples,
    )


def head_precision(task: PreparedModel) -> str:
    """The precision whose rounding the head check allows for: float16 embeddings round as an fp16
    forward does (11 significant bits), on top of the precision the probabilities were made in."""
    if task.precision == "fp32" and task.embedding_dtype != "float32":
        return "fp16"
    return task.precision


def pool_inputs(
    store: Store,
    pool: PoolRows,
    strategy: Strategy,
    task: Sequence[PreparedModel],
    embedder: PreparedModel | None,
    mc_pass: PreparedModel | None = None,
    mc_head: McDropout | None = None,
    *,
    budgeted: bool,
    reduction: Reduction = TASK_DEFAULTS,
) -> PoolInputs:
    """Load the arrays the strategy needs (and ``probs`` for the export), aligned with the pool.

    With a budget the run holds only N images: images already sent to annotators are left out,
    so each nightly run's N are new. Without one everything is ranked and export skips them.
    A detector's or segmenter's ``probs`` are its images' class shares and its per-image
    uncertainty scores come in ``arrays`` (``alselect.tasks.pool``).
    """
    needs = strategy.needs
    task_arrays: LazyArrays | None = None
    if task[0].task != CLASSIFICATION:
        first = task[0]
        probs, task_arrays = task_pool(store, pool, first.key, first.task, reduction, first.model.num_classes)
        members = [probs]
    else:
        members = [store.pool_array(pool, p.key, "probs") for p in task]
        probs = members[0] if len(members) == 1 else np.mean(np.stack(members, axis=1), axis=1)
    embeddings = None
    if "embeddings" in needs:
        source = embedder or task[0]
        layout = (store.model(source.key) or {}).get("outputs") or {}
        if layout and "embedding" not in layout:
            raise UsageError(
                f"strategy {strategy.name!r} compares embeddings, and model {source.display} gives none "
                "(its program returns no 'embedding'); add --embed-model CKPT for a backbone that does"
            )
        embeddings = store.pool_array(pool, source.key, "embedding")
    mc_probs = None
    if "mc_probs" in needs:
        if len(members) > 1:
            mc_probs = np.stack(members, axis=1)
        elif mc_pass is not None:
            mc_probs = store.pool_array(pool, mc_pass.key, "mc_probs").astype(np.float32)
        elif mc_head is not None:
            stored = store.pool_array(pool, task[0].key, "embedding")
            weight, bias = head_layer(task[0].model, probs, stored, precision=head_precision(task[0]))
            mc_probs = head_mc_probs(stored, weight, bias, mc_head.samples, mc_head.rate)
        else:
            raise UsageError(f"strategy {strategy.name!r} needs several predictions per image")
    arrays = {name: store.pool_array(pool, task[0].key, name) for name in sorted(needs - STANDARD_INPUTS)}
    return PoolInputs(
        probs=np.asarray(probs, dtype=np.float32),
        labeled=pool.labeled,
        embeddings=embeddings,
        pending=pool.exported & ~pool.labeled if budgeted else None,
        mc_probs=mc_probs,
        arrays=task_arrays.including(arrays) if task_arrays is not None else arrays,
    )
