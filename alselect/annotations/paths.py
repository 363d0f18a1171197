"""A plain list of paths, one per line, as ``export --format paths`` writes it."""

from __future__ import annotations

from alselect.annotations.base import (
    AnnotationReader,
    Annotations,
    Document,
    LabelRecord,
    ReadOptions,
    register_reader,
)


@register_reader
class PathListReader(AnnotationReader):
    """Every non-blank line is a path, exactly as written: there is no comment syntax, so an
    image named ``#1.png`` is labeled like any other (a blank line cannot name an image)."""

    name = "paths"
    priority = 100  # accepts nearly any text, so it is asked last

    def detect(self, doc: Document) -> bool:
        # a JSON or XML document that no reader claimed is an unknown export, not a list of paths
        return doc.json is None and doc.xml is None

    def read(self, doc: Document, options: ReadOptions) -> Annotations:
        lines = (line.removesuffix("\r") for line in doc.text.split("\n"))
        return Annotations(self.name, [LabelRecord(line, path=line) for line in lines if line.strip()])
