"""Bring the store's image table in line with a folder: new, changed, vanished files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alselect.discover import FoundFile, WalkProblems, hash_files, walk_images
from alselect.errors import NothingUsableError
from alselect.progress import NULL_REPORTER, Reporter
from alselect.store import ImageRecord, Store

COMMIT_EVERY = 2000


@dataclass
class SyncResult:
    """What a folder scan found; a ``moved`` file vanished under one name and appeared under another."""

    found: int = 0
    new: int = 0
    moved: int = 0
    changed: int = 0
    vanished: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    problems: WalkProblems = field(default_factory=WalkProblems)


def needs_hash(file: FoundFile, known: ImageRecord | None) -> bool:
    """Hash new files, changed files (size or mtime), and files that could not be read before."""
    if known is None or known.sha256 is None:
        return True
    if (known.size, known.mtime_ns) != (file.size, file.mtime_ns):
        return True
    return known.status == "failed" and (known.reason or "").startswith("unreadable")


def sync_folder(
    store: Store,
    root: Path,
    reporter: Reporter = NULL_REPORTER,
    hash_threads: int = 4,
    *,
    allow_empty: bool = True,
) -> SyncResult:
    """Scan ``root``, hash new/changed files, mark vanished ones absent. Commits in chunks.

    Without ``allow_empty``, a folder where no image file is found although the store has
    present images under it (an unmounted disk looks like that) raises ``NothingUsableError``
    before anything is marked absent.
    """
    result = SyncResult()
    key = str(root)
    known = store.images_under(key)
    found: dict[str, FoundFile] = {}
    for file in walk_images(root, result.problems):
        found[file.relpath] = file
        if len(found) % 1000 == 0:
            reporter.progress("scan", len(found), None)
    result.found = len(found)
    reporter.progress("scan", len(found), len(found))
    if not found and not allow_empty:
        present = sum(1 for rec in known.values() if rec.status == "present")
        if present:
            raise NothingUsableError(
                f"{root} holds no image files, but the store knows {present} present image(s) there "
                "(is the disk mounted?); nothing changed, no run recorded (--allow-empty to accept)"
            )

    reappeared = [
        (rel, rec.sha256, rec.size, rec.mtime_ns, "present", None)
        for rel, rec in known.items()
        if rec.status == "absent" and rel in found and not needs_hash(found[rel], rec)
    ]
    if reappeared:
        store.upsert_images(key, reappeared)

    to_hash = [rel for rel, f in found.items() if needs_hash(f, known.get(rel))]
    pending: list[tuple[str, str | None, int, int, str, str | None]] = []
    new_shas: set[str] = set()
    for done, (rel, sha, error) in enumerate(hash_files(root, to_hash, hash_threads), start=1):
        file = found[rel]
        previous = known.get(rel)
        if previous is None:
            result.new += 1
            if sha is not None:
                new_shas.add(sha)
        elif previous.sha256 != sha:
            result.changed += 1
        if error is not None:
            result.unreadable.append((rel, error))
            pending.append((rel, None, file.size, file.mtime_ns, "failed", error))
        else:
            pending.append((rel, sha, file.size, file.mtime_ns, "present", None))
        if len(pending) >= COMMIT_EVERY:
            store.upsert_images(key, pending)
            pending = []
        reporter.progress("hash", done, len(to_hash))
    if pending:
        store.upsert_images(key, pending)

    gone = [rel for rel, rec in known.items() if rel not in found and rec.status != "absent"]
    result.vanished = store.mark_absent(key, gone)
    result.moved = sum(1 for rel in gone if known[rel].sha256 in new_shas)
    result.new -= result.moved
    result.vanished -= result.moved
    return result
