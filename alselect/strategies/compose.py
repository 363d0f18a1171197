"""Composing strategies: a ranking prefilter in front of another strategy, and class balancing.

Neither wrapper is registered: :func:`compose` builds them from ``--prefilter STRATEGY:TOP`` and
``--balance-classes``. Both are :class:`Strategy` objects whose ``name``, ``needs`` (the union of
their parts'), ``score_meaning`` and ``get_params()`` describe the whole composition, so a run
record says exactly what ran.

Restricting a strategy to some candidates (:func:`subpool`) keeps every labeled and pending row as
context: core-set still measures distances to the whole labeled set, DAL still trains on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alselect.errors import UsageError
from alselect.strategies.base import (
    PoolInputs,
    Selection,
    Strategy,
    build_strategy,
    require_budget,
)


def subpool(inputs: PoolInputs, keep: np.ndarray) -> tuple[PoolInputs, np.ndarray]:
    """``inputs`` restricted to the candidate rows ``keep`` plus every labeled or pending row.

    Returns the smaller inputs and ``rows``, the original index of each of their rows (ascending,
    so pool order and tie-breaks are kept): a selection ``s`` on the smaller inputs is
    ``rows[s.indices]`` in the original pool. Per-image arrays are copied for those rows only.
    """
    mask = inputs.excluded.copy()
    mask[np.asarray(keep, dtype=np.int64)] = True
    rows = np.flatnonzero(mask)

    def take(array: np.ndarray | None) -> np.ndarray | None:
        if array is None or array.ndim == 0 or array.shape[0] != inputs.size:
            return array  # absent, or a placeholder the strategy does not read
        return array[rows]

    probs = take(inputs.probs)
    assert probs is not None
    sub = PoolInputs(
        probs=probs,
        labeled=inputs.labeled[rows],
        embeddings=take(inputs.embeddings),
        pending=take(inputs.pending),
        mc_probs=take(inputs.mc_probs),
        arrays={key: value[rows] for key, value in inputs.arrays.items()},
    )
    return sub, rows


def _describe(strategy: Strategy) -> dict[str, Any]:
    return {"name": strategy.name, "params": strategy.get_params()}


class Prefiltered(Strategy):
    """Run ``base`` on the ``top`` best candidates of the ranking strategy ``prefilter``.

    The prefilter must rank images independently (not batch-aware). The base strategy sees those
    candidates plus every labeled and pending row (:func:`subpool`); its scores are kept as they are.
    """

    def __init__(self, *, base: Strategy, prefilter: Strategy, top: int) -> None:
        self.base = base
        self.prefilter = prefilter
        self.top = top

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.base.name}+prefilter({self.prefilter.name}:{self.top})"

    @property
    def summary(self) -> str:  # type: ignore[override]
        return f"{self.base.summary}, among the top {self.top} by {self.prefilter.name}"

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return self.base.needs | self.prefilter.needs

    @property
    def score_meaning(self) -> str:  # type: ignore[override]
        return f"{self.base.score_meaning} (computed among the top {self.top} by {self.prefilter.name})"

    @property
    def batch_aware(self) -> bool:  # type: ignore[override]
        return self.base.batch_aware

    def get_params(self) -> dict[str, Any]:
        """JSON-ready description: ``{"base": {name, params}, "prefilter": {name, params}, "top": N}``."""
        return {"base": _describe(self.base), "prefilter": _describe(self.prefilter), "top": self.top}

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        _check_prefilter(self.prefilter, self.top)
        ranked = self.prefilter.select(self.top, inputs)
        sub, rows = subpool(inputs, ranked.indices)
        chosen = self.base.select(budget, sub)
        return Selection(indices=rows[chosen.indices], scores=chosen.scores)


class ClassBalanced(Strategy):
    """Fill the batch round-robin over predicted classes (``argmax probs``), each in ``base``'s order.

    In every round, classes with fewer labeled or pending images (counted by their predicted class:
    the store knows which images are annotated, not their labels) come first, ties by class index.
    Per-class counts differ by at most one, unless a class runs out of candidates; its share then
    goes to the others.

    - A ranking base (not batch-aware) ranks the whole pool once; each class takes its images in
      that order. Without a budget the whole pool is interleaved.
    - A batch-aware base is given a quota per class (the budget split as evenly as the classes'
      candidates allow) and runs once per class, on that class's candidates plus every labeled and
      pending row as context (:func:`subpool`). Picks of one class do not see the other classes'
      picks of the same batch: they are in other regions of the model's output anyway.
    """

    def __init__(self, *, base: Strategy) -> None:
        self.base = base

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.base.name}+balanced"

    @property
    def summary(self) -> str:  # type: ignore[override]
        return f"{self.base.summary}, balanced round-robin over predicted classes"

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return self.base.needs | {"probs"}

    @property
    def score_meaning(self) -> str:  # type: ignore[override]
        return (
            "class-balanced round: R for the first round over the predicted classes, R - 1 for the next, "
            "..., 1 for the last (R = rounds); within a round, classes with fewer labeled or pending images "
            f"first; within a class, the order of {self.base.name} ({self.base.score_meaning})"
        )

    @property
    def batch_aware(self) -> bool:  # type: ignore[override]
        return self.base.batch_aware

    def get_params(self) -> dict[str, Any]:
        """JSON-ready description: ``{"base": {name, params}, "balance_classes": true}``."""
        return {"base": _describe(self.base), "balance_classes": True}

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        probs = np.asarray(inputs.probs)
        if probs.ndim != 2 or probs.shape[0] != inputs.size or probs.shape[1] == 0:
            raise ValueError(f"{self.name}: probs shape {probs.shape}, expected ({inputs.size}, C)")
        predicted = np.argmax(probs, axis=1)
        excluded = inputs.excluded
        classes = probs.shape[1]
        covered = np.bincount(predicted[excluded], minlength=classes)
        priority = np.lexsort((np.arange(classes), covered))  # fewer covered first, then class index
        if self.base.batch_aware:
            count = require_budget(self.name, budget)
            per_class = self._per_class_batches(count, inputs, predicted, priority)
        else:
            order = self.base.select(None, inputs).indices
            per_class = {int(c): order[predicted[order] == c] for c in priority}
            count = order.size if budget is None else min(int(budget), order.size)
        return _round_robin(per_class, priority, count)

    def _per_class_batches(
        self, count: int, inputs: PoolInputs, predicted: np.ndarray, priority: np.ndarray
    ) -> dict[int, np.ndarray]:
        candidates = np.flatnonzero(~inputs.excluded)
        members = {int(c): candidates[predicted[candidates] == c] for c in priority}
        quotas = balanced_quotas(count, [members[int(c)].size for c in priority])
        batches: dict[int, np.ndarray] = {}
        for c, quota in zip(priority.tolist(), quotas, strict=True):
            if quota == 0:
                batches[c] = np.zeros(0, dtype=np.int64)
                continue
            sub, rows = subpool(inputs, members[c])
            batches[c] = rows[self.base.select(quota, sub).indices]
        return batches


def balanced_quotas(total: int, available: list[int]) -> list[int]:
    """Split ``total`` over classes with ``available`` candidates (in priority order) as evenly as possible.

    Water-filling: every class gets ``min(available, L)`` for the highest level L that fits, then
    one more each for the first classes (in priority order) that still have candidates, until
    ``total`` is reached. So counts differ by at most one among classes that are not exhausted,
    and the sum is ``min(total, sum(available))``.
    """
    total = min(total, sum(available))
    low, high = 0, max(available, default=0)
    while low < high:  # the highest level L with sum(min(n, L)) <= total
        middle = (low + high + 1) // 2
        if sum(min(n, middle) for n in available) <= total:
            low = middle
        else:
            high = middle - 1
    quotas = [min(n, low) for n in available]
    left = total - sum(quotas)
    for i, n in enumerate(available):
        if left == 0:
            break
        if n > quotas[i]:
            quotas[i] += 1
            left -= 1
    return quotas


def _round_robin(per_class: dict[int, np.ndarray], priority: np.ndarray, count: int) -> Selection:
    indices: list[int] = []
    rounds: list[int] = []
    lists = [per_class[int(c)] for c in priority]
    depth = max((len(items) for items in lists), default=0)
    for r in range(depth):
        for items in lists:
            if len(indices) == count:
                break
            if r < len(items):
                indices.append(int(items[r]))
                rounds.append(r)
    total_rounds = rounds[-1] + 1 if rounds else 0
    scores = np.asarray([total_rounds - r for r in rounds], dtype=np.float64)
    return Selection(indices=np.asarray(indices, dtype=np.int64), scores=scores)


def _check_prefilter(prefilter: Strategy, top: int) -> None:
    if prefilter.batch_aware:
        raise UsageError(
            f"--prefilter needs a ranking strategy (one that scores each image on its own); "
            f"{prefilter.name!r} chooses a batch jointly"
        )
    if top < 1:
        raise UsageError(f"--prefilter TOP must be at least 1, got {top}")


def parse_prefilter(spec: str, *, seed: int = 0) -> tuple[Strategy, int]:
    """``"margin:10000"`` → ``(Margin(), 10000)``; a bad spec is a usage error naming the form."""
    name, sep, top_text = spec.rpartition(":")
    if not sep or not name:
        raise UsageError(f"--prefilter expects STRATEGY:TOP (e.g. margin:10000), got {spec!r}")
    try:
        top = int(top_text)
    except ValueError:
        raise UsageError(f"--prefilter expects STRATEGY:TOP with an integer TOP, got {spec!r}") from None
    strategy = build_strategy(name.strip(), seed=seed)
    _check_prefilter(strategy, top)
    return strategy, top


def compose(
    strategy: Strategy, *, prefilter: tuple[Strategy, int] | None = None, balance_classes: bool = False
) -> Strategy:
    """``strategy`` wrapped as the options ask; ``strategy`` itself when neither is given.

    The prefilter applies first, then balancing among what it kept:
    ``Prefiltered(ClassBalanced(strategy))``, named e.g. ``coreset+balanced+prefilter(margin:10000)``.
    A batch-aware prefilter or ``TOP < 1`` is a usage error here, before any work is done.
    """
    result = ClassBalanced(base=strategy) if balance_classes else strategy
    if prefilter is not None:
        first, top = prefilter
        _check_prefilter(first, top)
        result = Prefiltered(base=result, prefilter=first, top=top)
    return result
