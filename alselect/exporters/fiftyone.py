"""FiftyOne: a ``CSVDataset`` folder, i.e. ``labels.csv`` with a ``filepath`` column.

``filepath`` holds absolute paths, and the ``al_*`` columns carry the ranking. FiftyOne's importer
insists on a ``data/`` folder beside ``labels.csv`` even when every path is absolute, so an empty
one is made. FiftyOne reads every column as text unless told a parser per field,
and imports samples sorted by path, so load with types and sort by rank::

    fo.Dataset.from_dir(dataset_dir=DIR, dataset_type=fo.types.CSVDataset,
                        fields={"al_rank": int, "al_score": float, "al_confidence": float,
                                "al_strategy": None, "al_model": None, "al_sha256": None,
                                "al_predicted_label": None}).sort_by("al_rank")

FiftyOne opens ``labels.csv`` in universal-newline mode, which turns a carriage return inside a
quoted path into a line feed: such paths are skipped.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence

from alselect.errors import AlselectError
from alselect.exporters.base import (
    ExportContext,
    Exporter,
    ExportRow,
    FileSet,
    format_number,
    not_utf8_reason,
    register_exporter,
)
from alselect.uris import is_utf8

COLUMNS = (
    "filepath",
    "al_rank",
    "al_score",
    "al_strategy",
    "al_model",
    "al_sha256",
    "al_predicted_label",
    "al_confidence",
)
LABELS_FILE = "labels.csv"
DATA_FOLDER = "data"


@register_exporter
class FiftyOneExporter(Exporter):
    name = "fiftyone"
    summary = "FiftyOne CSVDataset folder: labels.csv with filepath and al_rank/al_score/... columns"
    layout = "folder"
    file_names = (LABELS_FILE,)
    reads = frozenset()  # local paths only

    def write_files(
        self, rows: Sequence[ExportRow], files: FileSet, context: ExportContext
    ) -> list[ExportRow]:
        written = []
        try:
            (files.target / DATA_FOLDER).mkdir(exist_ok=True)
        except OSError as exc:
            raise AlselectError(f"cannot create {files.target / DATA_FOLDER}: {exc.strerror}") from exc
        with files.open(LABELS_FILE) as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(COLUMNS)
            for row in rows:
                if self.unwritable(row, context) is not None:  # export_latest left these out already
                    continue
                writer.writerow(
                    [
                        str(row.file),
                        row.rank,
                        format_number(row.score),
                        row.strategy,
                        row.model,
                        row.sha256,
                        row.predicted_label,
                        format_number(row.confidence),
                    ]
                )
                written.append(row)
        return written

    def unwritable(self, row: ExportRow, context: ExportContext) -> str | None:
        filepath = str(row.file)
        if "\r" in filepath:
            return "path contains a carriage return, which FiftyOne's CSV reader turns into a line feed"
        if not is_utf8(filepath):
            return not_utf8_reason("FiftyOne's UTF-8 labels.csv")
        return super().unwritable(row, context)
