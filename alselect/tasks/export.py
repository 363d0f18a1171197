"""Detection data for exports: per-image detection counts and Label Studio rectangle predictions.

torch-free. A detection run records its task model's key and thresholds in the run's ``models``
roles (``{"role": "task", "task": "detection", "detection_threshold": ...}``); the boxes are read
back from that model's stored arrays by content hash (``Store.outputs_of``), so an export needs
no model pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from alselect.store import Store
from alselect.tasks import DETECTION
from alselect.tasks.reduce import valid_boxes

RECTANGLE_DIGITS = 4  # percent coordinates rounded to 1e-4 % (well under a pixel)


@dataclass(frozen=True)
class StoredDetections:
    """One image's detections: ``boxes [n, 4]`` x1, y1, x2, y2 as fractions of the image (after
    EXIF orientation), ``scores [n]``, ``labels [n]``, and the image's ``height`` and ``width``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    height: int
    width: int


def detection_role(run: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The task role of a detection run (its model key and thresholds), else None."""
    for role in run.get("models") or []:
        if role.get("role") == "task" and role.get("task") == DETECTION:
            return role
    return None


def stored_detections(
    store: Store, model_key: str, sha256: Sequence[str], threshold: float
) -> dict[str, StoredDetections]:
    """The stored boxes scoring at least ``threshold`` of each content the model has outputs for."""
    names = ("det_boxes", "det_scores", "det_labels", "det_count", "geometry")
    found, arrays = store.outputs_of(model_key, names, sha256)
    keep = valid_boxes(arrays["det_scores"], arrays["det_count"], threshold)
    out = {}
    for row, sha in enumerate(s for s, ok in zip(sha256, found, strict=True) if ok):
        mask = keep[row]
        geometry = arrays["geometry"][row]
        out[sha] = StoredDetections(
            boxes=arrays["det_boxes"][row][mask],
            scores=arrays["det_scores"][row][mask],
            labels=arrays["det_labels"][row][mask],
            height=int(geometry[0]),
            width=int(geometry[1]),
        )
    return out


def detection_counts(store: Store, run: Mapping[str, Any], sha256: Sequence[str]) -> list[int | None] | None:
    """Per content: how many detections (boxes at or above the run's detection threshold) the
    run's model stored; None for contents it has none for. None when the run is not a detection run."""
    role = detection_role(run)
    if role is None:
        return None
    found = stored_detections(store, role["key"], sha256, float(role["detection_threshold"]))
    return [len(found[sha].scores) if sha in found else None for sha in sha256]


def class_name(label: int, classes: Sequence[str] | None) -> str:
    """The class name of ``label``, or the label as text when the checkpoint names no classes."""
    return str(classes[label]) if classes is not None and 0 <= label < len(classes) else str(label)


def rectangle_results(
    detections: StoredDetections,
    classes: Sequence[str] | None,
    *,
    from_name: str = "label",
    to_name: str = "image",
) -> list[dict[str, Any]]:
    """Label Studio ``rectanglelabels`` results: top-left ``x``, ``y`` and ``width``, ``height`` in
    percent of the image's width and height (as a browser shows it, EXIF orientation applied),
    ``original_width``/``original_height`` in pixels, the box's class name and its score."""
    results = []
    for box, score, label in zip(detections.boxes, detections.scores, detections.labels, strict=True):
        x1, y1, x2, y2 = (float(v) * 100.0 for v in box)
        results.append(
            {
                "from_name": from_name,
                "to_name": to_name,
                "type": "rectanglelabels",
                "original_width": detections.width,
                "original_height": detections.height,
                "image_rotation": 0,
                "value": {
                    "x": round(x1, RECTANGLE_DIGITS),
                    "y": round(y1, RECTANGLE_DIGITS),
                    "width": round(x2 - x1, RECTANGLE_DIGITS),
                    "height": round(y2 - y1, RECTANGLE_DIGITS),
                    "rotation": 0,
                    "rectanglelabels": [class_name(int(label), classes)],
                },
                "score": round(float(score), 6),
            }
        )
    return results


def label_studio_prediction(
    detections: StoredDetections,
    classes: Sequence[str] | None,
    *,
    model_version: str,
    score: float,
    from_name: str = "label",
    to_name: str = "image",
) -> dict[str, Any]:
    """One Label Studio ``predictions`` entry holding the image's rectangles (possibly none)."""
    return {
        "model_version": model_version,
        "score": score,
        "result": rectangle_results(detections, classes, from_name=from_name, to_name=to_name),
    }


def detection_config(classes: Sequence[str], from_name: str = "label", to_name: str = "image") -> str:
    """A Label Studio labeling config for boxes over ``classes`` that reads ``data.image``: the
    config ``rectangle_results`` predictions fit (names must match ``from_name``/``to_name``)."""
    labels = "".join(f"    <Label value={quoteattr(str(name))}/>\n" for name in classes)
    return (
        "<View>\n"
        f'  <Image name={quoteattr(to_name)} value="$image"/>\n'
        f"  <RectangleLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n"
        f"{labels}"
        "  </RectangleLabels>\n"
        "</View>\n"
    )
