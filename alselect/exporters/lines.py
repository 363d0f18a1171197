"""Line-oriented exports: JSON Lines records and bare paths for ``xargs``/``rsync``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TextIO

from alselect.exporters.base import Exporter, ExportRow, register_exporter


@register_exporter
class JsonlExporter(Exporter):
    name = "jsonl"
    summary = "one JSON object per line with the csv columns (numbers as numbers)"

    def write(self, rows: Iterable[ExportRow], stream: TextIO) -> list[ExportRow]:
        written = []
        for row in rows:
            record = {
                "rank": row.rank,
                "path": row.path,
                "score": float(row.values()["score"]),
                "strategy": row.strategy,
                "model": row.model,
                "predicted_label": row.predicted_label,
                "confidence": None if row.confidence is None else float(row.values()["confidence"]),
                "sha256": row.sha256,
            }
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            written.append(row)
        return written


@register_exporter
class PathsExporter(Exporter):
    name = "paths"
    summary = "one path per line, no header (paths containing a newline are skipped)"

    def write(self, rows: Iterable[ExportRow], stream: TextIO) -> list[ExportRow]:
        written = []
        for row in rows:
            if "\n" in row.path or "\r" in row.path:
                continue
            stream.write(row.path + "\n")
            written.append(row)
        return written
