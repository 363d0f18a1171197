#!/usr/bin/env python3
"""Build ``sample_data/``: Fashion-MNIST test images, a few CC0 photos, and a trained SmallCNN.

Everything comes from offline sources and fixed seeds:

* Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files);
* photos bundled with scikit-image (``pip install scikit-image``; needed by this script only);
* ``alselect.models.small_cnn.SmallCNN`` trained on a seeded subset of the train split.

Run from the repository root: ``python scripts/make_sample_data.py``.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent

try:
    from alselect.datasets import FASHION_MNIST_CLASSES as CLASS_NAMES
except ImportError:  # run from a checkout where alselect is not installed
    sys.path.insert(0, str(REPO_ROOT))
    from alselect.datasets import FASHION_MNIST_CLASSES as CLASS_NAMES
MEAN = 0.2860
STD = 0.3530
IMAGE_SIZE = 28
PER_CLASS = 30
MAX_PHOTO_SIDE = 512
MAX_RGBA_SIDE = 256
JPEG_QUALITY = 85
BATCH_SIZE = 128
LEARNING_RATE = 2e-3


@dataclass(frozen=True)
class Photo:
    """A scikit-image sample photo and its licence as stated in skimage's data docstrings."""

    name: str
    title: str
    source: str
    license: str
    statement: str


# Licences quoted from the docstrings of ``skimage.data.<name>`` (skimage/data/_fetchers.py).
PHOTOS = [
    Photo(
        "astronaut",
        "Astronaut Eileen Collins",
        "NASA Great Images database, https://flic.kr/p/r9qvLn",
        "Public domain",
        "No known copyright restrictions, released into the public domain.",
    ),
    Photo(
        "chelsea",
        "Chelsea the cat",
        "Photograph by Stefan van der Walt",
        "CC0",
        "No copyright restrictions.  CC0 by the photographer (Stefan van der Walt).",
    ),
    Photo(
        "coffee",
        "Coffee cup (courtesy of Pikolo Espresso Bar)",
        "Photograph by Rachel Michetti",
        "CC0",
        "No copyright restrictions.  CC0 by the photographer (Rachel Michetti).",
    ),
    Photo(
        "rocket",
        "Launch of DSCOVR on Falcon 9 by SpaceX",
        "SpaceX Photos, https://www.flickr.com/photos/spacexphotos/16511594820/",
        "Public domain",
        "The image was captured by SpaceX and released in the public domain.",
    ),
    Photo(
        "camera",
        'Gray-level "camera" image',
        "Photograph by Lav Varshney",
        "CC0",
        "No copyright restrictions. CC0 by the photographer (Lav Varshney).",
    ),
]
RGBA_PHOTO = "chelsea"

MIT_LICENSE = """\
The MIT License (MIT)

Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def load_split(fmnist_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28] uint8`` and labels ``[N] uint8`` of ``train`` or ``t10k``."""
    from alselect.datasets import read_idx

    images = read_idx(fmnist_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(fmnist_dir / f"{split}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{split}: unexpected shapes {images.shape} / {labels.shape}")
    return images, labels


def choose_test_sample(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``PER_CLASS`` seeded test indices per class, sorted."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=PER_CLASS, replace=False)
        for c in range(len(CLASS_NAMES))
    ]
    return np.sort(np.concatenate(picks))


def write_fashion(out: Path, images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> None:
    """Write the chosen test images as 8-bit grayscale PNGs and ``labels.csv``."""
    folder = out / "images" / "fashion"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in idx:
        rel = f"fashion/test_{int(i):05d}.png"
        Image.fromarray(images[i], mode="L").save(out / "images" / rel, optimize=True)
        label = int(labels[i])
        rows.append((rel, label, CLASS_NAMES[label]))
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "class_name"])
        writer.writerows(rows)


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale (never upscale) so the longer side is at most ``max_side``."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def write_photos(out: Path) -> list[str]:
    """Save the skimage photos as metadata-free JPEGs plus one small RGBA PNG; return names."""
    try:
        from skimage import data as skdata
    except ImportError:
        sys.exit("scikit-image is needed for the photos: pip install scikit-image")
    folder = out / "images" / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for photo in PHOTOS:
        # From a bare array: no EXIF, ICC profile or comments reach the output.
        image = fit_within(Image.fromarray(np.asarray(getattr(skdata, photo.name)())), MAX_PHOTO_SIDE)
        image.save(folder / f"{photo.name}.jpg", quality=JPEG_QUALITY, optimize=True)
        written.append(f"photos/{photo.name}.jpg")
        if photo.name == RGBA_PHOTO:
            rgba = fit_within(image.convert("RGB"), MAX_RGBA_SIDE).convert("RGBA")
            rgba.putalpha(_vignette_alpha(rgba.size))
            rgba.save(folder / f"{photo.name}_rgba.png", optimize=True)
            written.append(f"photos/{photo.name}_rgba.png")
    return written


def _vignette_alpha(size: tuple[int, int]) -> Image.Image:
    """Opaque ellipse fading to transparent corners (exercises RGBA → RGB conversion)."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    r = np.hypot((xs - (w - 1) / 2) / (w / 2), (ys - (h - 1) / 2) / (h / 2))
    alpha = np.clip((1.25 - r) / 0.5, 0.0, 1.0) * 255
    return Image.fromarray(alpha.round().astype(np.uint8), mode="L")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``[N, 28, 28] uint8`` → normalised ``[N, 3, 28, 28] float32`` (grey replicated 3×)."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = (x - MEAN) / STD
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def load_png_batch(paths: list[Path]) -> torch.Tensor:
    """Read PNGs as the inference pipeline does: RGB, shorter side 28, centre crop 28."""
    arrays = []
    for path in paths:
        with Image.open(path) as im:
            image = im.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{path}: expected {IMAGE_SIZE}x{IMAGE_SIZE}, got {image.size}")
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return ((x - MEAN) / STD).contiguous()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> list[float]:
    """Adam with cosine decay, batch 128, random horizontal flips; returns per-epoch loss."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps = epochs * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total, start = 0.0, time.perf_counter()
        for i in range(0, len(x), BATCH_SIZE):
            batch = order[i : i + BATCH_SIZE]
            xb, yb = x[batch], y[batch]
            flip = torch.rand(len(batch), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
        print(
            f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    return losses


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Class predictions in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean())


def write_readme(out: Path, info: dict[str, str]) -> None:
    """``sample_data/README.md``: contents, how it was made, measured accuracy."""
    photo_lines = "\n".join(f"  - `images/{p}`" for p in info["photos"].split(","))
    text = f"""\
# alselect sample data

Small, freely licensed data for trying `alselect` offline and for its tests.
Generated by `scripts/make_sample_data.py`; see `LICENSE.md` for credits and licences.

## Contents

- `images/fashion/test_NNNNN.png`: {info["n_fashion"]} Fashion-MNIST images from the **test**
  split ({PER_CLASS} per class, seeded choice), 28×28 8-bit grayscale PNG. `NNNNN` is the index
  in the 10,000-image test split.
- `labels.csv`: `path,label,class_name` for the Fashion-MNIST images; `path` is relative to
  `images/` (e.g. `{info["example"]}`), `label` is 0–9 in the order
  {", ".join(CLASS_NAMES)}.
- `images/photos/`: CC0 / public-domain photos bundled with scikit-image, as
  metadata-free JPEG (quality {JPEG_QUALITY}, longer side ≤ {MAX_PHOTO_SIDE} px; `camera.jpg` is
  grayscale), plus one small RGBA PNG with a transparent vignette to exercise mode conversion.
  They have no labels: out-of-distribution inputs for the Fashion-MNIST model.
{photo_lines}
- `model.pt`: an alselect checkpoint (`alselect_checkpoint` format 1, arch `small_cnn`,
  10 classes, class names embedded) of `alselect.models.small_cnn.SmallCNN`, with preprocessing
  `image_size=28, resize_size=28, mean=({MEAN:.4f},)*3, std=({STD:.4f},)*3`. Load it with
  `alselect.checkpoints.load_checkpoint("sample_data/model.pt")`.

## How it was made

```
pip install scikit-image   # only for the photos; not an alselect dependency
{info["command"]}
```

- Fashion-MNIST is read from the Debian package `dataset-fashion-mnist`
  (`{info["fmnist_dir"]}`), IDX files parsed directly.
- Model: SmallCNN, 3-channel input (grayscale replicated 3×), 28×28, pixel/255 then
  normalised with mean {MEAN:.4f} and std {STD:.4f} on every channel — the same as alselect's
  inference pipeline (PNG L→RGB, shorter side resized to 28, centre crop 28).
- Training: {info["train_size"]} images drawn (seed {info["seed"]}) from the 60,000-image
  **train** split (disjoint from the test images above), {info["epochs"]} epochs, batch
  {BATCH_SIZE}, Adam (lr {LEARNING_RATE}, cosine decay), random horizontal flips,
  `torch.use_deterministic_algorithms(True)`. Training wall time: {info["train_time"]}
  on {info["threads"]} CPU thread(s) (torch {info["torch"]}); wall time grows when other
  processes share the CPU.
- Final training loss: {info["final_loss"]}.

## Measured accuracy

| data | images | accuracy |
| --- | ---: | ---: |
| Fashion-MNIST test split (all) | 10,000 | {info["acc_full"]} |
| `images/fashion/` sample (read back from the PNGs via `load_checkpoint`) | \
{info["n_fashion"]} | {info["acc_sample"]} |

The images, `labels.csv` and photos are byte-for-byte reproducible with the command above;
`model.pt` was too when rerun on the same machine and torch version (other CPUs, thread counts or
torch versions may give slightly different weights and accuracy). Training time varies.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def write_license(out: Path) -> None:
    """``sample_data/LICENSE.md``: Fashion-MNIST (MIT) and each photo's licence."""
    photo_rows = "\n".join(
        f"| `images/photos/{p.name}.jpg`"
        + (f", `images/photos/{p.name}_rgba.png`" if p.name == RGBA_PHOTO else "")
        + f" | {p.title} | {p.source} | {p.license}: “{p.statement}” |"
        for p in PHOTOS
    )
    text = f"""\
# Licences and credits for sample_data/

## Fashion-MNIST images, `labels.csv` and `model.pt`

`images/fashion/*.png` and `labels.csv` are taken from Fashion-MNIST
(Han Xiao, Kashif Rasul, Roland Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv:1708.07747, 2017),
https://github.com/zalandoresearch/fashion-mnist, © 2017 Zalando SE, under the MIT License,
as distributed by the Debian package `dataset-fashion-mnist`.

`model.pt` holds weights trained on Fashion-MNIST: derived data, distributed under the same MIT
License terms as Fashion-MNIST (text below).

```
{MIT_LICENSE}```

## Photos (`images/photos/`)

Sample images bundled with scikit-image (https://scikit-image.org, `skimage.data`), downscaled and
re-encoded by `scripts/make_sample_data.py`. Licences as stated in scikit-image's own data
documentation (the docstrings of `skimage.data.<name>`):

| file(s) | image | source | licence as stated by scikit-image |
| --- | --- | --- | --- |
{photo_rows}

`chelsea_rgba.png` is a further downscaled copy of `chelsea` with an added alpha channel.
"""
    (out / "LICENSE.md").write_text(text, encoding="utf-8")


def import_alselect() -> None:
    """Make the in-repo ``alselect`` importable when it is not installed."""
    try:
        import alselect  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fmnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("sample_data"))
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import_alselect()
    from alselect.checkpoints import load_checkpoint
    from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
    from alselect.models.small_cnn import SmallCNN
    from alselect.preprocess import Preprocess

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    train_images, train_labels = load_split(args.fmnist_dir, "train")
    test_images, test_labels = load_split(args.fmnist_dir, "t10k")
    print(f"Fashion-MNIST: train {train_images.shape}, test {test_images.shape}")

    rng = np.random.default_rng(args.seed)
    sample_idx = choose_test_sample(test_labels, rng)
    train_idx = np.sort(rng.choice(len(train_images), size=args.train_size, replace=False))
    write_fashion(out, test_images, test_labels, sample_idx)
    photos = write_photos(out)
    print(f"wrote {len(sample_idx)} Fashion-MNIST PNGs and {len(photos)} photos")

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    x_train = to_tensor(train_images[train_idx])
    y_train = torch.from_numpy(train_labels[train_idx].astype(np.int64))
    x_test = to_tensor(test_images)
    y_test = torch.from_numpy(test_labels.astype(np.int64))

    model = SmallCNN(num_classes=len(CLASS_NAMES))
    params = sum(p.numel() for p in model.parameters())
    print(f"training SmallCNN ({params:,} parameters) on {len(x_train)} images")
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = train(model, x_train, y_train, args.epochs, args.seed)
    train_time = time.perf_counter() - start
    cpu_time = time.process_time() - cpu_start

    pred = predict(model, x_test)
    acc_full = accuracy(pred, y_test)
    sample_t = torch.from_numpy(sample_idx)
    acc_sample = accuracy(pred[sample_t], y_test[sample_t])
    print(f"training time: {train_time:.1f}s wall, {cpu_time:.1f}s CPU")
    print(f"test accuracy (full 10,000): {acc_full:.4f}")
    print(f"test accuracy ({len(sample_idx)}-image sample): {acc_sample:.4f}")

    ckpt = out / "model.pt"
    preprocess = Preprocess(image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE, mean=(MEAN,) * 3, std=(STD,) * 3)
    save_alselect_checkpoint(
        ckpt,
        model,
        arch="small_cnn",
        num_classes=len(CLASS_NAMES),
        classes=CLASS_NAMES,
        preprocess=preprocess,
    )

    # Round trip: library loader, on the PNGs read back from disk as the CLI would read them.
    loaded = load_checkpoint(ckpt)
    if loaded.classes != CLASS_NAMES or loaded.preprocess != preprocess:
        raise SystemExit(f"round trip: metadata mismatch ({loaded.classes}, {loaded.preprocess})")
    paths = [out / "images" / "fashion" / f"test_{int(i):05d}.png" for i in sample_idx]
    x_png = load_png_batch(paths)
    if not torch.equal(x_png, x_test[sample_t]):
        raise SystemExit("round trip: PNGs do not read back to the training-time tensors")
    probs, emb = loaded.predict(x_png)
    acc_loaded = accuracy(probs.argmax(1), y_test[sample_t])
    full_probs, _ = loaded.predict(x_test)
    acc_loaded_full = accuracy(full_probs.argmax(1), y_test)
    print(
        f"round trip via load_checkpoint: probs {tuple(probs.shape)}, embedding "
        f"{tuple(emb.shape)}, sample accuracy {acc_loaded:.4f}, full {acc_loaded_full:.4f}"
    )
    if acc_loaded != acc_sample or acc_loaded_full != acc_full:
        raise SystemExit("round trip: accuracy differs after save/load")

    command = "python scripts/make_sample_data.py"
    defaults = parse_args([])
    for name in ("fmnist_dir", "out", "train_size", "epochs", "seed"):
        value = getattr(args, name)
        if value != getattr(defaults, name):
            command += f" --{name.replace('_', '-')} {value}"
    write_readme(
        out,
        {
            "command": command,
            "fmnist_dir": str(args.fmnist_dir),
            "n_fashion": str(len(sample_idx)),
            "example": f"fashion/test_{int(sample_idx[0]):05d}.png",
            "photos": ",".join(photos),
            "train_size": f"{args.train_size:,}",
            "epochs": str(args.epochs),
            "seed": str(args.seed),
            "train_time": f"{train_time:.0f} s ({cpu_time:.0f} s CPU time)",
            "threads": str(torch.get_num_threads()),
            "torch": torch.__version__,
            "final_loss": f"{losses[-1]:.4f}",
            "acc_full": f"{acc_full:.2%} ({round(acc_full * len(y_test))}/{len(y_test)})",
            "acc_sample": f"{acc_sample:.2%} ({round(acc_sample * len(sample_idx))}/{len(sample_idx)})",
        },
    )
    write_license(out)
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
