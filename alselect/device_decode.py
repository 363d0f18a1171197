"""JPEGs decoded in batches on the model's device, with ``alselect.images``' preprocessing.

On a GPU, decoding is what holds a run back: one CPU core decodes a few hundred photos a second,
a GPU runs a ResNet-50 on tens of thousands. With ``--decode gpu`` (the default on CUDA devices)
the decoding workers only read, hash and look at the header of each JPEG; the main process
decodes a batch of them at once with nvJPEG (``torchvision.io.decode_jpeg`` on the device) and
preprocesses them there:

- the DCT scale the CPU path decodes at (Pillow's ``draft``) emulated by averaging blocks of the
  full decode (a DCT-scaled decode is close to, not equal to, a block mean);
- EXIF orientation, as ``ImageOps.exif_transpose``;
- large images box-reduced (mean of ``k × k`` blocks) to no less than twice the target, as the CPU
  path does;
- the crop (or letterbox) resampled with Pillow's BILINEAR weights (``images.bilinear_weights``,
  applied as two matrix products with a rounding to 8 bits between and after them, as Pillow
  does).

So the two paths agree closely but not exactly; ``tests/test_device_decode.py`` states by how much
on real photos (there with ``decode_jpeg`` on the CPU: the logic is the same on every device).
Anything else (other formats, CMYK JPEGs, JPEGs over ``DEVICE_MAX_PIXELS``, files
nvJPEG refuses) is decoded by the CPU path, in the workers or, after a device failure, here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from alselect.images import (
    ImageDecodeError,
    bilinear_weights,
    decode_image_geometry,
    letterbox_fill,
    oriented_size,
    reduce_factor,
    resample_plan,
)
from alselect.limits import DEFAULT_MAX_PIXELS
from alselect.preprocess import Preprocess

# JPEGs with more pixels are decoded by the CPU path (at 1/8 scale): one 50 MP decode is 150 MB of
# device memory, and a batch of them would crowd the model out.
DEVICE_MAX_PIXELS = 50_000_000
# Decoded pixels (uint8) handed to one decode call; a batch of larger photos is decoded in parts.
DECODE_CHUNK_PIXELS = 1 << 28
# Float pixels resampled at once (per size group): bounds the work memory of preprocessing.
RESAMPLE_CHUNK_PIXELS = 1 << 26
DEVICE_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG decodes to RGB like Pillow does


@dataclass
class JpegFile:
    """A JPEG a worker read and looked at, for the device to decode: its bytes (``uint8 [n]``),
    stored size and EXIF orientation."""

    index: int
    data: torch.Tensor
    width: int
    height: int
    orientation: int


def device_decodable(header: tuple[int, int, int, str] | None) -> bool:
    """Whether a JPEG with this ``images.jpeg_header`` goes to the device."""
    if header is None:
        return False
    width, height, _, mode = header
    return mode in DEVICE_MODES and width * height <= DEVICE_MAX_PIXELS


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image [C, H, W]`` as ``ImageOps.exif_transpose`` turns it for EXIF ``orientation`` (a view)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


@lru_cache(maxsize=256)
def _weights(in_size: int, out_size: int, start: float, end: float) -> np.ndarray:
    return bilinear_weights(in_size, out_size, start, end).astype(np.float32)


def draft_scale(width: int, height: int, preprocess: Preprocess) -> int:
    """The DCT scale (1, 2, 4 or 8) at which the CPU path decodes a ``width × height`` JPEG: Pillow's
    ``draft`` for ``(resize_size, resize_size)``, the largest that keeps both sides at least that."""
    target = max(preprocess.resize_size, 1)
    fits = min(width // target, height // target)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def drafted(image: torch.Tensor, scale: int) -> torch.Tensor:
    """``uint8 [3, H, W]`` reduced as a DCT-scaled decode at ``1 / scale`` does it, approximately: the
    mean of each ``scale × scale`` block (partial blocks at the edges), rounded to 8 bits."""
    if scale < 2:
        return image
    reduced = F.avg_pool2d(image[None].float(), scale, stride=scale, ceil_mode=True)[0]
    return reduced.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def preprocess_images(
    images: Sequence[torch.Tensor],
    preprocess: Preprocess,
    full_sizes: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``uint8 [n, 3, S, S]`` model input and ``int64 [n, 4]`` geometry for upright ``uint8
    [3, H, W]`` images (any device; the result is on theirs), as ``images.load_image_geometry``
    makes them: box-reduce, crop or letterbox, bilinear resample. ``full_sizes``: each image's
    upright ``(height, width)`` before a draft reduction, for the geometry (default: its size)."""
    if not images:
        raise ValueError("no images")
    device = images[0].device
    side = preprocess.image_size
    out = torch.empty((len(images), 3, side, side), dtype=torch.uint8, device=device)
    geometry = torch.empty((len(images), 4), dtype=torch.int64)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((int(image.shape[-2]), int(image.shape[-1])), []).append(i)
    if preprocess.resize == "letterbox":
        fill = torch.tensor(letterbox_fill(preprocess), dtype=torch.uint8, device=device)
        out[:] = fill.view(1, 3, 1, 1)
    for (height, width), members in groups.items():
        per_chunk = max(1, RESAMPLE_CHUNK_PIXELS // (3 * height * width))
        for start in range(0, len(members), per_chunk):
            rows = members[start : start + per_chunk]
            pixels = torch.stack([images[i] for i in rows]).float()
            resized, content = _resample(pixels, (width, height), preprocess)
            target = torch.tensor(rows, device=device)
            if preprocess.resize == "letterbox":
                out[target, :, : content[0], : content[1]] = resized
            else:
                out[target] = resized
            geometry[rows] = torch.tensor([height, width, content[0], content[1]], dtype=torch.int64)
    if full_sizes is not None:
        geometry[:, :2] = torch.tensor(list(full_sizes), dtype=torch.int64).view(len(images), 2)
    return out, geometry


def _resample(
    pixels: torch.Tensor, size: tuple[int, int], preprocess: Preprocess
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``float [g, 3, H, W]`` images of ``size`` (width, height) → ``uint8`` resized content."""
    factor = reduce_factor(size, preprocess)
    reduced_by = 1
    if factor >= 2:  # Image.reduce: the mean of each factor × factor block (partial blocks at the edges)
        pixels = F.avg_pool2d(pixels, factor, stride=factor, ceil_mode=True)
        reduced_by = factor
    box, (out_w, out_h), content = resample_plan(size, preprocess, reduced_by)
    in_h, in_w = int(pixels.shape[-2]), int(pixels.shape[-1])
    wx = torch.from_numpy(_weights(in_w, out_w, box[0], box[2])).to(pixels.device)
    wy = torch.from_numpy(_weights(in_h, out_h, box[1], box[3])).to(pixels.device)
    if factor >= 2:  # Pillow's reduce rounds to 8 bits too
        pixels = pixels.add_(0.5).floor_()
    across = torch.matmul(pixels, wx.T).add_(0.5).floor_().clamp_(0, 255)  # [g, 3, H, out_w]
    down = torch.matmul(wy, across).add_(0.5).floor_().clamp_(0, 255)  # [g, 3, out_h, out_w]
    return down.to(torch.uint8), content


class DeviceDecoder:
    """Decodes the JPEGs of a batch on ``device`` and preprocesses them (see the module docstring).

    ``decode(jpegs)`` returns, per file, ``(index, pixels [3, S, S] uint8 on device, geometry
    int64 [4])`` or ``(index, None, reason)``. A file nvJPEG fails on goes through the CPU path,
    which decodes it or gives the reason it cannot be decoded.
    """

    def __init__(self, preprocess: Preprocess, device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.preprocess = preprocess
        self.device = device
        self.max_pixels = max_pixels
        self.cpu_fallbacks = 0

    def decode(
        self, jpegs: Sequence[JpegFile]
    ) -> list[tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]]:
        decoded: list[torch.Tensor | None] = []
        start = 0
        while start < len(jpegs):  # parts of at most DECODE_CHUNK_PIXELS decoded pixels
            end, total = start, 0
            while end < len(jpegs) and (end == start or total + _pixels(jpegs[end]) <= DECODE_CHUNK_PIXELS):
                total += _pixels(jpegs[end])
                end += 1
            decoded.extend(self._decode_part(jpegs[start:end]))
            start = end
        upright = [
            (
                jpeg,
                orient(
                    drafted(image, draft_scale(jpeg.width, jpeg.height, self.preprocess)), jpeg.orientation
                ),
            )
            for jpeg, image in zip(jpegs, decoded, strict=True)
            if image is not None
        ]
        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if upright:
            full = [oriented_size(jpeg.height, jpeg.width, jpeg.orientation) for jpeg, _ in upright]
            pixels, geometry = preprocess_images([image for _, image in upright], self.preprocess, full)
            done = {jpeg.index: (pixels[row], geometry[row]) for row, (jpeg, _) in enumerate(upright)}
        return [
            (jpeg.index, *done[jpeg.index], None) if jpeg.index in done else self._on_cpu(jpeg)
            for jpeg in jpegs
        ]

    def _decode_part(self, jpegs: Sequence[JpegFile]) -> list[torch.Tensor | None]:
        """Decoded ``uint8 [3, H, W]`` images on the device; None where nvJPEG failed."""
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            try:
                images = decode_jpeg([j.data for j in jpegs], mode=ImageReadMode.RGB, device=self.device)
                return list(images)
            except RuntimeError:  # one bad file fails the batch: decode one by one
                pass
            out: list[torch.Tensor | None] = []
            for jpeg in jpegs:
                try:
                    out.append(decode_jpeg(jpeg.data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _on_cpu(self, jpeg: JpegFile) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        self.cpu_fallbacks += 1
        try:
            pixels, geometry = decode_image_geometry(
                jpeg.data.numpy().tobytes(), self.preprocess, max_pixels=self.max_pixels
            )
        except ImageDecodeError as exc:
            return jpeg.index, None, None, str(exc)
        except MemoryError:
            from alselect.images import OUT_OF_MEMORY

            return jpeg.index, None, None, OUT_OF_MEMORY
        tensor = torch.from_numpy(pixels).to(self.device)
        return jpeg.index, tensor, torch.from_numpy(geometry.astype(np.int64)), None


def _pixels(jpeg: JpegFile) -> int:
    return 3 * jpeg.width * jpeg.height
