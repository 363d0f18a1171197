"""Label Studio's JSON export: a list of tasks, each with its annotations.

A task is matched by ``data.al_sha256`` (alselect's export writes it), else by its image reference
(``data.image``, or the task's only URL-valued field): a Local Files URL
``/data/local-files/?d=<path>`` gives ``<path>`` (relative to Label Studio's document root:
``--folder`` names that), a URL under the export's ``--uri-prefix`` gives the folder-relative path,
and a plain path is taken as written. A task without a non-cancelled annotation is no label. The
class is the first choice of the first ``choices`` result; a ground-truth annotation wins over the
others; annotators who disagree leave the image labeled without a class. Predictions are ignored.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from alselect.annotations.base import (
    BLANK_CLASS,
    AnnotationReader,
    Annotations,
    Document,
    LabelRecord,
    ReadOptions,
    blank_class,
    class_name,
    count_note,
    register_reader,
    single_class,
    valid_sha256,
)
from alselect.errors import DataError
from alselect.uris import is_url, strip_uri_prefix

LOCAL_FILES = "/data/local-files"
MAX_SHOWN = 200  # characters of an image reference in reports (it may be a data: URI)
UPLOADS = "/data/upload/"  # files uploaded into Label Studio, renamed by it: only al_sha256 can match


def image_reference(data: dict[str, Any]) -> str | None:
    """``data.image``, else the one field that holds a URL or a Label Studio file path."""
    image = data.get("image")
    if isinstance(image, str) and image:
        return image
    urls = [v for v in data.values() if isinstance(v, str) and (is_url(v) or v.startswith("/data/"))]
    return urls[0] if len(urls) == 1 else None


def path_of(image: str, uri_prefix: str | None) -> str | None:
    """The file path an image reference stands for, or ``None`` when it cannot be known."""
    stripped = strip_uri_prefix(image, uri_prefix)
    if stripped is not None:
        return stripped
    parts = urlsplit(image)
    if parts.path.rstrip("/") == LOCAL_FILES:
        # the server reads d= as a query parameter: percent-escapes decoded and "+" as a space
        values = parse_qs(parts.query).get("d")
        return values[0] if values else None
    if is_url(image) or image.startswith(UPLOADS):
        return None
    return image


def first_choice(annotation: dict[str, Any]) -> tuple[str | None, bool, bool]:
    """``(class, several, blank)``: the first choice of the annotation's first ``choices`` result;
    ``blank`` when that choice is empty text (``choices: [""]``)."""
    for item in annotation.get("result") or []:
        value = item.get("value") if isinstance(item, dict) else None
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list) and choices:
            return class_name(choices[0]), len(choices) > 1, blank_class(choices[0])
    return None, False, False


@register_reader
class LabelStudioReader(AnnotationReader):
    name = "label-studio"
    priority = 10

    def detect(self, doc: Document) -> bool:
        # an empty list is what Label Studio exports when no task is annotated yet
        tasks = doc.json
        return isinstance(tasks, list) and all(
            isinstance(task, dict) and isinstance(task.get("data"), dict) for task in tasks
        )

    def read(self, doc: Document, options: ReadOptions) -> Annotations:
        tasks = doc.require_json("the Label Studio export")
        if not isinstance(tasks, list):
            raise DataError("a Label Studio JSON export is a list of tasks")
        result = Annotations(self.name)
        several = disagree = unmapped = no_choice = 0
        for number, task in enumerate(tasks, start=1):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise DataError(f"item {number} of the Label Studio export is not a task (no 'data' object)")
            data = task["data"]
            image = image_reference(data)
            shown = image if image is None or len(image) <= MAX_SHOWN else image[: MAX_SHOWN - 3] + "..."
            ref = f"task {task.get('id', number)}" + (f" ({shown})" if shown else "")
            annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
            done = [a for a in annotations if not a.get("was_cancelled")]
            if not done:
                result.skipped.append((ref, "skipped (cancelled)" if annotations else "not annotated"))
                continue
            picks = [first_choice(a) for a in [a for a in done if a.get("ground_truth")] or done]
            if any(blank for _, _, blank in picks):
                result.skipped.append((ref, BLANK_CLASS))
                continue
            several += sum(1 for _, many, _ in picks if many)
            label, mixed = single_class([choice for choice, _, _ in picks])
            disagree += mixed
            no_choice += label is None and not mixed
            sha = valid_sha256(data.get("al_sha256"))
            path = None if sha or image is None else path_of(image, options.uri_prefix)
            unmapped += sha is None and path is None
            result.records.append(LabelRecord(ref, sha, path, label=label))
        result.notes += count_note(several, "annotation(s) chose several classes; the first is kept")
        result.notes += count_note(
            disagree,
            "task(s) have annotations with different classes and are labeled without one "
            "(mark one annotation as ground truth to choose)",
        )
        result.notes += count_note(no_choice, "task(s) were annotated without a choice: labeled, no class")
        result.notes += count_note(
            unmapped,
            "task(s) have no al_sha256 and an image URL that maps to no path "
            "(pass the --uri-prefix given at export)",
        )
        return result
