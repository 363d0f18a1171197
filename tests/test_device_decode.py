"""Batched JPEG decode on the model's device (``alselect.device_decode``).

The logic runs on any device, so it is tested with CPU tensors (``decode_jpeg`` on the CPU); the
CUDA test at the end skips without a GPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from alselect.device_decode import DeviceDecoder, JpegFile, draft_scale, orient, preprocess_images
from alselect.embed import (
    DecodedBatch,
    EmbedOptions,
    _ImageFiles,
    collate,
    jpegs_on_device,
    with_device_jpegs,
)
from alselect.errors import UsageError
from alselect.images import decode_image_geometry, jpeg_header, load_image_geometry
from alselect.preprocess import Preprocess
from tests.helpers import MakeImages, cli

PHOTOS = Path(__file__).resolve().parent.parent / "sample_data" / "images" / "photos"
CROP_224 = Preprocess(image_size=224, resize_size=256)
CROP_28 = Preprocess(image_size=28, resize_size=32)
LETTERBOX = Preprocess(image_size=224, resize_size=224, resize="letterbox")
SETTINGS = [CROP_224, CROP_28, LETTERBOX]
SETTING_IDS = ["crop224", "crop28", "letterbox224"]


def smooth_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def jpeg_file(index: int, data: bytes) -> JpegFile:
    header = jpeg_header(data)
    assert header is not None
    width, height, orientation, _ = header
    return JpegFile(index, torch.frombuffer(bytearray(data), dtype=torch.uint8), width, height, orientation)


@pytest.mark.parametrize("pre", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("size", [(300, 200), (1200, 900), (97, 300)], ids=["small", "reduced", "tall"])
def test_preprocessing_matches_pillow_on_lossless_images(pre: Preprocess, size: tuple[int, int]) -> None:
    """Box-reduce, crop or letterbox and Pillow's BILINEAR weights: within 1 level of the CPU path
    (a PNG: no draft, so both see the same pixels)."""
    pixels = smooth_image(*size)
    expected, geometry = decode_image_geometry(png_bytes(pixels), pre)
    out, got_geometry = preprocess_images([torch.from_numpy(pixels).permute(2, 0, 1)], pre)
    diff = np.abs(out[0].numpy().astype(int) - expected.astype(int))
    assert diff.max() <= 1
    np.testing.assert_array_equal(got_geometry[0].numpy(), geometry)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_as_exif_transpose(orientation: int) -> None:
    pixels = smooth_image(7, 5)
    img = Image.fromarray(pixels, "RGB")
    exif = img.getexif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    img.save(out, format="PNG", exif=exif)
    with Image.open(io.BytesIO(out.getvalue())) as reopened:
        expected = np.asarray(ImageOps.exif_transpose(reopened))
    turned = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation)
    np.testing.assert_array_equal(turned.permute(1, 2, 0).numpy(), expected)


def test_draft_scale_is_pillows() -> None:
    for width, height in [(1024, 768), (512, 512), (451, 300), (4000, 3000), (100, 90)]:
        with Image.new("RGB", (width, height)) as img:
            out = io.BytesIO()
            img.save(out, format="JPEG")
        for pre in SETTINGS:
            with Image.open(io.BytesIO(out.getvalue())) as jpeg:
                jpeg.draft("RGB", (pre.resize_size, pre.resize_size))
                scale = draft_scale(width, height, pre)
                assert jpeg.size == (-(-width // scale), -(-height // scale)), (width, height, scale)


# Stated tolerance of the device path against the CPU path on real photos (sample_data, from
# scikit-image's data set): the CPU path decodes at a reduced DCT scale, the device path decodes in
# full and averages blocks; they differ most at sharp, high-contrast detail.
MAX_ABS_DIFF = 32  # levels of 255, at any one pixel
MEAN_ABS_DIFF = 1.0  # levels of 255, over an image


@pytest.mark.parametrize("pre", SETTINGS, ids=SETTING_IDS)
def test_device_decode_of_real_photos_is_within_the_stated_tolerance(pre: Preprocess) -> None:
    paths = sorted(PHOTOS.glob("*.jpg"))
    assert len(paths) >= 5
    jpegs = [jpeg_file(i, p.read_bytes()) for i, p in enumerate(paths)]
    decoder = DeviceDecoder(pre, torch.device("cpu"))
    results = decoder.decode(jpegs)
    assert decoder.cpu_fallbacks == 0
    for (_, pixels, geometry, reason), path in zip(results, paths, strict=True):
        assert reason is None and pixels is not None and geometry is not None
        expected, expected_geometry = load_image_geometry(path, pre)
        diff = np.abs(pixels.numpy().astype(int) - expected.astype(int))
        assert diff.max() <= MAX_ABS_DIFF, path.name
        assert diff.mean() <= MEAN_ABS_DIFF, path.name
        np.testing.assert_array_equal(geometry.numpy(), expected_geometry)


def test_device_decode_follows_exif_orientation() -> None:
    with Image.open(PHOTOS / "coffee.jpg") as img:
        exif = img.getexif()
        exif[0x0112] = 6  # stored sideways: turn 90° clockwise to view
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=95, exif=exif)
    data = out.getvalue()
    (index, pixels, geometry, reason), *_ = DeviceDecoder(CROP_224, torch.device("cpu")).decode(
        [jpeg_file(3, data)]
    )
    expected, expected_geometry = decode_image_geometry(data, CROP_224)
    assert index == 3 and reason is None and pixels is not None and geometry is not None
    np.testing.assert_array_equal(geometry.numpy(), expected_geometry)  # sides swapped: 512 high
    assert expected_geometry[0] == 512
    diff = np.abs(pixels.numpy().astype(int) - expected.astype(int))
    assert diff.max() <= MAX_ABS_DIFF and diff.mean() <= MEAN_ABS_DIFF


def test_a_jpeg_the_decoder_refuses_takes_the_cpu_path() -> None:
    good = (PHOTOS / "chelsea.jpg").read_bytes()
    truncated = good[:400]  # a header, then nothing
    decoder = DeviceDecoder(CROP_28, torch.device("cpu"))
    results = decoder.decode([jpeg_file(0, good), jpeg_file(1, truncated), jpeg_file(2, good)])
    assert [r[0] for r in results] == [0, 1, 2]
    assert results[0][3] is None and results[2][3] is None
    assert results[1][1] is None and results[1][3]  # the CPU path's reason
    assert decoder.cpu_fallbacks == 1


def test_batches_mix_worker_pixels_and_device_jpegs_in_index_order() -> None:
    png = PHOTOS / "chelsea_rgba.png"
    jpg = [PHOTOS / "coffee.jpg", PHOTOS / "rocket.jpg"]
    paths = [png, jpg[0], png, jpg[1], PHOTOS / "missing.jpg"]
    dataset = _ImageFiles(paths, CROP_28, device_jpegs=True)
    items = [dataset[i] for i in range(len(paths))]
    assert [item[4] is not None for item in items] == [False, True, False, True, False]
    assert items[4][2] is not None  # the missing file fails in the worker
    batch = collate(items)
    assert batch.indices == [0, 2] and len(batch.jpegs) == 2
    merged = with_device_jpegs(batch, DeviceDecoder(CROP_28, torch.device("cpu")))
    assert merged.indices == [0, 1, 2, 3] and merged.count == 5
    assert [i for i, _ in merged.failures] == [4]
    assert merged.pixels is not None and merged.geometry is not None
    for row, index in enumerate(merged.indices):
        expected, geometry = load_image_geometry(paths[index], CROP_28)
        diff = np.abs(merged.pixels[row].numpy().astype(int) - expected.astype(int))
        assert diff.max() <= MAX_ABS_DIFF
        np.testing.assert_array_equal(merged.geometry[row].numpy(), geometry)
    nothing = DecodedBatch([], None, None, [(5, "bad")], 1, [])
    empty = with_device_jpegs(nothing, DeviceDecoder(CROP_28, torch.device("cpu")))
    assert empty.pixels is None and empty.failures == [(5, "bad")]


def test_where_jpegs_are_decoded() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not jpegs_on_device(EmbedOptions(decode="auto"), cpu)
    assert jpegs_on_device(EmbedOptions(decode="auto"), cuda)
    assert jpegs_on_device(EmbedOptions(decode="gpu"), cuda)
    assert not jpegs_on_device(EmbedOptions(decode="cpu"), cuda)
    with pytest.raises(UsageError, match="needs a CUDA device"):
        jpegs_on_device(EmbedOptions(decode="gpu"), cpu)
    with pytest.raises(UsageError, match="--decode"):
        EmbedOptions(decode="nvjpeg")


def test_decode_gpu_without_cuda_is_refused_before_any_work_even_with_nothing_to_embed(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError, match="--decode gpu needs a CUDA device; the model runs on cpu"):
        EmbedOptions(device="cpu", decode="gpu").check()
    with pytest.raises(UsageError, match="--workers must be >= 0"):
        EmbedOptions(device="cpu", workers=-1).check()
    make_images(tmp_path / "pool", 3)
    store = ["--store", str(tmp_path / "store")]
    model = ["-m", str(tiny_checkpoint), "--workers", "0"]
    code, out, err = cli(capsys, *store, "score", str(tmp_path / "pool"), *model, "-s", "entropy")
    assert code == 0, err  # everything embedded now: nothing needs decoding any more
    runs = _run_count(tmp_path / "store")
    for command in (
        ["score", str(tmp_path / "pool"), *model, "-s", "entropy"],
        ["embed", str(tmp_path / "pool"), *model],
    ):
        code, out, err = cli(capsys, *store, *command, "--device", "cpu", "--decode", "gpu")
        assert (code, out) == (2, ""), err
        assert err.strip() == "alselect: error: --decode gpu needs a CUDA device; the model runs on cpu"
    assert _run_count(tmp_path / "store") == runs
    code, _, err = cli(
        capsys,
        "--store",
        str(tmp_path / "fresh"),
        "embed",
        str(tmp_path / "pool"),
        *model,
        "--device",
        "cpu",
        "--decode",
        "gpu",
    )
    assert code == 2 and not (tmp_path / "fresh").exists(), err


def _run_count(store_path: Path) -> int:
    from alselect.store import Store

    with Store.open(store_path) as store:
        return int(store.scalar("SELECT COUNT(*) FROM runs"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pre", SETTINGS, ids=SETTING_IDS)
def test_nvjpeg_decode_is_within_the_stated_tolerance(pre: Preprocess) -> None:
    paths = sorted(PHOTOS.glob("*.jpg"))
    decoder = DeviceDecoder(pre, torch.device("cuda"))
    for (_, pixels, geometry, reason), path in zip(
        decoder.decode([jpeg_file(i, p.read_bytes()) for i, p in enumerate(paths)]), paths, strict=True
    ):
        assert reason is None and pixels is not None and geometry is not None
        assert pixels.device.type == "cuda"
        expected, expected_geometry = load_image_geometry(path, pre)
        diff = np.abs(pixels.cpu().numpy().astype(int) - expected.astype(int))
        assert diff.max() <= MAX_ABS_DIFF and diff.mean() <= MEAN_ABS_DIFF, path.name
        np.testing.assert_array_equal(geometry.numpy(), expected_geometry)
