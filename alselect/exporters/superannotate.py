"""SuperAnnotate: an attach CSV (``url,name``) and a priorities JSON for ``upload_priority_scores``.

SuperAnnotate matches priorities to items by name, drops every CSV column but ``url``, ``name`` and
``integration``, silently skips duplicate names, and refuses names over 120 characters or holding
``< > : " ' / \\ ? * & $ !  +``. So each name is the folder-relative path with folders joined by
``__`` and forbidden or control characters replaced by ``_``, cut to 120 characters (extension
kept), and made unique with a short content hash where two would coincide. Priorities are
integers, higher first (rank 1 gets the highest), within SuperAnnotate's [0, 1e6]: the SDK
truncates a value's text to 8 characters, so small floats would break.
"""

from __future__ import annotations

import csv
import posixpath
import re
from collections.abc import Sequence

from alselect.exporters.base import (
    ExportContext,
    Exporter,
    ExportRow,
    FileSet,
    register_exporter,
    write_json_array,
)

MAX_NAME = 120
MAX_PRIORITY = 1_000_000
# the characters SuperAnnotate forbids, control characters, and the surrogate escapes of bytes that are
# not UTF-8 (they cannot be written to its UTF-8 files)
FORBIDDEN = re.compile(r'[<>:"\'/\\?*&$!+\x00-\x1f\x7f\udc80-\udcff]')
ATTACH_FILE = "attach.csv"
PRIORITIES_FILE = "priorities.json"


def item_name(relpath: str) -> str:
    """A SuperAnnotate item name for ``relpath``: ``a/b c&d.jpg`` → ``a__b c_d.jpg`` (≤ 120 chars)."""
    name = FORBIDDEN.sub("_", relpath.replace("/", "__")).strip()
    return fit(name or "image", "")


def fit(name: str, suffix: str) -> str:
    """``name`` with ``suffix`` added before its extension, cut so the whole is ≤ ``MAX_NAME``."""
    stem, ext = posixpath.splitext(name)
    if len(ext) > 10:  # not a real extension: keep it in the part that may be cut
        stem, ext = name, ""
    room = MAX_NAME - len(suffix) - len(ext)
    return stem[:room].rstrip() + suffix + ext


def unique_names(rows: Sequence[ExportRow]) -> list[str]:
    """One distinct name per row, stable for the same rows; clashes get ``~<sha256 prefix>``."""
    names = [item_name(row.relative) for row in rows]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    taken = {name for name, count in counts.items() if count == 1}
    result = []
    for row, name in zip(rows, names, strict=True):
        if counts[name] > 1:
            for width in (8, 16, 64):
                candidate = fit(name, "~" + row.sha256[:width])
                if candidate not in taken:
                    break
            name = candidate
            taken.add(name)
        result.append(name)
    return result


def priorities(count: int) -> list[int]:
    """Integer priorities for ranks 1..count, higher first, within [0, 1e6]: ``count - rank + 1``,
    scaled down (ties possible) only when more than a million rows are exported at once."""
    if count <= MAX_PRIORITY:
        return [count - i for i in range(count)]
    return [(count - 1 - i) * MAX_PRIORITY // (count - 1) for i in range(count)]


@register_exporter
class SuperAnnotateExporter(Exporter):
    name = "superannotate"
    reads = frozenset({"uri_prefix"})
    summary = "SuperAnnotate attach CSV (url,name) + priorities JSON (integers, higher first)"
    layout = "files"
    file_names = (ATTACH_FILE, PRIORITIES_FILE)
    uri_schemes = ("http", "https")
    uri_required = True

    def write_files(
        self, rows: Sequence[ExportRow], files: FileSet, context: ExportContext
    ) -> list[ExportRow]:
        names = unique_names(rows)
        with files.open(ATTACH_FILE) as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["url", "name"])
            writer.writerows([row.uri, name] for row, name in zip(rows, names, strict=True))
        with files.open(PRIORITIES_FILE) as handle:
            records = [
                {"name": name, "priority": priority}
                for name, priority in zip(names, priorities(len(rows)), strict=True)
            ]
            write_json_array(handle, records)
        return list(rows)
