"""Labelbox: data rows (a JSON array for ``dataset.create_data_rows``) and per-row priorities.

Each row has ``row_data`` (the image's URL from ``--uri-prefix``, or its absolute local path, which
the SDK uploads), ``global_key`` and ``media_type: "IMAGE"``. Labelbox keeps a global key unique in the
whole organisation and refuses a second data row with the same one, so the key names the image
exactly: its folder-relative path, ``@``, and the first 16 hex digits of the sha256 of (scored folder,
path, content hash). Two folders with the same relative path, or an edited file (new content at the
same path), get different keys; the same image always gets the same key, run after run.
The ranking goes in ``metadata_fields`` (``al_rank``, ``al_score``
numbers; ``al_strategy``, ``al_model``, ``al_sha256`` strings): Labelbox only accepts metadata whose
schema exists, so create those five fields once in the workspace (README: Labelbox). Labelbox
rejects ``s3://`` row data; give the bucket's https URL instead.

``priorities.csv`` holds ``global_key,priority`` with the rank as priority: Labelbox's
``set_labeling_parameter_overrides`` serves lower numbers first, so 1 = annotate first.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence

from alselect.errors import UsageError
from alselect.exporters.base import (
    ExportContext,
    Exporter,
    ExportRow,
    FileSet,
    finite_or_none,
    not_utf8_reason,
    register_exporter,
    uri_scheme,
    write_json_array,
)
from alselect.uris import WEB_SCHEMES, is_utf8

ROWS_FILE = "data_rows.json"
PRIORITIES_FILE = "priorities.csv"
METADATA_FIELDS = ("al_rank", "al_score", "al_strategy", "al_model", "al_sha256")


@register_exporter
class LabelboxExporter(Exporter):
    name = "labelbox"
    reads = frozenset({"uri_prefix"})
    summary = "Labelbox data rows (JSON array, al_* metadata) + priorities CSV (1 = first)"
    layout = "files"
    file_names = (ROWS_FILE, PRIORITIES_FILE)
    uri_schemes = ("https", "http", "gs")

    def check(self, rows: Sequence[ExportRow], context: ExportContext) -> None:
        prefix = context.options.uri_prefix
        if prefix is not None and uri_scheme(prefix) == "s3":
            raise UsageError(
                "Labelbox rejects s3:// row data: give the bucket's https URL as --uri-prefix "
                "(https://BUCKET.s3.REGION.amazonaws.com/pool/) with Labelbox's IAM delegated access"
            )
        super().check(rows, context)

    def write_files(
        self, rows: Sequence[ExportRow], files: FileSet, context: ExportContext
    ) -> list[ExportRow]:
        with files.open(ROWS_FILE) as handle:
            write_json_array(handle, [self.data_row(row) for row in rows])
        with files.open(PRIORITIES_FILE) as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["global_key", "priority"])
            writer.writerows([global_key(row), row.rank] for row in rows)
        return list(rows)

    def unwritable(self, row: ExportRow, context: ExportContext) -> str | None:
        # a web URL carries the name's bytes percent-encoded; a local path or gs:// key cannot
        if uri_scheme(row.uri) not in WEB_SCHEMES and not is_utf8(row.uri or str(row.file)):
            return not_utf8_reason("Labelbox (without an http(s) --uri-prefix)")
        return super().unwritable(row, context)

    def data_row(self, row: ExportRow) -> dict[str, object]:
        values = (finite_or_none(row.score), row.strategy, row.model, row.sha256)
        return {
            "row_data": row.uri or str(row.file),
            "global_key": global_key(row),
            "media_type": "IMAGE",
            "metadata_fields": [
                {"name": name, "value": value}
                for name, value in zip(METADATA_FIELDS, (row.rank, *values), strict=True)
                if value is not None
            ],
        }


def global_key(row: ExportRow) -> str:
    """``<relative path>@<16 hex>``: unique per (scored folder, path, content) and stable across
    reruns. Bytes of a name that are not UTF-8 appear as ``\\xNN`` (the key is text)."""
    identity = b"\0".join([os.fsencode(row.folder), os.fsencode(row.relative), row.sha256.encode()])
    readable = os.fsencode(row.relative).decode("utf-8", "backslashreplace")
    return f"{readable}@{hashlib.sha256(identity).hexdigest()[:16]}"
