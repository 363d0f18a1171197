"""``embed`` and ``score``: the commands that run a model (torch is imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

import typer

from alselect.cli.app import app, command_line, examples, globals_of, help_field, reporter_for
from alselect.limits import DEFAULT_MAX_PIXELS
from alselect.progress import Reporter

if TYPE_CHECKING:
    from alselect.discover import WalkProblems
    from alselect.embed import EmbedOptions
    from alselect.pipeline import EmbedResult, ModelSpec, Safeguards

Folder = Annotated[Path, typer.Argument(metavar="DIR", help="Image folder (searched recursively).")]
Model = Annotated[
    list[Path],
    typer.Option(
        "--model", "-m", metavar="CKPT", help="Checkpoint file; give it several times for an ensemble."
    ),
]
EmbedModel = Annotated[
    Path | None,
    typer.Option(
        metavar="CKPT",
        help="Separate checkpoint whose embeddings diversity strategies use (probs stay --model's).",
    ),
]
EmbedArch = Annotated[
    str | None, typer.Option(metavar="NAME", help="Architecture of a plain state_dict --embed-model.")
]
EmbedNumClasses = Annotated[
    int | None, typer.Option(min=1, help="Classes of a plain state_dict --embed-model.")
]
RetryFailed = Annotated[
    bool, typer.Option("--retry-failed", help="Try again images that failed to decode or score before.")
]
AllowEmpty = Annotated[
    bool,
    typer.Option(
        "--allow-empty", help="Accept a folder with no images where the store knew some (else exit 3)."
    ),
]
MaxFailed = Annotated[
    str | None,
    typer.Option(
        metavar="SHARE",
        help="Exit 3 without recording a run when more than this share of images fails: 5% or 0.05.",
    ),
]
Device = Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per model call.")]
Workers = Annotated[
    int | None,
    typer.Option(
        min=0, help="Decoding processes (default: CPUs - 1 with a GPU, else half the CPUs); 0 = none."
    ),
]
Threads = Annotated[
    int | None, typer.Option(min=1, help="Torch threads of the model (default: the CPUs decoding leaves).")
]
Precision = Annotated[
    str,
    typer.Option(
        metavar="P",
        help="auto, fp32, bf16 or fp16 (auto: bf16 on GPUs and CPUs that compute it natively, else fp32).",
    ),
]
EmbeddingDtype = Annotated[
    str,
    typer.Option(
        metavar="DTYPE",
        help="float32 or float16: the number format embeddings are stored in (float16: half the disk "
        "and load time, ~3 significant digits; a model's outputs in each format are kept apart).",
    ),
]
Decode = Annotated[
    str,
    typer.Option(
        metavar="WHERE",
        help="auto, cpu or gpu: where JPEGs are decoded (auto: in batches on the GPU the model runs on).",
    ),
]
Compile = Annotated[
    bool,
    typer.Option("--compile", help="Run the model through torch.compile (slower start, faster batches)."),
]
ImageSize = Annotated[int | None, typer.Option(min=1, help="Crop size in pixels (overrides checkpoint).")]
Mean = Annotated[str | None, typer.Option(metavar="R,G,B", help="Normalisation mean (0–1 scale).")]
Std = Annotated[str | None, typer.Option(metavar="R,G,B", help="Normalisation std (0–1 scale).")]
Arch = Annotated[
    str | None,
    typer.Option(metavar="NAME", help="Architecture of a plain state_dict: small_cnn or a torchvision name."),
]
NumClasses = Annotated[int | None, typer.Option(min=1, help="Classes of a plain state_dict.")]
Trust = Annotated[
    bool,
    typer.Option("--trust-checkpoint", help="Allow arbitrary unpickling (only for checkpoints you trust)."),
]
MaxPixels = Annotated[
    int,
    typer.Option(
        min=1,
        help="Fail images with more pixels than this as decompression bombs (default: 500 million).",
        show_default=False,
    ),
]
Strategy = Annotated[
    str, typer.Option("--strategy", "-s", metavar="NAME", help="Acquisition strategy: one of those below.")
]


def _strategy_names() -> str:
    """The strategy names, wrapped at commas only (a name such as kl-disagreement stays whole)."""
    import textwrap

    from alselect.strategies import available

    lines = textwrap.wrap(", ".join(available()), 74, break_on_hyphens=False, break_long_words=False)
    return "\n".join(f"  {line}" for line in lines)


help_field("strategies", _strategy_names)
Task = Annotated[
    str | None,
    typer.Option(
        help="classification, detection or segmentation [default: from the checkpoint, else classification]."
    ),
]
MaxDetections = Annotated[int, typer.Option(min=1, help="Detection: boxes kept per image (highest scores).")]
Engine = Annotated[
    str,
    typer.Option(help="local, or ray: run the model on a Ray cluster (needs the ray extra of alselect)."),
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start a local one)."),
]
RayActors = Annotated[
    int | None,
    typer.Option(min=1, help="Model actors (default: one per GPU of the cluster, else half its CPUs)."),
]
RayGpusPerActor = Annotated[
    float | None,
    typer.Option(min=0, help="GPUs per model actor, may be fractional (default: 1 if the cluster has GPUs)."),
]


def _spec(
    model: Path,
    arch: str | None,
    num_classes: int | None,
    trust: bool,
    image_size: int | None,
    mean: str | None,
    std: str | None,
    task: str | None = None,
    max_detections: int = 100,
) -> ModelSpec:
    from alselect.pipeline import ModelSpec
    from alselect.preprocess import parse_triple

    return ModelSpec(
        checkpoint=model,
        arch=arch,
        num_classes=num_classes,
        trust_checkpoint=trust,
        image_size=image_size,
        mean=parse_triple(mean, "--mean"),
        std=parse_triple(std, "--std"),
        task=task,
        max_detections=max_detections,
    )


@app.command(
    epilog=examples(
        (
            "embed with an alselect, TorchScript or torch.export checkpoint",
            "alselect embed photos/ -m model.pt",
        ),
        (
            "a plain state_dict needs its architecture",
            "alselect embed photos/ -m weights.pth --arch resnet50 --num-classes 10",
        ),
    )
)
def embed(
    ctx: typer.Context,
    folder: Folder,
    model: Model,
    device: Device = "auto",
    batch_size: BatchSize = 64,
    workers: Workers = None,
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    trust_checkpoint: Trust = False,
    task: Task = None,
    max_detections: MaxDetections = 100,
    retry_failed: RetryFailed = False,
    allow_empty: AllowEmpty = False,
    max_failed: MaxFailed = None,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    precision: Precision = "auto",
    embedding_dtype: EmbeddingDtype = "float32",
    compile: Compile = False,
    threads: Threads = None,
    decode: Decode = "auto",
    engine: Engine = "local",
    ray_address: RayAddress = None,
    ray_actors: RayActors = None,
    ray_gpus_per_actor: RayGpusPerActor = None,
) -> None:
    """Embed new or changed images into the store.

    Stores each image's class probabilities and penultimate features; files this model has
    seen before (by content) are not run again.
    """
    from alselect.embed import open_engine
    from alselect.pipeline import embed_folder
    from alselect.store import Store

    specs = [
        _spec(m, arch, num_classes, trust_checkpoint, image_size, mean, std, task, max_detections)
        for m in model
    ]
    safeguards = _safeguards(allow_empty, max_failed)
    options = _options(
        device,
        batch_size,
        workers,
        engine,
        ray_address,
        ray_actors,
        ray_gpus_per_actor,
        max_pixels,
        speed=Speed(precision, compile, threads, decode, embedding_dtype),
    )
    _check_inputs(folder, *model)
    _check_memory(batch_size, workers, image_size, device)
    with (
        Store.open(globals_of(ctx).store, write=True, create=True) as store,
        reporter_for(ctx) as reporter,
        open_engine(options) as running,
    ):
        results = [
            embed_folder(
                store,
                folder,
                spec,
                options,
                reporter,
                retry_failed=retry_failed,
                safeguards=safeguards,
                engine=running,
            )
            for spec in specs
        ]
        reporter.close()
        for result in results:
            _report_embed(reporter, result)


@app.command(
    epilog="\b\nStrategies ('alselect strategies' says what each needs and scores):\n{strategies}\n\n"
    + examples(
        ("rank every unlabeled image", "alselect score photos/ -m model.pt -s entropy"),
        (
            "nightly: rank 500 images not sent before",
            "alselect score photos/ -m model.pt -s margin --budget 500",
        ),
        ("then write what to annotate", "alselect export --top 500 -o batch.csv"),
    )
)
def score(
    ctx: typer.Context,
    folder: Folder,
    model: Model,
    strategy: Strategy,
    budget: Annotated[int | None, typer.Option(min=1, help="Rank only the best N (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for strategies that draw at random.")] = 0,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", metavar="KEY=VALUE", help="Strategy option (repeatable), e.g. --param beta=10."
        ),
    ] = None,
    prefilter: Annotated[
        str | None,
        typer.Option(metavar="STRATEGY:TOP", help="Keep the TOP best by STRATEGY first, e.g. entropy:5000."),
    ] = None,
    balance_classes: Annotated[
        bool, typer.Option("--balance-classes", help="Fill the batch round-robin over predicted classes.")
    ] = False,
    embed_model: EmbedModel = None,
    embed_arch: EmbedArch = None,
    embed_num_classes: EmbedNumClasses = None,
    labeled_dir: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="DIR", help="Folder of already-labeled images (repeatable): context for coreset, DAL."
        ),
    ] = None,
    mc_samples: Annotated[
        int, typer.Option(min=1, help="MC-dropout passes T for strategies that need several predictions.")
    ] = 20,
    mc_mode: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help="auto, full (T passes with the model's dropout) or head (on cached embeddings).",
        ),
    ] = "auto",
    mc_dropout: Annotated[float, typer.Option(help="Dropout rate of head-only MC dropout.")] = 0.5,
    task: Task = None,
    max_detections: MaxDetections = 100,
    reduce: Annotated[
        str | None,
        typer.Option(
            help="Per-image reduction: detection max|mean|sum [max], segmentation mean|topq [mean]."
        ),
    ] = None,
    score_threshold: Annotated[
        float, typer.Option(help="Detection: boxes scoring below this are left out of the uncertainty.")
    ] = 0.05,
    detection_threshold: Annotated[
        float,
        typer.Option(
            help="Detection: boxes at or above this are detections (class, count, pre-annotations)."
        ),
    ] = 0.5,
    empty_score: Annotated[
        str, typer.Option(help="Detection: score of images without boxes: min (0), max, or a number.")
    ] = "min",
    top_percent: Annotated[
        float, typer.Option(help="Segmentation --reduce topq: mean over the top Q% most uncertain pixels.")
    ] = 10.0,
    device: Device = "auto",
    batch_size: BatchSize = 64,
    workers: Workers = None,
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    trust_checkpoint: Trust = False,
    retry_failed: RetryFailed = False,
    allow_empty: AllowEmpty = False,
    max_failed: MaxFailed = None,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    precision: Precision = "auto",
    embedding_dtype: EmbeddingDtype = "float32",
    compile: Compile = False,
    threads: Threads = None,
    decode: Decode = "auto",
    engine: Engine = "local",
    ray_address: RayAddress = None,
    ray_actors: RayActors = None,
    ray_gpus_per_actor: RayGpusPerActor = None,
) -> None:
    """Rank the unlabeled images of a folder and record the run.

    Embeds what is missing first; 'alselect export' then writes the ranking.
    """
    from alselect.pipeline import McDropout, ModelSpec, ScoreModels, score_folder
    from alselect.store import Store
    from alselect.strategies import parse_params, strategy_from_options
    from alselect.tasks import Reduction, check_task

    chosen = strategy_from_options(
        strategy, seed=seed, params=parse_params(param), prefilter=prefilter, balance_classes=balance_classes
    )  # unknown names and bad options are usage errors before any work
    check_task(task)
    reduction = Reduction(
        reduce=reduce,
        score_threshold=score_threshold,
        detection_threshold=detection_threshold,
        empty_score=empty_score,
        top_percent=top_percent,
    )
    models = ScoreModels(
        task=[
            _spec(m, arch, num_classes, trust_checkpoint, image_size, mean, std, task, max_detections)
            for m in model
        ],
        embed=ModelSpec(embed_model, embed_arch, embed_num_classes, trust_checkpoint)
        if embed_model is not None
        else None,
        mc=McDropout(samples=mc_samples, mode=mc_mode, rate=mc_dropout),
    )
    safeguards = _safeguards(allow_empty, max_failed)
    options = _options(
        device,
        batch_size,
        workers,
        engine,
        ray_address,
        ray_actors,
        ray_gpus_per_actor,
        max_pixels,
        speed=Speed(precision, compile, threads, decode, embedding_dtype),
    )
    command = command_line()
    _check_inputs(folder, *model, embed_model)
    for other in labeled_dir or []:
        _check_inputs(other)
    _check_memory(batch_size, workers, image_size, device)
    with Store.open(globals_of(ctx).store, write=True, create=True) as store, reporter_for(ctx) as reporter:
        result = score_folder(
            store,
            folder,
            models,
            chosen,
            budget=budget,
            options=options,
            reporter=reporter,
            command=command,
            labeled_dirs=labeled_dir or [],
            retry_failed=retry_failed,
            safeguards=safeguards,
            reduction=reduction,
        )
        reporter.close()
        for i, embedded in enumerate(result.embeds):  # one scan: its skipped paths said once
            _report_embed(reporter, embedded, walk=i == 0)
        for labeled_folder, labeled_sync in result.labeled_syncs:
            _report_walk(reporter, labeled_sync.problems, labeled_folder)
        counts = result.embeds[0].counts if result.embeds else None
        duplicates = (
            f"; {counts.duplicates} duplicate file(s) counted once" if counts and counts.duplicates else ""
        )
        reporter.info(
            f"run {result.run_id}: {result.strategy} ranked {result.selected} of "
            f"{result.pool_size} image(s) ({result.labeled} labeled){duplicates}"
            + ("; next: alselect export --top N" if result.selected else "")
        )


def _check_inputs(folder: Path, *models: Path | None) -> None:
    """Fail on a missing folder, or a checkpoint that is missing or no checkpoint, before any work."""
    from alselect.checkpoints.identify import check_checkpoint_path
    from alselect.discover import resolve_root

    resolve_root(folder)
    for model in models:
        if model is not None:
            check_checkpoint_path(model)


def _check_memory(batch_size: int, workers: int | None, image_size: int | None, device: str = "auto") -> None:
    """Options that cannot fit in memory are a usage error up front (``alselect.limits``).

    Without ``--image-size`` the size comes from the checkpoint: checked once that is loaded (with
    ``--device auto``, also once it is known whether there is a GPU, which sets the default workers).
    """
    from alselect.limits import check_batch_memory, check_image_size, default_workers

    if image_size is not None:
        check_image_size(image_size)
        default = default_workers(accelerator=device.startswith("cuda"))
        check_batch_memory(batch_size, image_size, default if workers is None else workers)


def _options(
    device: str,
    batch_size: int,
    workers: int | None,
    engine: str,
    ray_address: str | None,
    ray_actors: int | None,
    ray_gpus_per_actor: float | None,
    max_pixels: int,
    *,
    speed: Speed,
) -> EmbedOptions:
    from alselect.embed import EmbedOptions, RayOptions
    from alselect.errors import UsageError

    ray = RayOptions(ray_address, ray_actors, ray_gpus_per_actor)
    if engine != "ray" and ray != RayOptions():
        raise UsageError("--ray-address, --ray-actors and --ray-gpus-per-actor need --engine ray")
    options = EmbedOptions(
        device,
        batch_size,
        workers,
        max_pixels,
        precision=speed.precision,
        compile=speed.compile,
        threads=speed.threads,
        decode=speed.decode,
        embedding_dtype=speed.embedding_dtype,
        engine=engine,
        ray=ray,
    )
    options.check()  # before the store is opened or the folder scanned, whatever is embedded already
    return options


class Speed(NamedTuple):
    """``embed`` and ``score``'s ``--precision``, ``--compile``, ``--threads``, ``--decode`` and
    ``--embedding-dtype``."""

    precision: str
    compile: bool
    threads: int | None
    decode: str
    embedding_dtype: str = "float32"


def _safeguards(allow_empty: bool, max_failed: str | None) -> Safeguards:
    from alselect.pipeline import Safeguards

    return Safeguards(allow_empty=allow_empty, max_failed=parse_share(max_failed))


def parse_share(text: str | None) -> float | None:
    """``5%`` or ``0.05`` → 0.05; a usage error otherwise."""
    from alselect.errors import UsageError

    if text is None:
        return None
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"--max-failed expects a share like 5% or 0.05, got {text!r}") from None
    if not 0 <= value <= 1:
        raise UsageError(f"--max-failed must be between 0% and 100%, got {text!r}")
    return value


def _report_embed(reporter: Reporter, result: EmbedResult, walk: bool = True) -> None:
    """A model's summary line and warnings; ``walk``: also what its folder scan skipped."""
    sync, counts = result.sync, result.counts
    files = f"files {counts.describe()}; " if counts else ""  # status's wording and counts
    reporter.info(
        f"{sync.found} image file(s): {sync.new} new, {sync.moved} moved, {sync.changed} changed, "
        f"{sync.restored} restored, {sync.unchanged} unchanged; {sync.vanished} vanished"
        + (f", {sync.copies_removed} duplicate copy(ies) removed" if sync.copies_removed else "")
        + f"; {files}"
        f"embedded {result.embedded} with model {result.model_display} "
        f"({result.already_embedded} already embedded)"
    )
    summary = result.failure_summary()
    if summary:
        reporter.warning(summary)
    if walk:
        _report_walk(reporter, sync.problems)


def _report_walk(reporter: Reporter, problems: WalkProblems, folder: str | None = None) -> None:
    """What a folder scan skipped; paths relative to the scanned folder, or under ``folder``."""

    def shown(relpath: str) -> str:
        return relpath if folder is None else f"{folder.rstrip('/')}/{relpath}"

    if problems.unreadable_dirs:
        reporter.warning(
            f"{len(problems.unreadable_dirs)} unreadable folder(s) skipped, "
            f"e.g. {shown(problems.unreadable_dirs[0])}"
        )
    if problems.special_files:
        reporter.warning(
            f"{len(problems.special_files)} image-named path(s) that are no regular file (FIFO, socket, "
            f"device) skipped, e.g. {shown(problems.special_files[0])}"
        )
