"""Mark images as annotated from a list of paths or a CSV with a ``path``/``sha256`` column."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alselect.errors import DataError
from alselect.store import Store
from alselect.store.names import from_db, to_db

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 500  # bound parameters per IN (...) query, under SQLite's oldest default limit of 999


@dataclass
class LabelResult:
    requested: int
    newly_labeled: int
    already_labeled: int
    unknown: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)


def parse_label_input(text: str) -> tuple[list[str], list[str]]:
    """Split input into ``(paths, sha256s)``.

    A first line naming a ``path`` or ``sha256`` column makes it a CSV or TSV, and a first
    non-empty line holding a JSON object makes it JSON Lines (earlier exports in any of these
    formats work as is); otherwise every non-empty line not starting with ``#`` is a path. A
    valid sha256 wins over the path of the same record. ``text`` must be exact: a CR inside a
    quoted CSV field is part of the path.
    """
    text = text.lstrip("\ufeff")
    first = text.split("\n", 1)[0].rstrip("\r")
    for dialect in ("excel", "excel-tab"):
        header = next(csv.reader([first], dialect=dialect), [])
        if "path" in header or "sha256" in header:
            return split_records(csv.DictReader(io.StringIO(text, newline=""), dialect=dialect))
    records = json_lines(text)
    if records is not None:
        return split_records(records)
    lines = [line.rstrip("\r") for line in text.split("\n")]
    return [line for line in lines if line.strip() and not line.startswith("#")], []


def json_lines(text: str) -> list[dict[str, object]] | None:
    """Records of a JSON Lines text, or ``None`` when its first non-empty line is no JSON object."""
    lines = [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines or not lines[0][1].lstrip().startswith("{"):
        return None
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number == lines[0][0]:
                return None  # a plain list whose first path happens to start with "{"
            raise DataError(f"line {number} of the JSON Lines input is not a JSON object: {line[:60]!r}")
        records.append(record)
    return records


def split_records(records: Iterable[Mapping[str, object]]) -> tuple[list[str], list[str]]:
    """``(paths, sha256s)`` from table or JSON records: a valid ``sha256`` wins over ``path``."""
    paths, shas = [], []
    for record in records:
        sha = record.get("sha256")
        sha = sha.strip().lower() if isinstance(sha, str) else ""
        path = record.get("path")
        if SHA256_RE.match(sha):
            shas.append(sha)
        elif isinstance(path, str) and path:
            paths.append(path)
    return paths, shas


def import_labels(store: Store, text: str, source: str, cwd: str | None = None) -> LabelResult:
    """Label every listed image by content hash, so renamed copies stay labeled.

    Paths are resolved with ``resolve_paths`` against ``cwd`` (the working directory by default).
    """
    paths, shas = parse_label_input(text)
    if not paths and not shas:
        raise DataError(f"{source}: no paths found (one path per line, or a CSV with a path column)")
    found, unknown, ambiguous = resolve_paths(store, paths, cwd)
    known = hashes_in(store, "images", shas)
    unknown += [sha for sha in shas if sha not in known]
    wanted = set(found.values()) | known
    already = len(hashes_in(store, "labels", wanted))
    added = store.add_labels(wanted, source)
    return LabelResult(
        requested=len(paths) + len(shas),
        newly_labeled=added,
        already_labeled=already,
        unknown=unknown,
        ambiguous=ambiguous,
    )


def resolve_paths(
    store: Store, paths: Sequence[str], cwd: str | None = None
) -> tuple[dict[str, str], list[str], list[str]]:
    """Map user-given paths to content hashes: ``(found, unknown, ambiguous)``.

    A path is first taken as a file path (absolute, or relative to ``cwd``) and looked up
    exactly in the stored folder it lies in, after resolving symlinks the way the folder walk
    sees them. A relative path that is not found so, and is not an existing file inside a
    stored folder, is then taken as a folder-relative path (as exports write them): the latest
    run's folder wins, otherwise a single folder must hold it (present images preferred), or
    several folders the same content; anything else is ambiguous and not labeled.
    """
    cwd = os.getcwd() if cwd is None else cwd
    locator = RootLocator(stored_roots(store))
    located: dict[str, list[tuple[str, str]]] = {}
    as_relpath: dict[str, str] = {}
    for raw in dict.fromkeys(paths):
        if not usable(raw):
            continue
        full = os.path.join(cwd, raw)
        located[raw] = candidates = locator.candidates(full)
        relpath = raw
        while relpath.startswith("./"):
            relpath = relpath[2:]
        if relpath and not os.path.isabs(raw) and not (candidates and os.path.lexists(full)):
            as_relpath[raw] = relpath
    exact = lookup_exact(store, {c for candidates in located.values() for c in candidates})
    found: dict[str, str] = {}
    for raw, candidates in located.items():
        hits = [exact[c] for c in candidates if c in exact]
        if hits:
            found[raw] = next((sha for sha, status in hits if status == "present"), hits[0][0])
    pending = {raw: relpath for raw, relpath in as_relpath.items() if raw not in found}
    by_relpath = lookup_relpaths(store, set(pending.values()))
    run = store.latest_run()
    latest = run["root"] if run else None
    unknown: list[str] = []
    ambiguous: list[str] = []
    for raw in dict.fromkeys(paths):
        if raw in found:
            continue
        rows = by_relpath.get(pending[raw], []) if raw in pending else []
        in_latest = [sha for root, sha, _ in rows if root == latest]
        preferred = [row for row in rows if row[2] == "present"] or rows
        contents = {sha for _, sha, _ in preferred}
        if in_latest:
            found[raw] = in_latest[0]
        elif len(contents) == 1:
            found[raw] = contents.pop()
        elif contents:
            ambiguous.append(raw)
        else:
            unknown.append(raw)
    return found, unknown, ambiguous


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


def lookup_relpaths(store: Store, relpaths: Iterable[str]) -> dict[str, list[tuple[str, str, str]]]:
    """``relpath -> [(root, sha256, status)]`` over every folder (served by ``images_relpath``)."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    for chunk in chunks(sorted(relpaths)):
        for root, relpath, sha, status in store.rows(
            "SELECT root, relpath, sha256, status FROM images "
            f"WHERE relpath IN ({marks(chunk)}) AND sha256 IS NOT NULL ORDER BY root",
            [to_db(path) for path in chunk],
        ):
            found.setdefault(from_db(relpath), []).append((from_db(root), sha, status))
    return found


def hashes_in(store: Store, table: str, shas: Iterable[str]) -> set[str]:
    """Which of ``shas`` appear in ``table``'s ``sha256`` column (``images`` or ``labels``)."""
    found: set[str] = set()
    for chunk in chunks(sorted(set(shas))):
        found.update(
            r[0]
            for r in store.rows(
                f"SELECT DISTINCT sha256 FROM {table} WHERE sha256 IN ({marks(chunk)})", chunk
            )
        )
    return found


def chunks(items: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield list(items[start : start + CHUNK])


def marks(chunk: Sequence[object]) -> str:
    return ", ".join("?" * len(chunk))
