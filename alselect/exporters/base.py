"""Export rows, the exporter registry, and atomic file output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TextIO

from alselect.errors import AlselectError

CSV_COLUMNS = (
    "rank",
    "path",
    "score",
    "strategy",
    "model",
    "predicted_label",
    "confidence",
    "sha256",
)


@dataclass(frozen=True)
class ExportRow:
    """One image to annotate; ``rank`` 1 = annotate first (contiguous within an export)."""

    rank: int
    path: str
    score: float
    strategy: str
    model: str
    predicted_label: str
    confidence: float | None
    sha256: str

    def values(self) -> dict[str, str]:
        """Column → text, numbers formatted deterministically."""
        return {
            "rank": str(self.rank),
            "path": self.path,
            "score": format_number(self.score),
            "strategy": self.strategy,
            "model": self.model,
            "predicted_label": self.predicted_label,
            "confidence": format_number(self.confidence),
            "sha256": self.sha256,
        }


def format_number(value: float | None) -> str:
    """Eight significant digits: stable across runs, enough to read ties."""
    return "" if value is None else format(float(value), ".8g")


class Exporter:
    """Writes rows to a text stream; ``write`` returns the rows it actually wrote."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def write(self, rows: Iterable[ExportRow], stream: TextIO) -> list[ExportRow]:
        raise NotImplementedError


_REGISTRY: dict[str, type[Exporter]] = {}


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    _REGISTRY[cls.name] = cls
    return cls


def exporter_registry() -> dict[str, type[Exporter]]:
    return dict(sorted(_REGISTRY.items()))


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[TextIO]:
    """Write to a temp file beside ``path``, fsync, then rename over it; nothing on failure."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise AlselectError(f"output folder does not exist: {directory}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


WriterFactory = Callable[[], Exporter]
