"""Decode an image file into a preprocessed uint8 array, or say precisely why it cannot be."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alselect.preprocess import Preprocess


class ImageDecodeError(Exception):
    """The file is not a usable image; ``str(exc)`` is the reason recorded in the store."""


def load_image(path: Path, preprocess: Preprocess) -> np.ndarray:
    """Decode, apply EXIF orientation, convert to RGB, resize + centre-crop.

    Returns ``uint8 [3, S, S]`` with ``S = preprocess.image_size``. JPEGs are decoded at a
    reduced DCT scale (``draft``) when that still leaves at least ``resize_size`` pixels.
    Raises ``ImageDecodeError`` for empty, truncated, corrupt, unreadable or bomb files.
    """
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (preprocess.resize_size, preprocess.resize_size))
                oriented = ImageOps.exif_transpose(img)
                rgb = to_rgb(oriented)
                out = resize_and_crop(rgb, preprocess)
        return np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1))
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except PermissionError as exc:
        raise ImageDecodeError(f"unreadable: {exc.strerror}") from None
    except FileNotFoundError:
        raise ImageDecodeError("vanished while reading") from None
    except OSError as exc:
        raise ImageDecodeError(f"truncated or corrupt: {exc}") from None
    except Exception as exc:  # decoder plugins raise ValueError, SyntaxError, struct.error...
        raise ImageDecodeError(f"cannot decode: {type(exc).__name__}: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any mode: 16-bit and float greyscale are scaled, alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img, dtype=np.float64)
        # 16-bit modes always span 0..65535; 32-bit "I" is rescaled only when it exceeds 8 bits
        sixteen_bit = img.mode.startswith("I;16") or values.max(initial=0) > 255
        scale = 255.0 / 65535.0 if sixteen_bit else 1.0
        return Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        values = values * 255.0 if values.max(initial=0) <= 1.0 else values
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, preprocess: Preprocess) -> Image.Image:
    """Shorter side to ``resize_size`` then centre crop ``image_size``, as one resample."""
    width, height = img.size
    scale = preprocess.resize_size / min(width, height)
    crop = preprocess.image_size / scale  # crop side in source pixels
    left = (width - crop) / 2
    top = (height - crop) / 2
    box = (max(left, 0.0), max(top, 0.0), min(left + crop, width), min(top + crop, height))
    size = preprocess.image_size
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)
