"""CSV (RFC 4180: CRLF, minimal quoting) and TSV: one row per image in rank order, columns only appended."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import TextIO

from alselect.exporters.base import ExportContext, Exporter, ExportRow, columns_for, register_exporter


@register_exporter
class CsvExporter(Exporter):
    name = "csv"
    reads = frozenset({"uri_prefix", "absolute"})
    summary = "UTF-8 CSV with header; paths with commas, quotes or newlines are quoted"
    dialect: type[csv.Dialect] | str = "excel"

    def write(
        self, rows: Iterable[ExportRow], stream: TextIO, context: ExportContext | None = None
    ) -> list[ExportRow]:
        # RFC 4180 CRLF: csv then quotes any field holding CR or LF (with a bare "\n"
        # terminator a lone CR stays unquoted, and readers split the row on it).
        rows = list(rows)
        fields = columns_for(rows)
        writer = csv.DictWriter(stream, fieldnames=fields, dialect=self.dialect, lineterminator="\r\n")
        writer.writeheader()
        written = []
        for row in rows:
            writer.writerow(dict.fromkeys(fields, "") | row.values())
            written.append(row)
        return written


@register_exporter
class TsvExporter(CsvExporter):
    name = "tsv"
    summary = "tab-separated, same columns as csv; fields with tabs or newlines are quoted"
    dialect = "excel-tab"
