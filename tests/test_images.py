"""Image decoding: resize + centre crop, colour modes, EXIF orientation, JPEG draft, failure reasons."""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin, features

from alselect.images import ImageDecodeError, load_image
from alselect.preprocess import Preprocess
from tests.helpers import decode_peak_growth, needs_proc

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    """Random RGB noise at ``path`` (format from the suffix), like conftest.write_image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def decode(path: Path, size: int, resize: int | None = None) -> np.ndarray:
    return load_image(path, Preprocess(image_size=size, resize_size=resize or size))


def hwc(array: np.ndarray) -> np.ndarray:
    """``[3,S,S]`` -> ``[S,S,3]`` as int, for pixel comparisons without uint8 wrap-around."""
    return array.transpose(1, 2, 0).astype(int)


def reference(img: Image.Image, size: int, resize: int) -> np.ndarray:
    """Brute force: resize the whole RGB image (shorter side -> resize), then crop the centre.

    Only used with sizes where the resized image and the crop offsets are whole pixels.
    """
    rgb = img.convert("RGB")
    width, height = rgb.size
    scale = resize / min(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    assert (new_w, new_h) == (width * scale, height * scale), "pick sizes that scale exactly"
    assert (new_w - size) % 2 == 0 and (new_h - size) % 2 == 0, "pick sizes with a whole-pixel crop"
    full = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(full.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def save(img: Image.Image, path: Path, **kwargs: Any) -> Path:
    img.save(path, **kwargs)
    return path


def reason(path: Path, size: int = 8) -> str:
    with pytest.raises(ImageDecodeError) as exc:
        decode(path, size)
    return str(exc.value)


# --- geometry -----------------------------------------------------------------------------------


def test_output_shape_dtype_and_layout(tmp_path: Path) -> None:
    path = write_image(tmp_path / "noise.png", seed=3, size=(24, 20))
    out = decode(path, 12, 14)
    assert out.shape == (3, 12, 12)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(decode(path, 20), reference(Image.open(path), 20, 20))


def halves_image(transpose: bool) -> Image.Image:
    """40x20: a 1 px green frame around a red left half and a blue right half (or transposed)."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = RED
    pixels[:, 20:] = BLUE
    pixels[0, :] = pixels[-1, :] = pixels[:, 0] = pixels[:, -1] = GREEN
    return Image.fromarray(pixels.transpose(1, 0, 2).copy() if transpose else pixels)


@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_resize_shorter_side_then_centre_crop(tmp_path: Path, portrait: bool) -> None:
    img = halves_image(portrait)
    path = save(img, tmp_path / "halves.png")
    # Shorter side 20 -> 10 (scale 1/2): 20x10, centre crop 8x8 = source box x 12..28, y 2..18.
    out = hwc(decode(path, 8, 10))
    if portrait:
        out = out.transpose(1, 0, 2)
    assert out.shape == (8, 8, 3)
    assert np.all(out[:, :, 1] == 0), "the green frame lies outside the crop"
    assert np.all(out[:, :3] == RED), "columns 0-2 sample only the red half"
    assert np.all(out[:, 5:] == BLUE), "columns 5-7 sample only the blue half"
    assert np.all(out[:, 3, 0] > out[:, 3, 2]) and np.all(out[:, 4, 2] > out[:, 4, 0]), "blend at the seam"
    np.testing.assert_allclose(decode(path, 8, 10), reference(img, 8, 10), atol=2)


def test_upscale_and_identity(tmp_path: Path) -> None:
    path = write_image(tmp_path / "noise.png", seed=5, size=(16, 16))
    np.testing.assert_array_equal(hwc(decode(path, 16)), np.asarray(Image.open(path)).astype(int))
    img = halves_image(False)  # 40x20 -> 80x40 then the centre 32x32 (x 24..56)
    path = save(img, tmp_path / "small.png")
    np.testing.assert_allclose(decode(path, 32, 40), reference(img, 32, 40), atol=2)


# --- colour modes -------------------------------------------------------------------------------


def blocks(values: list[int], block: int = 4) -> np.ndarray:
    """A 2x2 arrangement of ``block``-sized squares with the four given values."""
    grid = np.array(values).reshape(2, 2)
    return np.kron(grid, np.ones((block, block), dtype=int))


def test_greyscale_l_becomes_equal_channels(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = hwc(decode(save(Image.fromarray(grey, "L"), tmp_path / "grey.png"), 8))
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


def test_greyscale_with_alpha_drops_alpha(tmp_path: Path) -> None:
    grey = blocks([10, 90, 170, 250]).astype(np.uint8)
    alpha = blocks([0, 255, 128, 0]).astype(np.uint8)
    img = Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    out = hwc(decode(save(img, tmp_path / "la.png"), 8))
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


PALETTE = [(200, 30, 40), (10, 220, 90), (40, 50, 230), (250, 250, 10)]


def palette_image() -> tuple[Image.Image, np.ndarray]:
    indices = blocks([0, 1, 2, 3]).astype(np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette([c for rgb in PALETTE for c in rgb] + [0] * (768 - 12))
    expected = np.array(PALETTE)[indices]
    return img, expected


@pytest.mark.parametrize("transparency", [None, 1, b"\xff\x00\x80\xff"], ids=["opaque", "index", "trns"])
def test_palette_images_keep_palette_colours(tmp_path: Path, transparency: int | bytes | None) -> None:
    img, expected = palette_image()
    kwargs = {} if transparency is None else {"transparency": transparency}
    path = save(img, tmp_path / "palette.png", **kwargs)
    with Image.open(path) as check:
        assert check.mode == "P" and (transparency is None) == ("transparency" not in check.info)
    np.testing.assert_array_equal(hwc(decode(path, 8)), expected)


def test_rgba_drops_alpha_keeps_colour(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:4, :4], rgb[:4, 4:], rgb[4:, :4], rgb[4:, 4:] = (
        (250, 10, 10),
        (10, 250, 10),
        (10, 10, 250),
        (90, 90, 90),
    )
    alpha = blocks([0, 64, 255, 0]).astype(np.uint8)
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    np.testing.assert_array_equal(hwc(decode(save(img, tmp_path / "rgba.png"), 8)), rgb)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    img.paste((255, 0, 0, 0), (8, 0, 16, 16))  # cyan right half
    path = save(img, tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = hwc(decode(path, 16))
    np.testing.assert_allclose(out[2:-2, 1:5], np.broadcast_to(RED, (12, 4, 3)), atol=6)
    np.testing.assert_allclose(out[2:-2, 11:15], np.broadcast_to((0, 255, 255), (12, 4, 3)), atol=6)


def test_sixteen_bit_greyscale_is_scaled(tmp_path: Path) -> None:
    values = blocks([65535, 32768, 0, 16384]).astype(np.uint16)
    path = save(Image.fromarray(values), tmp_path / "grey16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = hwc(decode(path, 8))
    assert np.all(out[:, :, 0] == out[:, :, 1]) and np.all(out[:, :, 1] == out[:, :, 2])
    grey = out[:, :, 0]
    assert np.all(grey[:4, :4] == 255)
    assert np.all(np.abs(grey[:4, 4:] - 128) <= 1)
    assert np.all(grey[4:, :4] == 0)
    assert np.all(np.abs(grey[4:, 4:] - 64) <= 1)


def test_one_bit_image(tmp_path: Path) -> None:
    bits = blocks([1, 0, 0, 1]).astype(bool)
    path = save(Image.fromarray(bits), tmp_path / "bits.png")
    with Image.open(path) as check:
        assert check.mode == "1"
    out = hwc(decode(path, 8))
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], np.where(bits, 255, 0))


# --- EXIF orientation ---------------------------------------------------------------------------

# Orientation tag -> the transpose a viewer applies, and the output quadrant that ends up white.
ORIENTATIONS = {
    1: (None, (0, 0)),
    3: (Image.Transpose.ROTATE_180, (1, 1)),
    6: (Image.Transpose.ROTATE_270, (0, 1)),
    8: (Image.Transpose.ROTATE_90, (1, 0)),
}


@pytest.mark.parametrize("scale", [1, 20], ids=["40x20", "800x400-draft"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, scale: int) -> None:
    pixels = np.zeros((20 * scale, 40 * scale, 3), dtype=np.uint8)
    pixels[: 10 * scale, : 20 * scale] = 255  # white top-left quadrant of a landscape image
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(img, tmp_path / "oriented.jpg", quality=95, exif=exif)
    out = hwc(decode(path, 10)).mean(axis=2)
    # After orientation the image is 40x20 or 20x40; either way the 10x10 output covers the centre
    # square, whose four 5x5 quadrants are all-white in exactly one place.
    white_row, white_col = ORIENTATIONS[orientation][1]
    for row in (0, 1):
        for col in (0, 1):
            centre = out[row * 5 + 1 : row * 5 + 4, col * 5 + 1 : col * 5 + 4]
            if (row, col) == (white_row, white_col):
                assert centre.min() > 200, (row, col, out.round())
            else:
                assert centre.max() < 55, (row, col, out.round())
    method = ORIENTATIONS[orientation][0]
    upright = save(img if method is None else img.transpose(method), tmp_path / "upright.png")
    # JPEG noise and the DCT-scaled draft decode soften the quadrant edge differently from a bilinear
    # resize of the lossless PNG; a misplaced quadrant would give a mean difference near 127.
    assert np.abs(hwc(decode(upright, 10)) - hwc(decode(path, 10))).mean() < 12


# --- JPEG draft ---------------------------------------------------------------------------------


def smooth_photo(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / width
    green = 255 * y / height
    blue = 127 + 100 * np.sin(x / width * 6.0) * np.cos(y / height * 4.0)
    pixels = np.stack([red, green, blue], axis=-1)
    pixels[height // 4 : height // 2, width // 5 : width // 2] = (240, 240, 240)  # a large bright patch
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(("size", "resize"), [(32, 32), (224, 256)])
def test_jpeg_draft_matches_full_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, resize: int
) -> None:
    path = save(smooth_photo(1600, 1280), tmp_path / "large.jpg", quality=90)
    drafted: list[tuple[int, int]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> Any:
        result = original_draft(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = decode(path, size, resize)
    assert len(drafted) == 1
    width, height = drafted[0]
    assert width < 1600 and min(width, height) >= resize, "decoded at a reduced DCT scale, never below resize"
    monkeypatch.undo()
    with Image.open(path) as full:
        full.load()  # no draft: the full 1600x1280 decode
        expected = reference(full, size, resize)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 6


# --- failures -----------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason(path) == "empty file"


def test_random_bytes_are_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert reason(path).startswith("not an image")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    full = write_image(tmp_path / f"full{suffix}", seed=1, size=(64, 64))
    data = full.read_bytes()
    path = tmp_path / f"half{suffix}"
    path.write_bytes(data[: len(data) // 2])
    assert reason(path).startswith("truncated or corrupt")


@pytest.mark.parametrize("limit", [100, 300, 399])
def test_decompression_bomb_is_over_max_pixels(tmp_path: Path, limit: int) -> None:
    path = write_image(tmp_path / "bomb.png", seed=2, size=(20, 20))  # 400 pixels
    with pytest.raises(ImageDecodeError, match=r"^decompression bomb: 20x20 .* \(--max-pixels\)$"):
        load_image(path, Preprocess(image_size=8, resize_size=8), max_pixels=limit)
    assert load_image(path, Preprocess(image_size=8, resize_size=8), max_pixels=400).shape == (3, 8, 8)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` RGB and holds one empty data chunk: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def test_real_bomb_is_refused_by_default_before_decoding(tmp_path: Path) -> None:
    """50000x50000 RGB would take 10 GB decoded; the 100-byte file is refused from its header."""
    path = png_header_only(tmp_path / "bomb.png", 50000, 50000)
    assert reason(path) == (
        "decompression bomb: 50000x50000 = 2,500 MP is over the limit of 500 MP (--max-pixels)"
    )


def test_pillows_own_limit_neither_applies_nor_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_image(tmp_path / "ok.png", seed=3, size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert decode(path, 8).shape == (3, 8, 8)
    assert Image.MAX_IMAGE_PIXELS == 10  # restored for the rest of the process


def big_camera_jpeg(path: Path, width: int = 10000, height: int = 9000) -> Path:
    """A 90 MP JPEG (10000x9000, just over Pillow's 89.5 MP bomb warning), made cheaply."""
    gradient = Image.linear_gradient("L").resize((width // 10, height // 10)).resize((width, height))
    Image.merge("RGB", [gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient]).save(
        path, quality=80
    )
    return path


@needs_proc
def test_ninety_megapixel_camera_jpeg_decodes_in_little_memory(tmp_path: Path) -> None:
    path = big_camera_jpeg(tmp_path / "DSC_0001.JPG")
    out = decode(path, 224, 256)
    assert out.shape == (3, 224, 224)
    assert 40 < out[0].mean() < 215 and out[0].std() > 10  # the gradient, not a blank
    growth = decode_peak_growth(path)
    assert growth < 64 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MB (a full decode is 343 MB)"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "P-transparent", "1", "PA"])
@pytest.mark.parametrize("factor", [2, 3, 7])
def test_strip_conversion_equals_converting_the_whole_image(mode: str, factor: int) -> None:
    """Modes converted before the reduce go strip by strip; the pixels are exactly the same."""
    from alselect import images

    rng = np.random.default_rng(factor)
    rgba = Image.fromarray(rng.integers(0, 256, (301, 203, 4), dtype=np.uint8), "RGBA")
    img = {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P": rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE),
        "P-transparent": rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE),
        "1": rgba.convert("1"),
        "PA": rgba.convert("PA"),
    }[mode]
    if mode == "P-transparent":
        img.info["transparency"] = 5
    expected = images._converted(img).reduce(factor)
    old_strip = images._STRIP_PIXELS
    try:
        images._STRIP_PIXELS = 203 * factor * factor * 4  # several strips, the last one partial
        out = images.to_rgb(img, factor)
    finally:
        images._STRIP_PIXELS = old_strip
    assert out.mode == "RGB" and out.size == expected.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_image(tmp_path / "locked.png", seed=4)
    path.chmod(0)
    try:
        assert reason(path).startswith("unreadable")
    finally:
        path.chmod(0o644)


def test_permission_error_while_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same branch as chmod 000, reachable as root: the open itself is refused."""
    path = write_image(tmp_path / "locked.png", seed=4)

    def refuse(*_args: Any, **_kwargs: Any) -> Image.Image:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    assert reason(path) == "unreadable: Permission denied"


def test_vanished_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert reason(tmp_path / "gone.png") == "vanished while reading"
    path = write_image(tmp_path / "going.png", seed=6)

    def vanish(*_args: Any, **_kwargs: Any) -> Image.Image:  # deleted between stat() and open()
        path.unlink()
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    monkeypatch.setattr(Image, "open", vanish)
    assert reason(path) == "vanished while reading"


# --- other formats ------------------------------------------------------------------------------


def test_gif_uses_first_frame(tmp_path: Path) -> None:
    first, second = Image.new("RGB", (12, 12), RED), Image.new("RGB", (12, 12), BLUE)
    path = save(first, tmp_path / "anim.gif", save_all=True, append_images=[second], duration=50)
    with Image.open(path) as check:
        assert check.n_frames == 2
    np.testing.assert_array_equal(hwc(decode(path, 12)), np.broadcast_to(RED, (12, 12, 3)))


def test_multipage_tiff_uses_first_page(tmp_path: Path) -> None:
    first = Image.fromarray(np.asarray(Image.open(write_image(tmp_path / "a.png", seed=7, size=(16, 16)))))
    second = Image.new("RGB", (16, 16), BLUE)
    path = save(first, tmp_path / "pages.tiff", save_all=True, append_images=[second])
    with Image.open(path) as check:
        assert check.n_frames == 2
    np.testing.assert_array_equal(hwc(decode(path, 16)), np.asarray(first).astype(int))


@pytest.mark.parametrize("suffix", [".bmp", ".webp"])
def test_bmp_and_webp(tmp_path: Path, suffix: str) -> None:
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    img = Image.fromarray(np.asarray(Image.open(write_image(tmp_path / "src.png", seed=8, size=(24, 20)))))
    path = save(img, tmp_path / f"img{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    np.testing.assert_array_equal(decode(path, 20), reference(img, 20, 20))
    np.testing.assert_allclose(decode(path, 8, 10), reference(img, 8, 10), atol=2)
