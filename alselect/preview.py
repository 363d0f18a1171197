"""A contact sheet of the next images to annotate (what ``export`` would send now), with Pillow only.

Layout: ``columns`` cells per row in rank order, left to right then top to bottom. Each cell is
``max(thumb_size, MIN_CAPTION_WIDTH) + 2 * PAD`` wide (so captions stay readable under small
thumbnails) and ``thumb_size + 2 * PAD + CAPTION`` high: the thumbnail (EXIF orientation applied,
aspect kept; images under half the square enlarged by a whole factor) centred in a ``thumb_size``
square at the top of the cell, then two caption lines, ``#rank  score`` and the predicted label.

An image is drawn only when its bytes still have the content hash that was scored; a file replaced
since, or one that cannot be decoded (Pillow's own bomb limit is lifted and the project's
``--max-pixels`` default applies, as when scoring), is marked in its cell and reported with why.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont, ImageOps

from alselect.errors import UsageError
from alselect.export import NothingToExport, Selection, explain_empty, select_rows
from alselect.exporters import ExportRow
from alselect.images import (
    CHANGED_WHILE_READING,
    check_pixels,
    decode_error,
    pillow_limit_off,
    to_rgb,
)
from alselect.limits import DEFAULT_MAX_PIXELS, MEMORY_SHARE, usable_memory
from alselect.progress import NULL_REPORTER, Reporter
from alselect.store import Store

PAD = 6
FONT_SIZE = 12
LINE = FONT_SIZE + 4
CAPTION = 2 * LINE + 2
MIN_CAPTION_WIDTH = 96  # a cell is at least this wide inside its padding: "#12  0.8734" fits
# The largest side each output format can hold (JPEG and GIF store 16-bit sizes; libwebp's limit is
# 16383); others get the JPEG limit, past which few viewers open a PNG either.
MAX_SIDE = {"WEBP": 16383, "JPEG": 65535, "GIF": 65535}
DEFAULT_MAX_SIDE = 65535
CHANGED = "changed since it was scored (content hash differs): run 'alselect score' again"
BACKGROUND = (255, 255, 255)
THUMB_BACKGROUND = (236, 236, 236)
TEXT = (20, 20, 20)
MISSING = (190, 60, 60)


@dataclass(frozen=True)
class Preview:
    image: Image.Image
    selection: Selection
    unreadable: list[tuple[str, str]]  # (relative path, why it is not drawn)


def cell_size(thumb_size: int) -> tuple[int, int]:
    """``(width, height)`` of one cell."""
    return max(thumb_size, MIN_CAPTION_WIDTH) + 2 * PAD, thumb_size + 2 * PAD + CAPTION


def thumb_origin(index: int, columns: int, thumb_size: int) -> tuple[int, int]:
    """Top-left corner of the ``thumb_size`` square of the cell at ``index`` (0 = rank 1)."""
    width, height = cell_size(thumb_size)
    inset = (width - 2 * PAD - thumb_size) // 2
    return (index % columns) * width + PAD + inset, (index // columns) * height + PAD


def sheet_size(count: int, columns: int, thumb_size: int) -> tuple[int, int]:
    """``(width, height)`` of the sheet for ``count`` images."""
    columns = min(columns, max(count, 1))
    width, height = cell_size(thumb_size)
    return columns * width, max(math.ceil(count / columns), 1) * height


def check_sheet(
    count: int, columns: int, thumb_size: int, image_format: str = "PNG", available: int | None = None
) -> None:
    """Refuse (``UsageError``) a sheet the output format cannot hold or memory cannot: each side at
    most the format's limit, and its pixels (3 bytes each) within half the machine's memory."""
    if columns < 1 or thumb_size < 16:
        raise UsageError("--columns must be at least 1 and --thumb-size at least 16")
    width, height = sheet_size(count, columns, thumb_size)
    limit = MAX_SIDE.get(image_format.upper(), DEFAULT_MAX_SIDE)
    if max(width, height) > limit:
        raise UsageError(
            f"a sheet of {count} thumbnail(s) of {thumb_size} px in {min(columns, max(count, 1))} column(s) "
            f"would be {width}x{height} px, over {image_format}'s limit of {limit} px a side: lower "
            "--thumb-size, --top or --columns"
        )
    available = usable_memory() if available is None else available
    if available is not None and 3 * width * height > MEMORY_SHARE * available:
        raise UsageError(
            f"a sheet of {width}x{height} px would take {3 * width * height / 2**30:.1f} GiB, over half of "
            f"this machine's memory: lower --thumb-size or --top"
        )


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def thumbnail(
    row: ExportRow, thumb_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image | None, str | None]:
    """``(image, None)``: the image at most ``thumb_size`` on its longer side; ``(None, why)`` when
    it cannot be shown (missing, replaced since it was scored, truncated, a decompression bomb)."""
    try:
        data = row.file.read_bytes()
        if row.sha256 and hashlib.sha256(data).hexdigest() != row.sha256:
            return None, CHANGED
        with pillow_limit_off(), Image.open(io.BytesIO(data)) as img:
            check_pixels(img.size, max_pixels)
            img.draft("RGB", (thumb_size, thumb_size))  # JPEG: decode at a reduced scale
            oriented = ImageOps.exif_transpose(img)
            rgb = to_rgb(oriented)
            rgb.thumbnail((thumb_size, thumb_size), Image.Resampling.LANCZOS)
            factor = thumb_size // max(rgb.width, rgb.height, 1)
            if factor >= 2:  # tiny images (icons, MNIST digits): enlarge by a whole factor, crisp
                return rgb.resize((rgb.width * factor, rgb.height * factor), Image.Resampling.NEAREST), None
            return rgb.copy(), None
    except Exception as exc:  # the sheet marks it and goes on
        reason = str(decode_error(exc))
        return None, "vanished" if reason == CHANGED_WHILE_READING else reason


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    font = _font()
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(
    rows: Sequence[ExportRow],
    *,
    columns: int = 5,
    thumb_size: int = 160,
    image_format: str = "PNG",
    reporter: Reporter = NULL_REPORTER,
) -> tuple[Image.Image, list[tuple[str, str]]]:
    """Draw ``rows`` in rank order; returns the sheet and ``(path, why)`` of those not drawn."""
    check_sheet(len(rows), columns, thumb_size, image_format)
    columns = min(columns, max(len(rows), 1))
    sheet = Image.new("RGB", sheet_size(len(rows), columns, thumb_size), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    unreadable = []
    for index, row in enumerate(rows):
        x, y = thumb_origin(index, columns, thumb_size)
        draw.rectangle((x, y, x + thumb_size - 1, y + thumb_size - 1), fill=THUMB_BACKGROUND)
        thumb, why = thumbnail(row, thumb_size)
        if thumb is None:
            unreadable.append((row.relative, why or "unreadable"))
            mark = "changed" if why == CHANGED else "unreadable"
            draw.text((x + 2, y + thumb_size // 2 - LINE // 2), mark, fill=MISSING, font=font)
        else:
            sheet.paste(thumb, (x + (thumb_size - thumb.width) // 2, y + (thumb_size - thumb.height) // 2))
        caption_y = y + thumb_size + 2
        left = (index % columns) * cell_size(thumb_size)[0] + PAD
        room = cell_size(thumb_size)[0] - 2 * PAD
        draw.text(
            (left, caption_y), fit_text(draw, f"#{row.rank}  {row.score:.4g}", room), fill=TEXT, font=font
        )
        label = row.predicted_label or "—"
        draw.text((left, caption_y + LINE), fit_text(draw, label, room), fill=TEXT, font=font)
        reporter.progress("preview", index + 1, len(rows))
    return sheet, unreadable


def preview_latest(
    store: Store,
    *,
    top: int = 20,
    include_exported: bool = False,
    columns: int = 5,
    thumb_size: int = 160,
    image_format: str = "PNG",
    reporter: Reporter = NULL_REPORTER,
) -> Preview:
    """The sheet of the next ``top`` images ``export`` would send; records nothing.

    Raises ``NothingToExport`` (with the reason) when there is nothing to show.
    """
    check_sheet(top, columns, thumb_size, image_format)  # before reading anything
    selection = select_rows(store, top=top, include_exported=include_exported)
    if not selection.rows:
        reason = explain_empty(store, selection.run, include_exported)
        raise NothingToExport(reason.replace("nothing to export", "nothing to preview", 1))
    image, unreadable = contact_sheet(
        selection.rows, columns=columns, thumb_size=thumb_size, image_format=image_format, reporter=reporter
    )
    return Preview(image=image, selection=selection, unreadable=unreadable)
