"""``preview``: a contact sheet of the next images to annotate (reads the store, records nothing)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from alselect.cli.app import app, examples, globals_of, reporter_for
from alselect.errors import UsageError


@app.command(
    epilog=examples(
        ("a contact sheet of the next 20 images", "alselect preview -o next.png"),
        (
            "the next 40, eight per row, to an image viewer",
            "alselect preview --top 40 --columns 8 -o - | display",
        ),
    )
)
def preview(
    ctx: typer.Context,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Image file to write (.png, .jpg or .webp); '-': PNG on stdout.",
        ),
    ],
    top: Annotated[int, typer.Option(min=1, help="How many of the next images to show.")] = 20,
    columns: Annotated[int, typer.Option(min=1, help="Thumbnails per row.")] = 5,
    thumb_size: Annotated[int, typer.Option(min=16, help="Thumbnail square, in pixels.")] = 160,
    include_exported: Annotated[bool, typer.Option(help="Also show images sent in earlier exports.")] = False,
) -> None:
    """Draw the next images 'export' would send, on one sheet.

    Each thumbnail is captioned with its rank, score and predicted label. Reads the store only.
    """
    from PIL import Image

    from alselect.exporters import atomic_output
    from alselect.preview import preview_latest
    from alselect.store import Store

    if output == "-":
        if sys.stdout.isatty():
            raise UsageError("refusing to write a PNG to a terminal: give -o FILE or redirect stdout")
        image_format = "PNG"
    else:
        suffix = Path(output).suffix.lower()
        image_format = Image.registered_extensions().get(suffix, "")
        if not image_format or image_format not in Image.SAVE:
            raise UsageError(f"cannot tell an image format from {output!r}: name it .png, .jpg or .webp")
    with reporter_for(ctx) as reporter:
        with Store.open(globals_of(ctx).store) as store:  # read only: the writer lock is not taken
            result = preview_latest(
                store,
                top=top,
                include_exported=include_exported,
                columns=columns,
                thumb_size=thumb_size,
                image_format=image_format,
                reporter=reporter,
            )
        if output == "-":
            result.image.save(sys.stdout.buffer, format=image_format)
            sys.stdout.buffer.flush()
        else:
            with atomic_output(Path(output), binary=True) as handle:
                result.image.save(handle, format=image_format)
        if result.unreadable:
            sample = ", ".join(f"{path!r} ({why})" for path, why in result.unreadable[:3])
            more = ", ..." if len(result.unreadable) > 3 else ""
            reporter.warning(
                f"{len(result.unreadable)} image(s) are not shown and are marked: {sample}{more}"
            )
        reporter.info(
            f"previewed the next {len(result.selection.rows)} image(s) of run {result.selection.run.id} "
            f"in {'stdout' if output == '-' else output} (nothing recorded)"
        )
