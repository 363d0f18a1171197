"""What a model predicts: classification, detection or segmentation (torch-free definitions).

Classifiers store ``probs [C]`` and ``embedding [D]`` per image. Detectors and segmenters store
fixed-shape per-image summaries (``DETECTION_ARRAYS``, ``SEGMENTATION_ARRAYS``) from which every
scoring-time choice (``Reduction``: the per-image reduction, thresholds, the rule for images
without detections) is computed without running the model again. The runners that compute them
live in ``alselect.tasks.detection`` and ``alselect.tasks.segmentation`` (torch); the scoring-time
reductions in ``alselect.tasks.reduce`` (numpy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from alselect.errors import UsageError
from alselect.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

CLASSIFICATION = "classification"
DETECTION = "detection"
SEGMENTATION = "segmentation"
TASKS = (CLASSIFICATION, DETECTION, SEGMENTATION)

DEFAULT_MAX_DETECTIONS = 100  # boxes kept per image (the highest scores); torchvision's default too
DEFAULT_DETECTION_SIZE = 640  # letterbox side for detectors that do not say
DEFAULT_SEGMENTATION_SIZE = 520  # torchvision's segmentation evaluation size
HISTOGRAM_BINS = 256  # per-pixel uncertainty histogram of a segmented image

# Uncertainty measures, in the order the stored segmentation summaries keep them. Each is the
# per-prediction (box, pixel) score of the classification strategy of the same name.
MEASURES = ("entropy", "least_confidence", "margin", "ratio")
STRATEGY_MEASURES = {
    "entropy": "entropy",
    "least-confidence": "least_confidence",
    "margin": "margin",
    "ratio": "ratio",
}

# Per-image arrays a detector stores (K = max detections; rows past ``det_count`` are zero padding,
# labels -1). Boxes are x1, y1, x2, y2 as fractions of the image's width and height (after EXIF
# orientation). ``det_top1``/``det_top2``: the box's largest and second-largest class probability,
# or its score s and 1 - s when the model gives no class distribution; ``det_entropy`` in nats;
# ``det_classes``: the size of the class distribution (0: score only).
DETECTION_ARRAYS = (
    "det_boxes",
    "det_scores",
    "det_labels",
    "det_top1",
    "det_top2",
    "det_entropy",
    "det_count",
    "det_classes",
    "geometry",
)
# Per-image arrays a segmenter stores: ``seg_mean [4]`` exact mean of each measure over the image's
# pixels, ``seg_hist [4, HISTOGRAM_BINS]`` pixel counts per equal-width bin of [0, upper bound],
# ``seg_class_pixels [C]`` pixels predicted as each class.
SEGMENTATION_ARRAYS = ("seg_mean", "seg_hist", "seg_class_pixels", "geometry")

REDUCTIONS = {DETECTION: ("max", "mean", "sum"), SEGMENTATION: ("mean", "topq")}
DEFAULT_REDUCTION = {DETECTION: "max", SEGMENTATION: "mean"}


def check_task(task: str | None) -> str | None:
    """``task`` when it is one alselect knows (None passes), else a usage error."""
    if task is not None and task not in TASKS:
        raise UsageError(f"--task must be classification, detection or segmentation, got {task!r}")
    return task


def measure_bound(measure: str, classes: int) -> float:
    """The largest value ``measure`` takes for a distribution over ``classes`` (>= 2) classes."""
    classes = max(int(classes), 2)
    if measure == "entropy":
        return math.log(classes)
    if measure == "least_confidence":
        return 1.0 - 1.0 / classes
    if measure in ("margin", "ratio"):
        return 1.0
    raise ValueError(f"unknown measure {measure!r}")


@dataclass(frozen=True)
class TaskSettings:
    """Embed-time settings that shape what a detector or segmenter stores (part of its store key)."""

    task: str = CLASSIFICATION
    max_detections: int = DEFAULT_MAX_DETECTIONS

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.max_detections < 1:
            raise UsageError(f"--max-detections must be at least 1, got {self.max_detections}")

    def key_suffix(self) -> str:
        """Text hashed into the model's store key (empty for classification)."""
        if self.task == DETECTION:
            return f"task=detection;max_detections={self.max_detections}"
        if self.task == SEGMENTATION:
            return f"task=segmentation;bins={HISTOGRAM_BINS}"
        return ""


@dataclass(frozen=True)
class Reduction:
    """Scoring-time choices for detection and segmentation runs (no model pass needed to change them).

    ``reduce``: how per-box (``max``, ``mean``, ``sum``) or per-pixel (``mean``, ``topq``)
    uncertainty becomes one score per image; None takes the task's default (``max`` for
    detection, ``mean`` for segmentation). ``score_threshold``: boxes scoring below it are left
    out of the uncertainty. ``detection_threshold``: boxes at or above it are the image's
    detections (its class shares and dominant class, the export's count and pre-annotations).
    ``empty_score``: the score of an image with no box at or above ``score_threshold``:
    ``min`` (0, after every image with an uncertain box), ``max`` (the measure's upper bound, as
    uncertain as one maximally uncertain box) or a number. ``top_percent``: q of ``topq``.
    """

    reduce: str | None = None
    score_threshold: float = 0.05
    detection_threshold: float = 0.5
    empty_score: str = "min"
    top_percent: float = 10.0

    def __post_init__(self) -> None:
        known = {r for names in REDUCTIONS.values() for r in names}
        if self.reduce is not None and self.reduce not in known:
            raise UsageError(f"--reduce must be one of {', '.join(sorted(known))}, got {self.reduce!r}")
        for name, value in (
            ("--score-threshold", self.score_threshold),
            ("--detection-threshold", self.detection_threshold),
        ):
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{name} must be between 0 and 1, got {value}")
        if not 0.0 < self.top_percent <= 100.0:
            raise UsageError(f"--top-percent must be in (0, 100], got {self.top_percent}")
        if self.empty_score not in ("min", "max"):
            try:
                value = float(self.empty_score)
            except ValueError:
                raise UsageError(
                    f"--empty-score must be min, max or a number, got {self.empty_score!r}"
                ) from None
            if not math.isfinite(value):
                raise UsageError(f"--empty-score must be finite, got {self.empty_score!r}")

    def for_task(self, task: str) -> str:
        """The reduction used for ``task`` (its default when none was given); a usage error if the
        reduction does not apply to the task."""
        reduce = self.reduce or DEFAULT_REDUCTION[task]
        if reduce not in REDUCTIONS[task]:
            raise UsageError(
                f"--reduce {reduce} does not apply to {task}; use {' or '.join(REDUCTIONS[task])}"
            )
        return reduce

    def record(self, task: str) -> dict[str, Any]:
        """What a run records about its reduction (in its task model's role)."""
        data: dict[str, Any] = {"task": task, "reduce": self.for_task(task)}
        if task == DETECTION:
            data.update(
                score_threshold=self.score_threshold,
                detection_threshold=self.detection_threshold,
                empty_score=self.empty_score,
            )
        elif data["reduce"] == "topq":
            data["top_percent"] = self.top_percent
        return data


def default_preprocess(task: str, meta: dict[str, Any] | None = None, model: Any = None) -> Preprocess:
    """Letterboxed input for a detector or segmenter: side, mean and std from ``meta`` when it says,
    else the task's defaults. torchvision detectors (``model.transform``) normalise inside the
    model, so they get mean 0 and std 1, and their side is the transform's ``min_size``."""
    meta = meta or {}
    transform = getattr(model, "transform", None)
    min_size = getattr(transform, "min_size", None)
    if task == DETECTION:
        side = int(min_size[-1]) if min_size else DEFAULT_DETECTION_SIZE
        mean, std = (
            ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) if transform is not None else (IMAGENET_MEAN, IMAGENET_STD)
        )
    else:
        side, mean, std = DEFAULT_SEGMENTATION_SIZE, IMAGENET_MEAN, IMAGENET_STD
    base = Preprocess.from_metadata({"image_size": side, "mean": mean, "std": std, **meta})
    return base.letterboxed(base.image_size)
