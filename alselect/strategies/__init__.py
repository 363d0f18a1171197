"""Acquisition strategies: every module in this package registers its classes on import."""

from __future__ import annotations

import importlib
import pkgutil

from alselect.strategies.base import (
    PoolInputs,
    Selection,
    Strategy,
    make_strategy,
    register,
    registry,
    top_k,
)

__all__ = [
    "PoolInputs",
    "Selection",
    "Strategy",
    "available",
    "make_strategy",
    "register",
    "registry",
    "top_k",
]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def available() -> dict[str, type[Strategy]]:
    """Registered strategies by name, sorted."""
    return dict(sorted(registry().items()))
