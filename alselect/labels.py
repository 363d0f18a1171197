"""Mark images as annotated, with their class where the source gives one.

Every input format (see ``alselect.annotations``) yields ``LabelRecord``s; this module is the one
place that decides which stored image a record means, and it never guesses: a record names an
image by content hash, by a path that lies in exactly one stored image location (absolute,
relative to the working directory, to ``--folder``, or to the record's own ``folder``), or by a
folder-relative path that only one content in the store has. Anything else is reported as
unmatched or ambiguous and labels nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alselect.annotations import LabelRecord, ReadOptions, read_annotations
from alselect.annotations.base import single_class
from alselect.errors import DataError
from alselect.store import Store
from alselect.store.names import from_db, to_db
from alselect.uris import check_uri_prefix

CHUNK = 500  # bound parameters per IN (...) query, under SQLite's oldest default limit of 999

PathKey = tuple[str | None, str]  # (folder the path is relative to, None: the working directory; path)


@dataclass
class LabelResult:
    """What ``import_labels`` did. ``unknown``, ``ambiguous`` and ``conflicting`` hold the refs of
    records that labeled nothing (or, for conflicting classes, labeled without a class)."""

    format: str
    requested: int
    newly_labeled: int
    already_labeled: int
    with_class: int = 0
    reclassified: int = 0
    unknown: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    conflicting: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every record was matched to one image without a conflicting class."""
        return not (self.unknown or self.ambiguous or self.conflicting)


def import_labels(
    store: Store,
    text: str,
    source: str,
    *,
    fmt: str | None = None,
    folder: str | None = None,
    uri_prefix: str | None = None,
    cwd: str | None = None,
) -> LabelResult:
    """Label every image the input names, by content hash (renamed copies stay labeled), with the
    class the input gives. ``fmt`` forces a reader (default: detect from content); ``folder`` is
    what relative paths without a folder of their own are relative to (default: the working
    directory ``cwd``, then the stored folder-relative paths); ``uri_prefix`` is the prefix the
    export put before paths in image URLs."""
    if uri_prefix is not None:
        uri_prefix = check_uri_prefix(uri_prefix)
    annotations = read_annotations(text, fmt, ReadOptions(uri_prefix=uri_prefix))
    if not annotations.records and not annotations.skipped:
        raise DataError(f"{source}: nothing to label in it (no paths, content hashes or annotated items)")
    cwd = os.getcwd() if cwd is None else cwd
    if folder is not None:
        check_folder(store, folder, cwd)
    records = annotations.records
    found, unknown, ambiguous = resolve_records(store, records, cwd, folder)
    classes, conflicting = merge_classes(records, found)
    wanted = set(found.values())
    before = stored_labels(store, wanted)
    added = store.add_labels(wanted, source, classes)
    return LabelResult(
        format=annotations.format,
        requested=len(records),
        newly_labeled=added,
        already_labeled=len(before),
        with_class=len(classes),
        reclassified=sum(1 for sha, label in classes.items() if before.get(sha) not in (None, label)),
        unknown=unknown,
        ambiguous=ambiguous,
        conflicting=conflicting,
        skipped=annotations.skipped,
        notes=annotations.notes,
    )


def resolve_records(
    store: Store, records: Sequence[LabelRecord], cwd: str, folder: str | None = None
) -> tuple[dict[int, str], list[str], list[str]]:
    """``(found, unknown, ambiguous)``: record index -> content hash, and the refs (each once) of
    records that name no stored image, or a path that several stored contents have."""
    known = stored_hashes(store, (r.sha256 for r in records if r.sha256))
    keys: dict[int, PathKey] = {
        index: (record.folder if record.folder is not None else folder, record.path)
        for index, record in enumerate(records)
        if record.sha256 is None and record.path is not None
    }
    by_path, several = resolve_paths(store, keys.values(), cwd)
    found: dict[int, str] = {}
    unknown: dict[str, None] = {}
    ambiguous: dict[str, None] = {}
    for index, record in enumerate(records):
        key = keys.get(index)
        sha = (record.sha256 if record.sha256 in known else None) if key is None else by_path.get(key)
        if sha is not None:
            found[index] = sha
        elif key in several:
            ambiguous[record.ref] = None
        else:
            unknown[record.ref] = None
    return found, list(unknown), list(ambiguous)


def merge_classes(records: Sequence[LabelRecord], found: dict[int, str]) -> tuple[dict[str, str], list[str]]:
    """``(classes, conflicting)``: content hash -> the class its records agree on; the refs (each
    once) of records giving one image different classes (that image is labeled without a class)."""
    by_sha: dict[str, list[LabelRecord]] = {}
    for index, sha in found.items():
        if records[index].label is not None:  # class-less records neither set nor contradict a class
            by_sha.setdefault(sha, []).append(records[index])
    classes: dict[str, str] = {}
    conflicting: dict[str, None] = {}
    for sha, group in by_sha.items():
        label, mixed = single_class([record.label for record in group])
        if label is not None:
            classes[sha] = label
        elif mixed:
            conflicting.update((record.ref, None) for record in group if record.label is not None)
    return classes, list(conflicting)


def check_folder(store: Store, folder: str, cwd: str) -> None:
    """``--folder`` must be a scored folder, or lie inside or above one: a typo labels nothing."""
    real = os.path.realpath(os.path.join(cwd, folder))
    inside = real.rstrip(os.sep) + os.sep
    for root in stored_roots(store):
        if root == real or root.startswith(inside) or real.startswith(root.rstrip(os.sep) + os.sep):
            return
    raise DataError(f"--folder {folder}: no scored folder is at, inside or above {real}")


def resolve_paths(store: Store, keys: Iterable[PathKey], cwd: str) -> tuple[dict[PathKey, str], set[PathKey]]:
    """Map ``(folder, path)`` keys to content hashes: ``(found, ambiguous)``.

    The path is taken as a file path (absolute, or relative to ``folder``, else to ``cwd``) and
    looked up exactly in the stored folder it lies in, after resolving symlinks the way the folder
    walk sees them. A relative path without a folder may also be a folder-relative path as exports
    write them (``export`` run from anywhere, ``--format paths``, a URI's path): it names every
    content stored under that relative path in any folder. Its candidates are both readings
    together, and it resolves only when they hold exactly one content; several make it ambiguous,
    so a list of one folder's relative paths, read while the working directory is another scored
    folder with the same names, labels nothing instead of the wrong images. An existing file
    under the working directory inside a scored folder that is not stored itself is unknown (it
    is not looked up elsewhere). Which folder was scored last plays no part.
    """
    locator = RootLocator(stored_roots(store))
    located: dict[PathKey, list[tuple[str, str]]] = {}
    as_relpath: dict[PathKey, str] = {}
    unscored_here: set[PathKey] = set()
    for key in dict.fromkeys(keys):
        base, raw = key
        if not usable(raw) or (base is not None and not usable(base)):
            continue
        full = os.path.join(cwd, base or "", raw)
        located[key] = candidates = locator.candidates(full)
        relpath = raw
        while relpath.startswith("./"):
            relpath = relpath[2:]
        if base is None and relpath and not os.path.isabs(raw):
            as_relpath[key] = relpath
            if candidates and os.path.lexists(full):
                unscored_here.add(key)  # cleared below when it is stored
    exact = lookup_exact(store, {c for candidates in located.values() for c in candidates})
    contents_of = lookup_relpaths(store, set(as_relpath.values()))
    found: dict[PathKey, str] = {}
    ambiguous: set[PathKey] = set()
    for key, candidates in located.items():
        hits = [exact[c] for c in candidates if c in exact]
        here = next((sha for sha, status in hits if status == "present"), hits[0][0]) if hits else None
        if key not in as_relpath:
            if here is not None:
                found[key] = here
            continue
        if here is None and key in unscored_here:
            continue  # the file the path names under the working directory was never scored
        contents = set(contents_of.get(as_relpath[key], set()))
        if here is not None:
            contents.add(here)
        if len(contents) == 1:
            found[key] = next(iter(contents))
        elif contents:
            ambiguous.add(key)
    return found, ambiguous


def usable(path: str) -> bool:
    """Whether a path can be a stored one: no NUL (names that are not UTF-8 are fine)."""
    return bool(path) and "\0" not in path


class RootLocator:
    """Where a file path lies in the stored folders: ``(root, relpath)`` candidates, best first.

    Roots are stored symlink-resolved, while the walk keeps the names of symlinks met inside a
    folder; so each ancestor directory of the path is resolved in turn (deepest first, cached)
    and the rest of the path is kept as given. A symlinked file is also tried at its target.
    """

    def __init__(self, roots: Iterable[str]) -> None:
        self.prefixes = sorted(
            ((root, root.rstrip(os.sep) + os.sep) for root in roots), key=lambda item: -len(item[1])
        )
        self.cache: dict[str, list[tuple[str, str]]] = {}

    def candidates(self, full: str) -> list[tuple[str, str]]:
        head, tail = os.path.split(full)
        if tail in ("", ".", ".."):
            return []
        # ".." after a symlink climbs out of the link target, so only the resolved path is right
        head = os.path.realpath(head) if ".." in Path(head).parts else os.path.normpath(head)
        found = [(root, join(reldir, tail)) for root, reldir in self.directory(head)]
        if os.path.islink(full):
            found += [(root, rel) for root, rel in self.under(os.path.realpath(full)) if rel]
        return list(dict.fromkeys(found))

    def directory(self, path: str) -> list[tuple[str, str]]:
        cached = self.cache.get(path)
        if cached is not None:
            return cached
        found = self.under(os.path.realpath(path))
        parent, name = os.path.split(path)
        if parent != path and name:
            found += [(root, join(reldir, name)) for root, reldir in self.directory(parent)]
        self.cache[path] = found = list(dict.fromkeys(found))
        return found

    def under(self, real: str) -> list[tuple[str, str]]:
        """``(root, relative rest)`` for every stored root holding ``real``, longest root first."""
        return [
            (root, real[len(prefix) :] if real != root else "")
            for root, prefix in self.prefixes
            if real == root or real.startswith(prefix)
        ]


def join(reldir: str, name: str) -> str:
    return f"{reldir}/{name}" if reldir else name


def stored_roots(store: Store) -> list[str]:
    """Distinct image folders, by skipping through the (root, relpath) index: one seek each."""
    rows = store.rows(
        """WITH RECURSIVE r (root) AS (
               SELECT MIN(root) FROM images
               UNION ALL
               SELECT (SELECT MIN(root) FROM images WHERE root > r.root) FROM r WHERE r.root IS NOT NULL
           ) SELECT root FROM r WHERE root IS NOT NULL"""
    )
    return [from_db(str(row[0])) for row in rows]


def lookup_exact(store: Store, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, str]]:
    """``(root, relpath) -> (sha256, status)`` for the pairs that are stored with a hash."""
    by_root: dict[str, list[str]] = {}
    for root, relpath in pairs:
        by_root.setdefault(root, []).append(relpath)
    found = {}
    for root, relpaths in by_root.items():
        for chunk in chunks(sorted(relpaths)):
            for relpath, sha, status in store.rows(
                "SELECT relpath, sha256, status FROM images "
                f"WHERE root = ? AND relpath IN ({marks(chunk)}) AND sha256 IS NOT NULL",
                [to_db(root), *map(to_db, chunk)],
            ):
                found[(root, from_db(relpath))] = (sha, status)
    return found


def lookup_relpaths(store: Store, relpaths: Iterable[str]) -> dict[str, set[str]]:
    """``relpath -> {sha256}`` over every folder (served by the ``images_relpath`` index)."""
    found: dict[str, set[str]] = {}
    for chunk in chunks(sorted(relpaths)):
        for relpath, sha in store.rows(
            f"SELECT relpath, sha256 FROM images WHERE relpath IN ({marks(chunk)}) AND sha256 IS NOT NULL",
            [to_db(path) for path in chunk],
        ):
            found.setdefault(from_db(relpath), set()).add(sha)
    return found


def stored_hashes(store: Store, shas: Iterable[str | None]) -> set[str]:
    """Which of ``shas`` are the content of some stored image."""
    found: set[str] = set()
    for chunk in chunks(sorted({sha for sha in shas if sha})):
        found.update(
            r[0]
            for r in store.rows(f"SELECT DISTINCT sha256 FROM images WHERE sha256 IN ({marks(chunk)})", chunk)
        )
    return found


def stored_labels(store: Store, shas: Iterable[str]) -> dict[str, str | None]:
    """``sha256 -> class or None`` for those of ``shas`` already labeled."""
    found: dict[str, str | None] = {}
    for chunk in chunks(sorted(set(shas))):
        found.update(store.rows(f"SELECT sha256, label FROM labels WHERE sha256 IN ({marks(chunk)})", chunk))
    return found


def chunks(items: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield list(items[start : start + CHUNK])


def marks(chunk: Sequence[object]) -> str:
    return ", ".join("?" * len(chunk))
