"""Line-oriented exports: JSON Lines records and bare paths for ``xargs``/``rsync``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import TextIO

from alselect.exporters.base import ExportContext, Exporter, ExportRow, register_exporter


@register_exporter
class JsonlExporter(Exporter):
    name = "jsonl"
    summary = "one JSON object per line with the csv columns (numbers as numbers)"

    def write(
        self, rows: Iterable[ExportRow], stream: TextIO, context: ExportContext | None = None
    ) -> list[ExportRow]:
        written = []
        for row in rows:
            text = row.values()
            record = {
                "rank": row.rank,
                "path": row.path,
                "score": json_number(text["score"]),
                "strategy": row.strategy,
                "model": row.model,
                "predicted_label": row.predicted_label,
                "confidence": json_number(text["confidence"]),
                "sha256": row.sha256,
                "folder": row.folder,
                "uri": row.uri or None,
            }
            if row.detections is not None:  # detection runs
                record["detections"] = row.detections
            stream.write(json_line(record))
            written.append(row)
        return written


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def json_line(record: dict[str, object]) -> str:
    """One JSON object and a newline, UTF-8 as is; the bytes of a file name that are not UTF-8
    (surrogate escapes) as ``\\udcXX`` escapes, so the line stays valid UTF-8 and ``json.loads``
    gives back the name ``os.fsencode`` turns into the original bytes."""
    text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    return _NOT_UTF8.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def json_number(text: str) -> float | None:
    """A formatted number as JSON allows it: NaN, infinities and blanks become null."""
    if not text:
        return None
    value = float(text)
    return value if math.isfinite(value) else None


@register_exporter
class PathsExporter(Exporter):
    name = "paths"
    summary = "one path (or URI, with --uri-prefix) per line, no header; paths with a newline are skipped"

    def write(
        self, rows: Iterable[ExportRow], stream: TextIO, context: ExportContext | None = None
    ) -> list[ExportRow]:
        written = []
        for row in rows:
            text = row.uri or row.path
            if "\n" in text or "\r" in text:
                continue
            stream.write(text + "\n")
            written.append(row)
        return written
