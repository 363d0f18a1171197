"""The pool as strategies see it for a detector or segmenter (torch-free).

``probs [N, C]`` is each image's class shares (detection: score-weighted shares of its detections;
segmentation: pixel shares), so its argmax is the image's dominant class for the export and for
``--balance-classes``; an image without detections has a row of zeros. The uncertainty strategies
read ``arrays["uncertainty.<measure>"]`` (``alselect.strategies.uncertainty_array``): per-image
scores reduced from the stored summaries, computed when first read, in chunks of images so the
per-box and per-bin arrays of a large pool are never loaded whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from alselect.store import PoolRows, Store
from alselect.strategies.base import uncertainty_array
from alselect.tasks import DETECTION, MEASURES, Reduction
from alselect.tasks.reduce import class_shares, detection_scores, pixel_shares, segmentation_scores

CHUNK = 16384  # images per read of per-box / per-bin arrays


class LazyArrays(Mapping[str, np.ndarray]):
    """A read-only mapping whose values are computed on first access and kept."""

    def __init__(
        self, makers: Mapping[str, Callable[[], np.ndarray]], ready: Mapping[str, np.ndarray] | None = None
    ) -> None:
        self._makers = dict(makers)
        self._values: dict[str, np.ndarray] = dict(ready or {})
        for name in self._values:
            self._makers.setdefault(name, lambda: np.empty(0))

    def including(self, ready: Mapping[str, np.ndarray]) -> LazyArrays:
        """These lazy arrays plus arrays already computed."""
        return LazyArrays(self._makers, {**self._values, **ready})

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._values:
            self._values[name] = self._makers[name]()  # KeyError for unknown names, as a Mapping should
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def chunked(
    store: Store,
    pool: PoolRows,
    model_key: str,
    names: tuple[str, ...],
    compute: Callable[[dict[str, np.ndarray]], np.ndarray],
) -> np.ndarray:
    """``compute`` over the pool in chunks of ``CHUNK`` images, results concatenated on axis 0."""
    slots = pool.slots[model_key]
    parts = []
    for start in range(0, len(slots), CHUNK):
        part = slots[start : start + CHUNK]
        parts.append(compute({name: store.read_outputs(model_key, name, part) for name in names}))
    return (
        np.concatenate(parts)
        if parts
        else compute({name: store.read_outputs(model_key, name, slots[:0]) for name in names})
    )


def detection_classes(store: Store, pool: PoolRows, model_key: str, declared: int | None) -> int:
    """The class count of a detector: declared by its checkpoint, else its largest label + 1."""
    if declared:
        return int(declared)
    highest = chunked(
        store, pool, model_key, ("det_labels",), lambda a: np.array([a["det_labels"].max(initial=-1)])
    )
    return max(int(highest.max(initial=-1)) + 1, 1)


def task_pool(
    store: Store, pool: PoolRows, model_key: str, task: str, reduction: Reduction, num_classes: int | None
) -> tuple[np.ndarray, LazyArrays]:
    """``(probs [N, C] float32, arrays)`` for a detection or segmentation model's pool."""
    reduce = reduction.for_task(task)
    if task == DETECTION:
        classes = detection_classes(store, pool, model_key, num_classes)
        threshold = reduction.detection_threshold
        probs = chunked(
            store,
            pool,
            model_key,
            ("det_labels", "det_scores", "det_count"),
            lambda a: class_shares(a["det_labels"], a["det_scores"], a["det_count"], threshold, classes),
        )
        names = ("det_top1", "det_top2", "det_entropy", "det_scores", "det_count", "det_classes")

        def detection_maker(measure: str) -> Callable[[], np.ndarray]:
            return lambda: chunked(
                store,
                pool,
                model_key,
                names,
                lambda a: detection_scores(
                    a, measure, reduce, reduction.score_threshold, reduction.empty_score
                ),
            )

        return probs, LazyArrays({uncertainty_array(m): detection_maker(m) for m in MEASURES})
    pixels = chunked(
        store, pool, model_key, ("seg_class_pixels",), lambda a: pixel_shares(a["seg_class_pixels"])
    )
    classes = pixels.shape[1]
    wanted = ("seg_mean", "seg_hist") if reduce == "topq" else ("seg_mean",)

    def segmentation_maker(measure: str) -> Callable[[], np.ndarray]:
        return lambda: chunked(
            store,
            pool,
            model_key,
            wanted,
            lambda a: segmentation_scores(
                a["seg_mean"],
                a.get("seg_hist", np.empty((0, 0, 0))),
                classes,
                measure,
                reduce,
                reduction.top_percent,
            ),
        )

    return pixels, LazyArrays({uncertainty_array(m): segmentation_maker(m) for m in MEASURES})
