"""``preview``: a contact sheet of what ``export`` would send next, checked pixel by pixel."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alselect.preview import CAPTION, PAD, cell_size, thumb_origin
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
    assert (width, height) == (64 + 2 * PAD, 64 + 2 * PAD + CAPTION)
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
