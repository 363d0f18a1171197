"""Greedy farthest-first traversal and k-means++ (D²) seeding over factorised points.

Core-set (k-center greedy), BADGE (k-means++ seeding on gradient embeddings) and the k-means++
initialisation of the clustering strategies are one loop: keep, for every candidate, its squared
distance ``m`` to the nearest centre chosen so far; pick the next centre from ``m`` (its argmax, or
a draw with probability ∝ ``m``); lower ``m`` by the distances to the new centre.

A point is ``g_i = a_i ⊗ h_i``: ``h`` the embedding rows ``[N, D]`` (any float dtype; never copied
whole), ``a`` an optional factor ``[N, C]`` (BADGE's ``p − e_ŷ``). Without a factor ``g_i = h_i``.
Squared distances never build ``g``::

    ‖a₁⊗h₁ − a₂⊗h₂‖² = ‖a₁‖²‖h₁‖² + ‖a₂‖²‖h₂‖² − 2 (a₁·a₂)(h₁·h₂)

Memory is O(candidates) plus small chunks: one ``m`` vector, one norm vector, no candidates × centres
matrix. Three backends compute the distances:

- ``exact``: float64 numpy on a float64 copy of the candidate rows; direct differences ``Σ(x − c)²``
  when there is no factor (no cancellation from expanding the square), the factorised formula in
  float64 with one. Small inputs only (``precision="auto"`` picks it below ``EXACT_MAX_WORK``).
- ``fast`` on the CPU: float32 arithmetic on chunks of 2 MiB converted from the stored dtype (so a
  float16 matrix stays float16), through torch, split over threads by row range. On large inputs
  each step skips the candidates the new centre provably cannot come closer to, in two filters:
  the owner filter (``x`` is skipped when ``d(c, s) ≥ 2√m(x)`` for its nearest centre ``c``: the
  triangle inequality) and a lower bound from a projection onto the top principal directions
  (``‖P(x − s)‖² + (r_x − r_s)² ≤ ‖x − s‖²`` for an orthonormal ``P`` and residual norms ``r``).
  Only the rest are gathered and computed in full. Both filters are exact up to a rounding margin
  (``PRUNE_TOLERANCE``); how much they skip depends on the data (clustered embeddings: most rows).
- ``fast`` on CUDA: the candidate rows live on the device in their stored dtype; every step is one
  dense matrix-vector product with float32 results.

The fast paths differ from the exact one only by float32 rounding (relative ~1e-6 in squared
distances, and a pruning tolerance of ``PRUNE_TOLERANCE`` of the projected norms): they can break
near-ties differently, never pick an excluded row, and agree with the exact path wherever the
candidates' distances differ by more than that.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from alselect.errors import DataError, UsageError
from alselect.strategies.base import DEVICE_PARAM, Strategy

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "exact", "fast")
EXACT_MAX_WORK = 1 << 28  # candidates × D × (centres + budget) at or below which "auto" means exact
CHUNK_BYTES = 1 << 21  # float32 bytes per converted chunk: cache-sized
PRUNE_DIMS = 64  # principal directions of the pruning bound (64 of 512: the fastest measured)
PRUNE_SAMPLE = 8192  # rows the principal directions are estimated from
PRUNE_MIN_CANDIDATES = 100_000  # below this a dense pass is cheaper than building the bound
PRUNE_TOLERANCE = 2e-3  # bounds are lowered by this fraction of the projected norms (rounding margin)
ZERO_TOLERANCE = {"exact": 1e-12, "fast": 1e-5}  # squared distances this close to 0 (relative) are 0
OWNER_MAX_CENTRES = 50_000  # context + budget above which the owner filter is off (table memory)
GATHER_FRACTION = 16  # the bound gathers its rows when fewer than 1/16 of a range are left
DENSE_SWITCH = 0.5  # when the filters pass more than this fraction of the rows ...
DENSE_STEPS = 16  # ... the next this many steps run without them (data without structure)
MAX_LANES = 8  # CPU threads the fast path splits rows over (at most torch's thread count)
PICKED = -1.0  # m of a chosen centre: below every real squared distance, so never chosen again


@dataclass(frozen=True)
class Greedy:
    """Chosen centres in pick order.

    - ``picks``: ``[B]`` int64 row indices (into ``h``)
    - ``dists``: ``[B]`` float64 distance from each pick to the nearest earlier centre (or context
      centre) when it was picked; NaN for a first pick made with no centre at all
    - ``first_radius``: distance from the first pick to the farthest candidate (the radius it alone
      covers), or NaN when there were context centres
    """

    picks: np.ndarray
    dists: np.ndarray
    first_radius: float


class GreedyStrategy(Strategy):
    """Parameters shared by the strategies built on :func:`greedy_centres` (coreset, badge).

    ``seed``: the draws (cold-start pick, k-means++ sampling). ``device``: ``auto`` (CUDA when
    available), ``cpu``, ``cuda``, ``cuda:N``. ``precision``: ``exact``, ``fast`` or ``auto``
    (exact for small inputs).
    """

    batch_aware = True

    def __init__(self, *, seed: int = 0, device: str = "auto", precision: str = "auto") -> None:
        self.seed = seed
        self.device = device
        self.precision = precision


def resolve_precision(precision: str, work: int) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "exact" if work <= EXACT_MAX_WORK else "fast"
    return precision


def resolve_torch_device(device: str) -> torch.device:
    """A strategy's ``device`` param: ``auto`` → CUDA when available, else CPU; checked as
    ``build_strategy`` checks it, named ``--param device``."""
    from alselect.embed import resolve_device

    return resolve_device(device, DEVICE_PARAM)


def greedy_centres(
    h: np.ndarray,
    candidates: np.ndarray,
    budget: int,
    *,
    rng: np.random.Generator,
    factors: np.ndarray | None = None,
    centres: np.ndarray | None = None,
    sample: bool = False,
    weights: np.ndarray | None = None,
    first: Literal["max_norm", "sample"] = "sample",
    device: str = "auto",
    precision: str = "auto",
    prune: bool | None = None,
) -> Greedy:
    """Choose ``min(budget, len(candidates))`` distinct candidates greedily.

    ``h [N, D]``: embedding rows; ``candidates [M]``: sorted row indices that may be chosen;
    ``centres``: row indices already covered (labeled, pending), never chosen; ``factors [N, C]``:
    the optional ``a`` of ``g = a ⊗ h``. ``sample=False`` takes the farthest candidate (ties: first
    in row order); ``sample=True`` draws with probability ∝ ``weights · m`` (k-means++). With no
    centres the first pick is the largest ``‖g‖`` (``first="max_norm"``) or a draw ∝ ``weights``
    (uniform without weights). When every remaining candidate is at distance 0 from a centre, the
    rest are drawn uniformly (``sample``) or taken in row order (farthest-first). All draws use
    ``rng``: one uniform number per pick, drawn up front, so every backend consumes the same stream.
    ``prune`` forces the CPU pruning bound on or off (None: on for large inputs).
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    centres = np.zeros(0, dtype=np.int64) if centres is None else np.asarray(centres, dtype=np.int64)
    count = min(int(budget), candidates.size)
    dims = int(h.shape[1]) if h.ndim == 2 else 0
    mode = resolve_precision(precision, candidates.size * max(dims, 1) * (centres.size + count))
    uniforms = rng.random(count)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
    picks = np.empty(count, dtype=np.int64)
    dists = np.full(count, np.nan)
    if count == 0:
        return Greedy(picks, dists, math.nan)
    if h.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {h.shape}")
    if factors is not None and factors.shape[0] != h.shape[0]:
        raise ValueError(f"factors {factors.shape} and embeddings {h.shape} differ in rows")
    with contextlib.ExitStack() as stack:
        backend = _open_backend(stack, h, candidates, factors, mode, device, prune, centres.size + count)
        if centres.size:
            backend.cover(centres)
        first_radius = math.nan
        for step in range(count):
            if step == 0 and not centres.size:
                if first == "max_norm":
                    j = backend.argmax_norm()
                else:
                    j = _draw(weights if weights is not None else np.ones(candidates.size), uniforms[0])
            else:
                found = backend.sample(uniforms[step], weights) if sample else backend.argmax()
                # None: no distance left, every remaining candidate duplicates a centre
                j = backend.any_remaining(uniforms[step] if sample else None) if found is None else found
                dists[step] = math.sqrt(max(backend.value(j), 0.0))
            backend.add(j)
            if step == 0 and not centres.size:
                first_radius = math.sqrt(max(backend.max_value(), 0.0))
            picks[step] = candidates[j]
    return Greedy(picks, dists, first_radius)


def _draw(mass: np.ndarray, uniform: float) -> int:
    """Index drawn with probability ∝ ``mass`` (non-negative) from one uniform; uniform if all zero."""
    cumulative = np.cumsum(mass, dtype=np.float64)
    if not cumulative[-1] > 0:
        return min(int(uniform * mass.size), mass.size - 1)
    index = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
    if index >= mass.size or mass[index] <= 0:  # rounding at the top end
        index = int(np.flatnonzero(mass > 0)[-1])
    return index


def _open_backend(
    stack: contextlib.ExitStack,
    h: np.ndarray,
    candidates: np.ndarray,
    factors: np.ndarray | None,
    mode: str,
    device: str,
    prune: bool | None,
    capacity: int,
) -> _Backend:
    """The backend for ``mode``/``device``; ``capacity``: centres there will be (context + picks)."""
    if mode == "exact":
        return _ExactBackend(h, candidates, factors)
    torch_device = resolve_torch_device(device)
    if torch_device.type == "cuda":
        return _CudaBackend(h, candidates, factors, torch_device)
    if prune is None:
        prune = candidates.size >= PRUNE_MIN_CANDIDATES and h.shape[1] > 2 * PRUNE_DIMS
    threads = stack.enter_context(single_threaded_torch())
    backend = _CpuBackend(h, candidates, factors, prune, lanes=min(threads, MAX_LANES), centres=capacity)
    stack.callback(backend.close)
    return backend


def check_finite(norms: np.ndarray, what: str = "embeddings") -> None:
    """A NaN or infinite input row would make every distance meaningless: refuse it clearly."""
    bad = ~np.isfinite(norms)
    if bad.any():
        raise DataError(f"{int(bad.sum())} {what} rows contain NaN or infinite values; re-embed those images")


class _Backend:
    """Distances from every candidate to its nearest centre (``m``), and the pick rules on it."""

    def cover(self, rows: np.ndarray) -> None:
        """Lower ``m`` by the distances to the context centres ``rows`` (row indices)."""
        raise NotImplementedError

    def add(self, j: int) -> None:
        """Make candidate ``j`` (position in the candidate list) a centre."""
        raise NotImplementedError

    def argmax(self) -> int | None:
        raise NotImplementedError

    def argmax_norm(self) -> int:
        raise NotImplementedError

    def value(self, j: int) -> float:
        raise NotImplementedError

    def max_value(self) -> float:
        raise NotImplementedError

    def masses(self) -> np.ndarray:
        """``max(m, 0)`` on the host (a new array)."""
        raise NotImplementedError

    def sample(self, uniform: float, weights: np.ndarray | None) -> int | None:
        mass = self.masses()
        if weights is not None:
            mass = mass * weights
        if not (mass > 0).any():
            return None
        return _draw(mass, uniform)

    def any_remaining(self, uniform: float | None) -> int:
        """A candidate not chosen yet: uniformly drawn, or the first in row order."""
        remaining = np.flatnonzero(self.masses_with_picked() != PICKED)
        if uniform is None:
            return int(remaining[0])
        return int(remaining[min(int(uniform * remaining.size), remaining.size - 1)])

    def masses_with_picked(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release threads; the base backends hold none."""


class _HostBackend(_Backend):
    """Backends whose ``m`` and ``norms`` are numpy arrays on the host."""

    m: np.ndarray
    norms: np.ndarray

    def argmax(self) -> int | None:
        j = int(np.argmax(self.m))
        return j if self.m[j] >= 0 else None

    def argmax_norm(self) -> int:
        return int(np.argmax(self.norms))

    def value(self, j: int) -> float:
        return float(self.m[j])

    def max_value(self) -> float:
        return float(self.m.max())

    def masses(self) -> np.ndarray:
        return np.maximum(self.m, 0.0)

    def masses_with_picked(self) -> np.ndarray:
        return self.m


class _ExactBackend(_HostBackend):
    """float64 numpy reference: direct differences without factors, the factorised formula with."""

    def __init__(self, h: np.ndarray, candidates: np.ndarray, factors: np.ndarray | None) -> None:
        self.h = h
        self.factors = factors
        self.x = np.asarray(h[candidates], dtype=np.float64)
        self.hn = np.einsum("ij,ij->i", self.x, self.x)
        check_finite(self.hn)
        if factors is None:
            self.a = None
            self.norms = self.hn
        else:
            self.a = np.asarray(factors[candidates], dtype=np.float64)
            self.norms = self.hn * np.einsum("ij,ij->i", self.a, self.a)
            check_finite(self.norms, "probability")
        self.m = np.full(candidates.size, np.inf)

    def _sqdist(self, hv: np.ndarray, av: np.ndarray | None) -> np.ndarray:
        if self.a is None or av is None:
            diff = self.x - hv
            return np.einsum("ij,ij->i", diff, diff)
        norm = float(hv @ hv) * float(av @ av)
        d2 = self.norms + norm - 2.0 * (self.a @ av) * (self.x @ hv)
        d2[d2 <= ZERO_TOLERANCE["exact"] * (self.norms + norm)] = 0.0
        return d2

    def cover(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            hv = np.asarray(self.h[row], dtype=np.float64)
            av = None if self.factors is None else np.asarray(self.factors[row], dtype=np.float64)
            np.minimum(self.m, self._sqdist(hv, av), out=self.m)

    def add(self, j: int) -> None:
        av = None if self.a is None else self.a[j]
        np.minimum(self.m, self._sqdist(self.x[j], av), out=self.m)
        self.m[j] = PICKED


def _chunk_rows(dims: int) -> int:
    return max(64, CHUNK_BYTES // (4 * max(dims, 1)))


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[int]:
    """Run torch ops single-threaded, yielding the previous thread count (restored on exit).

    The CPU backend parallelises over row ranges itself (``lanes``): one OpenMP region per 2 MiB
    chunk costs a barrier each, and on a busy machine a barrier waits for a descheduled thread
    (measured here: 20× slower under a load of 7 on 2 cores).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield previous
    finally:
        torch.set_num_threads(previous)


class _Lane:
    """Per-thread chunk buffers: rows of ``h`` are gathered in their dtype, then converted."""

    def __init__(self, h: np.ndarray, chunk: int) -> None:
        import torch

        self.torch = torch
        self.h = h
        self.chunk = chunk
        dims = int(h.shape[1])
        self.native = np.empty((chunk, dims), dtype=h.dtype)
        self.native_t = torch.from_numpy(self.native) if h.dtype != np.float32 else None
        self.buf = torch.empty((chunk, dims), dtype=torch.float32)

    def blocks(self, rows: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, float32 tensor [k, D])`` per chunk of ``h[rows]``; the tensor is reused."""
        for start in range(0, rows.size, self.chunk):
            idx = rows[start : start + self.chunk]
            k = idx.size
            if self.native_t is None:
                np.take(self.h, idx, axis=0, out=self.buf.numpy()[:k], mode="clip")
            else:
                np.take(self.h, idx, axis=0, out=self.native[:k], mode="clip")
                self.buf[:k].copy_(self.native_t[:k])
            yield start, self.buf[:k]

    def dots(self, rows: np.ndarray, vector: torch.Tensor) -> np.ndarray:
        """``h[rows] @ vector`` in float32."""
        out = np.empty(rows.size, dtype=np.float32)
        out_t = self.torch.from_numpy(out)
        for start, block in self.blocks(rows):
            self.torch.mv(block, vector, out=out_t[start : start + block.shape[0]])
        return out


class _CpuBackend(_HostBackend):
    """float32 torch kernels on chunks gathered from ``h``, split over ``lanes`` threads.

    Each lane owns a contiguous range of candidate positions (and that slice of ``m``), so lanes
    never write the same memory; torch runs single-threaded inside each (see
    :func:`single_threaded_torch`, which the caller holds).
    """

    def __init__(
        self,
        h: np.ndarray,
        candidates: np.ndarray,
        factors: np.ndarray | None,
        prune: bool,
        lanes: int,
        centres: int = 0,
    ) -> None:
        """``centres``: how many centres there will be at most (context + budget), for the owner filter."""
        import torch

        self.torch = torch
        self.h = h
        self.factors = factors
        self.candidates = candidates
        self.started = False  # m is finite everywhere once a centre exists
        self.dims = int(h.shape[1])
        size = candidates.size
        chunk = _chunk_rows(self.dims)
        count = max(1, min(lanes, size // (4 * chunk)))
        self.lanes = [_Lane(h, chunk) for _ in range(count)]
        bounds = np.linspace(0, size, count + 1).astype(np.int64)
        self.ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        self.pool = ThreadPoolExecutor(count - 1) if count > 1 else None
        self.hn = np.empty(size, dtype=np.float32)
        self._each(self._norms_range)
        check_finite(self.hn)
        if factors is None:
            self.a: np.ndarray | None = None
            self.norms = self.hn
        else:
            self.a = np.ascontiguousarray(factors[candidates], dtype=np.float32)
            self.norms = self.hn * np.einsum("ij,ij->i", self.a, self.a)
            check_finite(self.norms, "probability")
        self.m = np.full(size, np.inf, dtype=np.float32)
        self.computed = 0  # candidate distances computed in full (the rest were pruned)
        self.survivors = 0  # rows that passed the owner filter (statistics)
        self._dense_steps = 0  # steps left without filters (see DENSE_SWITCH)
        self.filtered_steps = 0  # steps that ran the filters (statistics)
        self.proj: np.ndarray | None = None
        self.table: np.ndarray | None = None
        if prune:
            self._build_projection()
            if 0 < centres <= OWNER_MAX_CENTRES:
                self._start_owners(centres)

    def _start_owners(self, capacity: int) -> None:
        """The owner filter: each candidate's nearest centre, and every centre's vector.

        A new centre ``s`` cannot come closer to ``x`` than ``x``'s nearest centre ``c`` when
        ``d(c, s) ≥ 2 √m(x)`` (triangle inequality), so such rows are skipped after one lookup.
        """
        self.owner = np.full(self.candidates.size, -1, dtype=np.int32)
        self.table = np.zeros((capacity, self.dims), dtype=np.float32)
        self.table_norms = np.zeros(capacity, dtype=np.float32)
        self.table_a = None if self.a is None else np.zeros((capacity, self.a.shape[1]), dtype=np.float32)
        self.count = 0  # centres in the table

    def _add_to_table(self, vectors: np.ndarray, norms: np.ndarray, factors: np.ndarray | None) -> int:
        """Store centres; returns the id of the first."""
        assert self.table is not None
        first = self.count
        self.table[first : first + vectors.shape[0]] = vectors
        self.table_norms[first : first + vectors.shape[0]] = norms
        if self.table_a is not None and factors is not None:
            self.table_a[first : first + vectors.shape[0]] = factors
        self.count += vectors.shape[0]
        return first

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _each(self, work: Callable[[_Lane, int, int], int | None]) -> list[int | None]:
        """Run ``work(lane, lo, hi)`` for every lane's candidate range, in parallel."""
        if self.pool is None:
            return [work(self.lanes[0], *self.ranges[0])]
        futures = [
            self.pool.submit(work, lane, lo, hi)
            for lane, (lo, hi) in zip(self.lanes[1:], self.ranges[1:], strict=True)
        ]
        first = work(self.lanes[0], *self.ranges[0])
        return [first, *(future.result() for future in futures)]

    def _norms_range(self, lane: _Lane, lo: int, hi: int) -> None:
        out = self.torch.from_numpy(self.hn[lo:hi])
        for start, block in lane.blocks(self.candidates[lo:hi]):
            self.torch.sum(block * block, dim=1, out=out[start : start + block.shape[0]])

    def _build_projection(self) -> None:
        """The pruning bound's parts: ``y = Pᵀ(h − μ)`` and the residual norm ``r = ‖h − μ − P y‖``.

        ``P``: the top principal directions of a fixed-seed row sample (for BADGE, of the
        ``‖a‖²``-weighted second moment, with ``μ = 0``: a shift does not preserve ``a ⊗ h``
        distances). For any orthonormal ``P`` the squared distance splits into the projected part
        and the residual part, and the residual part is at least ``(r₁ − r₂)²`` (triangle
        inequality), so ``‖y₁ − y₂‖² + (r₁ − r₂)²`` never exceeds it; the same holds for ``a ⊗ h``
        with ``a ⊗ y`` and ``‖a‖ r``.
        """
        torch = self.torch
        size = self.candidates.size
        pick = np.sort(np.random.default_rng(0).choice(size, min(size, PRUNE_SAMPLE), replace=False))
        sample = torch.from_numpy(np.asarray(self.h[self.candidates[pick]], dtype=np.float64))
        if self.a is None:
            mean = sample.mean(dim=0)
            sample -= mean
            moment = sample.T @ sample
        else:
            mean = torch.zeros(self.dims, dtype=torch.float64)
            weight = torch.from_numpy(np.einsum("ij,ij->i", self.a[pick], self.a[pick]).astype(np.float64))
            moment = (sample * weight[:, None]).T @ sample
        # torch's eigh (single-threaded here) takes a tenth of the time of numpy's on a busy machine
        _, vectors_t = torch.linalg.eigh(moment)
        vectors = vectors_t.numpy()
        top = vectors[:, ::-1][:, : min(PRUNE_DIMS, self.dims)]
        mean = mean.numpy()
        self._basis = torch.from_numpy(np.ascontiguousarray(top, dtype=np.float32))
        self._mean = torch.from_numpy(mean.astype(np.float32))
        self.proj = np.empty((size, top.shape[1]), dtype=np.float32)
        centred_norms = np.empty(size, dtype=np.float32)  # ‖h − μ‖², from the centred rows
        self._centred_norms = centred_norms
        self._each(self._project_range)
        del self._centred_norms
        pn = np.einsum("ij,ij->i", self.proj, self.proj)
        residual = np.maximum(centred_norms - pn, 0.0)
        # float32 rounding: |r² − r̂²| ≤ ε‖h − μ‖² gives |r − r̂| ≤ √(ε‖h − μ‖²); bounds use r̂ ± that
        slack = np.sqrt(PRUNE_TOLERANCE * np.maximum(centred_norms, 0.0))
        if self.a is not None:
            an = np.einsum("ij,ij->i", self.a, self.a)
            pn *= an
            residual *= an
            slack *= np.sqrt(an)
        self.residual = np.sqrt(residual).astype(np.float32)
        self.slack = slack.astype(np.float32)
        # lowered by the tolerance: float32 rounding never makes the bound exceed the distance
        self.proj_norms = (pn * (1.0 - PRUNE_TOLERANCE)).astype(np.float32)

    def _project_range(self, lane: _Lane, lo: int, hi: int) -> None:
        assert self.proj is not None
        torch = self.torch
        proj = torch.from_numpy(self.proj[lo:hi])
        norms = torch.from_numpy(self._centred_norms[lo:hi])
        for start, block in lane.blocks(self.candidates[lo:hi]):
            stop = start + block.shape[0]
            block -= self._mean  # the chunk buffer is scratch: centring it in place is free
            torch.sum(block * block, dim=1, out=norms[start:stop])
            torch.mm(block, self._basis, out=proj[start:stop])

    def cover(self, rows: np.ndarray) -> None:
        torch = self.torch
        for begin in range(0, rows.size, 4096):
            ctx = rows[begin : begin + 4096]
            cx = torch.from_numpy(np.asarray(self.h[ctx], dtype=np.float32))
            cn = (cx * cx).sum(dim=1)
            if not bool(torch.isfinite(cn).all()):
                raise DataError("labeled or pending embeddings contain NaN or infinite values; re-embed them")
            ca = None
            if self.factors is not None:
                ca = torch.from_numpy(np.asarray(self.factors[ctx], dtype=np.float32))
                cn = cn * (ca * ca).sum(dim=1)
            self._context_id = 0
            if self.table is not None:
                self._context_id = self._add_to_table(
                    cx.numpy(), cn.numpy(), None if ca is None else ca.numpy()
                )
            self._context = (cx, ca, cn)
            self._each(self._cover_range)
        self.started = True

    def _cover_range(self, lane: _Lane, lo: int, hi: int) -> None:
        """``m = min over context centres of d²``: one GEMM and one row minimum per chunk.

        ``min_c (n_c − 2 x·c)`` comes from a single ``addmm``; ``n_x`` is added to the minimum only.
        """
        torch = self.torch
        cx, ca, cn = self._context
        scratch = torch.empty((lane.chunk, cx.shape[0]), dtype=torch.float32)
        for start, block in lane.blocks(self.candidates[lo:hi]):
            a, b = lo + start, lo + start + block.shape[0]
            out = scratch[: block.shape[0]]
            if ca is None:
                torch.addmm(cn[None, :], block, cx.T, beta=1.0, alpha=-2.0, out=out)
            else:
                assert self.a is not None
                torch.mm(block, cx.T, out=out)
                out *= torch.from_numpy(self.a[a:b]) @ ca.T
                out.mul_(-2.0).add_(cn[None, :])
            value, index = out.min(dim=1)
            nearest = index.numpy()
            mine = self.norms[a:b]
            d2 = mine + value.numpy()
            d2[d2 <= ZERO_TOLERANCE["fast"] * (mine + cn.numpy()[nearest])] = 0.0
            better = d2 < self.m[a:b]
            self.m[a:b][better] = d2[better]
            if self.table is not None:
                self.owner[a:b][better] = self._context_id + nearest[better]

    def add(self, j: int) -> None:
        torch = self.torch
        vector = np.asarray(self.h[self.candidates[j]], dtype=np.float32).copy()
        factor = None if self.a is None else self.a[j].copy()
        centre_id = -1
        self._quarter: np.ndarray | None = None
        if self.table is not None:
            if self.started:
                # d(c, s)² / 4 for every centre c so far, lowered by the rounding tolerance
                count = self.count
                dots = torch.mv(torch.from_numpy(self.table[:count]), torch.from_numpy(vector)).numpy()
                if self.table_a is not None and factor is not None:
                    dots *= torch.mv(torch.from_numpy(self.table_a[:count]), torch.from_numpy(factor)).numpy()
                total = self.table_norms[:count] + self.norms[j]
                d2 = total - 2.0 * dots - PRUNE_TOLERANCE * total
                self._quarter = np.maximum(d2, 0.0) * 0.25
            centre_id = self._add_to_table(
                vector[None, :], self.norms[j : j + 1], None if factor is None else factor[None, :]
            )
        filtering = self.proj is not None and self.started and self._dense_steps == 0
        self._centre = (
            j,
            torch.from_numpy(vector),
            None if factor is None else torch.from_numpy(factor),
            torch.from_numpy(self.proj[j].copy()) if filtering and self.proj is not None else None,
            centre_id,
        )
        computed = sum(int(c or 0) for c in self._each(self._add_range))
        self.computed += computed
        self.filtered_steps += filtering
        # filters that let most rows through cost more than they save: skip them for a while
        if filtering and computed > DENSE_SWITCH * self.m.size:
            self._dense_steps = DENSE_STEPS
        elif self._dense_steps:
            self._dense_steps -= 1
        self.m[j] = PICKED
        self.started = True

    def _add_range(self, lane: _Lane, lo: int, hi: int) -> int:
        """Lower ``m[lo:hi]`` by the distances to the new centre; returns how many were computed.

        Filters, cheapest first: the owner filter (one lookup per row), the projection bound
        (``PRUNE_DIMS`` floats per row: streamed when many rows are left, gathered when few), then
        the full distance for what remains.
        """
        torch = self.torch
        j, vector, factor, projected, centre_id = self._centre
        m = self.m[lo:hi]
        if projected is None:  # no filters: every row not chosen yet
            rows = np.flatnonzero(m != PICKED)
        else:
            if self._quarter is not None:
                rows = np.flatnonzero((self._quarter[self.owner[lo:hi]] < m) & (m > 0))
            else:
                rows = np.flatnonzero(m > 0)
            rows = self._bound_filter(rows, lo, hi, j, projected, factor)
        if not rows.size:
            return 0
        dots = lane.dots(self.candidates[lo + rows], vector)
        if self.a is not None and factor is not None:
            dots *= torch.mv(torch.from_numpy(self.a[lo + rows]), factor).numpy()
        total = self.norms[lo + rows] + self.norms[j]
        d2 = total - 2.0 * dots
        d2[d2 <= ZERO_TOLERANCE["fast"] * total] = 0.0
        better = d2 < m[rows]
        m[rows[better]] = d2[better]
        if self.table is not None:
            self.owner[lo + rows[better]] = centre_id
        return int(rows.size)

    def _bound_filter(
        self,
        rows: np.ndarray,
        lo: int,
        hi: int,
        j: int,
        projected: torch.Tensor,
        factor: torch.Tensor | None,
    ) -> np.ndarray:
        """The rows (of ``rows``, offsets from ``lo``) whose projection bound is below their ``m``."""
        torch = self.torch
        assert self.proj is not None
        self.survivors += rows.size
        if rows.size > (hi - lo) // GATHER_FRACTION:  # streaming the range beats a large gather
            span = slice(lo, hi)
            dot = torch.mv(torch.from_numpy(self.proj[span]), projected).numpy()
            if self.a is not None and factor is not None:
                dot *= torch.mv(torch.from_numpy(self.a[span]), factor).numpy()
            bound = self._bound(dot, self.proj_norms[span], self.residual[span], self.slack[span], j)
            return rows[bound[rows] < self.m[lo:hi][rows]]
        at = lo + rows
        dot = torch.mv(torch.from_numpy(self.proj[at]), projected).numpy()
        if self.a is not None and factor is not None:
            dot *= torch.mv(torch.from_numpy(self.a[at]), factor).numpy()
        bound = self._bound(dot, self.proj_norms[at], self.residual[at], self.slack[at], j)
        return rows[bound < self.m[at]]

    def _bound(
        self, dot: np.ndarray, proj_norms: np.ndarray, residual: np.ndarray, slack: np.ndarray, j: int
    ) -> np.ndarray:
        """``‖y − y_j‖² + max(|r − r_j| − slack, 0)²``, never above the true squared distance."""
        bound = proj_norms + self.proj_norms[j] - 2.0 * dot
        gap = np.abs(residual - self.residual[j])
        gap -= slack
        gap -= self.slack[j]
        np.maximum(gap, 0.0, out=gap)
        bound += gap * gap
        return bound


class _CudaBackend(_Backend):
    """Dense CUDA kernels: candidate rows copied to the device once, in their stored dtype.

    Every step is one matrix-vector product over all candidates (no pruning: on a GPU the dense
    pass is cheaper than gathering). The code runs on any torch device; the tests run it on CPU
    tensors, where float16 products fall back to float32 conversion.
    """

    def __init__(
        self, h: np.ndarray, candidates: np.ndarray, factors: np.ndarray | None, device: torch.device
    ) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.h = h
        self.factors = factors
        self.dims = int(h.shape[1])
        dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}.get(
            np.dtype(h.dtype), torch.float32
        )
        size = candidates.size
        self.x = torch.empty((size, self.dims), dtype=dtype, device=device)
        chunk = 1 << 16
        for start in range(0, size, chunk):
            part = np.asarray(h[candidates[start : start + chunk]])
            self.x[start : start + part.shape[0]] = torch.from_numpy(part).to(device=device, dtype=dtype)
        self.hn = torch.empty(size, dtype=torch.float32, device=device)
        for start in range(0, size, chunk):
            block = self.x[start : start + chunk].float()
            self.hn[start : start + block.shape[0]] = (block * block).sum(dim=1)
        check_finite(self.hn.cpu().numpy())
        if factors is None:
            self.a = None
            self.norms = self.hn
        else:
            self.a = torch.from_numpy(np.asarray(factors[candidates], dtype=np.float32)).to(device)
            self.norms = self.hn * (self.a * self.a).sum(dim=1)
            check_finite(self.norms.cpu().numpy(), "probability")
        self.m = torch.full((size,), math.inf, dtype=torch.float32, device=device)
        self._mixed = dtype != torch.float32

    def _matmul(self, rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``rows @ other.T`` in float32, from storage-dtype inputs."""
        torch = self.torch
        if self._mixed:
            try:
                return torch.mm(rows, other.to(rows.dtype).T, out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                self._mixed = False
        return rows.float() @ other.float().T

    def _update(self, vectors: torch.Tensor, factors: torch.Tensor | None, norms: torch.Tensor) -> None:
        torch = self.torch
        chunk = max(1, (1 << 28) // max(1, 4 * vectors.shape[0]))
        for start in range(0, self.x.shape[0], chunk):
            stop = min(start + chunk, self.x.shape[0])
            prod = self._matmul(self.x[start:stop], vectors)
            if factors is not None and self.a is not None:
                prod *= self.a[start:stop] @ factors.T
            total = self.norms[start:stop, None] + norms[None, :]
            d2 = total - 2.0 * prod
            d2 = torch.where(d2 <= ZERO_TOLERANCE["fast"] * total, torch.zeros_like(d2), d2)
            torch.minimum(self.m[start:stop], d2.min(dim=1).values, out=self.m[start:stop])

    def cover(self, rows: np.ndarray) -> None:
        torch = self.torch
        for begin in range(0, rows.size, 4096):
            ctx = rows[begin : begin + 4096]
            cx = torch.from_numpy(np.asarray(self.h[ctx], dtype=np.float32)).to(self.device)
            cn = (cx * cx).sum(dim=1)
            if not bool(torch.isfinite(cn).all()):
                raise DataError("labeled or pending embeddings contain NaN or infinite values; re-embed them")
            ca = None
            if self.factors is not None:
                ca = torch.from_numpy(np.asarray(self.factors[ctx], dtype=np.float32)).to(self.device)
                cn = cn * (ca * ca).sum(dim=1)
            self._update(cx, ca, cn)

    def add(self, j: int) -> None:
        vector = self.x[j : j + 1]
        factor = None if self.a is None else self.a[j : j + 1]
        self._update(vector, factor, self.norms[j : j + 1])
        self.m[j] = PICKED

    def argmax(self) -> int | None:
        j = int(self.torch.argmax(self.m).item())
        return j if self.m[j].item() >= 0 else None

    def argmax_norm(self) -> int:
        return int(self.torch.argmax(self.norms).item())

    def value(self, j: int) -> float:
        return float(self.m[j].item())

    def max_value(self) -> float:
        return float(self.m.max().item())

    def masses(self) -> np.ndarray:
        return self.m.clamp(min=0).double().cpu().numpy()

    def sample(self, uniform: float, weights: np.ndarray | None) -> int | None:
        """As on the host, but the cumulative sum stays on the device (one scalar comes back)."""
        torch = self.torch
        mass = self.m.clamp(min=0).double()
        if weights is not None:
            if getattr(self, "_weights", None) is None:
                self._weights = torch.from_numpy(weights).to(self.device)
            mass *= self._weights
        cumulative = torch.cumsum(mass, dim=0)
        total = float(cumulative[-1].item())
        if total <= 0:
            return None
        target = torch.tensor([uniform * total], dtype=torch.float64, device=self.device)
        index = int(torch.searchsorted(cumulative, target, right=True).item())
        if index >= mass.shape[0] or float(mass[index].item()) <= 0:
            index = int(torch.nonzero(mass > 0)[-1].item())
        return index

    def masses_with_picked(self) -> np.ndarray:
        return self.m.cpu().numpy()
