"""The store: SQLite metadata (WAL) plus array segment files, guarded by a writer lock."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from alselect.errors import StoreError
from alselect.identity import REPRESENTATIVE_ORDER
from alselect.store import migrations
from alselect.store.arrays import append_rows, read_rows, rows_fit
from alselect.store.connect import READ_WAL, WRITE, can_write, open_connection, open_mode, read_only_error
from alselect.store.lock import WriterLock
from alselect.store.names import from_db, to_db

DB_FILE = "alselect.db"
LOCK_FILE = "lock"
ARRAY_DTYPE = "float32"
KEEP_RUN_RANKINGS = 3  # runs whose per-image ranking is kept; older runs keep their metadata
REPRESENTATIVE_SQL = ", ".join(f"i.{column}" for column in REPRESENTATIVE_ORDER)


def default_store_path() -> Path:
    """``ALSELECT_STORE`` or ``.alselect`` in the working directory."""
    return Path(os.environ.get("ALSELECT_STORE") or ".alselect")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def model_display_name(checkpoint_sha256: str, key: str) -> str:
    """``<sha12>`` of the checkpoint, plus ``+pp<key6>`` when preprocessing was overridden."""
    short = checkpoint_sha256[:12]
    return short if key == checkpoint_sha256 else f"{short}+pp{key[:6]}"


@dataclass(frozen=True)
class ImageRecord:
    id: int
    relpath: str
    sha256: str | None
    size: int
    mtime_ns: int
    status: str
    reason: str | None
    link: bool = False


@dataclass
class PoolArrays:
    """Embedded, present, decodable images of one folder for one model, ordered by path.

    Arrays are aligned: ``probs [N, C]``, ``embeddings [N, D]``, ``labeled [N]``, ``exported [N]``
    (sent in any export). One row per distinct content hash, represented by one of its paths as
    ``alselect.identity`` says (a real path before a symlinked one, then path order).
    """

    image_ids: np.ndarray
    relpaths: list[str]
    sha256: list[str]
    probs: np.ndarray
    embeddings: np.ndarray
    labeled: np.ndarray
    exported: np.ndarray


def _upgrade_briefly(path: Path, conn: sqlite3.Connection) -> None:
    """A reader found pending migrations (alselect was upgraded): apply them under the lock."""
    with WriterLock(path / LOCK_FILE, timeout=10.0):
        migrations.apply(conn)


def _exportable_from(include_exported: bool) -> str:
    """FROM/WHERE of a run's items still present and unlabeled (and, unless asked, unexported)."""
    unexported = (
        "" if include_exported else "AND NOT EXISTS (SELECT 1 FROM exported x WHERE x.sha256 = r.sha256)"
    )
    return f"""FROM run_items r JOIN images i ON i.id = r.image_id
               WHERE r.run_id = ? AND i.status = 'present' AND i.sha256 = r.sha256
                 AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sha256 = r.sha256) {unexported}"""


class Store:
    """Open with ``Store.open``; writing methods require ``write=True`` (holds the lock)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock: WriterLock | None) -> None:
        self.path = path
        self.conn = conn
        self.lock = lock
        self.read_only = False  # opened by a reader who cannot write (see alselect.store.connect)
        self._fault_counts: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path | str | None = None,
        *,
        write: bool = False,
        create: bool = False,
        lock_timeout: float | None = None,
    ) -> Store:
        """Open the store at ``path`` (``create`` makes a missing one); writers take the lock first.

        A reader who cannot write to the store (a shared store, a read-only mount) gets a connection
        that never writes (see ``alselect.store.connect``); a writer who cannot write gets one
        clear ``StoreError`` before anything is touched.
        """
        path = Path(path) if path is not None else default_store_path()
        db_path = path / DB_FILE
        if not (write and create) and not db_path.exists():
            raise StoreError(f"no alselect store at {path} (run 'alselect score' first, or pass --store)")
        lock = None
        if write:
            try:
                (path / "arrays").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create store at {path}: {exc}") from exc
            if not can_write(path, db_path):
                raise read_only_error(path)
            lock = WriterLock(path / LOCK_FILE, timeout=lock_timeout)
            lock.acquire()
        mode = open_mode(path, db_path, write)
        try:
            conn = open_connection(db_path, mode)
            conn.execute("PRAGMA busy_timeout = 30000")
            if write:
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            if write:
                migrations.apply(conn)
            elif migrations.pending(conn):
                if mode != WRITE:
                    raise StoreError(
                        f"store {path} was written by an older alselect and must be upgraded, which "
                        "needs write access: ask its owner to run 'alselect status' once"
                    )
                _upgrade_briefly(path, conn)
        except sqlite3.DatabaseError as exc:
            if lock:
                lock.release()
            if mode == READ_WAL:
                raise StoreError(
                    f"store {path} is being written (its write-ahead log is not empty) and cannot be "
                    f"read without write access ({exc}); try again when the writer has finished"
                ) from exc
            raise StoreError(f"store database {db_path} is unreadable: {exc}") from exc
        except BaseException:
            if lock:
                lock.release()
            raise
        store = cls(path, conn, lock)
        store.read_only = mode != WRITE
        return store

    def close(self) -> None:
        self.conn.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write; rolled back on any exception."""
        if self.lock is None:
            raise StoreError("store opened for reading only")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _fault(self, point: str) -> None:
        """Test hook: ``ALSELECT_FAULT=point:N`` kills the process the Nth time ``point`` is hit."""
        spec = os.environ.get("ALSELECT_FAULT")
        if not spec:
            return
        name, _, nth = spec.partition(":")
        if name != point:
            return
        self._fault_counts[point] = self._fault_counts.get(point, 0) + 1
        if self._fault_counts[point] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)

    # -- images ----------------------------------------------------------------------------

    def images_under(self, root: str) -> dict[str, ImageRecord]:
        rows = self.conn.execute(
            "SELECT id, relpath, sha256, size, mtime_ns, status, reason, link FROM images WHERE root = ?",
            (to_db(root),),
        )
        records = (
            ImageRecord(id_, from_db(rel), sha, size, mtime, status, reason, bool(link))
            for id_, rel, sha, size, mtime, status, reason, link in rows
        )
        return {record.relpath: record for record in records}

    def upsert_images(self, root: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert or update ``(relpath, sha256, size, mtime_ns, status, reason[, link])`` rows."""
        now = utcnow()
        with self.transaction() as conn:
            conn.executemany(
                """INSERT INTO images (root, relpath, sha256, size, mtime_ns, status, reason, link,
                                       first_seen, last_seen)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (root, relpath) DO UPDATE SET sha256 = excluded.sha256,
                     size = excluded.size, mtime_ns = excluded.mtime_ns, status = excluded.status,
                     reason = excluded.reason, link = excluded.link, last_seen = excluded.last_seen""",
                [
                    (to_db(root), to_db(row[0]), *row[1:6], int(len(row) > 6 and row[6]), now, now)
                    for row in rows
                ],
            )

    def mark_absent(self, root: str, relpaths: Iterable[str]) -> int:
        items = [(to_db(root), to_db(p)) for p in relpaths]
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE images SET status = 'absent', reason = NULL WHERE root = ? AND relpath = ?",
                items,
            )
        return len(items)

    def mark_failed(self, root: str, failures: Sequence[tuple[str, str]]) -> None:
        """Record ``(sha256, reason)`` decode failures for every path holding that content."""
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE images SET status = 'failed', reason = ? "
                "WHERE root = ? AND sha256 = ? AND status = 'present'",
                [(reason, to_db(root), sha) for sha, reason in failures],
            )

    # -- models and arrays ------------------------------------------------------------------

    def register_model(
        self,
        key: str,
        checkpoint_sha256: str,
        path: str,
        kind: str,
        arch: str | None,
        num_classes: int | None,
        classes: list[str] | None,
        preprocess: dict[str, Any],
    ) -> None:
        with self.transaction() as conn:
            conn.execute(
                """INSERT INTO models (key, checkpoint_sha256, path, kind, arch, num_classes, classes,
                                       preprocess, added_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (key) DO UPDATE SET path = excluded.path""",
                (
                    key,
                    checkpoint_sha256,
                    to_db(path),
                    kind,
                    arch,
                    num_classes,
                    json.dumps(classes) if classes is not None else None,
                    json.dumps(preprocess, sort_keys=True),
                    utcnow(),
                ),
            )

    def model(self, key: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT key, checkpoint_sha256, path, kind, arch, num_classes, dim, classes, preprocess "
            "FROM models WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        names = (
            "key",
            "checkpoint_sha256",
            "path",
            "kind",
            "arch",
            "num_classes",
            "dim",
            "classes",
            "preprocess",
        )
        info = dict(zip(names, row, strict=True))
        info["path"] = from_db(info["path"])
        info["classes"] = json.loads(info["classes"]) if info["classes"] else None
        info["preprocess"] = json.loads(info["preprocess"])
        return info

    def missing_embeddings(self, root: str, model_key: str) -> list[tuple[str, str]]:
        """``(sha256, relpath)`` of present images under ``root`` not yet embedded by the model."""
        rows = self.conn.execute(
            """SELECT i.sha256, MIN(i.relpath) FROM images i
               WHERE i.root = ? AND i.status = 'present' AND i.sha256 IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM embeddings e
                                 WHERE e.sha256 = i.sha256 AND e.model_key = ?)
               GROUP BY i.sha256 ORDER BY MIN(i.relpath)""",
            (to_db(root), model_key),
        )
        return [(r[0], from_db(r[1])) for r in rows]

    def add_embeddings(
        self, model_key: str, sha256: Sequence[str], probs: np.ndarray, embeddings: np.ndarray
    ) -> None:
        """Persist one batch: arrays appended and fsynced, then registered in one transaction.

        ``probs [n, C]`` and ``embeddings [n, D]`` are stored as float32.
        """
        if len(sha256) == 0:
            return
        probs = np.asarray(probs, dtype=ARRAY_DTYPE)
        embeddings = np.asarray(embeddings, dtype=ARRAY_DTYPE)
        self._check_dims(model_key, probs.shape[1], embeddings.shape[1])
        placed = {}
        for array_name, data in (("probs", probs), ("embedding", embeddings)):
            seg_id, file, rows = self._open_segment(model_key, array_name, data.shape[1], len(data))
            append_rows(self.path / file, rows, data)
            placed[array_name] = (seg_id, rows)
        self._fault("after-append")
        now = utcnow()
        (p_seg, p_start), (e_seg, e_start) = placed["probs"], placed["embedding"]
        with self.transaction() as conn:
            conn.executemany(
                """INSERT OR REPLACE INTO embeddings (sha256, model_key, probs_segment, probs_row,
                       embedding_segment, embedding_row, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [
                    (sha, model_key, p_seg, p_start + i, e_seg, e_start + i, now)
                    for i, sha in enumerate(sha256)
                ],
            )
            conn.execute("UPDATE segments SET rows = rows + ? WHERE id = ?", (len(sha256), p_seg))
            conn.execute("UPDATE segments SET rows = rows + ? WHERE id = ?", (len(sha256), e_seg))
        self._fault("after-commit")

    def _check_dims(self, model_key: str, num_classes: int, dim: int) -> None:
        row = self.conn.execute("SELECT num_classes, dim FROM models WHERE key = ?", (model_key,)).fetchone()
        if row is None:
            raise StoreError(f"model {model_key[:12]} is not registered in the store")
        known_c, known_d = row
        if known_c is not None and known_c != num_classes:
            raise StoreError(f"model outputs {num_classes} classes but the checkpoint declares {known_c}")
        if known_d is not None and known_d != dim:
            raise StoreError(f"model embedding has {dim} dims, earlier batches had {known_d}")
        if known_c is None or known_d is None:
            with self.transaction() as conn:
                conn.execute(
                    "UPDATE models SET num_classes = ?, dim = ? WHERE key = ?",
                    (num_classes, dim, model_key),
                )

    def _open_segment(self, model_key: str, array_name: str, width: int, extra: int) -> tuple[int, str, int]:
        row = self.conn.execute(
            "SELECT id, file, rows FROM segments WHERE model_key = ? AND array = ? AND sealed = 0 "
            "AND width = ? ORDER BY id DESC LIMIT 1",
            (model_key, array_name, width),
        ).fetchone()
        if row is not None and rows_fit(row[2], width, 4, extra):
            return int(row[0]), str(row[1]), int(row[2])
        with self.transaction() as conn:
            if row is not None:
                conn.execute("UPDATE segments SET sealed = 1 WHERE id = ?", (row[0],))
            count = conn.execute(
                "SELECT COUNT(*) FROM segments WHERE model_key = ?", (model_key,)
            ).fetchone()[0]
            file = f"arrays/{model_key[:16]}/{array_name}-{count:06d}.f32"
            cursor = conn.execute(
                "INSERT INTO segments (model_key, array, file, dtype, width) VALUES (?, ?, ?, ?, ?)",
                (model_key, array_name, file, ARRAY_DTYPE, width),
            )
        (self.path / file).parent.mkdir(parents=True, exist_ok=True)
        return int(cursor.lastrowid or 0), file, 0

    def pool(self, root: str, model_key: str, with_embeddings: bool = True) -> PoolArrays:
        """Gather arrays for every present, embedded image under ``root``."""
        rows = self.conn.execute(
            f"""SELECT i.id, i.relpath, i.sha256, e.probs_segment, e.probs_row,
                      e.embedding_segment, e.embedding_row,
                      EXISTS (SELECT 1 FROM labels l WHERE l.sha256 = i.sha256),
                      EXISTS (SELECT 1 FROM exported x WHERE x.sha256 = i.sha256)
               FROM images i JOIN embeddings e ON e.sha256 = i.sha256 AND e.model_key = ?
               WHERE i.root = ? AND i.status = 'present'
               ORDER BY {REPRESENTATIVE_SQL}""",
            (model_key, to_db(root)),
        ).fetchall()
        seen: set[str] = set()
        unique = []
        for row in rows:  # the first path of each content represents it (alselect.identity)
            if row[2] not in seen:
                seen.add(row[2])
                unique.append(row)
        unique.sort(key=lambda row: row[1])  # pool rows in the path order of their representatives
        info = self.model(model_key) or {}
        n = len(unique)
        probs = self._gather([r[3] for r in unique], [r[4] for r in unique], info.get("num_classes") or 0)
        emb = (
            self._gather([r[5] for r in unique], [r[6] for r in unique], info.get("dim") or 0)
            if with_embeddings
            else np.empty((n, 0), dtype=ARRAY_DTYPE)
        )
        return PoolArrays(
            image_ids=np.array([r[0] for r in unique], dtype=np.int64),
            relpaths=[from_db(r[1]) for r in unique],
            sha256=[r[2] for r in unique],
            probs=probs,
            embeddings=emb,
            labeled=np.array([bool(r[7]) for r in unique], dtype=bool),
            exported=np.array([bool(r[8]) for r in unique], dtype=bool),
        )

    def _gather(self, segments: list[int], rows: list[int], width: int) -> np.ndarray:
        seg_ids = np.asarray(segments, dtype=np.int64)
        row_ids = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(seg_ids), width), dtype=ARRAY_DTYPE)
        for seg_id in np.unique(seg_ids):
            file, dtype, seg_width, committed = self.conn.execute(
                "SELECT file, dtype, width, rows FROM segments WHERE id = ?", (int(seg_id),)
            ).fetchone()
            mask = seg_ids == seg_id
            if seg_width != width:
                raise StoreError(f"segment {file} has width {seg_width}, expected {width}")
            out[mask] = read_rows(self.path / file, dtype, width, committed, row_ids[mask])
        return out

    # -- runs, labels, exports ----------------------------------------------------------------

    def record_run(
        self,
        *,
        root: str,
        model_key: str,
        strategy: str,
        params: dict[str, Any],
        budget: int | None,
        pool_size: int,
        labeled_count: int,
        items: Sequence[tuple[int, str, str, float, int | None, float | None]],
        version: str,
        command: str | None,
    ) -> int:
        """Store a run and its ranked ``(image_id, relpath, sha256, score, predicted, confidence)``.

        Rankings of all but the latest ``KEEP_RUN_RANKINGS`` runs are deleted (1M images ≈ 130 MB each).
        """
        with self.transaction() as conn:
            cursor = conn.execute(
                """INSERT INTO runs (created_at, root, model_key, strategy, params, budget, pool_size,
                                     labeled_count, selected, alselect_version, command)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    utcnow(),
                    to_db(root),
                    model_key,
                    strategy,
                    json.dumps(params, sort_keys=True),
                    budget,
                    pool_size,
                    labeled_count,
                    len(items),
                    version,
                    None if command is None else to_db(command),
                ),
            )
            run_id = int(cursor.lastrowid or 0)
            conn.executemany(
                """INSERT INTO run_items (run_id, rank, image_id, relpath, sha256, score, predicted,
                                          confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (run_id, rank, image_id, to_db(relpath), *rest)
                    for rank, (image_id, relpath, *rest) in enumerate(items, start=1)
                ],
            )
            # Rankings are large (one row per pool image); keep the last few, run metadata forever.
            conn.execute(
                "DELETE FROM run_items WHERE run_id NOT IN (SELECT id FROM runs ORDER BY id DESC LIMIT ?)",
                (KEEP_RUN_RANKINGS,),
            )
        return run_id

    def latest_run(self) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT id, created_at, root, model_key, strategy, params, budget, pool_size, "
            "labeled_count, selected FROM runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        names = (
            "id",
            "created_at",
            "root",
            "model_key",
            "strategy",
            "params",
            "budget",
            "pool_size",
            "labeled_count",
            "selected",
        )
        run = dict(zip(names, row, strict=True))
        run["params"] = json.loads(run["params"])
        run["root"] = from_db(run["root"])
        return run

    def exportable_items(self, run_id: int, include_exported: bool) -> Iterator[tuple[Any, ...]]:
        """Run items in rank order that are still present, unlabeled and (optionally) unexported."""
        rows = self.conn.execute(
            "SELECT r.rank, i.relpath, r.sha256, r.score, r.predicted, r.confidence "
            + _exportable_from(include_exported)
            + " ORDER BY r.rank",
            (run_id,),
        )
        for rank, relpath, *rest in rows:
            yield (rank, from_db(relpath), *rest)

    def count_exportable(self, run_id: int) -> int:
        """How many of a run's items a plain ``export`` would still write (read-only)."""
        return int(self.scalar("SELECT COUNT(*) " + _exportable_from(False), (run_id,)) or 0)

    def record_export(self, run_id: int, fmt: str, destination: str, items: Sequence[tuple[str, int]]) -> int:
        """Record ``(sha256, rank)`` rows as exported so later exports skip them."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO exports (run_id, format, destination, count, created_at) VALUES (?, ?, ?, ?, ?)",
                (run_id, fmt, to_db(destination), len(items), utcnow()),
            )
            export_id = int(cursor.lastrowid or 0)
            conn.executemany(
                "INSERT OR IGNORE INTO exported (export_id, sha256, rank) VALUES (?, ?, ?)",
                [(export_id, sha, rank) for sha, rank in items],
            )
        return export_id

    def add_labels(
        self, shas: Iterable[str], source: str, classes: Mapping[str, str | None] | None = None
    ) -> int:
        """Mark contents as labeled, with their class label where ``classes`` gives one.

        A known class is never erased by a source without one (a plain path list); a new class
        replaces an older one (the image was re-annotated). Returns how many were newly labeled.
        """
        now = utcnow()
        classes = classes or {}
        wanted = set(shas) | set(classes)
        with self.transaction() as conn:
            before = conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
            conn.executemany(
                """INSERT INTO labels (sha256, source, labeled_at, label) VALUES (?, ?, ?, ?)
                   ON CONFLICT (sha256) DO UPDATE SET
                     label = COALESCE(excluded.label, labels.label),
                     source = CASE WHEN excluded.label IS NOT NULL THEN excluded.source
                                   ELSE labels.source END,
                     labeled_at = CASE WHEN excluded.label IS NOT NULL THEN excluded.labeled_at
                                       ELSE labels.labeled_at END""",
                [(sha, to_db(source), now, classes.get(sha)) for sha in sorted(wanted)],
            )
            after = conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        return int(after - before)

    def label_classes(self) -> dict[str, str]:
        """``sha256 -> class label`` for labeled contents that have one."""
        return dict(self.rows("SELECT sha256, label FROM labels WHERE label IS NOT NULL"))

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()
