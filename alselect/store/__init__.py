"""The store: SQLite metadata (WAL) plus array segment files, guarded by a writer lock."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from alselect.errors import StoreError
from alselect.store import migrations
from alselect.store.arrays import append_rows, empty_rows, read_rows, rows_fit
from alselect.store.connect import READ_WAL, WRITE, can_write, open_connection, open_mode, read_only_error
from alselect.store.keys import (
    content_keys,
    first_occurrences,
    full_order,
    hex_words,
    key_bytes,
    key_hex,
    last_occurrences,
    lookup,
    member,
    record_keys,
)
from alselect.store.lock import WriterLock
from alselect.store.names import from_db, to_db
from alselect.store.rankings import Ranking, read_ranking, write_ranking

DB_FILE = "alselect.db"
LOCK_FILE = "lock"
KEEP_RUN_RANKINGS = 3  # runs whose per-image ranking is kept; older runs keep their metadata
# Every change of an image row's content or status stamps it with the latest run's id (migration m007).
CHANGED_NOW = "changed = (SELECT COALESCE(MAX(id), 0) FROM runs)"
EXPORT_CHUNK = 500  # ranked images looked up per query while exporting (bound parameters stay < 999)
# Write-ahead log pages a writer lets build up before copying them into the database (SQLite's
# default is 1,000). A batch of outputs rows touched about one B-tree page per content, so with the
# default nearly every batch paid a checkpoint of its own. A killed process loses nothing committed
# either way; after a power loss (synchronous = NORMAL) the commits since the last checkpoint can
# be undone, up to 64 MiB of log instead of 4 MiB: the store stays consistent (the arrays are
# fsynced before their rows commit) and the next run embeds those images again.
WAL_CHECKPOINT_PAGES = 16384
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the log file is cut back to after a checkpoint
# Registered outputs rows a model lets build up in ``outputs_log`` before they are merged into
# ``outputs`` (migration m008): one merge rewrites each B-tree page once for this many rows.
OUTPUTS_LOG_ROWS = 1 << 18
APPEND_THREADS = 4  # array files of one batch appended and fsynced at once
# SQL: contents the model ``m`` (an alias of ``models``) has outputs for, unmerged log rows included.
MODEL_OUTPUT_COUNT = (
    "((SELECT COUNT(*) FROM outputs o WHERE o.model = m.id) + (SELECT COUNT(DISTINCT l.sha256) "
    "FROM outputs_log l WHERE l.model = m.id AND NOT EXISTS "
    "(SELECT 1 FROM outputs o WHERE o.model = l.model AND o.sha256 = l.sha256)))"
)


def default_store_path() -> Path:
    """``ALSELECT_STORE`` or ``.alselect`` in the working directory."""
    return Path(os.environ.get("ALSELECT_STORE") or ".alselect")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


COPY_REMOVED = "copy removed"  # ``images.reason`` of an absent path that was a duplicate copy


def model_display_name(checkpoint_sha256: str, key: str, settings: Mapping[str, Any] | None = None) -> str:
    """What a model is, in a few characters: ``<sha12>`` of the checkpoint, ``+pp<key6>`` when its
    preprocessing (or a detector's box count) was overridden, ``+bf16`` / ``+fp16`` for outputs made
    in that precision, ``+e16`` for embeddings stored as float16, ``+mc<T>`` for T stored MC-dropout
    samples; e.g. ``50ed1dd89398+bf16+mc20``.

    ``settings`` is the model record's ``preprocess``: its ``base_key`` (the key of the fp32, single
    pass model a derived one comes from), ``precision`` and ``mc_samples`` say how it was derived.
    """
    settings = settings or {}
    base = str(settings.get("base_key") or key)
    short = checkpoint_sha256[:12]
    name = short if base == checkpoint_sha256 else f"{short}+pp{base[:6]}"
    if settings.get("precision") in ("bf16", "fp16"):
        name += f"+{settings['precision']}"
    if settings.get("embedding_dtype") == "float16":
        name += "+e16"
    if settings.get("mc_samples"):
        name += f"+mc{int(settings['mc_samples'])}"
    return name


class ImageRecord(NamedTuple):
    """One stored image file (a named tuple: a million of them load in a fraction of a second)."""

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


@dataclass
class PoolRows:
    """The images a run ranks, one row per content, aligned on axis 0 (path order).

    ``image_ids`` and ``keys`` (``[N, 4]`` content keys, ``alselect.store.keys``) identify each row;
    ``slots[model_key]`` locates it in that model's stored arrays; ``labeled``/``exported`` are
    ``[N]`` bool masks. ``roots``/``relpaths``/``sha256`` are read on first use: selection needs
    none of them, and a million paths cost seconds.
    """

    image_ids: np.ndarray
    slots: dict[str, np.ndarray]
    labeled: np.ndarray
    exported: np.ndarray
    keys: np.ndarray
    paths: Callable[[], tuple[list[str], list[str]]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    @cached_property
    def _paths(self) -> tuple[list[str], list[str]]:
        return self.paths()

    @property
    def roots(self) -> list[str]:
        return self._paths[0]

    @property
    def relpaths(self) -> list[str]:
        return self._paths[1]

    @cached_property
    def sha256(self) -> list[str]:
        return [key_hex(raw) for raw in key_bytes(self.keys).tolist()]


STORABLE_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8"})


def storable(name: str, array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` as stored: C-contiguous, ``rows`` long, bool as uint8, a supported dtype."""
    data = np.asarray(array)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.ndim == 0 or data.shape[0] != rows:
        raise ValueError(f"array {name!r} has shape {data.shape} for {rows} images")
    if data.dtype.name not in STORABLE_DTYPES:
        raise ValueError(f"array {name!r} has dtype {data.dtype}, not one the store keeps")
    return np.ascontiguousarray(data)


def describe_layout(layout: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {spec['dtype']}{spec['shape']}" for name, spec in sorted(layout.items()))


def _upgrade_briefly(path: Path, conn: sqlite3.Connection) -> None:
    """A reader found pending migrations (alselect was upgraded): apply them under the lock."""
    with WriterLock(path / LOCK_FILE, timeout=10.0):
        migrations.apply(conn)


class Store:
    """Open with ``Store.open``; writing methods require ``write=True`` (holds the lock)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock: WriterLock | None) -> None:
        self.path = path
        self.conn = conn
        self.lock = lock
        self.read_only = False  # opened by a reader who cannot write (see alselect.store.connect)
        self.closed = False
        self._fault_counts: dict[str, int] = {}
        self._appenders: ThreadPoolExecutor | None = None  # started by the first add_outputs

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
                conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
                conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
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
        if lock is not None:
            try:
                store.merge_outputs()  # rows a killed writer registered but did not merge
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.lock is not None and not self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # left in the log, merged by the next writer
                    self.merge_outputs()
        finally:
            self.closed = True
            if self._appenders is not None:
                self._appenders.shutdown(wait=True)
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

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Statements in the block read one state of the database (a read transaction): a reader
        that looks at ``outputs`` and then ``outputs_log`` sees a concurrent writer's merge whole or
        not at all, never the rows in neither table. Inside a transaction already: that one."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")  # reads only: ends the snapshot

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
        make = ImageRecord._make
        records = {}
        for row in rows:  # one tuple per row; names other than plain text (rare) are converted
            record = make(row)
            if "\x00" in record.relpath:
                record = record._replace(relpath=from_db(record.relpath))
            records[record.relpath] = record
        return records

    def upsert_images(self, root: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert or update ``(relpath, sha256, size, mtime_ns, status, reason[, link])`` rows."""
        now = utcnow()
        with self.transaction() as conn:
            changed = self._change_mark(conn)
            conn.executemany(
                """INSERT INTO images (root, relpath, sha256, size, mtime_ns, status, reason, link,
                                       first_seen, last_seen, changed)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (root, relpath) DO UPDATE SET sha256 = excluded.sha256,
                     size = excluded.size, mtime_ns = excluded.mtime_ns, status = excluded.status,
                     reason = excluded.reason, link = excluded.link, last_seen = excluded.last_seen,
                     changed = excluded.changed""",
                [
                    (to_db(root), to_db(row[0]), *row[1:6], int(len(row) > 6 and row[6]), now, now, changed)
                    for row in rows
                ],
            )

    @staticmethod
    def _change_mark(conn: sqlite3.Connection) -> int:
        """The ``images.changed`` value of a row changed now: the latest run's id (0 before any)."""
        return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM runs").fetchone()[0])

    def mark_absent(self, root: str, relpaths: Iterable[str], copies: Iterable[str] = ()) -> int:
        """Mark paths gone; those in ``copies`` were duplicate copies of content still in the folder
        under a path seen before (reason ``COPY_REMOVED``: ``status`` tells them from moved files)."""
        removed = set(copies)
        items = [(COPY_REMOVED if p in removed else None, to_db(root), to_db(p)) for p in relpaths]
        with self.transaction() as conn:
            conn.executemany(
                f"UPDATE images SET status = 'absent', reason = ?, {CHANGED_NOW} "
                "WHERE root = ? AND relpath = ?",
                items,
            )
        return len(items)

    def mark_failed(self, root: str, failures: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Record ``(sha256, reason)`` decode failures for every path holding that content.

        Returns ``(relpath, reason)`` of every file marked failed: a copy of a broken file is a
        failed file too, and counts as one (``alselect.status``)."""
        root_db = to_db(root)
        marked: list[tuple[str, str]] = []
        with self.transaction() as conn:
            for sha, reason in failures:
                marked.extend(
                    (from_db(rel), reason)
                    for (rel,) in conn.execute(
                        "SELECT relpath FROM images WHERE root = ? AND sha256 = ? AND status = 'present'",
                        (root_db, sha),
                    )
                )
            conn.executemany(
                f"UPDATE images SET status = 'failed', reason = ?, {CHANGED_NOW} "
                "WHERE root = ? AND sha256 = ? AND status = 'present'",
                [(reason, root_db, sha) for sha, reason in failures],
            )
        return marked

    # -- models ---------------------------------------------------------------------------------

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
                """INSERT INTO models (key, id, checkpoint_sha256, path, kind, arch, num_classes, classes,
                                       preprocess, added_at)
                   VALUES (?, (SELECT COALESCE(MAX(id), 0) + 1 FROM models), ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (key) DO UPDATE SET path = excluded.path, preprocess = excluded.preprocess""",
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

    def model_names(self) -> dict[str, str]:
        """Every model's ``model_display_name`` by key, in the order they were added."""
        return {
            key: model_display_name(ckpt, key, json.loads(settings) if settings else None)
            for key, ckpt, settings in self.rows(
                "SELECT key, checkpoint_sha256, preprocess FROM models ORDER BY added_at, id"
            )
        }

    def model(self, key: str) -> dict[str, Any] | None:
        """The model's record: key, id, checkpoint, path, kind, arch, classes, preprocess, outputs."""
        names = (
            "key",
            "id",
            "checkpoint_sha256",
            "path",
            "kind",
            "arch",
            "num_classes",
            "dim",
            "classes",
            "preprocess",
            "slots",
            "outputs",
        )
        row = self.conn.execute(f"SELECT {', '.join(names)} FROM models WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        info = dict(zip(names, row, strict=True))
        info["path"] = from_db(info["path"])
        info["classes"] = json.loads(info["classes"]) if info["classes"] else None
        info["preprocess"] = json.loads(info["preprocess"])
        info["outputs"] = json.loads(info["outputs"]) if info["outputs"] else None
        return info

    def _model_row(self, key: str) -> tuple[int, int, dict[str, Any] | None]:
        row = self.conn.execute("SELECT id, slots, outputs FROM models WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"model {key[:12]} is not registered in the store")
        return int(row[0]), int(row[1]), json.loads(row[2]) if row[2] else None

    # -- per-image outputs: named arrays per (content, model) -----------------------------------

    def missing_outputs(self, root: str, model_key: str, retry_failed: bool = False) -> list[tuple[str, str]]:
        """``(sha256, relpath)`` of present images under ``root`` the model has no outputs for.

        One entry per content (its first path), in path order. Contents whose model output failed
        before (e.g. not finite) are left out unless ``retry_failed``.
        """
        model_id = self._model_row(model_key)[0]
        if self.lock is not None:
            self.merge_outputs()
        failed = (
            ""
            if retry_failed
            else "AND NOT EXISTS (SELECT 1 FROM output_failures f WHERE f.model = ?1 AND f.sha256 = i.sha256)"
        )
        with self.snapshot():
            rows = self.rows(
                f"""SELECT i.sha256, MIN(i.relpath) FROM images i
                    WHERE i.root = ?2 AND i.status = 'present' AND i.sha256 IS NOT NULL
                      AND NOT EXISTS (SELECT 1 FROM outputs o WHERE o.model = ?1 AND o.sha256 = i.sha256)
                      {failed}
                    GROUP BY i.sha256 ORDER BY MIN(i.relpath)""",
                (model_id, to_db(root)),
            )
            # A reader leaves out rows a writer has not merged yet. The log is keyed by slot, so
            # it is read once (a NOT EXISTS per image would read all of it per image).
            logged = {r[0] for r in self.rows("SELECT sha256 FROM outputs_log WHERE model = ?", (model_id,))}
        return [(sha, from_db(rel)) for sha, rel in rows if sha not in logged]

    def add_outputs(self, model_key: str, sha256: Sequence[str], arrays: Mapping[str, np.ndarray]) -> None:
        """Persist one batch of per-image arrays (``name -> [n, *shape]``) for ``sha256`` (n contents).

        Each array is appended to its own segment file and fsynced; then every row is registered
        in one transaction (a killed writer loses at most this batch). A model always stores the
        same names, dtypes and shapes; ``probs`` and ``embedding`` widths are recorded as its class
        count and embedding size. A success clears an earlier recorded failure of that content.
        """
        n = len(sha256)
        if n == 0:
            return
        model_id, slot, known = self._model_row(model_key)
        data = {name: storable(name, array, n) for name, array in sorted(arrays.items())}
        layout = {name: {"dtype": a.dtype.name, "shape": list(a.shape[1:])} for name, a in data.items()}
        if known is None:
            self._set_layout(model_key, layout, data)
        elif known != layout:
            raise StoreError(
                f"model {model_key[:12]} stores {describe_layout(known)}, but this batch has "
                f"{describe_layout(layout)}"
            )
        placed = [self._segment_for(model_key, name, array, slot) for name, array in data.items()]
        appends = [
            (self.path / file, committed, array.reshape(n, -1))
            for (_, file, committed), array in zip(placed, data.values(), strict=True)
        ]
        rows = [(model_id, slot + i, sha) for i, sha in enumerate(sha256)]  # slot order: appends
        # The arrays are appended and fsynced (one thread per file, so the fsyncs overlap) while the
        # rows are inserted; the transaction commits only once every file is durable, so a crash
        # anywhere before the commit leaves at most an uncommitted tail, as before. The threads live
        # as long as the store: starting two per batch cost ~1 ms, a tenth of a 1,024-row batch.
        if self._appenders is None:
            self._appenders = ThreadPoolExecutor(APPEND_THREADS, thread_name_prefix="alselect-append")
        written = [self._appenders.submit(append_rows, *job) for job in appends]
        try:
            with self.transaction() as conn:
                conn.executemany("INSERT INTO outputs_log (model, slot, sha256) VALUES (?, ?, ?)", rows)
                conn.executemany(
                    "UPDATE array_segments SET rows = rows + ? WHERE id = ?",
                    [(n, seg) for seg, _, _ in placed],
                )
                conn.execute("UPDATE models SET slots = ? WHERE id = ?", (slot + n, model_id))
                if conn.execute(
                    "SELECT 1 FROM output_failures WHERE model = ? LIMIT 1", (model_id,)
                ).fetchone():
                    conn.executemany(
                        "DELETE FROM output_failures WHERE model = ? AND sha256 = ?",
                        [(r[0], r[2]) for r in rows],
                    )
                for done in written:
                    done.result()  # an append that failed rolls the transaction back
                self._fault("after-append")
        finally:
            wait(written)  # no append of this batch may still be writing when the next one starts
        self._fault("after-commit")
        oldest = self.scalar("SELECT MIN(slot) FROM outputs_log WHERE model = ?", (model_id,))
        if oldest is not None and slot + n - oldest >= OUTPUTS_LOG_ROWS:
            self.merge_outputs()

    def output_count(self, model_key: str) -> int:
        """Contents the model has outputs for, rows not yet merged from ``outputs_log`` included.

        The exact SQL (``MODEL_OUTPUT_COUNT``) counts distinct log contents with a sort of their
        64-character hashes: ~1 s for a full log of 262,144 rows, which `status` paid while a
        writer worked. A log holds each content once unless a library caller registered one
        twice between merges, so the log's contents are counted without the sort and checked for
        repeats as numbers (~0.1 s); the exact SQL runs only when there are repeats.
        """
        row = self.conn.execute("SELECT id FROM models WHERE key = ?", (model_key,)).fetchone()
        if row is None:
            return 0
        model_id = int(row[0])
        with self.snapshot():
            merged = int(self.scalar("SELECT COUNT(*) FROM outputs WHERE model = ?", (model_id,)) or 0)
            logged, new = self.rows(
                "SELECT COUNT(*), COALESCE(SUM(NOT EXISTS (SELECT 1 FROM outputs o "
                "WHERE o.model = l.model AND o.sha256 = l.sha256)), 0) FROM outputs_log l WHERE l.model = ?",
                (model_id,),
            )[0]
            if not logged:
                return merged
            (shas,) = self.rows(
                "SELECT group_concat(sha256, '') FROM outputs_log WHERE model = ?", (model_id,)
            )[0]
            # hashes that are not 64 hex digits (a library caller's) cannot be compared as numbers
            if len(shas or "") == 64 * logged:
                with contextlib.suppress(ValueError):
                    if len(first_occurrences(hex_words(shas or "", 4))) == logged:
                        return merged + int(new)
            exact = self.scalar(f"SELECT {MODEL_OUTPUT_COUNT} FROM models m WHERE m.id = ?", (model_id,))
            return int(exact or 0)

    def merge_outputs(self) -> None:
        """Move the rows of ``outputs_log`` into ``outputs`` in one transaction (migration m008).

        In content order, so each B-tree page is rewritten once; a content logged twice keeps its
        latest slot. Writers merge when a model's log reaches ``OUTPUTS_LOG_ROWS``, at the end of
        an embedding pass, when they open (a killed writer's rows) and when they close.
        """
        if self.conn.execute("SELECT 1 FROM outputs_log LIMIT 1").fetchone() is None:
            return
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO outputs (model, sha256, slot) "
                "SELECT model, sha256, slot FROM outputs_log ORDER BY model, sha256, slot"
            )
            conn.execute("DELETE FROM outputs_log")
            self._fault("merge-outputs")

    def add_embeddings(
        self, model_key: str, sha256: Sequence[str], probs: np.ndarray, embeddings: np.ndarray
    ) -> None:
        """``add_outputs`` of a classifier's two arrays: ``probs [n, C]``, ``embedding [n, D]``."""
        self.add_outputs(model_key, sha256, {"probs": probs, "embedding": embeddings})

    def _set_layout(self, model_key: str, layout: dict[str, Any], data: Mapping[str, np.ndarray]) -> None:
        num_classes = data["probs"].shape[1] if "probs" in data and data["probs"].ndim == 2 else None
        dim = data["embedding"].shape[1] if "embedding" in data and data["embedding"].ndim == 2 else None
        row = self.conn.execute("SELECT num_classes FROM models WHERE key = ?", (model_key,)).fetchone()
        declared = row[0] if row else None
        if declared is not None and num_classes is not None and declared != num_classes:
            raise StoreError(f"model outputs {num_classes} classes but the checkpoint declares {declared}")
        with self.transaction() as conn:
            conn.execute(
                "UPDATE models SET outputs = ?, num_classes = COALESCE(num_classes, ?), dim = ? "
                "WHERE key = ?",
                (json.dumps(layout, sort_keys=True), num_classes, dim, model_key),
            )

    def _segment_for(self, model_key: str, name: str, array: np.ndarray, slot: int) -> tuple[int, str, int]:
        """The open segment that continues at ``slot``, or a new one starting there."""
        width = int(np.prod(array.shape[1:], dtype=np.int64))
        row = self.conn.execute(
            "SELECT id, file, first_slot, rows FROM array_segments WHERE model_key = ? AND name = ? "
            "AND sealed = 0 ORDER BY id DESC LIMIT 1",
            (model_key, name),
        ).fetchone()
        if (
            row is not None
            and row[2] + row[3] == slot
            and rows_fit(row[3], width, array.dtype.itemsize, len(array))
        ):
            return int(row[0]), str(row[1]), int(row[3])
        with self.transaction() as conn:
            if row is not None:
                conn.execute("UPDATE array_segments SET sealed = 1 WHERE id = ?", (row[0],))
            seg_id = int(conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM array_segments").fetchone()[0])
            file = f"arrays/{model_key[:16]}/{name}-{seg_id:06d}.{array.dtype.name}"
            conn.execute(
                "INSERT INTO array_segments (id, model_key, name, file, dtype, shape, first_slot) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seg_id, model_key, name, file, array.dtype.name, json.dumps(list(array.shape[1:])), slot),
            )
        (self.path / file).parent.mkdir(parents=True, exist_ok=True)
        return seg_id, file, 0

    def slots_of(self, model_key: str, sha256: Sequence[str]) -> np.ndarray:
        """``int64 [n]``: the model's slot for each content hash, -1 where it stored none."""
        model_id = self._model_row(model_key)[0]
        found: dict[str, int] = {}
        wanted = sorted(set(sha256))
        with self.snapshot():
            for start in range(0, len(wanted), EXPORT_CHUNK):
                part = wanted[start : start + EXPORT_CHUNK]
                marks = ", ".join("?" * len(part))
                found.update(
                    self.rows(
                        f"SELECT sha256, slot FROM outputs WHERE model = ? AND sha256 IN ({marks})",
                        [model_id, *part],
                    )
                )
            # Rows not merged yet (a writer at work, or killed); later slots win. The log is keyed
            # by slot, so a search by content reads all of the model's rows: one read, not one
            # per chunk of wanted contents.
            if len(wanted) <= EXPORT_CHUNK:
                marks = ", ".join("?" * len(wanted))
                logged = self.rows(
                    f"SELECT sha256, slot FROM outputs_log WHERE model = ? AND sha256 IN ({marks}) "
                    "ORDER BY slot",
                    [model_id, *wanted],
                )
            else:
                logged = self.rows(
                    "SELECT sha256, slot FROM outputs_log WHERE model = ? ORDER BY slot", (model_id,)
                )
        found.update(logged)
        return np.array([found.get(sha, -1) for sha in sha256], dtype=np.int64)

    def outputs_of(
        self, model_key: str, names: Sequence[str], sha256: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The model's arrays ``names`` for the given contents (e.g. an export's rows): ``(found [n]
        bool, {name: [found.sum(), *shape]})``, rows in the order of ``sha256``."""
        slots = self.slots_of(model_key, sha256)
        found = slots >= 0
        return found, {name: self.read_outputs(model_key, name, slots[found]) for name in names}

    def read_outputs(self, model_key: str, name: str, slots: np.ndarray) -> np.ndarray:
        """Rows ``slots [n]`` of the model's array ``name``: ``[n, *shape]``, memory-mapped reads."""
        segments = self.rows(
            "SELECT file, dtype, shape, first_slot, rows FROM array_segments "
            "WHERE model_key = ? AND name = ? AND rows > 0 ORDER BY first_slot, id",
            (model_key, name),
        )
        slots = np.asarray(slots, dtype=np.int64)
        if not segments:
            info = self.model(model_key) or {}
            spec = (info.get("outputs") or {}).get(name)
            if len(slots) or (spec is None and info.get("outputs")):
                raise StoreError(f"model {model_key[:12]} has no stored {name!r} rows")
            if spec is None:  # nothing stored yet: an empty pool
                width = info.get("num_classes") if name == "probs" else info.get("dim")
                spec = {"dtype": "float32", "shape": [int(width or 0)]}
            return np.empty((0, *spec["shape"]), dtype=np.dtype(spec["dtype"]))
        shape = tuple(json.loads(segments[0][2]))
        dtype = np.dtype(segments[0][1])
        width = int(np.prod(shape, dtype=np.int64))
        out = empty_rows(len(slots), width, dtype)
        in_order = bool(np.all(slots[1:] > slots[:-1]))  # a pool in slot order reads straight into out
        order = np.arange(len(slots)) if in_order else np.argsort(slots, kind="stable")
        ordered = slots if in_order else slots[order]
        covered = 0
        for file, seg_dtype, seg_shape, first, rows in segments:
            lo, hi = np.searchsorted(ordered, [first, first + rows], side="left")
            if lo == hi:
                continue
            if tuple(json.loads(seg_shape)) != shape:
                raise StoreError(f"array file {file} has shape {seg_shape}, expected {list(shape)}")
            index = ordered[lo:hi] - first
            if in_order and np.dtype(seg_dtype) == dtype:
                read_rows(self.path / file, seg_dtype, width, rows, index, out=out[lo:hi])
            else:  # sorted reads (sequential pages), then back to the caller's order
                out[order[lo:hi]] = read_rows(self.path / file, seg_dtype, width, rows, index)
            covered += int(hi - lo)
        if covered != len(slots):
            raise StoreError(f"model {model_key[:12]}: {len(slots) - covered} {name!r} rows are missing")
        return out.reshape(len(slots), *shape)

    def record_output_failures(self, model_key: str, failures: Sequence[tuple[str, str]]) -> None:
        """Record ``(sha256, reason)``: this model's output for that content failed (e.g. not finite).

        The failure belongs to (content, model): the image stays present, other models still score it.
        """
        model_id = self._model_row(model_key)[0]
        now = utcnow()
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO output_failures (model, sha256, reason, failed_at) "
                "VALUES (?, ?, ?, ?)",
                [(model_id, sha, reason, now) for sha, reason in failures],
            )

    def retry_failures(self, root: str, model_key: str) -> int:
        """Forget recorded decode failures under ``root`` and the model's output failures: try again."""
        model_id = self._model_row(model_key)[0]
        with self.transaction() as conn:
            decode = conn.execute(
                f"UPDATE images SET status = 'present', reason = NULL, {CHANGED_NOW} "
                "WHERE root = ? AND status = 'failed' AND sha256 IS NOT NULL",
                (to_db(root),),
            ).rowcount
            output = conn.execute(
                """DELETE FROM output_failures WHERE model = ? AND sha256 IN
                   (SELECT sha256 FROM images WHERE root = ? AND status = 'present')""",
                (model_id, to_db(root)),
            ).rowcount
        return int(decode + output)

    def output_failure_count(self, root: str, model_key: str) -> int:
        """Contents present under ``root`` whose output failed for the model and were not retried."""
        model_id = self._model_row(model_key)[0]
        return int(
            self.scalar(
                """SELECT COUNT(DISTINCT f.sha256) FROM output_failures f JOIN images i ON i.sha256 = f.sha256
                   WHERE f.model = ? AND i.root = ? AND i.status = 'present'""",
                (model_id, to_db(root)),
            )
            or 0
        )

    # -- pools: the images a run ranks, aligned across models -----------------------------------

    def pool_rows(self, root: str, model_keys: Sequence[str], labeled_roots: Sequence[str] = ()) -> PoolRows:
        """Present images under ``root`` that every model in ``model_keys`` has outputs for.

        One row per content, represented by one of its paths as ``alselect.identity`` says (a real
        path before a symlinked one, then path order); rows in the path order of their
        representatives. Then the images of ``labeled_roots`` not already in the pool, all taken as
        labeled (a labeled set kept in another folder), also one per content. ``slots[key]`` locates
        each row in a model's arrays. Numbers only: SQLite hands over each column as one string
        (``group_concat``), aligned by sorting content hashes as numbers; no per-image Python
        objects (paths are read on demand by ``PoolRows.relpaths``).
        """
        if not model_keys:
            raise ValueError("a pool needs at least one model")
        keys_in_order = list(dict.fromkeys(model_keys))
        model_ids = [self._model_row(key)[0] for key in keys_in_order]
        parts = [root, *(r for r in dict.fromkeys(labeled_roots) if r != root)]
        ids, keys, link, part_of = [], [], [], []
        for number, part in enumerate(parts):
            # path order from the (root, relpath) index; the aggregate reads its subquery in order
            hex_ids, shas, links = self.rows(
                "SELECT group_concat(printf('%016x', id), ''), group_concat(sha256, ''), "
                "group_concat(link, '') FROM (SELECT id, sha256, link FROM images WHERE root = ? "
                "AND status = 'present' AND sha256 IS NOT NULL ORDER BY relpath)",
                (to_db(part),),
            )[0]
            ids.append(hex_words(hex_ids or "", 1).reshape(-1).astype(np.int64))
            keys.append(hex_words(shas or "", 4))
            link.append(np.frombuffer((links or "").encode(), dtype=np.uint8) - ord("0"))
            part_of.append(np.full(len(ids[-1]), number, dtype=np.int64))
        all_ids, all_keys = np.concatenate(ids), np.concatenate(keys)
        # Representative of each content: first by (folder, link, path); rows then in path order.
        preference = np.lexsort((np.arange(len(all_ids)), np.concatenate(link), np.concatenate(part_of)))
        keep = np.sort(preference[first_occurrences(all_keys[preference])])
        slots: dict[str, np.ndarray] = {}
        usable = np.ones(len(keep), dtype=bool)
        for key, model_id in zip(keys_in_order, model_ids, strict=True):
            table, stored = self._output_slots(model_id)
            pos, found = lookup(table, all_keys[keep])
            usable &= found
            slots[key] = stored[pos] if len(stored) else pos
        keep = keep[usable]
        kept = all_keys[keep]
        labels = [r[0] for r in self.rows("SELECT sha256 FROM labels")]
        sent = [r[0] for r in self.rows("SELECT DISTINCT sha256 FROM exported")]
        image_ids = all_ids[keep]
        return PoolRows(
            image_ids=image_ids,
            slots={key: value[usable] for key, value in slots.items()},
            labeled=member(labels, kept) | (np.concatenate(part_of)[keep] > 0),
            exported=member(sent, kept),
            keys=kept,
            paths=lambda: self._paths_of(image_ids),
        )

    def _output_slots(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(keys [n, 4], slots [n])`` of every content the model has outputs for, keys sorted by
        ``full_order``: the ``outputs`` table, with the unmerged ``outputs_log`` rows over it."""
        parts = []
        with self.snapshot():  # both tables as of one moment: a concurrent merge moves rows between them
            for table, sort_by in (("outputs", "sha256"), ("outputs_log", "slot")):
                shas, hex_slots = self.rows(
                    "SELECT group_concat(sha256, ''), group_concat(printf('%016x', slot), '') "
                    f"FROM (SELECT sha256, slot FROM {table} WHERE model = ? ORDER BY {sort_by})",
                    (model_id,),
                )[0]
                stored = hex_words(hex_slots or "", 1).reshape(-1).astype(np.int64)
                parts.append((hex_words(shas or "", 4), stored))
        (keys, slots), (log_keys, log_slots) = parts
        if len(log_keys):  # the latest slot of each content: log rows come after the table's, by slot
            keys, slots = np.concatenate([keys, log_keys]), np.concatenate([slots, log_slots])
            keep = last_occurrences(keys)
            keys, slots = keys[keep], slots[keep]
        order = full_order(keys)
        return keys[order], slots[order]

    def _paths_of(self, image_ids: np.ndarray) -> tuple[list[str], list[str]]:
        """``image_paths``, also after this store was closed (a pool outlives its store)."""
        if not self.closed:
            return self.image_paths(image_ids)
        with Store.open(self.path) as again:
            return again.image_paths(image_ids)

    def image_paths(self, image_ids: np.ndarray) -> tuple[list[str], list[str]]:
        """``(roots, relpaths)`` of image rows ``image_ids``, in that order."""
        found: dict[int, tuple[str, str]] = {}
        wanted = sorted(set(np.asarray(image_ids).tolist()))
        for start in range(0, len(wanted), EXPORT_CHUNK):
            part = wanted[start : start + EXPORT_CHUNK]
            marks = ", ".join("?" * len(part))
            for image_id, root, rel in self.rows(
                f"SELECT id, root, relpath FROM images WHERE id IN ({marks})", part
            ):
                found[image_id] = (from_db(root), from_db(rel))
        pairs = [found[i] for i in np.asarray(image_ids).tolist()]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def pool_array(self, pool: PoolRows, model_key: str, name: str) -> np.ndarray:
        """The model's array ``name`` aligned with the pool's rows: ``[N, *shape]``."""
        return self.read_outputs(model_key, name, pool.slots[model_key])

    def pool(self, root: str, model_key: str, with_embeddings: bool = True) -> PoolArrays:
        """Probabilities (and embeddings) of one model for every present, embedded image under ``root``."""
        rows = self.pool_rows(root, [model_key])
        probs = self.pool_array(rows, model_key, "probs")
        emb = (
            self.pool_array(rows, model_key, "embedding")
            if with_embeddings
            else np.empty((len(rows.relpaths), 0), dtype=np.float32)
        )
        return PoolArrays(
            image_ids=rows.image_ids,
            relpaths=rows.relpaths,
            sha256=rows.sha256,
            probs=probs,
            embeddings=emb,
            labeled=rows.labeled,
            exported=rows.exported,
        )

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
        ranking: Ranking,
        version: str,
        command: str | None,
        models: Sequence[Mapping[str, Any]] = (),
    ) -> int:
        """Store a run and its ranking (a file under ``rankings/``, written before the commit).

        ``models`` names every model the run read, with its role (``{"key", "role"}``: the task
        model, ensemble members, the embedding model). Rankings of all but the latest
        ``KEEP_RUN_RANKINGS`` runs are deleted (56 bytes per image); run metadata is kept forever.
        """
        run_id = int(self.scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM runs"))
        file = f"rankings/run-{run_id:08d}.npy"
        write_ranking(self.path / file, ranking)
        self._fault("after-ranking")
        with self.transaction() as conn:
            conn.execute(
                """INSERT INTO runs (id, created_at, root, model_key, strategy, params, budget, pool_size,
                                     labeled_count, selected, alselect_version, command, models, ranking)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    run_id,
                    utcnow(),
                    to_db(root),
                    model_key,
                    strategy,
                    json.dumps(params, sort_keys=True),
                    budget,
                    pool_size,
                    labeled_count,
                    len(ranking),
                    version,
                    None if command is None else to_db(command),
                    json.dumps([dict(m) for m in models]) if models else None,
                    file,
                ),
            )
            kept = "SELECT id FROM runs ORDER BY id DESC LIMIT ?"
            old = conn.execute(
                f"SELECT ranking FROM runs WHERE ranking IS NOT NULL AND id NOT IN ({kept})",
                (KEEP_RUN_RANKINGS,),
            ).fetchall()
            conn.execute(f"UPDATE runs SET ranking = NULL WHERE id NOT IN ({kept})", (KEEP_RUN_RANKINGS,))
            conn.execute(f"DELETE FROM run_items WHERE run_id NOT IN ({kept})", (KEEP_RUN_RANKINGS,))
        for (stale,) in old:
            with contextlib.suppress(FileNotFoundError):
                (self.path / stale).unlink()
        return run_id

    def ranking_records(self, run_id: int) -> np.ndarray | None:
        """The run's ranking (``RANKING_DTYPE`` records, rank order), or None once it was pruned.

        Runs recorded before ranking files existed are read from their ``run_items`` rows.
        """
        file = self.scalar("SELECT ranking FROM runs WHERE id = ?", (run_id,))
        if file:
            return read_ranking(self.path / file)
        rows = self.rows(
            "SELECT image_id, sha256, score, predicted, confidence FROM run_items "
            "WHERE run_id = ? ORDER BY rank",
            (run_id,),
        )
        if not rows:
            return None
        return Ranking(
            image_ids=np.array([r[0] for r in rows], dtype=np.int64),
            keys=content_keys([r[1] for r in rows]),
            scores=np.array([r[2] for r in rows], dtype=np.float64),
            predicted=np.array([-1 if r[3] is None else r[3] for r in rows], dtype=np.int32),
            confidence=np.array([np.nan if r[4] is None else r[4] for r in rows], dtype=np.float32),
        ).records()

    def latest_run(self) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT id, created_at, root, model_key, strategy, params, budget, pool_size, "
            "labeled_count, selected, models, command, alselect_version FROM runs ORDER BY id DESC LIMIT 1"
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
            "models",
            "command",
            "alselect_version",
        )
        run = dict(zip(names, row, strict=True))
        run["params"] = json.loads(run["params"])
        default = [{"key": run["model_key"], "role": "task"}]
        run["models"] = json.loads(run["models"]) if run["models"] else default
        run["root"] = from_db(run["root"])
        return run

    def exportable_items(self, run_id: int, include_exported: bool) -> Iterator[tuple[Any, ...]]:
        """``(rank, relpath, sha256, score, predicted, confidence)`` of the run in rank order, for images
        still present with the same content, unlabeled and (optionally) not exported before.

        Reads the ranking in chunks, so the top N of a million-image run costs a few queries.
        """
        records = self.ranking_records(run_id)
        if records is None:
            return
        for start in range(0, len(records), EXPORT_CHUNK):
            chunk = records[start : start + EXPORT_CHUNK]
            ids = chunk["image_id"].tolist()
            shas = [key_hex(raw) for raw in chunk["sha256"].tolist()]
            marks = ", ".join("?" * len(ids))
            images = {
                row[0]: (row[1], row[2])
                for row in self.rows(
                    f"SELECT id, relpath, sha256 FROM images WHERE id IN ({marks}) AND status = 'present'",
                    ids,
                )
            }
            wanted = sorted(set(shas))
            hash_marks = ", ".join("?" * len(wanted))
            skip = {
                r[0] for r in self.rows(f"SELECT sha256 FROM labels WHERE sha256 IN ({hash_marks})", wanted)
            }
            if not include_exported:
                skip |= {
                    r[0]
                    for r in self.rows(f"SELECT sha256 FROM exported WHERE sha256 IN ({hash_marks})", wanted)
                }
            scores = chunk["score"].tolist()
            predicted = chunk["predicted"].tolist()
            confidence = chunk["confidence"].tolist()
            for offset, (image_id, sha) in enumerate(zip(ids, shas, strict=True)):
                image = images.get(image_id)
                if image is None or image[1] != sha or sha in skip:
                    continue
                label = predicted[offset]
                conf = confidence[offset]
                yield (
                    start + offset + 1,
                    from_db(image[0]),
                    sha,
                    scores[offset],
                    None if label < 0 else label,
                    None if conf != conf else conf,
                )

    def run_item_states(self, run_id: int) -> dict[str, int]:
        """How a run's ranked images stand now, in disjoint groups: ``gone`` (absent or changed since
        the run), ``labeled``, ``exported`` (sent, not labeled yet), ``open`` (still to send).

        Reads only the image rows changed since the run or not present (``images.changed``), the
        labels and the exports: a million-image ranking costs its file, not a million row reads.
        """
        records = self.ranking_records(run_id)
        if records is None or not len(records):
            return {"ranked": 0, "gone": 0, "labeled": 0, "exported": 0, "open": 0}
        ranked_keys = record_keys(records)
        root = self.scalar("SELECT root FROM runs WHERE id = ?", (run_id,))
        rows = self.rows(
            "SELECT id, sha256, status FROM images WHERE root = ? AND changed >= ? "
            "UNION SELECT id, sha256, status FROM images WHERE root = ? AND status != 'present'",
            (root, run_id, root),
        )
        gone = np.zeros(len(records), dtype=bool)
        if rows:
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            order = np.argsort(ids)
            ids = ids[order]
            where = np.minimum(np.searchsorted(ids, records["image_id"]), len(ids) - 1)
            hit = ids[where] == records["image_id"]
            if hit.any():
                present = np.array([r[2] == "present" and r[1] is not None for r in rows], dtype=bool)[order]
                keys = content_keys([r[1] if r[1] is not None else "0" * 64 for r in rows])[order]
                row = where[hit]
                gone[hit] = ~present[row] | ~(keys[row] == ranked_keys[hit]).all(axis=1)
        labeled = ~gone & member([r[0] for r in self.rows("SELECT sha256 FROM labels")], ranked_keys)
        sent = member([r[0] for r in self.rows("SELECT DISTINCT sha256 FROM exported")], ranked_keys)
        exported = ~gone & ~labeled & sent
        counts = {"ranked": len(records), "gone": int(gone.sum()), "labeled": int(labeled.sum())}
        counts["exported"] = int(exported.sum())
        counts["open"] = counts["ranked"] - counts["gone"] - counts["labeled"] - counts["exported"]
        return counts

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
