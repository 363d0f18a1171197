"""Scoring-time reductions of stored detection and segmentation summaries (numpy, hand-computed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alselect.errors import UsageError
from alselect.tasks import HISTOGRAM_BINS, Reduction, measure_bound
from alselect.tasks.reduce import (
    box_bound,
    box_uncertainty,
    class_shares,
    detection_counts,
    detection_scores,
    pixel_shares,
    segmentation_scores,
    top_fraction_mean,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def planted() -> dict[str, np.ndarray]:
    """Three images, K = 3: image 0 has a confident and an ambiguous box, image 1 one low-score box
    only, image 2 none. Components as the runner stores them for class distributions over 3 classes."""
    return {
        # image 0: box a p = (0.9, 0.05, 0.05), box b p = (0.5, 0.5, 0); image 1: p = (0.6, 0.4, 0)
        "det_top1": np.array([[0.9, 0.5, 0.0], [0.6, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        "det_top2": np.array([[0.05, 0.5, 0.0], [0.4, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        "det_entropy": np.array(
            [
                [-(0.9 * math.log(0.9) + 0.1 * math.log(0.05)), LN2, 0.0],
                [-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), 0.0, 0.0],
                [0.0, 0.0, 0.0],
            ]
        ),
        "det_scores": np.array([[0.9, 0.5, 0.0], [0.03, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        "det_count": np.array([2, 1, 0]),
        "det_classes": np.array([3, 3, 3]),
    }


def test_box_measures_match_the_classification_formulas() -> None:
    a = planted()
    lc = box_uncertainty(a["det_top1"], a["det_top2"], a["det_entropy"], "least_confidence")
    margin = box_uncertainty(a["det_top1"], a["det_top2"], a["det_entropy"], "margin")
    ratio = box_uncertainty(a["det_top1"], a["det_top2"], a["det_entropy"], "ratio")
    np.testing.assert_allclose(lc[0, :2], [0.1, 0.5])
    np.testing.assert_allclose(margin[0, :2], [1 - 0.85, 1.0])
    np.testing.assert_allclose(ratio[0, :2], [0.05 / 0.9, 1.0])
    # score-only boxes: top1 = s, top2 = 1 - s
    s = np.array([0.8, 0.3])
    np.testing.assert_allclose(box_uncertainty(s, 1 - s, np.zeros(2), "least_confidence"), [0.2, 0.7])
    np.testing.assert_allclose(box_uncertainty(s, 1 - s, np.zeros(2), "margin"), [0.4, 0.6])
    np.testing.assert_allclose(box_uncertainty(s, 1 - s, np.zeros(2), "ratio"), [0.25, 0.3 / 0.7])


@pytest.mark.parametrize(
    ("reduce", "expected_0"),
    [
        ("max", LN2),
        ("sum", -(0.9 * math.log(0.9) + 0.1 * math.log(0.05)) + LN2),
        ("mean", (-(0.9 * math.log(0.9) + 0.1 * math.log(0.05)) + LN2) / 2),
    ],
)
def test_detection_reductions_equal_hand_computed_values(reduce: str, expected_0: float) -> None:
    scores = detection_scores(planted(), "entropy", reduce, threshold=0.05, empty_score="min")
    # image 1's only box scores 0.03 < 0.05: it keeps no box, like image 2 -> the empty score 0
    np.testing.assert_allclose(scores, [expected_0, 0.0, 0.0])


def test_threshold_changes_which_boxes_count() -> None:
    a = planted()
    np.testing.assert_allclose(
        detection_scores(a, "least_confidence", "max", threshold=0.0, empty_score="min"), [0.5, 0.4, 0.0]
    )
    np.testing.assert_allclose(
        detection_scores(a, "least_confidence", "max", threshold=0.6, empty_score="min"), [0.1, 0.0, 0.0]
    )
    np.testing.assert_array_equal(detection_counts(a["det_scores"], a["det_count"], 0.5), [2, 0, 0])


def test_no_detection_rule() -> None:
    a = planted()
    # max: one maximally uncertain box over 3 classes
    np.testing.assert_allclose(detection_scores(a, "entropy", "max", 0.05, "max"), [LN2, LN3, LN3])
    np.testing.assert_allclose(
        detection_scores(a, "least_confidence", "sum", 0.05, "max"), [0.6, 2 / 3, 2 / 3]
    )
    np.testing.assert_allclose(
        detection_scores(a, "margin", "mean", 0.05, "0.25"), [(0.15 + 1) / 2, 0.25, 0.25]
    )
    # score-only models (det_classes 0): binary bounds; least confidence 1 - s reaches 1
    np.testing.assert_allclose(box_bound("entropy", np.array([0, 4])), [LN2, math.log(4)])
    np.testing.assert_allclose(box_bound("least_confidence", np.array([0, 4])), [1.0, 0.75])
    # the padding rows (beyond det_count) never count, even at threshold 0
    padded = dict(a, det_top1=np.where(np.arange(3) < a["det_count"][:, None], a["det_top1"], 0.0))
    assert detection_scores(padded, "least_confidence", "max", 0.0, "min")[2] == 0.0


def test_class_shares_and_dominant_class() -> None:
    labels = np.array([[1, 2, 1, -1], [2, 0, -1, -1], [-1, -1, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.6, 0.0], [0.4, 0.7, 0.0, 0.0], [0.0] * 4])
    count = np.array([3, 2, 0])
    shares = class_shares(labels, scores, count, threshold=0.5, classes=3)
    np.testing.assert_allclose(shares[0], [0, 1.5 / 2.3, 0.8 / 2.3], rtol=1e-6)
    np.testing.assert_allclose(shares[1], [1.0, 0, 0])  # the 0.4 box is below the threshold
    np.testing.assert_array_equal(shares[2], [0, 0, 0])  # no detection: no class
    np.testing.assert_allclose(pixel_shares(np.array([[3, 1, 0], [0, 0, 0]])), [[0.75, 0.25, 0], [0, 0, 0]])


def exact_top_mean(values: np.ndarray, percent: float) -> float:
    k = max(1, math.ceil(percent / 100 * len(values) - 1e-9))
    return float(np.sort(values)[::-1][:k].mean())


def histogram(values: np.ndarray, bound: float) -> np.ndarray:
    bins = np.clip(np.floor(values / bound * HISTOGRAM_BINS), 0, HISTOGRAM_BINS - 1).astype(int)
    return np.bincount(bins, minlength=HISTOGRAM_BINS)[None, :]


@pytest.mark.parametrize("percent", [0.5, 5.0, 10.0, 37.5, 100.0])
def test_top_percent_from_histogram_is_within_one_bin_of_exact(percent: float) -> None:
    rng = np.random.default_rng(3)
    bound = LN3
    for values in (rng.random(10_000) * bound, rng.beta(0.5, 4, size=7_777) * bound, np.full(100, 0.3)):
        estimate = top_fraction_mean(histogram(values, bound), bound, percent)[0]
        assert abs(estimate - exact_top_mean(values, percent)) <= bound / HISTOGRAM_BINS
    assert top_fraction_mean(np.zeros((1, HISTOGRAM_BINS), dtype=int), bound, 10.0)[0] == 0.0


def test_segmentation_scores_pick_the_stored_summary() -> None:
    seg_mean = np.array([[0.2, 0.1, 0.3, 0.4]])
    hist = np.zeros((1, 4, HISTOGRAM_BINS), dtype=np.int32)
    hist[0, 2, HISTOGRAM_BINS - 1] = 10  # margin: 10 pixels in the top bin
    hist[0, 2, 0] = 90
    assert segmentation_scores(seg_mean, hist, 3, "margin", "mean", 10)[0] == 0.3
    top = segmentation_scores(seg_mean, hist, 3, "margin", "topq", 10)[0]
    assert top == pytest.approx(1.0 - 0.5 / HISTOGRAM_BINS)
    assert measure_bound("least_confidence", 3) == pytest.approx(2 / 3)


def test_reduction_options_are_checked() -> None:
    assert Reduction().for_task("detection") == "max"
    assert Reduction().for_task("segmentation") == "mean"
    with pytest.raises(UsageError, match="does not apply"):
        Reduction(reduce="topq").for_task("detection")
    with pytest.raises(UsageError, match="--reduce"):
        Reduction(reduce="median")
    with pytest.raises(UsageError, match="--empty-score"):
        Reduction(empty_score="high")
    with pytest.raises(UsageError, match="--score-threshold"):
        Reduction(score_threshold=1.5)
    with pytest.raises(UsageError, match="--top-percent"):
        Reduction(top_percent=0)
