"""``preview``: a contact sheet of what ``export`` would send next, checked pixel by pixel."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alselect.preview import CAPTION, MIN_CAPTION_WIDTH, PAD, cell_size, thumb_origin
from alselect.store import Store
from tests.helpers import MakeImages, cli, exported_count, exports, run_alselect, score


@pytest.fixture
def scored_store(tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages) -> Path:
    make_images(tmp_path / "pool", 5)
    score(tmp_path / "store", tmp_path / "pool", tiny_checkpoint)
    return tmp_path / "store"


COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230)]  # fmt: skip


@pytest.fixture
def coloured_store(tmp_path: Path, tiny_checkpoint: Path) -> tuple[Path, dict[str, tuple[int, int, int]]]:
    """Seven flat-coloured images of different shapes (one EXIF-rotated JPEG)."""
    pool = tmp_path / "pool"
    pool.mkdir()
    colours = {}
    for i, colour in enumerate(COLOURS):
        name = f"c{i} #&%.png" if i != 3 else "c3.jpg"
        size = (40 + 10 * i, 30) if i % 2 else (30, 50)
        image = Image.new("RGB", size, colour)
        if name.endswith(".jpg"):
            exif = Image.Exif()
            exif[274] = 6
            image.save(pool / name, exif=exif, quality=100)
        else:
            image.save(pool / name)
        colours[name] = colour
    score(tmp_path / "store", pool, tiny_checkpoint)
    return tmp_path / "store", colours


def rank_order(store: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The paths ``export`` would send next, in rank order (not recorded)."""
    code, out, err = cli(capsys, "--store", str(store), "export", "--dry-run")
    assert code == 0, err
    return [row["path"] for row in csv.DictReader(io.StringIO(out, newline=""))]


def test_preview_draws_the_next_images_in_rank_order(
    coloured_store: tuple[Path, dict[str, tuple[int, int, int]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, colours = coloured_store
    sheet_path = tmp_path / "sheet.png"
    code, out, err = cli(
        capsys, "--store", str(store), "preview", "--top", "5", "-o", str(sheet_path), "--columns", "3",
        "--thumb-size", "64",
    )  # fmt: skip
    assert (code, out) == (0, ""), err
    order = rank_order(store, capsys)
    with Image.open(sheet_path) as sheet:
        pixels = np.asarray(sheet.convert("RGB")).astype(int)
    width, height = cell_size(64)
    assert (width, height) == (max(64, MIN_CAPTION_WIDTH) + 2 * PAD, 64 + 2 * PAD + CAPTION)
    assert pixels.shape == (2 * height, 3 * width, 3)  # 5 thumbnails: two rows of three columns
    # Cell by cell, the image whose colour sits at the thumbnail's centre: the first five in rank order.
    found = []
    for index in range(6):
        x, y = thumb_origin(index, 3, 64)
        found += [n for n, c in colours.items() if np.abs(pixels[y + 32, x + 32] - c).max() <= 3]
    assert found == order[:5]
    x, y = thumb_origin(5, 3, 64)  # the sixth cell is empty: white, no thumbnail
    assert (pixels[y : y + 64, x : x + 64] == 255).all()
    assert exported_count(store) == 0 and exports(store) == []  # nothing recorded
    assert "nothing recorded" in err


def test_preview_keeps_aspect_and_exif_orientation(
    coloured_store: tuple[Path, dict[str, tuple[int, int, int]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, colours = coloured_store
    code, _, err = cli(capsys, "--store", str(store), "preview", "--top", "7", "-o", str(tmp_path / "s.png"),
                       "--columns", "7", "--thumb-size", "100")  # fmt: skip
    assert code == 0, err
    order = rank_order(store, capsys)
    pixels = np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).astype(int)
    index = order.index("c3.jpg")  # stored 70x30 with orientation 6: displayed 30 wide, 70 high
    x, y = thumb_origin(index, 7, 100)
    box = pixels[y : y + 100, x : x + 100]
    mask = np.abs(box - colours["c3.jpg"]).max(axis=2) <= 6
    rows, cols = np.nonzero(mask)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (70, 30)
    assert (rows.min(), cols.min()) == (15, 35)  # centred in the square


def test_preview_does_not_take_the_writer_lock(
    coloured_store: tuple[Path, dict[str, tuple[int, int, int]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, _ = coloured_store
    monkeypatch.setenv("ALSELECT_LOCK_TIMEOUT", "0.5")
    with Store.open(store, write=True):  # a long-running writer holds the lock
        done = run_alselect("--store", str(store), "preview", "-o", str(tmp_path / "p.png"))
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "p.png").size[0] > 0


def test_preview_with_nothing_left_says_why(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "--store", str(scored_store), "export", "-o", str(tmp_path / "all.csv"))[0] == 0
    code, _, err = cli(capsys, "--store", str(scored_store), "preview", "-o", str(tmp_path / "p.png"))
    assert code == 3 and "nothing to preview" in err and not (tmp_path / "p.png").exists()


def test_preview_refuses_an_unknown_image_type(
    scored_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "--store", str(scored_store), "preview", "-o", "sheet.txt")
    assert code == 2 and ".png" in err


def test_preview_and_cvat_use_the_project_pixel_limit_not_pillows(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 5: images between Pillow's bomb limit and --max-pixels warned or failed. Pillow's limit
    is lowered here so that 400x300 test images lie in that gap (captions' glyphs stay under it)."""
    import warnings

    from alselect.export import select_rows
    from alselect.exporters import ExportContext, get_exporter
    from alselect.preview import contact_sheet
    from tests.conftest import write_image

    for seed in range(3):
        write_image(tmp_path / "pool" / f"big{seed}.png", seed=seed, size=(400, 300))
    score(tmp_path / "store", tmp_path / "pool", tiny_checkpoint)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 120,000 pixels: over twice that
    with Store.open(tmp_path / "store") as store:
        rows = select_rows(store).rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        _, unreadable = contact_sheet(rows, thumb_size=32)
        manifest = io.StringIO()
        get_exporter("cvat").write(rows, manifest, ExportContext())
    assert unreadable == []
    assert len(manifest.getvalue().splitlines()) == 2 + len(rows)
    assert Image.MAX_IMAGE_PIXELS == 20_000  # restored for the rest of the process


@pytest.mark.parametrize(("size", "fmt"), [("100000", ".png"), ("4000", ".webp")])
def test_a_sheet_too_large_for_its_format_is_a_usage_error(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str, fmt: str
) -> None:
    """Defect 6: --thumb-size 100000 tried to allocate the sheet."""
    target = tmp_path / f"sheet{fmt}"
    code, _, err = cli(
        capsys, "--store", str(scored_store), "preview", "-o", str(target), "--thumb-size", size
    )
    assert code == 2 and "limit of" in err and "--thumb-size" in err and not target.exists()
    assert len(err.strip().splitlines()) == 1


def test_a_sheet_over_half_the_memory_is_refused() -> None:
    from alselect.errors import UsageError
    from alselect.preview import check_sheet

    check_sheet(20, 5, 160, "PNG", available=10**9)
    with pytest.raises(UsageError, match="memory"):
        check_sheet(20, 5, 1600, "PNG", available=10**8)


def test_small_thumbnails_keep_readable_captions() -> None:
    from PIL import ImageDraw

    from alselect.preview import fit_text

    width, _ = cell_size(16)
    assert width == MIN_CAPTION_WIDTH + 2 * PAD
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    assert fit_text(draw, "#20  1.0986", width - 2 * PAD) == "#20  1.0986"


def test_an_image_replaced_since_scoring_is_marked_not_shown(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 18: the sheet showed whatever the path now holds."""
    from tests.conftest import write_image

    with Store.open(scored_store) as store:
        folder, first = store.rows("SELECT root, relpath FROM images ORDER BY relpath LIMIT 1")[0]
    write_image(Path(folder) / first, seed=999)  # new content under the scored path
    code, _, err = cli(capsys, "--store", str(scored_store), "preview", "-o", str(tmp_path / "p.png"))
    assert code == 0, err
    assert f"1 image(s) are not shown and are marked: {first!r} (changed since it was scored" in err
