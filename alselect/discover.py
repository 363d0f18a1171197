"""Find image files under a folder and hash their contents."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from alselect.errors import DataError
from alselect.fsutil import open_regular

HASH_CHUNK = 1024
# Files per thread-pool task. A task per file cost ~80 us of hand-over and lock traffic, ten times
# the hashing of a 28 px PNG (6,000 such files: 480 ms, grouped 120 ms); groups still spread a
# chunk over every thread, so large files and slow disks keep their parallel reads.
HASH_GROUP = 32
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class FoundFile:
    """One candidate image: path relative to the root (``/`` separators), size, mtime in ns.

    ``link``: the path reaches the file through a symlink (the file's own name or a folder on the
    way), so among paths to the same content a real one is preferred (see ``alselect.identity``).
    """

    relpath: str
    size: int
    mtime_ns: int
    link: bool = False


@dataclass
class WalkProblems:
    """Things skipped while walking that the user should hear about."""

    unreadable_dirs: list[str] = field(default_factory=list)
    symlink_loops: int = 0
    # image-named paths that are no regular file (a FIFO, socket or device, or a link to one):
    # reading one would block or never end
    special_files: list[str] = field(default_factory=list)


def resolve_root(folder: str | os.PathLike[str]) -> Path:
    """The absolute, symlink-resolved pool folder; a clear error if it is not a folder."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise DataError(f"image folder not found: {folder}")
    if not path.is_dir():
        raise DataError(f"not a folder: {folder}")
    return path.resolve()


def walk_images(root: Path, problems: WalkProblems | None = None) -> Iterator[FoundFile]:
    """Yield image files under ``root`` in sorted order, following symlinks without looping.

    A symlink back to one of its own ancestors is a loop and is skipped (as ``find -L`` does);
    other aliases are walked, and duplicate contents are merged later by hash. Hidden files and
    folders (leading ``.``) are skipped: they hold caches, checkpoints and macOS resource forks.
    Names that are not valid UTF-8 are kept as ``os.fsdecode`` gives them (surrogate escapes): they
    open the right file, and the store keeps them losslessly (``alselect.store.names``).
    """
    problems = problems if problems is not None else WalkProblems()
    yield from _walk(root, "", frozenset(), problems, via_link=False)


def _walk(
    directory: Path,
    prefix: str,
    ancestors: frozenset[tuple[int, int]],
    problems: WalkProblems,
    via_link: bool,
) -> Iterator[FoundFile]:
    try:
        info = directory.stat()
        with os.scandir(directory) as entries:
            items = sorted(entries, key=lambda e: e.name)
    except OSError:
        problems.unreadable_dirs.append(prefix or ".")
        return
    key = (info.st_dev, info.st_ino)
    if key in ancestors:
        problems.symlink_loops += 1
        return
    inside = ancestors | {key}
    for entry in items:
        name = entry.name
        if name.startswith("."):
            continue
        relpath = f"{prefix}{name}"
        try:
            link = via_link or entry.is_symlink()
            if entry.is_dir():  # follows symlinks; loops are caught by the ancestor set
                yield from _walk(Path(entry.path), relpath + "/", inside, problems, link)
                continue
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            stat = entry.stat()
        except OSError:
            continue  # dangling symlink or a file removed mid-walk
        if not S_ISREG(stat.st_mode):
            problems.special_files.append(relpath)
            continue
        yield FoundFile(relpath=relpath, size=stat.st_size, mtime_ns=stat.st_mtime_ns, link=link)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes, read through a bare descriptor (no buffered file object)."""
    digest = hashlib.sha256()
    fd = open_regular(path)
    try:
        while block := os.read(fd, chunk):
            digest.update(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


def hash_files(
    root: Path, relpaths: Iterable[str], threads: int = 4
) -> Iterator[tuple[str, str | None, str | None]]:
    """Yield ``(relpath, sha256, error)`` in input order; hashing runs on a thread pool.

    hashlib releases the GIL on large buffers, so threads overlap I/O and hashing.
    """

    base = os.fspath(root)  # joined as strings: a Path per file cost more than hashing a small one

    def one(relpath: str) -> tuple[str, str | None, str | None]:
        try:
            return relpath, sha256_file(os.path.join(base, relpath)), None
        except OSError as exc:
            return relpath, None, f"unreadable: {exc.strerror or exc}"

    def group(relpaths: list[str]) -> list[tuple[str, str | None, str | None]]:
        return [one(relpath) for relpath in relpaths]

    pending = iter(relpaths)
    threads = max(1, threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        # bounded chunks: Executor.map would create a future per file up front (GBs at 1M files)
        while chunk := list(itertools.islice(pending, HASH_CHUNK)):
            # groups of HASH_GROUP, but at least 4 groups per thread: a few large files (new scans
            # added to a pool) are read side by side, not one after another on one thread
            size = max(1, min(HASH_GROUP, len(chunk) // (4 * threads)))
            groups = [chunk[start : start + size] for start in range(0, len(chunk), size)]
            for hashed in pool.map(group, groups):
                yield from hashed
