"""Bring the store's image table in line with a folder: new, changed, vanished files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alselect.discover import FoundFile, WalkProblems, hash_files, walk_images
from alselect.errors import NothingUsableError
from alselect.progress import NULL_REPORTER, Reporter
from alselect.store import ImageRecord, Store

COMMIT_EVERY = 2000


@dataclass
class SyncResult:
    """What a folder scan found. Every file found is in exactly one of new, moved, changed, restored
    and unchanged (``found`` is their sum); ``vanished`` counts paths seen before and gone now whose
    content is nowhere in the folder any more (a moved file's old path is not vanished: its content
    is under the new path; see ``alselect.identity``). ``copies_removed`` counts paths gone whose
    content is still in the folder under a path that was there before (a duplicate copy deleted)."""

    found: int = 0
    new: int = 0
    moved: int = 0
    changed: int = 0
    restored: int = 0
    unchanged: int = 0
    vanished: int = 0
    copies_removed: int = 0
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

    # Files not hashed again whose row still changes: back after being absent, or now (no longer)
    # reached through a symlink.
    kept = [
        (
            rel,
            rec.sha256,
            rec.size,
            rec.mtime_ns,
            "present" if rec.status == "absent" else rec.status,
            None if rec.status == "absent" else rec.reason,
            found[rel].link,
        )
        for rel, rec in known.items()
        if rel in found
        and not needs_hash(found[rel], rec)
        and (rec.status == "absent" or rec.link != found[rel].link)
    ]
    if kept:
        store.upsert_images(key, kept)

    to_hash = [rel for rel, f in found.items() if needs_hash(f, known.get(rel))]
    hashed: dict[str, str | None] = {}
    pending: list[tuple[str, str | None, int, int, str, str | None, bool]] = []
    for done, (rel, sha, error) in enumerate(hash_files(root, to_hash, hash_threads), start=1):
        file = found[rel]
        hashed[rel] = sha
        if error is not None:
            result.unreadable.append((rel, error))
            pending.append((rel, None, file.size, file.mtime_ns, "failed", error, file.link))
        else:
            pending.append((rel, sha, file.size, file.mtime_ns, "present", None, file.link))
        if len(pending) >= COMMIT_EVERY:
            store.upsert_images(key, pending)
            pending = []
        reporter.progress("hash", done, len(to_hash))
    if pending:
        store.upsert_images(key, pending)

    gone = [rel for rel, rec in known.items() if rel not in found and rec.status != "absent"]
    copies = _count(result, known, found, hashed, gone)
    store.mark_absent(key, gone, copies)
    return result


def _count(
    result: SyncResult,
    known: dict[str, ImageRecord],
    found: dict[str, FoundFile],
    hashed: dict[str, str | None],
    gone: list[str],
) -> list[str]:
    """Sort every found file into one category and count the gone paths whose content is gone too.

    Returns the gone paths that were duplicate copies: their content is still here under a path
    that is not new (a new path with the content of a gone one is that path moved, first in path
    order)."""
    left_behind = Counter(known[rel].sha256 for rel in gone if known[rel].sha256)
    for rel in found:
        previous = known.get(rel)
        sha = hashed.get(rel, previous.sha256 if previous else None)
        if previous is None:
            if sha is not None and left_behind[sha] > 0:  # the content of a path that is gone
                left_behind[sha] -= 1
                result.moved += 1
            else:
                result.new += 1
        elif rel in hashed and sha != previous.sha256:
            result.changed += 1
        elif previous.status == "absent":
            result.restored += 1
        else:
            result.unchanged += 1
    here = {hashed.get(rel, known[rel].sha256 if rel in known else None) for rel in found} - {None}
    result.vanished = sum(1 for rel in gone if known[rel].sha256 not in here)
    moved = Counter(known[rel].sha256 for rel in gone if known[rel].sha256) - left_behind
    copies = []
    for rel in sorted(gone):
        sha = known[rel].sha256
        if sha in here and moved[sha] > 0:
            moved[sha] -= 1
        elif sha in here:
            copies.append(rel)
    result.copies_removed = len(copies)
    return copies
