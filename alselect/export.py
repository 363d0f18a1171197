"""Write the latest run's ranking in a format, skipping labeled and already-exported images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from alselect.errors import NoRunError, UsageError
from alselect.exporters import ExportRow, atomic_output, get_exporter
from alselect.store import Store, model_display_name


@dataclass
class ExportResult:
    run_id: int
    written: int
    skipped_unwritable: int
    recorded: bool
    destination: str


def model_display(store: Store, model_key: str) -> tuple[str, list[str] | None]:
    """Short model name (checkpoint sha256 prefix, ``+pp…`` for overridden preprocessing)."""
    info = store.model(model_key) or {}
    return model_display_name(str(info.get("checkpoint_sha256") or model_key), model_key), info.get("classes")


def with_detection_counts(store: Store, run: dict[str, Any], rows: list[ExportRow]) -> list[ExportRow]:
    """Detection runs (issue #10): each row gains its image's detection count, read from the stored
    boxes of the run's model; other runs' rows are returned unchanged."""
    from alselect.tasks.export import detection_counts

    counts = detection_counts(store, run, [r.sha256 for r in rows])
    if counts is None:
        return rows
    return [
        replace(row, detections=count if count is not None else 0)
        for row, count in zip(rows, counts, strict=True)
    ]


def export_latest(
    store: Store,
    fmt: str = "csv",
    *,
    top: int | None = None,
    output: Path | None = None,
    stdout: Callable[[], TextIO] | None = None,
    include_exported: bool = False,
    absolute: bool = False,
    record: bool = True,
) -> ExportResult:
    """Export the top ``top`` rows of the latest run to ``output`` (atomic) or ``stdout()``.

    The export is recorded only after every row was written, so a failed or interrupted write
    never hides images from the next export.
    """
    if top is not None and top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    exporter = get_exporter(fmt)
    run = store.latest_run()
    if run is None:
        raise NoRunError(f"store {store.path} has no scoring run yet: run 'alselect score' first")
    model, classes = model_display(store, run["model_key"])
    root = Path(run["root"])
    rows: list[ExportRow] = []
    for _rank, relpath, sha, score, predicted, confidence in store.exportable_items(
        run["id"], include_exported
    ):
        if top is not None and len(rows) >= top:
            break
        label = (
            ""
            if predicted is None
            else (classes[predicted] if classes and 0 <= predicted < len(classes) else str(predicted))
        )
        rows.append(
            ExportRow(
                rank=len(rows) + 1,
                path=str(root / relpath) if absolute else relpath,
                score=score,
                strategy=run["strategy"],
                model=model,
                predicted_label=label,
                confidence=confidence,
                sha256=sha,
            )
        )
    rows = with_detection_counts(store, run, rows)
    if output is not None:
        with atomic_output(output) as handle:
            written = exporter.write(rows, handle)
        destination = str(output)
    else:
        if stdout is None:
            raise UsageError("export needs an output file or a stdout stream")
        stream = stdout()
        written = exporter.write(rows, stream)
        stream.flush()
        destination = "-"
    if record and written:
        store.record_export(run["id"], fmt, destination, [(r.sha256, r.rank) for r in written])
    return ExportResult(
        run_id=run["id"],
        written=len(written),
        skipped_unwritable=len(rows) - len(written),
        recorded=record and bool(written),
        destination=destination,
    )
