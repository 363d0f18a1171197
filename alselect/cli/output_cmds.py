"""``export`` and ``label``: what goes to annotators, and what came back."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, TextIO

import typer

from alselect.cli.app import app, globals_of, reporter_for
from alselect.errors import DataError


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
    top: Annotated[int | None, typer.Option(min=1, help="At most N images (default: all).")] = None,
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
    source: Annotated[str, typer.Argument(help="File of paths or CSV with a path column; - for stdin.")],
) -> None:
    """Mark images as annotated so they are never selected again."""
    from alselect.labels import import_labels
    from alselect.store import Store

    if source == "-":
        text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    else:
        try:
            text = Path(source).read_bytes().decode("utf-8")  # exact text: a CR inside a CSV field stays
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read label list {source}: {exc}") from exc
    with Store.open(globals_of(ctx).store, write=True) as store, reporter_for(ctx) as reporter:
        result = import_labels(store, text, source)
        if result.newly_labeled + result.already_labeled == 0 and (result.unknown or result.ambiguous):
            if not result.ambiguous:
                raise DataError(
                    f"none of the {result.requested} listed image(s) are in the store, "
                    f"e.g. {result.unknown[0]!r}"
                )
            raise DataError(
                f"none of the {result.requested} listed image(s) could be labeled: "
                f"{len(result.ambiguous)} match images in several folders, e.g. {result.ambiguous[0]!r} "
                f"(give absolute paths, or run from inside the image folder)"
                + (f"; {len(result.unknown)} are not in the store" if result.unknown else "")
            )
        reporter.info(f"labeled {result.newly_labeled} image(s) ({result.already_labeled} already labeled)")
        if result.unknown:
            sample = ", ".join(repr(p) for p in result.unknown[:3])
            reporter.warning(f"{len(result.unknown)} listed image(s) are not in the store: {sample}")
        if result.ambiguous:
            sample = ", ".join(repr(p) for p in result.ambiguous[:3])
            reporter.warning(
                f"{len(result.ambiguous)} listed path(s) match images in several folders and were not "
                f"labeled (give absolute paths, or run from inside the image folder): {sample}"
            )
