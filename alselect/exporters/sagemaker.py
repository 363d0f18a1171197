"""SageMaker Ground Truth: an input manifest, one JSON object per line with ``source-ref``.

``source-ref`` must be an ``s3://`` URI (give ``--uri-prefix s3://bucket/pool/``); the object keys
are written as they are (``s3://`` URIs name keys, which AWS tools take unencoded). Extra keys are
allowed; attribute names must not start with ``$``; an object may hold at most 100,000 characters
and one attribute 20,000. Ground Truth has no priority field, so ``al-rank`` and ``al-score``
ride along for the record (whether a job keeps manifest order is not documented).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TextIO

from alselect.errors import DataError
from alselect.exporters.base import ExportContext, Exporter, ExportRow, finite_or_none, register_exporter

MAX_OBJECT_CHARS = 100_000
MAX_ATTRIBUTE_CHARS = 20_000


@register_exporter
class SageMakerExporter(Exporter):
    name = "sagemaker"
    reads = frozenset({"uri_prefix"})
    summary = "SageMaker Ground Truth input manifest (JSON Lines, source-ref = s3:// URI)"
    uri_schemes = ("s3",)
    uri_required = True

    def check(self, rows: Sequence[ExportRow], context: ExportContext) -> None:
        super().check(rows, context)
        for row in rows:
            if len(row.uri) > MAX_ATTRIBUTE_CHARS:
                raise DataError(
                    f"the URI of {row.relative!r} is longer than Ground Truth's 20,000 characters"
                )

    def write(
        self, rows: Iterable[ExportRow], stream: TextIO, context: ExportContext | None = None
    ) -> list[ExportRow]:
        written = []
        for row in rows:
            record = {
                "source-ref": row.uri,
                "al-rank": row.rank,
                "al-score": finite_or_none(row.score),
                "al-strategy": row.strategy,
                "al-model": row.model,
                "al-sha256": row.sha256,
            }
            line = json.dumps(record, ensure_ascii=False, allow_nan=False)
            if len(line) > MAX_OBJECT_CHARS:
                raise DataError(f"the manifest line for {row.relative!r} is over 100,000 characters")
            stream.write(line + "\n")
            written.append(row)
        return written
