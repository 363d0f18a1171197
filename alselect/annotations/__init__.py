"""Annotation readers: each module here registers the readers for one family of files that come
back from annotation (alselect's own exports, Label Studio, CVAT, COCO)."""

from __future__ import annotations

from alselect.annotations.base import (
    AnnotationReader,
    Annotations,
    Document,
    LabelRecord,
    ReadOptions,
    reader_registry,
    register_reader,
)
from alselect.errors import DataError, UsageError
from alselect.plugins import import_submodules

__all__ = [
    "AnnotationReader",
    "Annotations",
    "LabelRecord",
    "ReadOptions",
    "get_reader",
    "read_annotations",
    "reader_registry",
    "register_reader",
]

import_submodules(__name__, __path__)


def get_reader(name: str) -> AnnotationReader:
    known = reader_registry()
    if name not in known:
        raise UsageError(f"unknown label format {name!r}; known formats: auto, {', '.join(known)}")
    return known[name]()


def read_annotations(text: str, fmt: str | None = None, options: ReadOptions | None = None) -> Annotations:
    """Read ``text`` in format ``fmt``, or in the first format whose reader recognises it."""
    doc = Document(text)
    if fmt is None or fmt == "auto":
        readers = [cls() for cls in reader_registry().values()]
        reader = next((candidate for candidate in readers if candidate.detect(doc)), None)
        broken = doc.syntax_error() if reader is None or reader.name == "paths" else None
        if broken:  # a truncated export is not a list of paths
            raise DataError(f"{broken} (a truncated or half-written file?); --format paths reads it as paths")
        if reader is None:
            raise DataError(
                "input is JSON or XML but no known annotation export (Label Studio JSON, COCO, "
                "CVAT for images XML); pass --format to say which it is"
            )
    else:
        reader = get_reader(fmt)
    return reader.read(doc, options or ReadOptions())
