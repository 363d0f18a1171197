"""A contact sheet of the next images to annotate (what ``export`` would send now), with Pillow only.

Layout: ``columns`` cells per row in rank order, left to right then top to bottom. Each cell is
``thumb_size + 2 * PAD`` wide and ``thumb_size + 2 * PAD + CAPTION`` high: the thumbnail (EXIF
orientation applied, aspect kept; images under half the square enlarged by a whole factor) centred
in a ``thumb_size`` square at ``(PAD, PAD)``, then two caption lines, ``#rank  score`` and the
predicted label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont, ImageOps

from alselect.errors import UsageError
from alselect.export import NothingToExport, Selection, explain_empty, select_rows
from alselect.exporters import ExportRow
from alselect.images import to_rgb
from alselect.progress import NULL_REPORTER, Reporter
from alselect.store import Store

PAD = 6
FONT_SIZE = 12
LINE = FONT_SIZE + 4
CAPTION = 2 * LINE + 2
BACKGROUND = (255, 255, 255)
THUMB_BACKGROUND = (236, 236, 236)
TEXT = (20, 20, 20)
MISSING = (190, 60, 60)


@dataclass(frozen=True)
class Preview:
    image: Image.Image
    selection: Selection
    unreadable: list[str]


def cell_size(thumb_size: int) -> tuple[int, int]:
    """``(width, height)`` of one cell."""
    return thumb_size + 2 * PAD, thumb_size + 2 * PAD + CAPTION


def thumb_origin(index: int, columns: int, thumb_size: int) -> tuple[int, int]:
    """Top-left corner of the ``thumb_size`` square of the cell at ``index`` (0 = rank 1)."""
    width, height = cell_size(thumb_size)
    return (index % columns) * width + PAD, (index // columns) * height + PAD


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def thumbnail(row: ExportRow, thumb_size: int) -> Image.Image | None:
    """The image at most ``thumb_size`` on its longer side, or None when it cannot be read."""
    try:
        with Image.open(row.file) as img:
            img.draft("RGB", (thumb_size, thumb_size))  # JPEG: decode at a reduced scale
            oriented = ImageOps.exif_transpose(img)
            rgb = to_rgb(oriented)
            rgb.thumbnail((thumb_size, thumb_size), Image.Resampling.LANCZOS)
            factor = thumb_size // max(rgb.width, rgb.height, 1)
            if factor >= 2:  # tiny images (icons, MNIST digits): enlarge by a whole factor, crisp
                return rgb.resize((rgb.width * factor, rgb.height * factor), Image.Resampling.NEAREST)
            return rgb.copy()
    except Exception:  # missing, changed, truncated, a bomb: the sheet marks it and goes on
        return None


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    font = _font()
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(
    rows: Sequence[ExportRow], *, columns: int = 5, thumb_size: int = 160, reporter: Reporter = NULL_REPORTER
) -> tuple[Image.Image, list[str]]:
    """Draw ``rows`` in rank order; returns the sheet and the paths that could not be read."""
    if columns < 1 or thumb_size < 16:
        raise UsageError("--columns must be at least 1 and --thumb-size at least 16")
    columns = min(columns, max(len(rows), 1))
    width, height = cell_size(thumb_size)
    sheet = Image.new("RGB", (columns * width, max(math.ceil(len(rows) / columns), 1) * height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    unreadable = []
    for index, row in enumerate(rows):
        x, y = thumb_origin(index, columns, thumb_size)
        draw.rectangle((x, y, x + thumb_size - 1, y + thumb_size - 1), fill=THUMB_BACKGROUND)
        thumb = thumbnail(row, thumb_size)
        if thumb is None:
            unreadable.append(row.relative)
            draw.text((x + 4, y + thumb_size // 2 - LINE // 2), "unreadable", fill=MISSING, font=font)
        else:
            sheet.paste(thumb, (x + (thumb_size - thumb.width) // 2, y + (thumb_size - thumb.height) // 2))
        caption_y = y + thumb_size + 2
        draw.text(
            (x, caption_y), fit_text(draw, f"#{row.rank}  {row.score:.4g}", thumb_size), fill=TEXT, font=font
        )
        label = row.predicted_label or "—"
        draw.text((x, caption_y + LINE), fit_text(draw, label, thumb_size), fill=TEXT, font=font)
        reporter.progress("preview", index + 1, len(rows))
    return sheet, unreadable


def preview_latest(
    store: Store,
    *,
    top: int = 20,
    include_exported: bool = False,
    columns: int = 5,
    thumb_size: int = 160,
    reporter: Reporter = NULL_REPORTER,
) -> Preview:
    """The sheet of the next ``top`` images ``export`` would send; records nothing.

    Raises ``NothingToExport`` (with the reason) when there is nothing to show.
    """
    selection = select_rows(store, top=top, include_exported=include_exported)
    if not selection.rows:
        reason = explain_empty(store, selection.run, include_exported)
        raise NothingToExport(reason.replace("nothing to export", "nothing to preview", 1))
    image, unreadable = contact_sheet(
        selection.rows, columns=columns, thumb_size=thumb_size, reporter=reporter
    )
    return Preview(image=image, selection=selection, unreadable=unreadable)
