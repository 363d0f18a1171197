"""What an annotation reader returns, the reader registry, and the parsed input readers share."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, NamedTuple

from alselect.errors import DataError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class LabelRecord(NamedTuple):
    """One image that came back annotated, named by content hash or by path.

    ``ref`` names the record in reports (a path, ``task 12 (...)``, an image name). A valid
    ``sha256`` wins over ``path``; ``path`` is absolute or relative to ``folder`` (when given).
    ``label`` is the class the annotator gave, ``None`` when the source carries none. (A named
    tuple: a million of them are made quickly.)
    """

    ref: str
    sha256: str | None = None
    path: str | None = None
    folder: str | None = None
    label: str | None = None


@dataclass
class Annotations:
    """A reader's result: the records, items that are not labels, and observations to report."""

    format: str
    records: list[LabelRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ref, why it is no label)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReadOptions:
    """``uri_prefix``: the prefix given to the export, stripped from image URLs to get paths back."""

    uri_prefix: str | None = None


# What a JSON or XML document starts with (a path list's first name may start with "{", "[" or "<"
# too: "{draft}.png", "[1].png", "<2>.png"); see Document.syntax_error.
_JSON_START = re.compile(r'^\s*(?:[\[{]\s*(?:\n|$)|\[\s*[\[{"\]]|\{\s*["}])')
_XML_START = re.compile(r"^\s*(?:<\?xml[\s?]|<!--|<[A-Za-z_][^<>\n]*>\s*(?:\n|$))")


class Document:
    """The input text plus its JSON or XML parse, each attempted at most once and only when the
    text could be one (readers detect from the same parse)."""

    def __init__(self, text: str) -> None:
        self.text = text.lstrip("\ufeff")
        self.json_error: str | None = None
        self.xml_error: str | None = None

    @cached_property
    def json(self) -> Any:
        """The parsed JSON document, or ``None`` when the text is not one JSON array or object."""
        if self.text.lstrip()[:1] not in ("[", "{"):
            return None
        try:
            value = json.loads(self.text)
        except json.JSONDecodeError as exc:
            self.json_error = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
            return None
        except ValueError as exc:
            self.json_error = str(exc)
            return None
        return value if isinstance(value, (list, dict)) else None

    @cached_property
    def xml(self) -> ET.Element | None:
        """The XML root element, or ``None`` when the text is not XML. Entity declarations are
        refused (no entity expansion from untrusted files)."""
        if not self.text.lstrip().startswith("<"):
            return None
        if "<!ENTITY" in self.text:
            raise DataError("XML input declares entities; refusing to expand them")
        try:
            return ET.fromstring(self.text)
        except ET.ParseError as exc:
            self.xml_error = str(exc)
            return None

    def syntax_error(self) -> str | None:
        """Why a text that starts like a JSON or XML document does not parse as one (a truncated,
        half-written export), or ``None``. A complete value followed by more text ("Extra data",
        "junk after document element") is not a broken document: a path list may start like that
        (``{"a": 1}x.png``)."""
        if _JSON_START.match(self.text) and self.json is None:
            error = self.json_error
            if error and not error.startswith("Extra data"):
                return f"the input starts like a JSON document but does not parse: {error}"
        if _XML_START.match(self.text) and self.xml is None:
            error = self.xml_error
            if error and not error.startswith("junk after document element"):
                return f"the input starts like an XML document but does not parse: {error}"
        return None

    def require_json(self, what: str) -> Any:
        """The JSON document, or a ``DataError`` naming the parse error (reading ``what``)."""
        value = self.json
        if value is None and self.json_error:
            raise DataError(f"{what} does not parse as JSON: {self.json_error} (a truncated file?)")
        return value

    def require_xml(self, what: str) -> ET.Element | None:
        """The XML root, or a ``DataError`` naming the parse error (reading ``what``)."""
        root = self.xml
        if root is None and self.xml_error:
            raise DataError(f"{what} does not parse as XML: {self.xml_error} (a truncated file?)")
        return root


class AnnotationReader:
    """Reads one kind of file coming back from annotation into ``LabelRecord``s.

    ``detect`` recognises the format from content; readers are asked in ``priority`` order
    (lower first), so the path list, which accepts almost anything, comes last.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 50

    def detect(self, doc: Document) -> bool:
        raise NotImplementedError

    def read(self, doc: Document, options: ReadOptions) -> Annotations:
        raise NotImplementedError


_REGISTRY: dict[str, type[AnnotationReader]] = {}


def register_reader(cls: type[AnnotationReader]) -> type[AnnotationReader]:
    _REGISTRY[cls.name] = cls
    return cls


def reader_registry() -> dict[str, type[AnnotationReader]]:
    """Readers by name, in detection order."""
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].priority, item[0])))


def valid_sha256(value: object) -> str | None:
    """A lower-case sha256 hex digest from ``value``, or ``None`` when it is not one."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if SHA256_RE.match(value) else None


def class_name(value: object) -> str | None:
    """A class label as text (surrounding blanks dropped); ``None`` for empty or non-scalar values."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


def blank_class(value: object) -> bool:
    """A class given as text that holds nothing (``""``, blanks): an annotation that names no class.
    Readers skip such an image with a reason instead of labeling it without a class."""
    return isinstance(value, str) and not value.strip()


BLANK_CLASS = "empty class name (fix the label in the platform; the image stays unlabeled)"


def single_class(labels: list[str | None]) -> tuple[str | None, bool]:
    """``(class, mixed)``: the one class all given labels share, else ``None`` and whether they differ."""
    distinct = {label for label in labels if label is not None}
    if len(distinct) == 1:
        return distinct.pop(), False
    return None, len(distinct) > 1


def count_note(count: int, what: str) -> list[str]:
    return [f"{count} {what}"] if count else []
