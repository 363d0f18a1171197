"""Clustering strategies: representative k-means and diverse mini-batch (Zhdanov 2019).

Both fit k-means with ``k = budget`` and take, for each centroid, the nearest image not already
taken by another centroid. Pieces:

- :func:`kmeans_fit`: (weighted) k-means++ seeding, then Lloyd iterations in float32 through torch
  (chunked, on the CPU or CUDA). Empty clusters move to the points that cost the most.
- :func:`nearest_unique`: one chunked pass over the candidates gives each centroid its ``T``
  nearest candidates. Centroid-image pairs are then matched greedily in increasing distance: a
  pair is taken when neither its centroid nor its image is taken yet (ties: lower image row, then
  lower centroid). A centroid whose ``T``
  nearest were all taken gets a second pass over the images still free. This is not the optimal
  (Hungarian) assignment, which needs O(k³) time and scipy; it gives every centroid a distinct
  image, and the nearest one whenever no closer pair competes for it.
- :func:`pick_shares`: a second chunked pass gives each pick the share of the candidates it
  represents (those nearer to it than to any other pick), the score of ``kmeans``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from alselect.errors import UsageError
from alselect.strategies.base import (
    PoolInputs,
    Selection,
    Strategy,
    register,
    require_budget,
    require_embeddings,
)
from alselect.strategies.greedy import check_finite, greedy_centres, resolve_torch_device
from alselect.strategies.uncertainty import top_two

if TYPE_CHECKING:
    import torch

NEAREST_PER_CENTROID = 8  # T: nearest candidates kept per centroid in the matching pass
BLOCK_BYTES = 1 << 26  # float32 bytes of one [rows, k] distance block


def _block_rows(k: int, dims: int) -> int:
    return max(256, BLOCK_BYTES // (4 * max(k, dims, 1)))


def _to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(device)


def kmeans_fit(
    x: np.ndarray,
    k: int,
    *,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
    max_iter: int = 20,
    tol: float = 1e-4,
    device: str = "auto",
) -> np.ndarray:
    """Centroids ``[k, D]`` float32 of (weighted) k-means on ``x [n, D]``, ``k ≤ n``.

    Seeding: k-means++ (first centre drawn ∝ weight, then ∝ weight × squared distance). Lloyd
    iterations stop after ``max_iter`` or when the centroids move less than ``tol`` times the mean
    per-dimension variance of ``x`` (squared shift, summed), or when no assignment changes.
    """
    import torch

    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 ≤ k ≤ n, got k={k}, n={n}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (w > 0).any():
        w = np.ones(n)
    seeds = greedy_centres(
        x, np.arange(n), k, rng=rng, sample=True, weights=w, first="sample", device=device
    ).picks
    dev = resolve_torch_device(device)
    points = _to_device(x, dev)
    norms = (points * points).sum(dim=1)
    check_finite(norms.cpu().numpy())
    weight = torch.from_numpy(w.astype(np.float32)).to(dev)
    centroids = points[torch.from_numpy(seeds).to(dev)].clone()
    threshold = tol * float(points.var(dim=0, unbiased=False).mean()) if n > 1 else 0.0
    assign: torch.Tensor | None = None
    for _ in range(max_iter):
        new_assign, d2 = _assign(points, norms, centroids)
        mass = torch.zeros(k, dtype=torch.float32, device=dev).index_add_(0, new_assign, weight)
        sums = torch.zeros_like(centroids).index_add_(0, new_assign, points * weight[:, None])
        updated = sums / mass.clamp(min=1e-30)[:, None]
        empty = torch.nonzero(mass <= 0).flatten()
        if empty.numel():
            # relocate empty clusters to the points that cost the most (weight × squared distance)
            cost = (weight * d2).cpu().numpy()
            order = np.argsort(-cost, kind="stable")[: empty.numel()]
            updated[empty] = points[torch.from_numpy(order).to(dev)]
        shift = float(((updated - centroids) ** 2).sum())
        centroids = updated
        unchanged = assign is not None and bool(torch.equal(assign, new_assign))
        assign = new_assign
        if unchanged or shift <= threshold:
            break
    return centroids.cpu().numpy()


def _assign(
    points: torch.Tensor, norms: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (first on ties) and its squared distance for every point."""
    import torch

    cn = (centroids * centroids).sum(dim=1)
    step = _block_rows(centroids.shape[0], points.shape[1])
    labels = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    best = torch.empty(points.shape[0], dtype=torch.float32, device=points.device)
    for start in range(0, points.shape[0], step):
        block = points[start : start + step]
        d2 = norms[start : start + step, None] + cn[None, :] - 2.0 * (block @ centroids.T)
        value, index = d2.min(dim=1)
        labels[start : start + step] = index
        best[start : start + step] = value.clamp(min=0)
    return labels, best


def nearest_unique(
    h: np.ndarray, candidates: np.ndarray, centroids: np.ndarray, *, device: str = "auto"
) -> np.ndarray:
    """A distinct candidate row per centroid: ``picks [k]`` (row indices, in centroid order).

    ``h [N, D]``; ``candidates [M]`` row indices (``M ≥ k``); ``centroids [k, D]``. See the module
    docstring for the matching rule.
    """
    k = centroids.shape[0]
    if k > candidates.size:
        raise ValueError(f"{k} centroids but only {candidates.size} candidates")
    dev = resolve_torch_device(device)
    cents = _to_device(centroids, dev)
    keep = min(NEAREST_PER_CENTROID, candidates.size)
    dist, pos = _nearest_pass(h, candidates, cents, keep, None)
    picks = np.full(k, -1, dtype=np.int64)
    taken = np.zeros(candidates.size, dtype=bool)
    _match(dist, pos, np.arange(k), picks, taken)
    missing = np.flatnonzero(picks < 0)
    if missing.size:
        dist, pos = _nearest_pass(h, candidates, cents[missing], missing.size, taken)
        _match(dist, pos, missing, picks, taken)
    assert (picks >= 0).all()
    return candidates[picks]


def pick_shares(
    h: np.ndarray, candidates: np.ndarray, picks: np.ndarray, *, device: str = "auto"
) -> np.ndarray:
    """``[k]`` float64: the share of the candidates each pick represents, in (0, 1], summing to 1.

    ``h [N, D]``; ``candidates [M]`` sorted row indices; ``picks [k]`` distinct rows among them. A
    candidate belongs to its nearest pick (first on ties); picks with identical embeddings (copies of
    one image) split what they represent evenly, and every pick represents at least itself, so no
    share is 0 and a batch of copies never claims the same images twice.
    """
    rows = np.ascontiguousarray(h[picks], dtype=np.float32)
    distinct, inverse = np.unique(rows, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    dev = resolve_torch_device(device)
    cents = _to_device(distinct, dev)
    cn = (cents * cents).sum(dim=1)
    nearest = np.empty(candidates.size, dtype=np.int64)
    step = _block_rows(distinct.shape[0], distinct.shape[1])
    for start in range(0, candidates.size, step):
        block = _to_device(h[candidates[start : start + step]], dev)
        d2 = (block * block).sum(dim=1)[:, None] + cn[None, :] - 2.0 * (block @ cents.T)
        nearest[start : start + step] = d2.argmin(dim=1).cpu().numpy()
    nearest[np.searchsorted(candidates, picks)] = inverse  # rounding never takes a pick from itself
    represented = np.bincount(nearest, minlength=distinct.shape[0]) / np.bincount(inverse)
    return represented[inverse] / candidates.size


def _nearest_pass(
    h: np.ndarray, candidates: np.ndarray, cents: torch.Tensor, keep: int, taken: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``keep`` smallest squared distances ``[keep, k]`` and candidate positions per centroid."""
    import torch

    dev = cents.device
    k = cents.shape[0]
    cn = (cents * cents).sum(dim=1)
    best_d = torch.full((0, k), math.inf, device=dev)
    best_p = torch.zeros((0, k), dtype=torch.long, device=dev)
    step = _block_rows(k, cents.shape[1])
    for start in range(0, candidates.size, step):
        block = _to_device(h[candidates[start : start + step]], dev)
        bn = (block * block).sum(dim=1)
        check_finite(bn.cpu().numpy())
        d2 = (bn[:, None] + cn[None, :] - 2.0 * (block @ cents.T)).clamp_(min=0)
        if taken is not None:
            mask = torch.from_numpy(taken[start : start + step]).to(dev)
            d2[mask] = math.inf
        values, index = torch.topk(d2, min(keep, d2.shape[0]), dim=0, largest=False, sorted=False)
        all_d = torch.cat([best_d, values])
        all_p = torch.cat([best_p, index + start])
        # the merged lists are short ([2T, k]): sort them by (distance, position)
        order = torch.sort(all_p, dim=0, stable=True).indices
        all_d, all_p = torch.gather(all_d, 0, order), torch.gather(all_p, 0, order)
        order = torch.sort(all_d, dim=0, stable=True).indices[:keep]
        best_d = torch.gather(all_d, 0, order)
        best_p = torch.gather(all_p, 0, order)
    return best_d.cpu().numpy(), best_p.cpu().numpy()


def _match(
    dist: np.ndarray, pos: np.ndarray, centroid_ids: np.ndarray, picks: np.ndarray, taken: np.ndarray
) -> None:
    """Greedy matching of ``(distance, position, centroid)`` triples in increasing order."""
    cols = np.broadcast_to(centroid_ids[None, :], dist.shape).ravel()
    d, p = dist.ravel(), pos.ravel()
    for idx in np.lexsort((cols, p, d)).tolist():
        c, q = int(cols[idx]), int(p[idx])
        if picks[c] < 0 and not taken[q] and math.isfinite(d[idx]):
            picks[c] = q
            taken[q] = True


def _validate(name: str, **positive: int) -> None:
    for key, value in positive.items():
        if value < 1:
            raise UsageError(f"strategy {name!r}: {key} must be at least 1, got {value}")


def _order(indices: np.ndarray, scores: np.ndarray) -> Selection:
    """Descending score, ties in row order."""
    order = np.lexsort((indices, -scores))
    return Selection(indices=indices[order], scores=scores[order])


@register
class KMeansSampling(Strategy):
    """Representative sampling: k-means (k = budget) on the candidates' ``embeddings [N, D]``.

    k-means is fitted on a seeded sample of ``max(fit_size, 10 × budget)`` candidates (all of them
    when fewer), then every candidate is assigned to its nearest centroid in one chunked pass, and
    the batch is the nearest distinct image per centroid (module docstring). Each pick's score is
    the share of the candidates it represents (``pick_shares``: those nearer to it than to any
    other pick; copies share theirs); picks are ordered by it, largest first, so a ``--top`` export
    of the batch covers the most images. Labeled and pending images are not clustered (the batch
    represents what is still unlabeled).
    """

    name = "kmeans"
    summary = "k-means (k = budget) on embeddings: the image nearest each centroid, largest clusters first"
    needs = frozenset({"embeddings"})
    score_meaning = (
        "share of the candidate images this image represents (those nearer to it than to any other "
        "pick; copies of one image share theirs), in (0, 1]; the batch's scores sum to 1"
    )
    batch_aware = True

    def __init__(
        self, *, seed: int = 0, max_iter: int = 20, fit_size: int = 50_000, device: str = "auto"
    ) -> None:
        self.seed = seed
        self.max_iter = max_iter
        self.fit_size = fit_size
        self.device = device

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        count = require_budget(self.name, budget)
        _validate(self.name, max_iter=self.max_iter, fit_size=self.fit_size)
        embeddings = require_embeddings(self.name, inputs)
        candidates = np.flatnonzero(~inputs.excluded)
        if count >= candidates.size:  # every image is picked and represents itself (pick_shares)
            return Selection(
                indices=candidates, scores=np.full(candidates.size, 1.0 / max(candidates.size, 1))
            )
        if count == 0:
            return Selection(indices=np.zeros(0, dtype=np.int64), scores=np.zeros(0))
        rng = np.random.default_rng(self.seed)
        fit = candidates
        size = max(self.fit_size, 10 * count)
        if candidates.size > size:
            fit = np.sort(rng.choice(candidates, size, replace=False))
        centroids = kmeans_fit(
            np.asarray(embeddings[fit], dtype=np.float32),
            count,
            rng=rng,
            max_iter=self.max_iter,
            device=self.device,
        )
        picks = nearest_unique(embeddings, candidates, centroids, device=self.device)
        return _order(picks, pick_shares(embeddings, candidates, picks, device=self.device))


@register
class DiverseMiniBatch(Strategy):
    """Diverse mini-batch active learning (Zhdanov 2019) on ``probs [N, C]`` and ``embeddings [N, D]``.

    1. Keep the ``beta × budget`` candidates with the smallest margin (``p₁ − p₂``).
    2. Weighted k-means (k = budget) on their embeddings, weight = informativeness ``1 − margin``.
    3. The nearest distinct kept image per centroid (module docstring: greedy matching, not the
       Hungarian method of the paper's reference code).

    The batch is ordered by informativeness, most uncertain first.
    """

    name = "diverse-minibatch"
    summary = "margin prefilter (beta × budget), weighted k-means, nearest image per centroid (Zhdanov)"
    needs = frozenset({"probs", "embeddings"})
    score_meaning = (
        "1 - (p_1 - p_2) of the image (its informativeness), in [0, 1]; the batch is the diverse set"
    )
    batch_aware = True

    def __init__(self, *, beta: int = 10, seed: int = 0, max_iter: int = 50, device: str = "auto") -> None:
        self.beta = beta
        self.seed = seed
        self.max_iter = max_iter
        self.device = device

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        count = require_budget(self.name, budget)
        _validate(self.name, beta=self.beta, max_iter=self.max_iter)
        embeddings = require_embeddings(self.name, inputs)
        first, second = top_two(inputs.probs)
        informativeness = 1.0 - (first - second)
        candidates = np.flatnonzero(~inputs.excluded)
        values = informativeness[candidates]
        ranked = candidates[np.argsort(-values, kind="stable")]  # NaN sorts last
        if count >= candidates.size:
            return _order(candidates, informativeness[candidates])
        if count == 0:
            return Selection(indices=np.zeros(0, dtype=np.int64), scores=np.zeros(0))
        kept = np.sort(ranked[: self.beta * count])
        weights = np.nan_to_num(informativeness[kept], nan=0.0)
        centroids = kmeans_fit(
            np.asarray(embeddings[kept], dtype=np.float32),
            count,
            rng=np.random.default_rng(self.seed),
            weights=weights,
            max_iter=self.max_iter,
            device=self.device,
        )
        picks = nearest_unique(embeddings, kept, centroids, device=self.device)
        return _order(picks, informativeness[picks])
