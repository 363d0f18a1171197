"""``export`` and ``label``: what goes to annotators, and what came back."""

from __future__ import annotations

import contextlib
import io
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer

from alselect.cli.app import EXIT_PARTIAL, app, globals_of, reporter_for
from alselect.errors import DataError, NothingUsableError
from alselect.progress import Reporter

if TYPE_CHECKING:
    from alselect.labels import LabelResult


@contextlib.contextmanager
def utf8_stdout() -> Iterator[TextIO]:
    """stdout as UTF-8 with no newline translation, detached afterwards (stdout stays open)."""
    stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
    try:
        yield stream
    finally:
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
        with contextlib.suppress(ValueError):
            stream.detach()


@app.command()
def export(
    ctx: typer.Context,
    top: Annotated[int | None, typer.Option(min=1, help="At most N images [default: all].")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="csv, tsv, jsonl or paths.")] = "csv",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write here atomically instead of stdout ('-': stdout)."),
    ] = None,
    include_exported: Annotated[bool, typer.Option(help="Also list images sent in earlier exports.")] = False,
    absolute: Annotated[bool, typer.Option(help="Absolute paths instead of folder-relative.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Write the list but do not record it as exported.")] = False,
) -> None:
    """Write the latest run's ranking (rank 1 = annotate first) and remember what was sent."""
    from alselect.export import export_latest
    from alselect.exporters import get_exporter
    from alselect.store import Store

    get_exporter(format)  # an unknown format is a usage error, before the store is touched
    if output is not None and str(output) == "-":
        output = None  # the usual spelling of stdout, not a file named '-'

    with (
        Store.open(globals_of(ctx).store, write=True) as store,
        reporter_for(ctx) as reporter,
        utf8_stdout() as stdout,
    ):
        result = export_latest(
            store,
            format,
            top=top,
            output=output,
            stdout=lambda: stdout,
            include_exported=include_exported,
            absolute=absolute,
            record=not dry_run,
        )
        if result.skipped_unwritable:
            reporter.warning(
                f"{result.skipped_unwritable} path(s) cannot be written as {format} "
                "(they contain a newline); use csv or jsonl"
            )
        note = "" if result.recorded else " (not recorded)"
        reporter.info(
            f"exported {result.written} image(s) from run {result.run_id} to "
            f"{'stdout' if result.destination == '-' else result.destination}{note}"
        )


@app.command()
def label(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(help="A path list, an export, or a platform's annotation export; - for stdin.")
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="auto (detect from content), paths, csv, tsv, jsonl, label-studio, cvat or coco.",
        ),
    ] = "auto",
    folder: Annotated[
        Path | None,
        typer.Option(
            "--folder",
            help="Relative paths are relative to DIR (a scored folder, or a folder above one); "
            "a folder column in the input wins.",
        ),
    ] = None,
    uri_prefix: Annotated[
        str | None,
        typer.Option("--uri-prefix", help="The prefix given at export: image URLs starting with it map back"),
    ] = None,
) -> None:
    """Mark images as annotated (with their class, where the input has one) so they are never
    selected again. Exit 3: no item matched an image; 4: some did, the others are reported."""
    from alselect.annotations import get_reader
    from alselect.labels import import_labels
    from alselect.store import Store

    if format != "auto":
        get_reader(format)  # an unknown format is a usage error, before anything is read
    if source == "-":
        text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    else:
        try:
            text = Path(source).read_bytes().decode("utf-8")  # exact text: a CR inside a CSV field stays
        except (OSError, UnicodeDecodeError) as exc:
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
