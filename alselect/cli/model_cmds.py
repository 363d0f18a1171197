"""``embed`` and ``score``: the commands that run a model (torch is imported only here)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from alselect.cli.app import app, globals_of, reporter_for
from alselect.progress import Reporter

if TYPE_CHECKING:
    from alselect.pipeline import EmbedResult, ModelSpec, Safeguards

Folder = Annotated[Path, typer.Argument(help="Image folder (searched recursively).")]
Model = Annotated[
    list[Path],
    typer.Option("--model", "-m", help="Checkpoint file; give it several times for an ensemble."),
]
EmbedModel = Annotated[
    Path | None,
    typer.Option(
        help="Separate checkpoint whose embeddings diversity strategies use (probs stay --model's)."
    ),
]
EmbedArch = Annotated[str | None, typer.Option(help="Architecture of a plain state_dict --embed-model.")]
EmbedNumClasses = Annotated[
    int | None, typer.Option(min=1, help="Classes of a plain state_dict --embed-model.")
]
RetryFailed = Annotated[bool, typer.Option(help="Try again images that failed to decode or score before.")]
AllowEmpty = Annotated[
    bool, typer.Option(help="Accept a folder with no images where the store knew some (else exit 3).")
]
MaxFailed = Annotated[
    str | None,
    typer.Option(
        help="Exit 3 without recording a run when more than this share of images fails: 5% or 0.05."
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per model call.")]
Workers = Annotated[
    int | None, typer.Option(min=0, help="Decoding processes (default: min(4, CPUs)); 0 = none.")
]
ImageSize = Annotated[int | None, typer.Option(min=1, help="Crop size in pixels (overrides checkpoint).")]
Mean = Annotated[str | None, typer.Option(help="Normalisation mean R,G,B (0–1 scale).")]
Std = Annotated[str | None, typer.Option(help="Normalisation std R,G,B (0–1 scale).")]
Arch = Annotated[
    str | None, typer.Option(help="Architecture of a plain state_dict (small_cnn or torchvision).")
]
NumClasses = Annotated[int | None, typer.Option(min=1, help="Classes of a plain state_dict.")]
Trust = Annotated[bool, typer.Option(help="Allow arbitrary unpickling (only for checkpoints you trust).")]


def _spec(
    model: Path,
    arch: str | None,
    num_classes: int | None,
    trust: bool,
    image_size: int | None,
    mean: str | None,
    std: str | None,
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
    )


@app.command()
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
    retry_failed: RetryFailed = False,
    allow_empty: AllowEmpty = False,
    max_failed: MaxFailed = None,
) -> None:
    """Embed new or changed images (probabilities + penultimate features) into the store."""
    from alselect.embed import EmbedOptions
    from alselect.pipeline import embed_folder
    from alselect.store import Store

    specs = [_spec(m, arch, num_classes, trust_checkpoint, image_size, mean, std) for m in model]
    safeguards = _safeguards(allow_empty, max_failed)
    _check_inputs(folder, *model)
    with Store.open(globals_of(ctx).store, write=True, create=True) as store, reporter_for(ctx) as reporter:
        results = [
            embed_folder(
                store,
                folder,
                spec,
                EmbedOptions(device, batch_size, workers),
                reporter,
                retry_failed=retry_failed,
                safeguards=safeguards,
            )
            for spec in specs
        ]
        reporter.close()
        for result in results:
            _report_embed(reporter, result)


@app.command()
def score(
    ctx: typer.Context,
    folder: Folder,
    model: Model,
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="See 'alselect strategies'.")],
    budget: Annotated[int | None, typer.Option(min=1, help="Rank only the best N (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for strategies that draw at random.")] = 0,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Strategy option KEY=VALUE (repeatable), e.g. --param beta=10."),
    ] = None,
    prefilter: Annotated[
        str | None,
        typer.Option(help="STRATEGY:TOP: keep the TOP best by STRATEGY first, e.g. entropy:5000."),
    ] = None,
    balance_classes: Annotated[
        bool, typer.Option(help="Fill the batch round-robin over predicted classes.")
    ] = False,
    embed_model: EmbedModel = None,
    embed_arch: EmbedArch = None,
    embed_num_classes: EmbedNumClasses = None,
    labeled_dir: Annotated[
        list[Path] | None,
        typer.Option(help="Folder of already-labeled images (repeatable): context for coreset, DAL."),
    ] = None,
    mc_samples: Annotated[
        int, typer.Option(min=1, help="MC-dropout passes T for strategies that need several predictions.")
    ] = 20,
    mc_mode: Annotated[
        str,
        typer.Option(help="auto, full (T passes with the model's dropout) or head (on cached embeddings)."),
    ] = "auto",
    mc_dropout: Annotated[float, typer.Option(help="Dropout rate of head-only MC dropout.")] = 0.5,
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
) -> None:
    """Embed what is missing, then rank every unlabeled image and record the run."""
    from alselect.embed import EmbedOptions
    from alselect.pipeline import McDropout, ModelSpec, ScoreModels, score_folder
    from alselect.store import Store
    from alselect.strategies import parse_params, strategy_from_options

    chosen = strategy_from_options(
        strategy, seed=seed, params=parse_params(param), prefilter=prefilter, balance_classes=balance_classes
    )  # unknown names and bad options are usage errors before any work
    models = ScoreModels(
        task=[_spec(m, arch, num_classes, trust_checkpoint, image_size, mean, std) for m in model],
        embed=ModelSpec(embed_model, embed_arch, embed_num_classes, trust_checkpoint)
        if embed_model is not None
        else None,
        mc=McDropout(samples=mc_samples, mode=mc_mode, rate=mc_dropout),
    )
    safeguards = _safeguards(allow_empty, max_failed)
    command = shlex.join(["alselect", *sys.argv[1:]])
    _check_inputs(folder, *model, embed_model)
    for other in labeled_dir or []:
        _check_inputs(other)
    with Store.open(globals_of(ctx).store, write=True, create=True) as store, reporter_for(ctx) as reporter:
        result = score_folder(
            store,
            folder,
            models,
            chosen,
            budget=budget,
            options=EmbedOptions(device, batch_size, workers),
            reporter=reporter,
            command=command,
            labeled_dirs=labeled_dir or [],
            retry_failed=retry_failed,
            safeguards=safeguards,
        )
        reporter.close()
        for embedded in result.embeds:
            _report_embed(reporter, embedded)
        reporter.info(
            f"run {result.run_id}: {result.strategy} ranked {result.selected} of "
            f"{result.pool_size} image(s) ({result.labeled} labeled); "
            "next: alselect export --top N"
        )


def _check_inputs(folder: Path, *models: Path | None) -> None:
    """Fail on a missing folder or checkpoint before a store is created for nothing."""
    from alselect.discover import resolve_root
    from alselect.errors import CheckpointError

    resolve_root(folder)
    for model in models:
        if model is not None and not model.is_file():
            raise CheckpointError(f"checkpoint not found: {model}")


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


def _report_embed(reporter: Reporter, result: EmbedResult) -> None:
    sync = result.sync
    reporter.info(
        f"{sync.found} image file(s): {sync.new} new, {sync.moved} moved, {sync.changed} changed, "
        f"{sync.vanished} vanished; embedded {result.embedded} with model {result.model_display} "
        f"({result.already_embedded} already embedded)"
    )
    summary = result.failure_summary()
    if summary:
        reporter.warning(summary)
    problems = sync.problems
    if problems.unreadable_dirs:
        reporter.warning(
            f"{len(problems.unreadable_dirs)} unreadable folder(s) skipped, "
            f"e.g. {problems.unreadable_dirs[0]}"
        )
    if problems.undecodable_names:
        reporter.warning(f"{problems.undecodable_names} file name(s) that are not valid UTF-8 skipped")
