"""Mark images as annotated from a list of paths or a CSV with a ``path``/``sha256`` column."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

from alselect.errors import DataError
from alselect.store import Store

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class LabelResult:
    requested: int
    newly_labeled: int
    already_labeled: int
    unknown: list[str] = field(default_factory=list)


def parse_label_input(text: str) -> tuple[list[str], list[str]]:
    """Split input into ``(paths, sha256s)``.

    A first line naming a ``path`` or ``sha256`` column makes it a CSV (an earlier export works
    as is); otherwise every non-empty line not starting with ``#`` is a path.
    """
    text = text.lstrip("\ufeff")
    first = text.split("\n", 1)[0].rstrip("\r")
    header = next(csv.reader([first]), [])
    if "path" in header or "sha256" in header:
        paths, shas = [], []
        for row in csv.DictReader(io.StringIO(text, newline="")):
            sha = (row.get("sha256") or "").strip().lower()
            if SHA256_RE.match(sha):
                shas.append(sha)
            elif row.get("path"):
                paths.append(row["path"])
        return paths, shas
    lines = [line.rstrip("\r") for line in text.split("\n")]
    return [line for line in lines if line.strip() and not line.startswith("#")], []


def import_labels(store: Store, text: str, source: str) -> LabelResult:
    """Label every listed image by content hash, so renamed copies stay labeled."""
    paths, shas = parse_label_input(text)
    if not paths and not shas:
        raise DataError(f"{source}: no paths found (one path per line, or a CSV with a path column)")
    found, unknown = store.shas_for_paths(paths)
    known = store.known_shas(shas)
    unknown += [sha for sha in shas if sha not in known]
    wanted = set(found.values()) | known
    already = int(
        sum(1 for sha in wanted if store.scalar("SELECT 1 FROM labels WHERE sha256 = ?", (sha,)) is not None)
    )
    added = store.add_labels(wanted, source)
    return LabelResult(
        requested=len(paths) + len(shas),
        newly_labeled=added,
        already_labeled=already,
        unknown=unknown,
    )
