"""Acquisition strategies: every module in this package registers its classes on import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    "strategy_from_options",
    "top_k",
]

import_submodules(__name__, __path__)


def strategy_from_options(
    name: str,
    *,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    prefilter: str | None = None,
    balance_classes: bool = False,
) -> Strategy:
    """The strategy the command line asks for: ``name`` with ``--param``s, then composition.

    ``prefilter`` is ``STRATEGY:TOP`` (e.g. ``entropy:5000``): that strategy's TOP best
    candidates are what ``name`` chooses from. ``balance_classes`` fills the batch round-robin
    over predicted classes. Any mistake is a usage error.
    """
    strategy = build_strategy(name, seed=seed, params=params)
    if prefilter is None and not balance_classes:
        return strategy
    from alselect.strategies.compose import compose, parse_prefilter

    first = None if prefilter is None else parse_prefilter(prefilter, seed=seed)
    return compose(strategy, prefilter=first, balance_classes=balance_classes)


def available() -> dict[str, type[Strategy]]:
    """Registered strategies by name, sorted."""
    return dict(sorted(registry().items()))
