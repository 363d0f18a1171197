"""Strategy base class, pool inputs and selections. Strategies see numpy arrays only."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from alselect.errors import UsageError


@dataclass(frozen=True)
class PoolInputs:
    """Arrays describing the pool, aligned on axis 0 and ordered by path (the tie-break order).

    - ``probs``: ``[N, C]`` float32 class probabilities (rows sum to 1)
    - ``embeddings``: ``[N, D]`` float32 penultimate features, or ``None`` when not needed
    - ``labeled``: ``[N]`` bool, True for images already annotated (never selected)
    - ``pending``: ``[N]`` bool or ``None``, True for images sent to annotators but not labeled yet:
      not selected again, yet not labeled knowledge either
    """

    probs: np.ndarray
    labeled: np.ndarray
    embeddings: np.ndarray | None = None
    pending: np.ndarray | None = None

    @property
    def excluded(self) -> np.ndarray:
        """``[N]`` bool: rows that must not be selected (labeled or pending)."""
        return self.labeled if self.pending is None else self.labeled | self.pending

    @property
    def size(self) -> int:
        return int(self.labeled.shape[0])


@dataclass(frozen=True)
class Selection:
    """Chosen pool indices in annotate-first order and their scores (higher = earlier)."""

    indices: np.ndarray
    scores: np.ndarray


class Strategy:
    """Acquisition strategy. Subclasses set ``name``, ``summary``, ``needs`` and ``score``.

    Constructor rules follow scikit-learn: keyword-only parameters stored unmodified under the
    same name, no work in ``__init__``, randomness only from an explicit ``seed``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"probs"})
    score_meaning: ClassVar[str] = ""

    def get_params(self) -> dict[str, Any]:
        signature = inspect.signature(type(self).__init__)
        return {
            name: getattr(self, name)
            for name, param in signature.parameters.items()
            if name != "self" and param.kind == param.KEYWORD_ONLY
        }

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def score(self, inputs: PoolInputs) -> np.ndarray:
        """Per-image informativeness ``[N]``; higher = annotate first."""
        raise NotImplementedError

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        """Top ``budget`` unlabeled images by ``score``; ties keep pool (path) order."""
        scores = np.asarray(self.score(inputs), dtype=np.float64)
        if scores.shape != (inputs.size,):
            raise ValueError(f"{self.name}: score shape {scores.shape}, expected ({inputs.size},)")
        return top_k(scores, inputs.excluded, budget)


def top_k(scores: np.ndarray, excluded: np.ndarray, budget: int | None) -> Selection:
    """Stable descending order of the scores of rows not ``excluded``; NaN sorts last."""
    candidates = np.flatnonzero(~excluded)
    values = scores[candidates]
    order = np.argsort(-values, kind="stable")  # numpy sorts NaN after everything else
    chosen = candidates[order[:budget] if budget is not None else order]
    return Selection(indices=chosen, scores=scores[chosen])


_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Strategy]]:
    return dict(_REGISTRY)


def make_strategy(name: str, **params: Any) -> Strategy:
    """Instantiate a registered strategy, passing only the parameters it accepts."""
    known = registry()
    if name not in known:
        raise UsageError(f"unknown strategy {name!r}; known strategies: {', '.join(sorted(known))}")
    cls = known[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in params.items() if k in accepted and v is not None})
