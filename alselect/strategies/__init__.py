"""Acquisition strategies: every module in this package registers its classes on import."""

from __future__ import annotations

from alselect.plugins import import_submodules
from alselect.strategies.base import (
    PoolInputs,
    Selection,
    Strategy,
    build_strategy,
    make_strategy,
    parse_params,
    register,
    registry,
    top_k,
)

__all__ = [
    "PoolInputs",
    "Selection",
    "Strategy",
    "available",
    "build_strategy",
    "make_strategy",
    "parse_params",
    "register",
    "registry",
    "top_k",
]

import_submodules(__name__, __path__)


def available() -> dict[str, type[Strategy]]:
    """Registered strategies by name, sorted."""
    return dict(sorted(registry().items()))
