"""Line-oriented exports: JSON Lines records and bare paths for ``xargs``/``rsync``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TextIO

from alselect.exporters.base import ExportContext, Exporter, ExportRow, json_text, register_exporter


@register_exporter
class JsonlExporter(Exporter):
    name = "jsonl"
    reads = frozenset({"uri_prefix", "absolute"})
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


def json_line(record: dict[str, object]) -> str:
    """One JSON object and a newline (see ``json_text``: names that are not UTF-8 as escapes)."""
    return json_text(record) + "\n"


def json_number(text: str) -> float | None:
    """A formatted number as JSON allows it: NaN, infinities and blanks become null."""
    if not text:
        return None
    value = float(text)
    return value if math.isfinite(value) else None


@register_exporter
class PathsExporter(Exporter):
    name = "paths"
    reads = frozenset({"uri_prefix", "absolute"})
    summary = "one path (or URI, with --uri-prefix) per line, no header; paths with a newline are skipped"

    def write(
        self, rows: Iterable[ExportRow], stream: TextIO, context: ExportContext | None = None
    ) -> list[ExportRow]:
        context = context or ExportContext()
        written = []
        for row in rows:
            if self.unwritable(row, context) is None:  # export_latest left these out already
                stream.write((row.uri or row.path) + "\n")
                written.append(row)
        return written

    def unwritable(self, row: ExportRow, context: ExportContext) -> str | None:
        text = row.uri or row.path
        if "\n" in text or "\r" in text:
            return "path contains a line break, which one path per line cannot hold (use csv or jsonl)"
        return super().unwritable(row, context)
