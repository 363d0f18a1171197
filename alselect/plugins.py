"""Registries fill themselves by importing every module of their package: one file, one plug-in."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str], skip: frozenset[str] = frozenset({"base"})) -> None:
    """Import each module in ``package`` (whose ``__path__`` is ``path``) except ``skip``."""
    for info in pkgutil.iter_modules(list(path)):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
