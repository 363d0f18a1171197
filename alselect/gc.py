"""``alselect gc``: drop arrays no run needs any more, compact the rest, report the bytes freed.

Every retrained checkpoint adds a full set of arrays. ``collect`` keeps the models the latest K runs
used (every role: task model, ensemble members, embedding model, MC-dropout samples) and models
added since the oldest of those runs (embedded, not scored yet); it drops the arrays of every other
model and of models named explicitly. Kept models whose segments hold rows no content points to any
more (a content re-embedded after a retry) or that are split over many small files are rewritten
compactly. Optionally the arrays of contents present in no folder and not labeled are dropped too.

Crash safety, like every other write: new segment files are written and fsynced before one
transaction switches the metadata to them; old files are deleted only after that commit. Files in
``arrays/`` that no segment row names (left by a killed run) are deleted at the start.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alselect.errors import UsageError
from alselect.limits import MAX_KEEP_RUNS
from alselect.progress import NULL_REPORTER, Reporter
from alselect.store import Store
from alselect.store.arrays import SEGMENT_MAX_BYTES, append_rows
from alselect.store.names import from_db

COPY_CHUNK_ROWS = 65536


@dataclass
class GcResult:
    dropped_models: list[str] = field(default_factory=list)  # display names
    compacted_models: list[str] = field(default_factory=list)
    dropped_rows: int = 0  # (content, model) entries removed
    orphan_files: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return self.bytes_before - self.bytes_after


def store_bytes(store: Store) -> int:
    """Bytes of the database (with its WAL) and every array file."""
    total = 0
    files = [*store.path.glob("arrays/**/*"), *store.path.glob("rankings/*")]
    for path in [store.path / "alselect.db", store.path / "alselect.db-wal", *files]:
        if path.is_file():
            total += path.stat().st_size
    return total


def collect(
    store: Store,
    *,
    keep_runs: int = 3,
    drop: Sequence[str] = (),
    drop_absent: bool = False,
    dry_run: bool = False,
    reporter: Reporter = NULL_REPORTER,
) -> GcResult:
    """Drop unused models' arrays, compact the kept ones; see the module docstring."""
    if not 0 <= keep_runs <= MAX_KEEP_RUNS:
        raise UsageError(f"--keep-runs must be between 0 and {MAX_KEEP_RUNS:,}, got {keep_runs}")
    result = GcResult(dry_run=dry_run, bytes_before=store_bytes(store))
    models = store.model_names()
    named = resolve_models(store, drop)
    keep = used_models(store, keep_runs) - named
    doomed = [
        key
        for key in models
        if key not in keep and store.scalar("SELECT slots FROM models WHERE key = ?", (key,))
    ]
    result.dropped_models = sorted(models[k] for k in doomed)
    if dry_run:
        result.dropped_rows = sum(count_outputs(store, k) for k in doomed)
        result.bytes_after = result.bytes_before - sum(segment_bytes(store, k) for k in doomed)
        return result
    store.merge_outputs()  # every registered row in ``outputs``, where dropping and compacting look
    result.orphan_files = remove_orphan_files(store)
    for key in doomed:
        result.dropped_rows += drop_model_arrays(store, key)
        reporter.info(f"dropped the arrays of model {models[key]}")
    if drop_absent:
        result.dropped_rows += drop_absent_outputs(store)
    for key in sorted(keep & set(models)):
        if compact_model(store, key, reporter):
            result.compacted_models.append(models[key])
    if result.dropped_rows or result.compacted_models or result.orphan_files:
        store.conn.execute("VACUUM")
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the vacuumed pages sit in the WAL until then
    result.bytes_after = store_bytes(store)
    return result


def resolve_models(store: Store, names: Sequence[str]) -> set[str]:
    """Model keys for names as ``status`` shows them (``<sha12>``, ``<sha12>+pp<key6>``,
    ``<sha12>+bf16+mc20``...), checkpoint paths, or key prefixes; an unknown or ambiguous name is a
    usage error."""
    rows = store.rows("SELECT key, checkpoint_sha256, path FROM models")
    shown = store.model_names()
    found: set[str] = set()
    for name in names:
        exact = {
            key
            for key, _ckpt, path in rows
            if name in (shown[key], from_db(path)) or os.path.abspath(name) == from_db(path)
        }
        hits = exact or {key for key, _, _ in rows if len(name) >= 6 and key.startswith(name)}
        if not hits:
            raise UsageError(f"no model {name!r} in the store ('alselect status' lists them)")
        if len(hits) > 1 and not exact:
            raise UsageError(f"model name {name!r} is ambiguous: give more of the key")
        found |= hits
    return found


def used_models(store: Store, keep_runs: int) -> set[str]:
    """Keys the latest ``keep_runs`` runs used, and models added after the oldest of those runs."""
    runs = store.rows("SELECT model_key, models, created_at FROM runs ORDER BY id DESC LIMIT ?", (keep_runs,))
    used: set[str] = set()
    for model_key, models, _ in runs:
        used.add(model_key)
        used.update(m["key"] for m in json.loads(models or "[]"))
    since = runs[-1][2] if len(runs) == keep_runs and runs else None
    newer = store.rows("SELECT key FROM models WHERE added_at > ?", (since,)) if since else []
    if not runs or len(runs) < keep_runs:  # fewer runs than asked: nothing is old enough to drop
        newer = store.rows("SELECT key FROM models")
    return used | {row[0] for row in newer}


def count_outputs(store: Store, key: str) -> int:
    """Contents the model has outputs for (rows a killed writer left unmerged included: a dry run
    on a read-only store sees them there)."""
    return store.output_count(key)


def segment_bytes(store: Store, key: str) -> int:
    total = 0
    for (file,) in store.rows("SELECT file FROM array_segments WHERE model_key = ?", (key,)):
        path = store.path / file
        total += path.stat().st_size if path.exists() else 0
    return total


def drop_model_arrays(store: Store, key: str) -> int:
    """Forget every array of the model (one transaction), then delete its files."""
    store.merge_outputs()  # every row in ``outputs``, where this looks (a no-op when merged)
    files = [row[0] for row in store.rows("SELECT file FROM array_segments WHERE model_key = ?", (key,))]
    with store.transaction() as conn:
        model_id = conn.execute("SELECT id FROM models WHERE key = ?", (key,)).fetchone()[0]
        dropped = conn.execute("DELETE FROM outputs WHERE model = ?", (model_id,)).rowcount
        conn.execute("DELETE FROM output_failures WHERE model = ?", (model_id,))
        conn.execute("DELETE FROM array_segments WHERE model_key = ?", (key,))
        conn.execute("UPDATE models SET slots = 0, outputs = NULL WHERE key = ?", (key,))
    unlink_all(store.path, files)
    return int(dropped)


def drop_absent_outputs(store: Store) -> int:
    """Forget outputs of contents present in no folder and not labeled (their rows get compacted)."""
    store.merge_outputs()  # every row in ``outputs``, where this looks (a no-op when merged)
    with store.transaction() as conn:
        return int(
            conn.execute(
                """DELETE FROM outputs WHERE NOT EXISTS
                     (SELECT 1 FROM images i WHERE i.sha256 = outputs.sha256 AND i.status = 'present')
                     AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sha256 = outputs.sha256)"""
            ).rowcount
        )


def compact_model(store: Store, key: str, reporter: Reporter = NULL_REPORTER) -> bool:
    """Rewrite the model's arrays with only referenced rows, in as few segments as fit; True if done."""
    store.merge_outputs()  # every row in ``outputs``, where this looks (a no-op when merged)
    model_id = store.scalar("SELECT id FROM models WHERE key = ?", (key,))
    segments = store.rows(
        "SELECT id, name, file, dtype, shape, rows FROM array_segments WHERE model_key = ? ORDER BY id",
        (key,),
    )
    if not segments:
        return False
    refs = store.rows("SELECT sha256, slot FROM outputs WHERE model = ? ORDER BY slot", (model_id,))
    if not refs:
        drop_model_arrays(store, key)
        return True
    layout = {seg[1]: (seg[3], json.loads(seg[4])) for seg in segments}
    stored = max(sum(seg[5] for seg in segments if seg[1] == name) for name in layout)
    files = {name: sum(1 for seg in segments if seg[1] == name and seg[5] > 0) for name in layout}
    if stored == len(refs) and all(files[n] <= files_needed(*layout[n], len(refs)) for n in layout):
        return False
    old_slots = np.array([slot for _, slot in refs], dtype=np.int64)
    next_id = int(store.scalar("SELECT COALESCE(MAX(id), 0) FROM array_segments")) + 1
    created = []
    for name, (dtype, shape) in sorted(layout.items()):
        per_file = rows_per_file(dtype, shape)
        for first in range(0, len(old_slots), per_file):
            chunk = old_slots[first : first + per_file]
            file = f"arrays/{key[:16]}/{name}-{next_id:06d}.{dtype}"
            (store.path / file).parent.mkdir(parents=True, exist_ok=True)
            for start in range(0, len(chunk), COPY_CHUNK_ROWS):
                rows = store.read_outputs(key, name, chunk[start : start + COPY_CHUNK_ROWS])
                append_rows(store.path / file, start, rows.reshape(len(rows), -1))
            last = first + per_file >= len(old_slots)
            created.append(
                (next_id, key, name, file, dtype, json.dumps(shape), first, len(chunk), int(not last))
            )
            next_id += 1
    store._fault("gc-before-commit")
    with store.transaction() as conn:
        conn.execute("DELETE FROM array_segments WHERE model_key = ?", (key,))
        conn.executemany(
            "INSERT INTO array_segments (id, model_key, name, file, dtype, shape, first_slot, rows, sealed) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            created,
        )
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS gc_slots (sha256 TEXT PRIMARY KEY, slot INTEGER)")
        conn.execute("DELETE FROM gc_slots")
        conn.executemany("INSERT INTO gc_slots VALUES (?, ?)", [(sha, i) for i, (sha, _) in enumerate(refs)])
        conn.execute(
            "UPDATE outputs SET slot = (SELECT g.slot FROM gc_slots g WHERE g.sha256 = outputs.sha256) "
            "WHERE model = ?",
            (model_id,),
        )
        conn.execute("DELETE FROM gc_slots")
        conn.execute("UPDATE models SET slots = ? WHERE key = ?", (len(refs), key))
    unlink_all(store.path, [seg[2] for seg in segments])
    reporter.info(f"compacted model {key[:12]}: {stored} rows -> {len(refs)}")
    return True


def rows_per_file(dtype: str, shape: Sequence[int]) -> int:
    row_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return max(1, SEGMENT_MAX_BYTES // max(1, row_bytes))


def files_needed(dtype: str, shape: Sequence[int], rows: int) -> int:
    return max(1, -(-rows // rows_per_file(dtype, shape)))


def remove_orphan_files(store: Store) -> int:
    """Delete files under ``arrays/`` and ``rankings/`` that no row names (a killed run's leftovers)."""
    known = {Path(row[0]) for row in store.rows("SELECT file FROM array_segments")}
    known |= {Path(row[0]) for row in store.rows("SELECT ranking FROM runs WHERE ranking IS NOT NULL")}
    removed = 0
    for folder in ("arrays", "rankings"):
        root = store.path / folder
        for path in sorted(root.glob("**/*")) if root.exists() else []:
            if path.is_file() and path.relative_to(store.path) not in known:
                path.unlink()
                removed += 1
    return removed


def unlink_all(base: Path, files: Sequence[str]) -> None:
    for file in files:
        with contextlib.suppress(FileNotFoundError):
            (base / file).unlink()
