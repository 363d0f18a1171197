"""Export formats: every module in this package registers its exporters on import."""

from __future__ import annotations

from alselect.errors import UsageError
from alselect.exporters.base import (
    CSV_COLUMNS,
    SCORE_DIRECTION,
    ExportContext,
    Exporter,
    ExportOptions,
    ExportRow,
    FileSet,
    RunInfo,
    atomic_output,
    exporter_registry,
    is_stream_target,
    join_uri,
    register_exporter,
)
from alselect.plugins import import_submodules

__all__ = [
    "CSV_COLUMNS",
    "SCORE_DIRECTION",
    "ExportContext",
    "ExportOptions",
    "ExportRow",
    "Exporter",
    "FileSet",
    "RunInfo",
    "atomic_output",
    "exporter_registry",
    "get_exporter",
    "is_stream_target",
    "join_uri",
    "register_exporter",
]

import_submodules(__name__, __path__)


def get_exporter(name: str) -> Exporter:
    known = exporter_registry()
    if name not in known:
        raise UsageError(f"unknown export format {name!r}; known formats: {', '.join(known)}")
    return known[name]()
