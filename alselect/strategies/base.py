"""Strategy base class, pool inputs and selections. Strategies see numpy arrays only."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from alselect.devices import check_device
from alselect.errors import UsageError

DEVICE_PARAM = "--param device="


@dataclass(frozen=True)
class PoolInputs:
    """Arrays describing the pool, aligned on axis 0 and ordered by path (the tie-break order).

    - ``probs``: ``[N, C]`` float32 class probabilities (rows sum to 1)
    - ``embeddings``: ``[N, D]`` float32 penultimate features, or ``None`` when not needed
    - ``labeled``: ``[N]`` bool, True for images already annotated (never selected)
    - ``pending``: ``[N]`` bool or ``None``, True for images sent to annotators but not labeled yet:
      not selected again, yet not labeled knowledge either
    - ``mc_probs``: ``[N, T, C]`` float32 or ``None``: T stochastic predictions per image (MC dropout
      passes with the same T masks for every image, or the T members of an ensemble)
    - ``arrays``: any other named per-image arrays a strategy ``needs`` (e.g. ``loss_pred [N]``),
      each aligned on axis 0. For a detector or segmenter it also holds the per-image
      uncertainty ``uncertainty_array(measure)`` (``[N]`` float64, measure one of entropy,
      least_confidence, margin, ratio), reduced from its boxes or pixels; there ``probs`` holds
      each image's class shares (argmax: the dominant class; a row of zeros: no detection)

    Rows may include labeled images from outside the scored folder (``--labeled-dir``); they are
    always ``labeled`` and so never selected.
    """

    probs: np.ndarray
    labeled: np.ndarray
    embeddings: np.ndarray | None = None
    pending: np.ndarray | None = None
    mc_probs: np.ndarray | None = None
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def excluded(self) -> np.ndarray:
        """``[N]`` bool: rows that must not be selected (labeled or pending)."""
        return self.labeled if self.pending is None else self.labeled | self.pending

    @property
    def size(self) -> int:
        return int(self.labeled.shape[0])


def uncertainty_array(measure: str) -> str:
    """Name in ``PoolInputs.arrays`` of a detector's or segmenter's per-image ``measure`` score."""
    return f"uncertainty.{measure}"


def precomputed_uncertainty(inputs: PoolInputs, measure: str) -> np.ndarray | None:
    """The per-image ``measure`` a detection or segmentation run provides, else None (classifiers)."""
    return inputs.arrays.get(uncertainty_array(measure))


@dataclass(frozen=True)
class Selection:
    """Chosen pool indices in annotate-first order and their scores (higher = earlier)."""

    indices: np.ndarray
    scores: np.ndarray


class Strategy:
    """Acquisition strategy. Subclasses set ``name``, ``summary``, ``needs`` and ``score``.

    Constructor rules follow scikit-learn: keyword-only parameters stored unmodified under the
    same name, no work in ``__init__``, randomness only from an explicit ``seed``.

    ``needs`` names the ``PoolInputs`` the strategy reads (``probs``, ``embeddings``, ``mc_probs``,
    or a key of ``arrays``), so the pipeline loads only those. A ``batch_aware`` strategy chooses
    a batch jointly (its picks depend on each other) and needs a budget; others rank every image.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"probs"})
    score_meaning: ClassVar[str] = ""
    batch_aware: ClassVar[bool] = False

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


def strategy_class(name: str) -> type[Strategy]:
    """The registered class for ``name``; an unknown name is a usage error listing the known ones."""
    known = registry()
    if name not in known:
        raise UsageError(f"unknown strategy {name!r}; known strategies: {', '.join(sorted(known))}")
    return known[name]


def make_strategy(name: str, **params: Any) -> Strategy:
    """Instantiate a registered strategy, passing only the parameters it accepts."""
    cls = strategy_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in params.items() if k in accepted and v is not None})


def build_strategy(name: str, *, seed: int = 0, params: Mapping[str, Any] | None = None) -> Strategy:
    """Instantiate ``name`` from user options (``--param key=value``), strictly.

    ``seed`` goes to strategies that take one. Every key of ``params`` must be a constructor
    parameter (else a usage error naming the accepted ones); text values are converted to the type
    of the parameter's default (int, float, bool), so ``beta=10`` reaches the strategy as ``10``.
    Seeds and a ``device`` are checked here, before any work, the same way for every strategy.
    """
    cls = strategy_class(name)
    accepted = {
        key: param
        for key, param in inspect.signature(cls.__init__).parameters.items()
        if param.kind == param.KEYWORD_ONLY
    }
    check_seed(seed, "--seed")
    kwargs: dict[str, Any] = {"seed": seed} if "seed" in accepted else {}
    for key, value in (params or {}).items():
        if key not in accepted:
            names = ", ".join(sorted(k for k in accepted if k != "seed")) or "none"
            raise UsageError(f"strategy {name!r} has no parameter {key!r} (its parameters: {names})")
        kwargs[key] = coerce_param(name, key, value, accepted[key].default)
        if key == "seed":
            check_seed(kwargs[key], f"--param seed for strategy {name!r}")
    if "device" in kwargs:
        check_device(kwargs["device"], DEVICE_PARAM)
    return cls(**kwargs)


MAX_SEED = 2**63 - 1


def check_seed(seed: Any, option: str) -> None:
    """A seed is an integer in [0, 2**63 - 1]: what both numpy's ``default_rng`` (no negatives) and
    ``torch.Generator.manual_seed`` accept; anything else is a usage error naming ``option``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{option} must be an integer from 0 to {MAX_SEED}, got {seed!r}")


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``["beta=10", "mode=fast"]`` → ``{"beta": "10", "mode": "fast"}``; bad items are usage errors."""
    params: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UsageError(f"--param expects KEY=VALUE, got {item!r}")
        params[key] = value.strip()
    return params


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce_param(strategy: str, key: str, value: Any, default: Any) -> Any:
    """Convert a command-line text ``value`` to the type of ``default``; non-text values pass."""
    if not isinstance(value, str) or isinstance(default, str) or default is inspect.Parameter.empty:
        return value
    try:
        if isinstance(default, bool):
            lowered = value.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError(f"expected true or false, got {value!r}")
            return lowered in _TRUE
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if default is None and value.lower() in {"none", "null"}:
            return None
        if default is None:
            for convert in (int, float):
                try:
                    return convert(value)
                except ValueError:
                    continue
    except ValueError as exc:
        raise UsageError(f"--param {key}={value} for strategy {strategy!r}: {exc}") from exc
    return value


def require_budget(strategy: str, budget: int | None) -> int:
    """The budget of a batch-aware strategy: its picks depend on each other, so it needs one."""
    if budget is None:
        raise UsageError(
            f"strategy {strategy!r} chooses a batch jointly and needs --budget N (how many images to pick)"
        )
    if budget < 0:
        raise UsageError(f"--budget must not be negative, got {budget}")
    return int(budget)


def require_embeddings(strategy: str, inputs: PoolInputs) -> np.ndarray:
    """``inputs.embeddings [N, D]``, or an error naming the strategy when the caller left them out."""
    embeddings = inputs.embeddings
    if embeddings is None:
        raise ValueError(f"strategy {strategy!r} needs embeddings, but PoolInputs.embeddings is None")
    if embeddings.ndim != 2 or embeddings.shape[0] != inputs.size:
        raise ValueError(f"{strategy}: embeddings shape {embeddings.shape}, expected ({inputs.size}, D)")
    return embeddings
