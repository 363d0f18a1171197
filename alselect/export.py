"""Write the latest run's ranking in a format, skipping labeled and already-exported images.

What counts as delivered: an export is recorded (so the next one skips its images) only after
every row was handed to the output without error: a file once it is renamed into place, a pipe or
stdout once its last write returned. A pipe's buffer accepts rows its reader may never read
(``export | head -3`` records what fitted); a reader that goes away mid-export (broken pipe)
leaves nothing recorded. ``record=False`` (``--dry-run``) peeks without recording.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from alselect import __version__
from alselect.errors import AlselectError, NoRunError, UsageError
from alselect.exporters import (
    SCORE_DIRECTION,
    ExportContext,
    Exporter,
    ExportOptions,
    ExportRow,
    FileSet,
    RunInfo,
    atomic_output,
    get_exporter,
    is_stream_target,
    join_uri,
)
from alselect.exporters.base import check_options, json_text
from alselect.store import Store, model_display_name
from alselect.uris import check_uri_prefix


class NothingToExport(AlselectError):
    """``--fail-if-empty`` and no image left to send: a distinct exit status for cron."""

    exit_code = 3


@dataclass
class ExportResult:
    run_id: int
    written: int
    skipped_unwritable: int
    recorded: bool
    destination: str
    files: list[str] = field(default_factory=list)
    sidecar: str | None = None
    notes: list[str] = field(default_factory=list)
    empty_reason: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why) left out


@dataclass
class Selection:
    """The rows an export would write now, and the run they come from."""

    run: RunInfo
    rows: list[ExportRow]


def detections_for(
    store: Store, run: RunInfo, rows: Sequence[ExportRow], options: ExportOptions
) -> dict[str, Any] | None:
    """A detection run's stored boxes per exported content, for Label Studio rectangle predictions."""
    from alselect.tasks.export import detection_role, stored_detections

    role = detection_role({"models": run.models})
    if role is None or not options.predictions:
        return None
    threshold = float(role["detection_threshold"])
    return stored_detections(store, str(role["key"]), [r.sha256 for r in rows], threshold)


def with_detection_counts(store: Store, run: RunInfo, rows: list[ExportRow]) -> list[ExportRow]:
    """Detection runs (issue #10): each row gains its image's detection count, read from the stored
    boxes of the run's model; other runs' rows are returned unchanged."""
    from alselect.tasks.export import detection_counts

    counts = detection_counts(store, {"models": run.models}, [r.sha256 for r in rows])
    if counts is None:
        return rows
    return [
        replace(row, detections=count if count is not None else 0)
        for row, count in zip(rows, counts, strict=True)
    ]


def run_info(store: Store) -> RunInfo:
    """The latest run, with its model; ``NoRunError`` when the store has none."""
    run = store.latest_run()
    if run is None:
        raise NoRunError(f"store {store.path} has no scoring run yet: run 'alselect score' first")
    model = store.model(run["model_key"]) or {}
    checkpoint = str(model.get("checkpoint_sha256") or run["model_key"])
    classes = model.get("classes")
    return RunInfo(
        id=run["id"],
        created_at=run["created_at"],
        folder=run["root"],
        strategy=run["strategy"],
        params=run["params"],
        budget=run["budget"],
        pool_size=run["pool_size"],
        labeled_count=run["labeled_count"],
        selected=run["selected"],
        command=run.get("command"),
        alselect_version=run.get("alselect_version"),
        model=model_display_name(checkpoint, run["model_key"], model.get("preprocess")),
        model_key=run["model_key"],
        checkpoint_sha256=checkpoint,
        checkpoint_path=str(model.get("path") or ""),
        classes=tuple(classes) if classes else None,
        num_classes=int(model.get("num_classes") or 0),
        models=tuple(run.get("models") or ()),
    )


def select_rows(
    store: Store,
    *,
    top: int | None = None,
    include_exported: bool = False,
    absolute: bool = False,
    uri_prefix: str | None = None,
) -> Selection:
    """The next ``top`` images of the latest run in rank order (what ``export`` would write now)."""
    if top is not None and top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    run = run_info(store)
    classes = run.classes
    root = Path(run.folder)
    rows: list[ExportRow] = []
    for _rank, relpath, sha, score, predicted, confidence in store.exportable_items(run.id, include_exported):
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
                strategy=run.strategy,
                model=run.model,
                predicted_label=label,
                confidence=confidence,
                sha256=sha,
                folder=run.folder,
                uri=join_uri(uri_prefix, relpath) if uri_prefix else "",
                relpath=relpath,
            )
        )
    return Selection(run=run, rows=with_detection_counts(store, run, rows))


def all_pending_reason(count: int) -> str:
    """Why a ``--budget`` run ranked nothing when its ``count`` unlabeled images were all sent and
    not labeled yet (such a run leaves them out), and what to do next."""
    return (
        f"all {count} unlabeled image(s) were exported and are not labeled yet (a --budget run leaves "
        "them out); next: once annotations come back, 'alselect label <their export>' then "
        "'alselect score'; to send them again, 'alselect score' without --budget, then "
        "'alselect export --include-exported'"
    )


def explain_empty(store: Store, run: RunInfo, include_exported: bool) -> str:
    """Why an export found nothing to send, and what to do next (one line)."""
    unlabeled = run.pool_size - run.labeled_count
    if run.selected == 0 and unlabeled > 0:  # candidates exist only as exported-not-labeled ones
        return f"nothing to export: run {run.id} ranked no images: {all_pending_reason(unlabeled)}"
    if run.selected == 0:
        return (
            f"nothing to export: run {run.id} ranked no images (every decodable image in {run.folder} "
            "was labeled, or the folder holds none); add images, then run 'alselect score' again"
        )
    states = store.run_item_states(run.id)
    parts = []
    if states["exported"] and not include_exported:
        parts.append(f"{states['exported']} already exported and not yet labeled")
    if states["labeled"]:
        parts.append(f"{states['labeled']} labeled")
    if states["gone"]:
        parts.append(f"{states['gone']} gone or changed since the run")
    steps = []
    if states["exported"] and not include_exported:
        steps.append(
            "once annotations come back, 'alselect label <their export>' then 'alselect score'; "
            "--include-exported sends the pending ones again"
        )
    else:
        steps.append("run 'alselect score' to rank images added or changed since")
    return (
        f"nothing to export: all {states['ranked']} image(s) ranked by run {run.id} are "
        f"{', '.join(parts) or 'unavailable'}; next: {'; '.join(steps)}"
    )


def export_latest(
    store: Store,
    fmt: str = "csv",
    *,
    top: int | None = None,
    output: Path | str | None = None,
    stdout: Callable[[], TextIO] | None = None,
    include_exported: bool = False,
    absolute: bool = False,
    record: bool = True,
    options: ExportOptions | None = None,
    fail_if_empty: bool = False,
    command: str | None = None,
) -> ExportResult:
    """Export the top ``top`` rows of the latest run to ``output`` (atomic) or ``stdout()``.

    Multi-file formats need ``output``: a folder (an existing one, or text ending in ``/``) or a
    prefix. A file output gets a run sidecar
    ``<output>.run.json`` (``<folder>/run.json``, ``<prefix>.run.json``). The export is recorded
    only after every file was written, so a failed or interrupted write never hides images from
    the next export. With nothing to export, ``fail_if_empty`` raises ``NothingToExport`` before
    anything is written; otherwise an empty output is written and ``empty_reason`` says why.
    """
    exporter = get_exporter(fmt)
    options = options or ExportOptions()
    if absolute:
        options = replace(options, absolute=True)
    check_options(type(exporter), options)  # an option the format would ignore: before any work
    if options.uri_prefix is not None:
        options = replace(options, uri_prefix=check_uri_prefix(options.uri_prefix))
    selection = select_rows(
        store,
        top=top,
        include_exported=include_exported,
        absolute=options.absolute,
        uri_prefix=options.uri_prefix,
    )
    run, rows = selection.run, selection.rows
    context = ExportContext(options=options, run=run, detections=detections_for(store, run, rows, options))
    rows, skipped = writable_rows(exporter, rows, context)
    exporter.check(rows, context)
    empty_reason = explain_empty(store, run, include_exported) if not rows else None
    if empty_reason and fail_if_empty:
        raise NothingToExport(empty_reason)

    files: list[Path] = []
    sidecar: Path | None = None
    sidecar_fields: dict[str, Any] = {
        "fmt": fmt,
        "run": run,
        "options": options,
        "top": top,
        "include_exported": include_exported,
        "command": command,
    }
    if exporter.layout == "stream":
        if output is not None:
            output = Path(output)
            destination = str(output)
            if is_stream_target(output):
                with atomic_output(output) as handle:
                    written = exporter.write(rows, handle, context)
            else:
                sidecar = output.with_name(output.name + ".run.json")
                check_targets([output, sidecar])  # before anything is written
                # the sidecar is written inside the data file's atomic write: a failure of either
                # leaves both targets as they were
                with atomic_output(output) as handle:
                    written = exporter.write(rows, handle, context)
                    handle.flush()
                    recorded = record and bool(written)
                    write_sidecar(
                        sidecar, files=[output], exported=len(written), recorded=recorded, **sidecar_fields
                    )
                files.append(output)
                sidecar_fields = {}  # written
        else:
            if stdout is None:
                raise UsageError("export needs an output file or a stdout stream")
            stream = stdout()
            written = exporter.write(rows, stream, context)
            stream.flush()
            destination = "-"
    else:
        if output is None:
            where = "-o FOLDER" if exporter.layout == "folder" else "-o FOLDER/ or -o PREFIX"
            raise UsageError(f"--format {fmt} writes several files: give {where}")
        fileset = FileSet.resolve(output, always_folder=exporter.layout == "folder")
        output = fileset.target
        check_targets([*(fileset.path(name) for name in exporter.file_names), fileset.sidecar])
        written = exporter.write_files(rows, fileset, context)
        files.extend(fileset.written)
        destination = str(output)
        sidecar = fileset.sidecar

    recorded = record and bool(written)
    if sidecar is not None and sidecar_fields:
        write_sidecar(sidecar, files=files, exported=len(written), recorded=recorded, **sidecar_fields)
    if recorded:
        store.record_export(run.id, fmt, destination, [(r.sha256, r.rank) for r in written])
    return ExportResult(
        run_id=run.id,
        written=len(written),
        skipped_unwritable=len(rows) - len(written),
        recorded=recorded,
        destination=destination,
        files=[str(f) for f in files],
        sidecar=None if sidecar is None else str(sidecar),
        notes=exporter.notes(written, context, files),
        empty_reason=empty_reason,
        skipped=skipped,
    )


def writable_rows(
    exporter: Exporter, rows: list[ExportRow], context: ExportContext
) -> tuple[list[ExportRow], list[tuple[str, str]]]:
    """The rows the format can write, ranks renumbered 1..N in order, and ``(path, why)`` for the
    others (left out and not recorded)."""
    kept: list[ExportRow] = []
    skipped: list[tuple[str, str]] = []
    for row in rows:
        why = exporter.unwritable(row, context)
        if why is None:
            kept.append(row if row.rank == len(kept) + 1 else replace(row, rank=len(kept) + 1))
        else:
            skipped.append((row.relative, why))
    return kept, skipped


def check_targets(paths: Sequence[Path]) -> None:
    """Refuse, before anything is written, targets that cannot be replaced: a folder in the way, a
    missing or unwritable folder. (A write can still fail later, e.g. on a full disk; each file is
    atomic, so a target is then left as it was.)"""
    for path in paths:
        target = Path(os.path.realpath(path))
        if target.is_dir():
            raise AlselectError(f"cannot write {path}: it is a folder; nothing was written")
        folder = target.parent
        if not folder.is_dir():
            raise AlselectError(f"cannot write {path}: folder {folder} does not exist; nothing was written")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise AlselectError(f"cannot write {path}: folder {folder} is not writable; nothing was written")


def sidecar_record(
    *,
    fmt: str,
    run: RunInfo,
    options: ExportOptions,
    files: list[Path],
    exported: int,
    recorded: bool,
    top: int | None,
    include_exported: bool,
    command: str | None,
) -> dict[str, Any]:
    """What makes a batch reproducible: who wrote it, from which run and model, with which options."""
    return {
        "alselect_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "format": fmt,
        "files": [str(f) for f in files],
        "exported": exported,
        "recorded": recorded,
        "score_direction": SCORE_DIRECTION,
        "options": {
            "top": top,
            "include_exported": include_exported,
            "absolute": options.absolute,
            "uri_prefix": options.uri_prefix,
            "document_root": None if options.document_root is None else str(options.document_root),
            "predictions": options.predictions,
        },
        "run": {
            "id": run.id,
            "created_at": run.created_at,
            "folder": run.folder,
            "strategy": run.strategy,
            "params": run.params,
            "budget": run.budget,
            "pool_size": run.pool_size,
            "labeled": run.labeled_count,
            "selected": run.selected,
            "command": run.command,
            "alselect_version": run.alselect_version,
        },
        "model": {
            "name": run.model,
            "key": run.model_key,
            "checkpoint_sha256": run.checkpoint_sha256,
            "checkpoint": run.checkpoint_path,
            "classes": None if run.classes is None else list(run.classes),
        },
    }


def write_sidecar(path: Path, **fields: Any) -> None:
    """``<output>.run.json``, written atomically."""
    with atomic_output(path) as handle:
        handle.write(json_text(sidecar_record(**fields), indent=2) + "\n")
