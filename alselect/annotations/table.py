"""Tables coming back from annotation: alselect's own CSV/TSV/JSON Lines exports and ``path,label`` files.

Columns (keys) used: ``sha256`` (wins when valid), ``path``, ``folder`` (the scored folder the
path is relative to) and ``label`` (the annotated class). Other columns, ``predicted_label``
included, are ignored: a prediction is not an annotation.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from typing import ClassVar

from alselect.annotations.base import (
    AnnotationReader,
    Annotations,
    Document,
    LabelRecord,
    ReadOptions,
    class_name,
    register_reader,
    valid_sha256,
)
from alselect.discover import IMAGE_EXTENSIONS
from alselect.errors import DataError

KEY_COLUMNS = ("path", "sha256")


EMPTY_CLASS = "empty class name (leave the label column out, or null, to label without a class)"


def record_from(fields: Mapping[str, object], fallback_ref: str) -> LabelRecord:
    """A record from one row or object; blank fields count as absent."""
    sha = valid_sha256(fields.get("sha256"))
    path = fields.get("path")
    path = path if isinstance(path, str) and path else None
    folder = fields.get("folder")
    folder = folder if isinstance(folder, str) and folder else None
    label = fields.get("label")
    label = None if label is None else class_name(label)
    return LabelRecord(path or sha or fallback_ref, sha, path, folder, label)


def records_from(rows: Iterable[Mapping[str, object]], unit: str, fmt: str) -> Annotations:
    """The records of ``rows``; a row whose ``label`` is present but blank is no label (an empty
    class name is refused, not taken as "no class": the annotator may have skipped it)."""
    result = Annotations(fmt)
    for number, row in enumerate(rows, start=1):
        record = record_from(row, f"{unit} {number}")
        given = row.get("label")
        if isinstance(given, str) and not given.strip():
            result.skipped.append((record.ref, EMPTY_CLASS))
        else:
            result.records.append(record)
    return result


class DelimitedReader(AnnotationReader):
    """A header row naming ``path`` or ``sha256`` (RFC 4180 quoting, any column order)."""

    dialect: ClassVar[str] = "excel"
    priority = 41

    def header(self, doc: Document, forced: bool = False) -> list[str] | None:
        """The header's column names, or ``None`` when the first line is not one.

        Detected (not ``forced``), a header has at least two distinct, non-blank columns, one of
        them ``path`` or ``sha256``: a line reading just ``path`` is the first line of a path list.
        """
        first = doc.text.split("\n", 1)[0].rstrip("\r")
        fields = next(csv.reader([first], dialect=self.dialect), [])
        if not any(column in fields for column in KEY_COLUMNS):
            return None
        names = [column.strip() for column in fields]
        if not forced and (len(names) < 2 or "" in names or len(set(names)) < len(names)):
            return None
        # a path list whose first image name holds a comma and the word "path" is still a path list
        if any(os.path.splitext(column)[1].lower() in IMAGE_EXTENSIONS for column in fields):
            return None
        return fields

    def detect(self, doc: Document) -> bool:
        return self.header(doc) is not None

    def read(self, doc: Document, options: ReadOptions) -> Annotations:
        if self.header(doc, forced=True) is None:
            raise DataError(f"no 'path' or 'sha256' column in the {self.name.upper()} header")
        rows = csv.DictReader(io.StringIO(doc.text, newline=""), dialect=self.dialect)
        return records_from(rows, "row", self.name)


@register_reader
class CsvReader(DelimitedReader):
    name = "csv"


@register_reader
class TsvReader(DelimitedReader):
    name = "tsv"
    dialect = "excel-tab"
    priority = 42


@register_reader
class JsonLinesReader(AnnotationReader):
    """One JSON object per line; recognised when the first one has a ``path`` or ``sha256`` key."""

    name = "jsonl"
    priority = 40

    def detect(self, doc: Document) -> bool:
        first = doc.text.lstrip().split("\n", 1)[0]
        try:
            value = json.loads(first)
        except ValueError:
            return False
        return isinstance(value, dict) and any(key in value for key in KEY_COLUMNS)

    def read(self, doc: Document, options: ReadOptions) -> Annotations:
        objects = []
        for number, line in enumerate(doc.text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                raise DataError(f"line {number} of the JSON Lines input is not a JSON object: {line[:60]!r}")
            objects.append(value)
        return records_from(objects, "object", self.name)
