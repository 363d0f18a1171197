"""Label Studio: a JSON array of tasks for the project import (``.json``; Label Studio's importer
does not parse ``.jsonl``).

Each task's ``data`` holds ``image`` (a URL, or a local-files URL ``/data/local-files/?d=<path
relative to the document root, percent-encoded>``) and ``al_rank``/``al_score`` as JSON numbers
plus ``al_strategy``, ``al_model``, ``al_sha256``: Label Studio keeps ``data`` fields and sorts the
Data Manager by them (custom top-level ``meta`` has been reported lost on import). With
predictions, each task carries the model's top class as a ``choices`` result for pre-annotation;
its ``score`` is ``(rank - 1) / n``, so "lowest score first" orderings (uncertainty sampling)
serve rank 1 first, and ``model_version`` is the model's short hash.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from alselect.errors import DataError, UsageError
from alselect.exporters.base import (
    ExportContext,
    Exporter,
    ExportRow,
    finite_or_none,
    not_utf8_reason,
    register_exporter,
    relative_to_root,
    write_json_array,
)
from alselect.uris import is_utf8

LOCAL_FILES_URL = "/data/local-files/?d="


def local_files_url(relpath: str) -> str:
    """Label Studio's URL for a file ``relpath`` under its ``LOCAL_FILES_DOCUMENT_ROOT``.

    The server decodes the query parameter, so every ``%``, ``+``, ``&``, ``#`` and space must be
    percent-encoded (``/`` is kept).
    """
    return LOCAL_FILES_URL + quote(relpath, safe="/")


def classification_config(classes: Sequence[str], from_name: str = "label", to_name: str = "image") -> str:
    """A Label Studio labeling config for single-choice image classification over ``classes``."""
    choices = "".join(f"    <Choice value={quoteattr(name)}/>\n" for name in classes)
    return (
        "<View>\n"
        f'  <Image name={quoteattr(to_name)} value="$image"/>\n'
        f'  <Choices name={quoteattr(from_name)} toName={quoteattr(to_name)} choice="single" '
        'showInLine="true">\n'
        f"{choices}"
        "  </Choices>\n"
        "</View>\n"
    )


@register_exporter
class LabelStudioExporter(Exporter):
    name = "label-studio"
    reads = frozenset(
        {"uri_prefix", "document_root", "predictions", "ls_from_name", "ls_to_name", "ls_config"}
    )
    summary = "Label Studio tasks (JSON array): data.image, data.al_*; --predictions for pre-annotation"

    def check(self, rows: Sequence[ExportRow], context: ExportContext) -> None:
        super().check(rows, context)
        options = context.options
        if options.uri_prefix is None and options.document_root is not None:
            root = options.document_root
            if not root.is_dir():
                raise UsageError(f"--ls-document-root {root} is not a folder")
        if options.ls_config is not None:
            if not options.predictions:
                raise UsageError("--ls-config checks predictions: add --predictions")
            check_predictions(
                options.ls_config, [self.task(row, context, len(rows)) for row in rows], options.ls_to_name
            )

    def unwritable(self, row: ExportRow, context: ExportContext) -> str | None:
        # Label Studio decodes the local-files d= parameter as UTF-8: such a file cannot be served
        if context.options.uri_prefix is None and not is_utf8(row.relative):
            return not_utf8_reason("Label Studio's local-files URLs")
        return super().unwritable(row, context)

    def write(
        self, rows: Iterable[ExportRow], stream: TextIO, context: ExportContext | None = None
    ) -> list[ExportRow]:
        context = context or ExportContext()
        rows = list(rows)
        write_json_array(stream, [self.task(row, context, len(rows)) for row in rows])
        return rows

    def task(self, row: ExportRow, context: ExportContext, count: int) -> dict[str, Any]:
        options = context.options
        if options.uri_prefix is not None:
            image = row.uri
        else:
            image = local_files_url(relative_to_root(row, options.document_root))
        task: dict[str, Any] = {
            "data": {
                "image": image,
                "al_rank": row.rank,
                "al_score": finite_or_none(row.score),
                "al_strategy": row.strategy,
                "al_model": row.model,
                "al_sha256": row.sha256,
            }
        }
        if options.predictions and context.detections is not None:  # a detection run: rectangles
            from alselect.tasks.export import label_studio_prediction

            found = context.detections.get(row.sha256)
            task["predictions"] = [
                label_studio_prediction(
                    found,
                    context.run.class_names,
                    model_version=row.model,
                    score=(row.rank - 1) / max(count, 1),
                    from_name=options.ls_from_name,
                    to_name=options.ls_to_name,
                )
                if found is not None
                else {"model_version": row.model, "score": (row.rank - 1) / max(count, 1), "result": []}
            ]
        elif options.predictions and row.predicted_label:
            task["predictions"] = [
                {
                    "model_version": row.model,
                    "score": (row.rank - 1) / max(count, 1),
                    "result": [
                        {
                            "from_name": options.ls_from_name,
                            "to_name": options.ls_to_name,
                            "type": "choices",
                            "value": {"choices": [row.predicted_label]},
                        }
                    ],
                }
            ]
        return task

    def notes(self, rows: Sequence[ExportRow], context: ExportContext, written: Sequence[Path]) -> list[str]:
        if context.options.uri_prefix is not None or not rows:
            return []
        root = context.options.document_root or Path(context.run.folder or rows[0].folder)
        return [
            "Label Studio serves these images from local files: start it with "
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
            f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root.resolve()}, and add a Local Files storage "
            "whose path is the sub-folder of that root holding the images (the root itself is refused; "
            "use --ls-document-root with a parent folder when the images sit directly in the scored folder)"
        ]


def check_predictions(config: str, tasks: Sequence[dict[str, Any]], to_name: str) -> None:
    """Validate every task's predictions with label-studio-sdk's ``LabelInterface`` (the check the
    server runs when prediction validation is on), and that the image object reads ``$image``."""
    try:
        from label_studio_sdk.label_interface import LabelInterface
    except ImportError as exc:
        raise UsageError("--ls-config needs label-studio-sdk: pip install 'alselect[label-studio]'") from exc
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises a variety of parse errors
        raise DataError(f"the labeling config cannot be parsed: {exc}") from exc
    try:
        image = interface.get_object(to_name)
    except Exception:
        raise DataError(f"the labeling config has no object named {to_name!r} (--ls-to-name)") from None
    if getattr(image, "value", None) != "$image":
        raise DataError(
            f"the labeling config's {to_name!r} reads {getattr(image, 'value', None)!r}; alselect's tasks "
            'put the image in data.image, so it must read "$image"'
        )
    for task in tasks:
        for prediction in task.get("predictions", []):
            errors = interface.validate_prediction(prediction, return_errors=True)
            if errors:
                raise DataError(
                    f"the labeling config rejects the prediction for {task['data']['image']}: {errors[0]}"
                )
