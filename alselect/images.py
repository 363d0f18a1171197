"""Decode an image file into a preprocessed uint8 array, or say precisely why it cannot be."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alselect.fsutil import NOT_REGULAR, open_regular
from alselect.limits import DEFAULT_MAX_PIXELS
from alselect.preprocess import Preprocess

CHANGED_WHILE_READING = "changed while reading"
# An image's geometry (int32 [4]): its height and width after EXIF orientation, and the height and
# width it occupies in the model input (the whole input for a crop; the top-left part for a letterbox).
GEOMETRY = ("height", "width", "content_height", "content_width")
OUT_OF_MEMORY = "out of memory while decoding"

# Greyscale modes scaled to 8 bits in strips of rows (never a full-size float copy).
_SCALED_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
# Modes whose channels average linearly and carry no alpha: box-reduced before RGB conversion.
# Others (palette, 1-bit, alpha) are converted first so alpha is dropped exactly as at full size.
_REDUCE_BEFORE_CONVERT = frozenset({"L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB"})
_STRIP_PIXELS = 1 << 20
_ORIENTATION = 0x0112  # the EXIF tag


class ImageDecodeError(Exception):
    """The file is not a usable image; ``str(exc)`` is the reason recorded in the store."""


def load_image(
    path: Path,
    preprocess: Preprocess,
    expected_sha256: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode, apply EXIF orientation, convert to RGB, resize + centre-crop (or letterbox).

    Returns ``uint8 [3, S, S]`` with ``S = preprocess.image_size``. JPEGs are decoded at a
    reduced DCT scale (``draft``) when that still leaves at least ``resize_size`` pixels.
    Raises ``ImageDecodeError`` for empty, truncated, corrupt or unreadable files, and for
    images of more than ``max_pixels`` pixels (decompression bombs), refused before decoding.

    With ``expected_sha256`` the file is read once, those bytes are hashed and, when they match,
    decoded; otherwise ``ImageDecodeError("changed while reading")`` is raised, so a file edited
    after it was hashed never has the new content stored under the old hash.
    """
    return load_image_geometry(path, preprocess, expected_sha256, max_pixels=max_pixels)[0]


def load_image_geometry(
    path: Path,
    preprocess: Preprocess,
    expected_sha256: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    interleaved: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``load_image`` plus the image's ``GEOMETRY`` (``int32 [4]``, see ``GEOMETRY``).

    With ``interleaved`` the ``[3, S, S]`` pixels are a view of ``[S, S, 3]`` contiguous memory,
    as Pillow holds them: no copy is made to reorder them, and a batch stacks them into the
    channels_last layout the model runs in (``alselect.embed.collate``) with one copy.
    """
    data = read_image_file(path, expected_sha256)
    return decode_image_geometry(data, preprocess, max_pixels=max_pixels, interleaved=interleaved)


def read_image_file(path: Path, expected_sha256: str | None = None) -> bytes:
    """The file's bytes, read once; with ``expected_sha256``, only if they still hash to it
    (else ``ImageDecodeError("changed while reading")``)."""
    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            data = handle.read()
    except Exception as exc:
        raise decode_error(exc) from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256.lower():
        raise ImageDecodeError(CHANGED_WHILE_READING)
    return data


def decode_image(data: bytes, preprocess: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``load_image`` for the bytes of a file already in memory."""
    return decode_image_geometry(data, preprocess, max_pixels=max_pixels)[0]


def decode_image_geometry(
    data: bytes, preprocess: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS, interleaved: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``load_image_geometry`` for the bytes of a file already in memory."""
    try:
        if not data:
            raise ImageDecodeError("empty file")
        pixels, geometry = _decode(io.BytesIO(data), preprocess, max_pixels)
    except Exception as exc:  # decode_error passes ImageDecodeError through
        raise decode_error(exc) from None
    return (pixels if interleaved else np.ascontiguousarray(pixels)), geometry


def decode_error(exc: Exception) -> ImageDecodeError:
    """The ``ImageDecodeError`` (with its recorded reason) for an exception raised while decoding."""
    if isinstance(exc, ImageDecodeError):
        return exc
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageDecodeError(f"decompression bomb: {exc}")
    if isinstance(exc, UnidentifiedImageError):
        return ImageDecodeError("not an image (unrecognised format)")
    if isinstance(exc, MemoryError):
        return ImageDecodeError(OUT_OF_MEMORY)
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.strerror == NOT_REGULAR):
        return ImageDecodeError(f"unreadable: {exc.strerror}")  # NOT_REGULAR: a FIFO or device now
    if isinstance(exc, FileNotFoundError):
        return ImageDecodeError("vanished while reading")
    if isinstance(exc, OSError):
        return ImageDecodeError(f"truncated or corrupt: {exc}")
    # decoder plugins raise ValueError, SyntaxError, struct.error...
    return ImageDecodeError(f"cannot decode: {type(exc).__name__}: {exc}")


class _PillowLimitOff:
    """Pillow's own bomb limit, off while alselect decodes; ``_decode`` applies ``max_pixels`` itself.

    Pillow's limit (``Image.MAX_IMAGE_PIXELS``, 89 MP, an error at twice that) is one global that
    also fails ordinary 90 MP camera photos. It is lifted only while at least one decode runs in
    this process and restored after the last one, so other code in the process keeps its setting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved: int | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._active == 0:
                self._saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    Image.MAX_IMAGE_PIXELS = self._saved


pillow_limit_off = _PillowLimitOff()


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels."""
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} = {_pixels(width * height)} is over the limit of "
            f"{_pixels(max_pixels)} (--max-pixels)"
        )


def _pixels(count: int) -> str:
    return f"{count / 1e6:,.0f} MP" if count >= 10_000_000 else f"{count:,} pixels"


def _decode(source: IO[bytes], preprocess: Preprocess, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    letterbox = preprocess.resize == "letterbox"
    with pillow_limit_off(), Image.open(source) as img:
        check_pixels(img.size, max_pixels)
        full = img.size
        if img.format == "JPEG":
            img.draft("RGB", (preprocess.resize_size, preprocess.resize_size))
        drafted = img.size
        ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy
        if img.size != drafted:  # EXIF orientation swapped the sides
            full = (full[1], full[0])
        # Large images are first box-reduced to no less than twice the target size, so they are
        # converted and resampled at a fraction of their size; the bilinear resize that follows
        # still shrinks by 2x or more, which keeps the result close to a direct resize.
        source_size = img.size
        factor = reduce_factor(source_size, preprocess)
        rgb = to_rgb(img, factor)
        reduced_by = factor if rgb.size != source_size else 1  # 1 where the mode has no reduce
        if letterbox:
            out, content = letterbox_resize(rgb, preprocess, source_size=source_size, reduced_by=reduced_by)
        else:
            out = resize_and_crop(rgb, preprocess, source_size=source_size, reduced_by=reduced_by)
            content = (preprocess.image_size, preprocess.image_size)
    geometry = np.array([full[1], full[0], content[0], content[1]], dtype=np.int32)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1), geometry


def to_rgb(img: Image.Image, factor: int = 1) -> Image.Image:
    """RGB view of any mode: 16-bit and float greyscale are scaled, alpha is dropped.

    With ``factor >= 2`` the result is also box-reduced ``factor`` times (``Image.reduce``),
    before the conversion where the mode allows it, else strip by strip: a strip of rows is
    converted, reduced and pasted, so no full-size converted copy ever exists next to the image.
    """
    if img.mode in _SCALED_GREY:
        return _scaled_grey(img, max(factor, 1)).convert("RGB")
    if factor >= 2 and img.mode in _REDUCE_BEFORE_CONVERT:
        reduced = _reduce(img, factor)
        if reduced is not img:
            img, factor = reduced, 1
    if factor < 2:
        return _converted(img)
    width, height = img.size
    rows = factor * max(1, _STRIP_PIXELS // (factor * factor * max(width, 1)))  # whole blocks per strip
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        strip = _converted(img.crop((0, top, width, min(top + rows, height))))
        out.paste(_reduce(strip, factor), (0, top // factor))
    return out


def _converted(img: Image.Image) -> Image.Image:
    """``img`` in RGB; a palette's transparent entries go through RGBA as Pillow requires."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """``img.reduce(factor)``, or ``img`` itself when ``factor < 2`` or the mode has no reduce."""
    if factor < 2:
        return img
    try:
        return img.reduce(factor)
    except (ValueError, NotImplementedError):
        return img


def _scaled_grey(img: Image.Image, factor: int) -> Image.Image:
    """``I;16*``, ``I`` or ``F`` greyscale as 8-bit ``L``, box-averaged over ``factor``² blocks.

    16-bit modes always span 0..65535; 32-bit ``I`` is rescaled only when it exceeds 8 bits;
    ``F`` is taken as 0..1 when its maximum is at most 1, else as 0..255. Integer modes use
    integer arithmetic; the image is read in strips of rows, so memory stays near its own size.
    """
    width, height = img.size
    is_float = img.mode == "F"
    gain, top = 1.0, 255
    if is_float:
        high = cast(tuple[float, float], img.getextrema())[1]
        gain = 255.0 if high <= 1.0 else 1.0
    elif img.mode.startswith("I;16") or cast(tuple[int, int], img.getextrema())[1] > 255:
        top = 65535
    columns = np.arange(0, width, factor)
    column_counts = np.diff(np.append(columns, width))
    strip_rows = factor * max(1, _STRIP_PIXELS // (factor * factor * max(width, 1)))
    strips: list[np.ndarray] = []
    for y0 in range(0, height, strip_rows):
        y1 = min(y0 + strip_rows, height)
        values = np.asarray(img.crop((0, y0, width, y1)))
        rows = np.arange(0, y1 - y0, factor)
        counts = np.outer(np.diff(np.append(rows, y1 - y0)), column_counts)
        if is_float:
            clipped = np.clip(np.nan_to_num(values.astype(np.float64) * gain), 0.0, 255.0)
            sums = np.add.reduceat(np.add.reduceat(clipped, rows, axis=0), columns, axis=1)
            strips.append(np.floor(sums / counts + 0.5).astype(np.uint8))
        else:
            if img.mode == "I":  # 32-bit: may hold values outside 0..top (16-bit modes cannot)
                values = np.clip(values, 0, top)
            sums = np.add.reduceat(np.add.reduceat(values, rows, axis=0, dtype=np.int64), columns, axis=1)
            scaled = counts.astype(np.int64) * top
            strips.append(((sums * 255 + scaled // 2) // scaled).astype(np.uint8))
    if not strips:
        return Image.new("L", img.size)
    return Image.fromarray(np.concatenate(strips), "L")


def jpeg_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, int, str] | None:
    """``(width, height, EXIF orientation, mode)`` of a baseline or progressive JPEG, from its
    header only (nothing is decoded), or None for any other file.

    Raises ``ImageDecodeError`` for images over ``max_pixels`` (and for unreadable headers).
    """
    try:
        with pillow_limit_off(), Image.open(io.BytesIO(data)) as img:
            check_pixels(img.size, max_pixels)
            if img.format != "JPEG":
                return None
            orientation = img.getexif().get(_ORIENTATION, 1)
            width, height = img.size
            return width, height, orientation if orientation in range(1, 9) else 1, img.mode
    except Exception as exc:
        raise decode_error(exc) from None


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """``(width, height)`` after EXIF ``orientation`` (5–8 swap the sides)."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def reduce_factor(size: tuple[int, int], preprocess: Preprocess) -> int:
    """The box-reduce applied to an image of ``size`` (upright) before it is resampled: large
    images are first reduced to no less than twice the target, then resized bilinearly."""
    side = max(size) if preprocess.resize == "letterbox" else min(size)
    return side // (2 * max(preprocess.resize_size, preprocess.image_size, 1))


def resample_plan(
    size: tuple[int, int], preprocess: Preprocess, reduced_by: int = 1
) -> tuple[tuple[float, float, float, float], tuple[int, int], tuple[int, int]]:
    """Where an upright image of ``size`` is sampled: ``(box, out_size, content)``.

    ``box`` is in the pixels of the image box-reduced ``reduced_by`` times; ``out_size`` is the
    ``(width, height)`` the box is resized to; ``content`` the ``(height, width)`` it occupies in
    the ``image_size`` square (all of it for a crop). The same geometry as ``resize_and_crop`` and
    ``letterbox_resize``.
    """
    width, height = size
    side = preprocess.image_size
    if preprocess.resize == "letterbox":
        scale = side / max(width, height)
        out = (max(1, min(side, round(width * scale))), max(1, min(side, round(height * scale))))
        box = (0.0, 0.0, width / reduced_by, height / reduced_by)
        return box, out, (out[1], out[0])
    scale = preprocess.resize_size / min(width, height)
    crop = side / scale
    left = (width - crop) / 2
    top = (height - crop) / 2
    box = (max(left, 0.0), max(top, 0.0), min(left + crop, width), min(top + crop, height))
    box = (box[0] / reduced_by, box[1] / reduced_by, box[2] / reduced_by, box[3] / reduced_by)
    return box, (side, side), (side, side)


def bilinear_weights(in_size: int, out_size: int, start: float, end: float) -> np.ndarray:
    """``float64 [out_size, in_size]``: the weights with which Pillow's BILINEAR resize of the
    input range ``[start, end)`` to ``out_size`` pixels averages input pixels (its
    ``precompute_coeffs``: a triangle filter widened by the scale when shrinking, so it
    antialiases; each row sums to 1). Lets another device resample exactly as Pillow does.
    """
    scale = (end - start) / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale  # the bilinear filter's support is 1
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for out in range(out_size):
        center = start + (out + 0.5) * scale
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), in_size)
        taps = np.arange(low, high)
        row = np.clip(1.0 - np.abs((taps - center + 0.5) / filter_scale), 0.0, None)
        total = row.sum()
        weights[out, low:high] = row / total if total else row
    return weights


def letterbox_resize(
    img: Image.Image,
    preprocess: Preprocess,
    *,
    source_size: tuple[int, int] | None = None,
    reduced_by: int = 1,
) -> tuple[Image.Image, tuple[int, int]]:
    """The whole image, longer side to ``image_size``, top-left on a square of the ``mean`` colour.

    Returns the square and the ``(height, width)`` the image occupies in it. ``source_size`` and
    ``reduced_by`` as in ``resize_and_crop``.
    """
    box, out, content = resample_plan(source_size or img.size, preprocess, reduced_by)
    resized = img.resize(out, Image.Resampling.BILINEAR, box=box)
    size = preprocess.image_size
    canvas = Image.new("RGB", (size, size), letterbox_fill(preprocess))
    canvas.paste(resized, (0, 0))
    return canvas, content


def letterbox_fill(preprocess: Preprocess) -> tuple[int, int, int]:
    """The padding colour of a letterbox: ``mean`` in 0–255 (it normalises to 0)."""
    red, green, blue = (round(255 * m) for m in preprocess.mean)
    return red, green, blue


def resize_and_crop(
    img: Image.Image,
    preprocess: Preprocess,
    *,
    source_size: tuple[int, int] | None = None,
    reduced_by: int = 1,
) -> Image.Image:
    """Shorter side to ``resize_size`` then centre crop ``image_size``, as one resample.

    When ``img`` is an image of ``source_size`` box-reduced ``reduced_by`` times, the crop is placed
    in source pixels and mapped onto ``img``: a partial block at the right or bottom edge (the
    reduced size is rounded up) then neither stretches nor shifts the result.
    """
    box, out, _ = resample_plan(source_size or img.size, preprocess, reduced_by)
    return img.resize(out, Image.Resampling.BILINEAR, box=box)
