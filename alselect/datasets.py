"""Labeled images for training and benchmarks: class folders, ``path,label`` CSVs, store labels, IDX.

Torch-free: these return file lists and numpy arrays; ``alselect.train`` turns them into batches.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alselect.discover import WalkProblems, resolve_root, walk_images
from alselect.errors import DataError
from alselect.store import Store

IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class LabeledFiles:
    """Image files with class indices: ``paths [N]``, ``labels [N]`` int64 into ``classes``.

    ``skipped`` lists ``(path, reason)`` of entries left out (missing file, unknown label...).
    """

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels.tolist())
        return {name: int(counts.get(i, 0)) for i, name in enumerate(self.classes)}


def sort_classes(names: set[str]) -> list[str]:
    """Class names in a stable order: numerically when every name is an integer, else by text."""
    if names and all(n.strip().lstrip("-").isdigit() for n in names):
        return sorted(names, key=lambda n: int(n))
    return sorted(names)


def _labeled(pairs: Sequence[tuple[Path, str]], source: str, skipped: list[tuple[str, str]]) -> LabeledFiles:
    classes = sort_classes({label for _, label in pairs})
    index = {name: i for i, name in enumerate(classes)}
    return LabeledFiles(
        paths=[p for p, _ in pairs],
        labels=np.array([index[label] for _, label in pairs], dtype=np.int64),
        classes=classes,
        source=source,
        skipped=skipped,
    )


def image_folder(folder: str | Path) -> LabeledFiles:
    """torchvision's ImageFolder layout: ``folder/<class>/**/<image>``; classes sorted by name.

    Images directly in ``folder`` (in no class folder), image-named paths that are no regular file
    (a FIFO, socket or device: the walk skips them) and unreadable folders are skipped and reported.
    """
    root = resolve_root(folder)
    pairs: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []
    problems = WalkProblems()
    for found in walk_images(root, problems):
        parts = found.relpath.split("/")
        if len(parts) < 2:
            skipped.append((found.relpath, "not inside a class folder"))
            continue
        pairs.append((root / found.relpath, parts[0]))
    skipped += [(rel, "not a regular file (FIFO, socket, device)") for rel in problems.special_files]
    skipped += [(rel, "unreadable folder") for rel in problems.unreadable_dirs]
    if not pairs:
        raise DataError(f"{folder}: no images in class subfolders (expected {folder}/<class>/<image>)")
    return _labeled(pairs, f"folder {root}", skipped)


def csv_labels(
    csv_path: str | Path, root: str | Path | None = None, label_column: str = "label"
) -> LabeledFiles:
    """A CSV with a header holding ``path`` and ``label_column``; relative paths resolve against
    ``root`` (default: the CSV's folder). Missing files and empty labels are skipped and reported."""
    path = Path(csv_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read {csv_path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path} is not UTF-8 text: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = reader.fieldnames or []
    if "path" not in fields or label_column not in fields:
        raise DataError(
            f"{csv_path}: needs a header with 'path' and '{label_column}' columns "
            f"(found: {', '.join(fields) or 'none'})"
        )
    base = Path(root) if root is not None else path.parent
    pairs: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []
    for row in reader:
        name = (row.get("path") or "").strip()
        label = (row.get(label_column) or "").strip()
        if not name:
            continue
        if not label:
            skipped.append((name, "no label"))
            continue
        file = Path(name) if Path(name).is_absolute() else base / name
        if not file.is_file():
            skipped.append((name, "file not found"))
            continue
        pairs.append((file, label))
    if not pairs:
        raise DataError(f"{csv_path}: no usable rows (paths resolve against {base})")
    return _labeled(pairs, f"csv {path}", skipped)


def store_labels(store: Store) -> LabeledFiles:
    """The class labels recorded by ``alselect label`` (``Store.label_classes``), each located at a
    present image file with that content (any folder the store knows). Contents with no file left
    are skipped and reported."""
    classes = store.label_classes()
    if not classes:
        raise DataError(
            "the store holds no class labels: 'alselect label' a CSV/JSONL export with a label column first"
        )
    files: dict[str, Path] = {}
    for sha, root, relpath in store.rows(
        "SELECT sha256, root, relpath FROM images WHERE status = 'present' AND sha256 IS NOT NULL "
        "ORDER BY root, relpath"
    ):
        if sha in classes and sha not in files:
            candidate = Path(root) / relpath
            if candidate.is_file():
                files[sha] = candidate
    pairs = [(files[sha], label) for sha, label in sorted(classes.items()) if sha in files]
    skipped = [(sha, "no present file with this content") for sha in sorted(classes) if sha not in files]
    if not pairs:
        raise DataError("none of the labeled images is present on disk any more")
    pairs.sort(key=lambda item: str(item[0]))
    return _labeled(pairs, f"store {store.path}", skipped)


# -- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file, gzipped or not: 2 zero bytes, dtype code, ndim, big-endian uint32 dims, data."""
    raw = Path(path).read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: bad IDX magic number {data[:4].hex()}")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=IDX_DTYPES[code], offset=header)
    expected = int(np.prod(dims))
    if array.size != expected:
        raise DataError(f"{path}: {array.size} values, header says {dims}")
    return array.reshape(dims)


def find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_idx_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds MNIST-style ``train-images-idx3-ubyte[.gz]`` files."""
    return find_idx(Path(folder), "train-images-idx3-ubyte") is not None


@dataclass
class ArraySplit:
    """In-memory images ``[N, channels, H, W]`` uint8 with labels ``[N]`` int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_idx_dataset(folder: str | Path) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """``train`` and ``t10k`` splits of an MNIST-layout folder (Fashion-MNIST: its class names)."""
    root = resolve_root(folder)
    splits = []
    for split in ("train", "t10k"):
        images_path = find_idx(root, f"{split}-images-idx3-ubyte")
        labels_path = find_idx(root, f"{split}-labels-idx1-ubyte")
        if images_path is None or labels_path is None:
            raise DataError(f"{folder}: missing {split}-images-idx3-ubyte or {split}-labels-idx1-ubyte (.gz)")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {split} has shapes {images.shape} and {labels.shape}")
        splits.append(ArraySplit(images[:, None].astype(np.uint8), labels.astype(np.int64)))
    n_classes = int(max(splits[0].labels.max(), splits[1].labels.max())) + 1
    fashion = "fashion" in str(root).lower() and n_classes == len(FASHION_MNIST_CLASSES)
    classes = list(FASHION_MNIST_CLASSES) if fashion else [str(i) for i in range(n_classes)]
    return splits[0], splits[1], classes
