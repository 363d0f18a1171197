"""``train`` and ``benchmark``: fit a classifier, and simulate active learning on labeled data."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from alselect.cli.app import app, examples, globals_of, reporter_for

Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]


def _milestones(text: str | None) -> tuple[int, ...]:
    from alselect.errors import UsageError

    if not text:
        return ()
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UsageError(f"--milestones expects epochs like 160 or 80,120, got {text!r}") from None


def on_off(value: str, option: str) -> bool:
    """``on``/``off`` (also true/false, yes/no, 1/0) as a bool; anything else is a usage error."""
    from alselect.errors import UsageError

    lowered = value.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise UsageError(f"{option} expects on or off, got {value!r}")


@app.command(
    epilog=examples(
        ("a folder with one subfolder per class", "alselect train labeled/ -o model.pt --arch resnet18"),
        ("the classes stored by 'alselect label'", "alselect train --from-store -o model.pt --epochs 30"),
        ("with a learning-loss module", "alselect train labeled/ -o ll.pt --loss-prediction"),
    )
)
def train(
    ctx: typer.Context,
    source: Annotated[
        Path | None,
        typer.Argument(help="A folder with one subfolder per class, or a CSV with path,label columns."),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint file to write.")] = Path(
        "model.pt"
    ),
    from_store: Annotated[
        bool, typer.Option("--from-store", help="Train on the class labels recorded by 'alselect label'.")
    ] = False,
    root: Annotated[
        Path | None, typer.Option(help="Folder that CSV paths are relative to (default: the CSV's folder).")
    ] = None,
    label_column: Annotated[str, typer.Option(help="CSV column holding the class.")] = "label",
    arch: Annotated[
        str | None,
        typer.Option(
            help="small_cnn, resnet18_cifar or any torchvision classifier (default: --init's, else resnet18)."
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(help="Start from this checkpoint's weights (alselect checkpoint or state_dict)."),
    ] = None,
    trust_checkpoint: Annotated[bool, typer.Option(help="Allow arbitrary unpickling of --init.")] = False,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    lr: Annotated[float, typer.Option(help="Initial learning rate.")] = 0.01,
    batch_size: Annotated[int, typer.Option(min=2)] = 64,
    optimizer: Annotated[str, typer.Option(help="sgd (momentum) or adam.")] = "sgd",
    momentum: Annotated[float, typer.Option()] = 0.9,
    weight_decay: Annotated[float, typer.Option()] = 5e-4,
    schedule: Annotated[str, typer.Option(help="cosine, step (see --milestones) or constant.")] = "cosine",
    milestones: Annotated[
        str | None, typer.Option(help="Epochs where the step schedule multiplies the rate by 0.1, e.g. 160.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
    workers: Annotated[
        int | None, typer.Option(min=0, help="Decoding processes (default: min(4, CPUs)).")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of each class held out for validation.")] = 0.1,
    augment: Annotated[
        str, typer.Option(metavar="on|off", help="Random crop (S/8 padding) and horizontal flip.")
    ] = "on",
    image_size: Annotated[
        int | None, typer.Option(min=1, help="Crop size (default: --init's, else 32 for small models, 224).")
    ] = None,
    mean: Annotated[str | None, typer.Option(help="Normalisation mean R,G,B (default: ImageNet).")] = None,
    std: Annotated[str | None, typer.Option(help="Normalisation std R,G,B (default: ImageNet).")] = None,
    loss_prediction: Annotated[
        bool, typer.Option(help="Attach the learning-loss module (for --strategy learning-loss).")
    ] = False,
    lp_weight: Annotated[float, typer.Option(help="λ: weight of the loss-prediction loss.")] = 1.0,
    lp_margin: Annotated[float, typer.Option(help="ξ: margin of the pair ranking loss.")] = 1.0,
    lp_stop: Annotated[
        float, typer.Option(help="Share of epochs after which the module stops training the backbone.")
    ] = 0.6,
) -> None:
    """Train a classifier from labeled images into a checkpoint.

    Reads a folder with one subfolder per class, a CSV of path,label, or the class labels stored
    by 'alselect label' (--from-store); prints validation accuracy per epoch on stderr.
    """
    from alselect.datasets import csv_labels, image_folder, store_labels
    from alselect.errors import UsageError
    from alselect.preprocess import parse_triple
    from alselect.store import Store
    from alselect.train import TrainConfig, train_checkpoint

    if (source is None) == (not from_store):
        raise UsageError("give a class folder or a CSV, or --from-store (one of them)")
    config = TrainConfig(
        arch=arch,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        val_fraction=val_fraction,
        augment=on_off(augment, "--augment"),
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        milestones=_milestones(milestones),
        loss_prediction=loss_prediction,
        lp_weight=lp_weight,
        lp_margin=lp_margin,
        lp_stop_fraction=lp_stop,
        workers=workers,
    )
    config.check()
    mean_rgb, std_rgb = parse_triple(mean, "--mean"), parse_triple(std, "--std")
    if from_store:
        with Store.open(globals_of(ctx).store) as store:
            files = store_labels(store)
    elif source is not None and source.is_dir():
        files = image_folder(source)
    elif source is not None:
        files = csv_labels(source, root, label_column)
    with reporter_for(ctx) as reporter:
        if files.skipped:
            reporter.warning(
                f"{len(files.skipped)} labeled entr(ies) left out, "
                f"e.g. {files.skipped[0][0]}: {files.skipped[0][1]}"
            )
        summary = train_checkpoint(
            files,
            output,
            config,
            image_size=image_size,
            mean=mean_rgb,
            std=std_rgb,
            init=init,
            trust_checkpoint=trust_checkpoint,
            reporter=reporter,
        )
        reporter.close()
        accuracy = f"{summary.val_accuracy:.2%}" if summary.val_accuracy is not None else "not measured"
        reporter.info(
            f"wrote {summary.output}: {len(summary.classes)} classes, {summary.train_count} training and "
            f"{summary.val_count} validation image(s), validation accuracy {accuracy} "
            f"({summary.seconds:.0f} s)"
        )


@app.command(
    epilog=examples(
        ("the CPU preset on Fashion-MNIST", "alselect benchmark --preset fashion-mnist-cpu -o results/"),
        ("your own class folder", "alselect benchmark labeled/ -o results/ -s entropy -s coreset"),
    )
)
def benchmark(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Labeled data: a class folder (with train/ and test/ inside, or split here), "
            "or a folder of MNIST-style IDX files (default: the preset's)."
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Results folder (resumed if it exists).")
    ] = Path("benchmark"),
    preset: Annotated[str | None, typer.Option(help="seed-cifar10 or fashion-mnist-cpu.")] = None,
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy", "-s", help="Strategy to compare (repeatable; 'all' = every registered one)."
        ),
    ] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="Repetitions (seeds 0..N-1) (default: 3).")] = None,
    initial: Annotated[int | None, typer.Option(min=1, help="Random labeled images to start from.")] = None,
    step: Annotated[int | None, typer.Option(min=1, help="Images selected per cycle (k).")] = None,
    cycles: Annotated[
        int | None, typer.Option(min=1, help="Selection rounds after the initial training.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    arch: Annotated[
        str | None, typer.Option(help="small_cnn, resnet18_cifar, any torchvision classifier.")
    ] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option(min=2)] = None,
    pool_size: Annotated[
        int | None, typer.Option(min=1, help="Use a seeded subset of the training split as pool.")
    ] = None,
    test_size: Annotated[
        int | None, typer.Option(min=1, help="Use a seeded subset of the test split.")
    ] = None,
    image_size: Annotated[int | None, typer.Option(min=1, help="Crop size for image folders.")] = None,
    mc_samples: Annotated[
        int | None, typer.Option(min=1, help="MC-dropout passes for strategies needing them.")
    ] = None,
    mc_mode: Annotated[str | None, typer.Option(help="auto, full or head.")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="STRATEGY:KEY=VALUE strategy option (repeatable)."),
    ] = None,
    device: Device = "auto",
) -> None:
    """Simulate active learning: does a strategy beat random?

    Cycles of select, reveal labels, retrain, test; writes a per-cycle CSV, a summary and a
    learning-curve plot. Resumable: finished cycles are not run again.
    """
    from alselect.benchmark import BenchmarkOptions, resolve_options, run_benchmark

    options = resolve_options(
        preset,
        data=data,
        strategies=strategy,
        seeds=seeds,
        initial=initial,
        step=step,
        cycles=cycles,
        epochs=epochs,
        arch=arch,
        lr=lr,
        batch_size=batch_size,
        pool_size=pool_size,
        test_size=test_size,
        image_size=image_size,
        mc_samples=mc_samples,
        mc_mode=mc_mode,
        params=param or [],
        device=device,
    )
    assert isinstance(options, BenchmarkOptions)
    command = shlex.join(["alselect", *sys.argv[1:]])
    with reporter_for(ctx) as reporter:
        result = run_benchmark(options, output, reporter=reporter, command=command)
        reporter.close()
        typer.echo(result.summary_text, nl=False)
        for note in result.notes:
            reporter.info(note)
