"""A plain list of paths, one per line, as ``export --format paths`` writes it."""

from __future__ import annotations

from alselect.annotations.base import (
    AnnotationReader,
    Annotations,
    Document,
    LabelRecord,
    ReadOptions,
    count_note,
    register_reader,
)
from alselect.uris import is_url, strip_uri_prefix


@register_reader
class PathListReader(AnnotationReader):
    """Every non-blank line is a path, exactly as written: there is no comment syntax, so an
    image named ``#1.png`` is labeled like any other (a blank line cannot name an image). A line
    that starts with the ``--uri-prefix`` given at export is that image's URI (``export --format
    paths --uri-prefix``) and stands for the folder-relative path after the prefix."""

    name = "paths"
    priority = 100  # accepts nearly any text, so it is asked last

    def detect(self, doc: Document) -> bool:
        # a JSON or XML document that no reader claimed is an unknown export, not a list of paths
        return doc.json is None and doc.xml is None

    def read(self, doc: Document, options: ReadOptions) -> Annotations:
        lines = [line.removesuffix("\r") for line in doc.text.split("\n")]
        result = Annotations(self.name)
        urls = 0
        for line in lines:
            if not line.strip():
                continue
            path = strip_uri_prefix(line, options.uri_prefix)
            if path is None and is_url(line):
                urls += 1
            result.records.append(LabelRecord(line, path=line if path is None else path))
        result.notes += count_note(
            urls,
            "line(s) are URLs without the --uri-prefix given to label: pass the --uri-prefix the "
            "export was made with",
        )
        return result
