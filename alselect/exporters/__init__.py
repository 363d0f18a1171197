"""Export formats: every module in this package registers its exporters on import."""

from __future__ import annotations

import importlib
import pkgutil

from alselect.errors import UsageError
from alselect.exporters.base import (
    CSV_COLUMNS,
    Exporter,
    ExportRow,
    atomic_output,
    exporter_registry,
    register_exporter,
)

__all__ = [
    "CSV_COLUMNS",
    "ExportRow",
    "Exporter",
    "atomic_output",
    "exporter_registry",
    "get_exporter",
    "register_exporter",
]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_exporter(name: str) -> Exporter:
    known = exporter_registry()
    if name not in known:
        raise UsageError(f"unknown export format {name!r}; known formats: {', '.join(known)}")
    return known[name]()
