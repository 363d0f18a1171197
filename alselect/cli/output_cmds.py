"""``export`` and ``label``: what goes to annotators, and what came back."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from alselect.cli.app import EXIT_PARTIAL, app, command_line, data_stdout, examples, globals_of, reporter_for
from alselect.errors import DataError, NothingUsableError, OutputClosedError
from alselect.progress import Reporter

if TYPE_CHECKING:
    from alselect.labels import LabelResult

PLATFORM = "Platform formats (see README: Labeling platforms)"


@app.command(
    epilog=examples(
        ("the 500 images to annotate first, as CSV", "alselect export --top 500 -o batch.csv"),
        ("look at the next 20 without recording them as sent", "alselect export --top 20 --dry-run"),
        ("a Label Studio import with the model's guesses", "alselect export -f label-studio --predictions"),
    )
)
def export(
    ctx: typer.Context,
    top: Annotated[int | None, typer.Option(min=1, help="At most N images (default: all).")] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="csv, tsv, jsonl, paths, or a platform: label-studio, cvat, labelbox, superannotate, "
            "sagemaker, fiftyone.",
        ),
    ] = "csv",
    output: Annotated[
        str | None,  # text, not Path: a trailing '/' (a folder for multi-file formats) must survive
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Write here atomically instead of stdout ('-': stdout). Formats that write several "
            "files take a folder (DIR/) or a prefix.",
        ),
    ] = None,
    include_exported: Annotated[bool, typer.Option(help="Also list images sent in earlier exports.")] = False,
    absolute: Annotated[bool, typer.Option(help="Absolute paths instead of folder-relative.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Write the list but do not record it as exported.")] = False,
    fail_if_empty: Annotated[
        bool,
        typer.Option(help="Exit 3, writing nothing, when there is nothing left to export (for cron)."),
    ] = False,
    uri_prefix: Annotated[
        str | None,
        typer.Option(
            metavar="URI",
            help="Base URI of the scored folder (s3://bucket/pool/, https://host/pool/): images become "
            "this + their relative path (URL-encoded for http/https).",
            rich_help_panel=PLATFORM,
        ),
    ] = None,
    document_root: Annotated[
        Path | None,
        typer.Option(
            "--ls-document-root",
            "--document-root",
            help="label-studio local-files URLs and cvat names are relative to this folder "
            "(default: the scored folder).",
            rich_help_panel=PLATFORM,
        ),
    ] = None,
    predictions: Annotated[
        bool,
        typer.Option(
            help="label-studio: add the model's top class as a prediction (pre-annotation).",
            rich_help_panel=PLATFORM,
        ),
    ] = False,
    ls_from_name: Annotated[
        str,
        typer.Option(
            metavar="NAME", help="label-studio: the Choices control's name.", rich_help_panel=PLATFORM
        ),
    ] = "label",
    ls_to_name: Annotated[
        str,
        typer.Option(metavar="NAME", help="label-studio: the Image object's name.", rich_help_panel=PLATFORM),
    ] = "image",
    ls_config: Annotated[
        Path | None,
        typer.Option(
            help="label-studio: check predictions against this labeling config (XML) before writing; "
            "needs label-studio-sdk (pip install 'alselect[label-studio]').",
            rich_help_panel=PLATFORM,
        ),
    ] = None,
    ls_print_config: Annotated[
        bool,
        typer.Option(
            help="label-studio: print a classification labeling config matching the model's classes "
            "and the --ls-*-name options, then exit (nothing is exported).",
            rich_help_panel=PLATFORM,
        ),
    ] = False,
) -> None:
    """Write the latest run's ranking, best first, and remember it.

    Rank 1 = annotate first. Labeled images and those sent in earlier exports are left out.
    """
    from alselect.export import export_latest, run_info
    from alselect.exporters import ExportOptions, get_exporter
    from alselect.exporters.base import check_options
    from alselect.store import Store

    get_exporter(format)  # an unknown format is a usage error, before the store is touched
    if output == "-":
        output = None  # the usual spelling of stdout, not a file named '-'
    config_text = None
    if ls_config is not None:
        try:
            config_text = ls_config.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read labeling config {ls_config}: {exc}") from exc
    options = ExportOptions(
        uri_prefix=uri_prefix,
        absolute=absolute,
        document_root=document_root,
        predictions=predictions,
        ls_from_name=ls_from_name,
        ls_to_name=ls_to_name,
        ls_config=config_text,
    )
    if ls_print_config:
        from alselect.exporters.label_studio import classification_config
        from alselect.tasks.export import detection_config, detection_role

        with Store.open(globals_of(ctx).store) as store:  # read only
            run = run_info(store)
        detection = detection_role({"models": run.models}) is not None
        config = detection_config if detection else classification_config
        sys.stdout.write(config(run.class_names, ls_from_name, ls_to_name))
        return

    check_options(type(get_exporter(format)), options)  # before the store is opened
    with (
        Store.open(globals_of(ctx).store, write=not dry_run) as store,  # a dry run only reads
        reporter_for(ctx) as reporter,
        data_stdout() as stdout,
    ):
        # Issue 5: an export records what it delivered, so a reader that goes away (broken pipe,
        # `| head -1`) is one line saying nothing was recorded; other commands end quietly.
        try:
            result = export_latest(
                store,
                format,
                top=top,
                output=output,
                stdout=lambda: stdout,
                include_exported=include_exported,
                record=not dry_run,
                options=options,
                fail_if_empty=fail_if_empty,
                command=command_line(),
            )
        except BrokenPipeError as exc:
            raise OutputClosedError(
                "the reader closed stdout before the export was complete (broken pipe); nothing was "
                "recorded as exported. To look at the next images without recording them: "
                "'alselect export --dry-run | head'"
            ) from exc
        if result.skipped:
            reasons = Counter(why for _, why in result.skipped)
            for why, count in reasons.most_common():
                first = next(path for path, reason in result.skipped if reason == why)
                reporter.warning(
                    f"{count} image(s) left out of the {format} export and not recorded: {why} "
                    f"(e.g. {first!r})"
                )
        if result.empty_reason:
            reporter.warning(result.empty_reason)
        note = "" if result.recorded else " (not recorded)"
        where = ", ".join(result.files) or ("stdout" if result.destination == "-" else result.destination)
        reporter.info(f"exported {result.written} image(s) from run {result.run_id} to {where}{note}")
        if result.sidecar:
            reporter.info(f"run details in {result.sidecar}")
        for line in result.notes:
            reporter.info(line)


@app.command(
    epilog=examples(
        ("an export, once its images are annotated", "alselect label batch.csv"),
        ("a list of paths, one per line", "find done/ -name '*.jpg' | alselect label -"),
        ("a Label Studio JSON export, with classes", "alselect label project-1.json"),
    )
)
def label(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            metavar="FILE", help="A path list, an export, or a platform's annotation export; - for stdin."
        ),
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="auto (detect from content), paths, csv, tsv, jsonl, label-studio, cvat or coco.",
        ),
    ] = "auto",
    folder: Annotated[
        Path | None,
        typer.Option(
            "--folder",
            metavar="DIR",
            help="Relative paths are relative to DIR (a scored folder, or a folder above one); "
            "a folder column in the input wins.",
        ),
    ] = None,
    uri_prefix: Annotated[
        str | None,
        typer.Option(
            "--uri-prefix",
            metavar="URI",
            help="The prefix given at export: image URLs starting with it map back.",
        ),
    ] = None,
) -> None:
    """Mark images as annotated so they are never selected again.

    Records their class too, where the input has one. Exit 3: no item matched an image; 4: some
    did, the others are reported.
    """
    from alselect.annotations import get_reader
    from alselect.labels import import_labels
    from alselect.store import Store
    from alselect.uris import check_uri_prefix

    if format != "auto":
        get_reader(format)  # an unknown format is a usage error, before anything is read
    if uri_prefix is not None:
        check_uri_prefix(uri_prefix)
    if source == "-":
        text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    else:
        try:
            # exact text: a CR inside a CSV field stays; names that are not UTF-8 keep their bytes
            text = Path(source).read_bytes().decode("utf-8", errors="surrogateescape")
        except OSError as exc:
            raise DataError(f"cannot read label list {source}: {exc}") from exc
    with Store.open(globals_of(ctx).store, write=True) as store, reporter_for(ctx) as reporter:
        result = import_labels(
            store,
            text,
            source,
            fmt=format,
            folder=None if folder is None else str(folder),
            uri_prefix=uri_prefix,
        )
        report_labels(result, reporter)
    if not result.complete:
        raise typer.Exit(EXIT_PARTIAL)


def sample(refs: list[str]) -> str:
    return ", ".join(repr(ref) for ref in refs[:3]) + (", ..." if len(refs) > 3 else "")


AMBIGUOUS_HINT = "pass --folder DIR, give absolute paths, or run from inside the image folder"


def report_labels(result: LabelResult, reporter: Reporter) -> None:
    """One info line, then one line per kind of problem; nothing matched at all is an error (exit 3),
    after the reader's notes (they often say why)."""
    if result.newly_labeled + result.already_labeled == 0 and not result.complete:
        for note in result.notes:
            reporter.warning(note)
        problems = []
        if result.unknown:
            problems.append(f"{len(result.unknown)} are not in the store (e.g. {result.unknown[0]!r})")
        if result.ambiguous:
            problems.append(
                f"{len(result.ambiguous)} match images in several folders "
                f"(e.g. {result.ambiguous[0]!r}; {AMBIGUOUS_HINT})"
            )
        listed = f"none of the {result.requested} listed image(s) could be labeled"
        raise NothingUsableError(f"{listed}: {'; '.join(problems)}")
    summary = f"labeled {result.newly_labeled} image(s) ({result.already_labeled} already labeled)"
    if result.with_class:
        summary += f"; {result.with_class} with a class"
        if result.reclassified:
            summary += f", {result.reclassified} of them changed"
    reporter.info(f"{summary} from {result.format} input")
    if result.skipped:
        reasons = Counter(reason for _, reason in result.skipped)
        reporter.info(
            f"{len(result.skipped)} item(s) are not labels and were left out: "
            + ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
            + f" (e.g. {result.skipped[0][0]!r})"
        )
    for note in result.notes:
        reporter.warning(note)
    if result.unknown:
        count = len(result.unknown)
        reporter.warning(f"{count} listed image(s) are not in the store: {sample(result.unknown)}")
    if result.ambiguous:
        reporter.warning(
            f"{len(result.ambiguous)} listed path(s) match images in several folders and were not "
            f"labeled ({AMBIGUOUS_HINT}): {sample(result.ambiguous)}"
        )
    if result.conflicting:
        reporter.warning(
            f"{len(result.conflicting)} listed image(s) were given different classes and are labeled "
            f"without a class: {sample(result.conflicting)}"
        )
