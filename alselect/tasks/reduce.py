"""Scoring-time reductions of stored detection and segmentation summaries to one score per image.

numpy only: the arrays come from the store (``alselect.tasks.DETECTION_ARRAYS``,
``SEGMENTATION_ARRAYS``), so a different ``--reduce``, threshold or empty-image rule never runs the
model again. Shapes: ``n`` images, ``K`` boxes per image, ``B`` histogram bins, ``C`` classes.
"""

from __future__ import annotations

import math

import numpy as np

from alselect.tasks import HISTOGRAM_BINS, MEASURES, measure_bound


def box_uncertainty(top1: np.ndarray, top2: np.ndarray, entropy: np.ndarray, measure: str) -> np.ndarray:
    """Per-box ``measure`` from the stored components (any shape, float64).

    entropy: as stored (nats); least_confidence: ``1 - top1``; margin: ``1 - |top1 - top2|``;
    ratio: ``min(top1, top2) / max(top1, top2)`` (0 when both are 0). With a class distribution
    ``top1 >= top2`` and these are the classification formulas; score-only boxes have
    ``top1 = s, top2 = 1 - s``.
    """
    t1 = np.asarray(top1, dtype=np.float64)
    t2 = np.asarray(top2, dtype=np.float64)
    if measure == "entropy":
        return np.asarray(entropy, dtype=np.float64)
    if measure == "least_confidence":
        return 1.0 - t1
    if measure == "margin":
        return 1.0 - np.abs(t1 - t2)
    if measure == "ratio":
        high = np.maximum(t1, t2)
        out = np.zeros_like(high)
        np.divide(np.minimum(t1, t2), high, out=out, where=high > 0)
        return out
    raise ValueError(f"unknown measure {measure!r}")


def box_bound(measure: str, classes: np.ndarray) -> np.ndarray:
    """``[n]`` upper bound of ``measure`` for one box, per image: over its ``classes``-way
    distribution, or (``classes == 0``) over a score's two outcomes, where least confidence
    ``1 - s`` reaches 1."""
    classes = np.asarray(classes)
    score_only = {"entropy": math.log(2.0)}.get(measure, 1.0)
    bounds = np.array(
        [measure_bound(measure, c) if c > 0 else score_only for c in range(int(classes.max(initial=0)) + 1)]
    )
    return bounds[np.maximum(classes, 0)]


def valid_boxes(scores: np.ndarray, count: np.ndarray, threshold: float) -> np.ndarray:
    """``[n, K]`` bool: stored rows (``< count``) scoring at least ``threshold``."""
    k = scores.shape[1]
    return (np.arange(k)[None, :] < np.asarray(count)[:, None]) & (scores >= threshold)


def reduce_boxes(values: np.ndarray, keep: np.ndarray, reduce: str, empty: np.ndarray | float) -> np.ndarray:
    """``[n]``: ``max``, ``mean`` or ``sum`` of ``values [n, K]`` over ``keep``; ``empty`` where
    an image keeps no box."""
    kept = keep.sum(axis=1)
    masked = np.where(keep, values, 0.0)
    if reduce == "max":
        out = np.where(keep, values, -np.inf).max(axis=1, initial=-np.inf)
    elif reduce == "sum":
        out = masked.sum(axis=1)
    elif reduce == "mean":
        out = masked.sum(axis=1) / np.maximum(kept, 1)
    else:
        raise ValueError(f"unknown box reduction {reduce!r}")
    return np.where(kept > 0, out, empty)


def empty_value(empty_score: str, measure: str, classes: np.ndarray) -> np.ndarray | float:
    """The score of images without a box: 0 (``min``), one maximally uncertain box (``max``), or
    the given number."""
    if empty_score == "min":
        return 0.0
    if empty_score == "max":
        return box_bound(measure, classes)
    return float(empty_score)


def detection_scores(
    arrays: dict[str, np.ndarray], measure: str, reduce: str, threshold: float, empty_score: str
) -> np.ndarray:
    """``[n]`` image scores from a chunk of stored detection arrays (``det_top1``, ``det_top2``,
    ``det_entropy``, ``det_scores``, ``det_count``, ``det_classes``)."""
    values = box_uncertainty(arrays["det_top1"], arrays["det_top2"], arrays["det_entropy"], measure)
    keep = valid_boxes(arrays["det_scores"], arrays["det_count"], threshold)
    return reduce_boxes(values, keep, reduce, empty_value(empty_score, measure, arrays["det_classes"]))


def detection_counts(scores: np.ndarray, count: np.ndarray, threshold: float) -> np.ndarray:
    """``[n]`` number of stored boxes scoring at least ``threshold``."""
    return valid_boxes(scores, count, threshold).sum(axis=1)


def class_shares(
    labels: np.ndarray, scores: np.ndarray, count: np.ndarray, threshold: float, classes: int
) -> np.ndarray:
    """``[n, C]`` float32: each class's share of the summed scores of the image's detections
    (stored boxes scoring at least ``threshold`` with a label in ``[0, C)``); an image without
    any has a row of zeros (no class). The argmax is the image's dominant class."""
    n = labels.shape[0]
    keep = valid_boxes(scores, count, threshold) & (labels >= 0) & (labels < classes)
    rows = np.broadcast_to(np.arange(n)[:, None], labels.shape)
    out = np.zeros((n, classes), dtype=np.float64)
    np.add.at(out, (rows[keep], labels[keep]), scores[keep])
    total = out.sum(axis=1, keepdims=True)
    np.divide(out, total, out=out, where=total > 0)
    return out.astype(np.float32)


def pixel_shares(class_pixels: np.ndarray) -> np.ndarray:
    """``[n, C]`` float32: each class's share of the image's pixels (argmax = dominant class)."""
    counts = np.asarray(class_pixels, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    out = np.zeros_like(counts)
    np.divide(counts, total, out=out, where=total > 0)
    return out.astype(np.float32)


def top_fraction_mean(hist: np.ndarray, bound: float, percent: float) -> np.ndarray:
    """``[n]``: mean of the top ``percent`` % values, from ``hist [n, B]`` counts of equal bins over
    ``[0, bound]``. Full bins count at their midpoint; the boundary bin's top ``r`` of ``c`` values
    are taken as spread evenly over the bin (mean ``upper - r / c * width / 2``). Every value is
    replaced by a number in its own bin, so the result is within one bin width (``bound / B``) of
    the exact mean of the top ``ceil(percent / 100 * pixels)`` values."""
    counts = np.asarray(hist, dtype=np.int64)
    n, bins = counts.shape
    width = bound / bins
    total = counts.sum(axis=1)
    wanted = np.maximum(1, np.ceil(percent / 100.0 * total - 1e-9)).astype(np.int64)
    descending = counts[:, ::-1]
    before = np.cumsum(descending, axis=1) - descending  # values in higher bins
    take = np.clip(wanted[:, None] - before, 0, descending)  # taken from each bin
    uppers = bound - width * np.arange(bins)  # upper edge of each bin, descending
    full = take == descending
    partial_mean = uppers[None, :] - np.where(descending > 0, take / np.maximum(descending, 1), 0) * width / 2
    centre = uppers[None, :] - width / 2
    sums = (take * np.where(full, centre, partial_mean)).sum(axis=1)
    out = np.zeros(n)
    np.divide(sums, np.minimum(wanted, total), out=out, where=total > 0)
    return out


def segmentation_scores(
    seg_mean: np.ndarray, seg_hist: np.ndarray, classes: int, measure: str, reduce: str, percent: float
) -> np.ndarray:
    """``[n]`` image scores from stored segmentation summaries: the exact pixel mean of
    ``measure``, or (``topq``) the mean of its top ``percent`` % pixels from the histogram."""
    index = MEASURES.index(measure)
    if reduce == "mean":
        return np.asarray(seg_mean[:, index], dtype=np.float64)
    if reduce == "topq":
        if seg_hist.shape[-1] != HISTOGRAM_BINS:
            raise ValueError(f"histograms have {seg_hist.shape[-1]} bins, expected {HISTOGRAM_BINS}")
        return top_fraction_mean(seg_hist[:, index, :], measure_bound(measure, classes), percent)
    raise ValueError(f"unknown pixel reduction {reduce!r}")
