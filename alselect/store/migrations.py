"""Ordered schema migrations; each runs once, in its own transaction, recorded by name."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone

from alselect.errors import StoreError

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(func: Migration) -> Migration:
    MIGRATIONS.append((func.__name__, func))
    return func


@migration
def m001_initial(conn: sqlite3.Connection) -> None:
    run_script(
        conn,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            root TEXT NOT NULL,
            relpath TEXT NOT NULL,
            sha256 TEXT,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('present', 'absent', 'failed')),
            reason TEXT,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            UNIQUE (root, relpath)
        );
        CREATE INDEX images_sha256 ON images (sha256);
        CREATE TABLE models (
            key TEXT PRIMARY KEY,
            checkpoint_sha256 TEXT NOT NULL,
            path TEXT NOT NULL,
            kind TEXT NOT NULL,
            arch TEXT,
            num_classes INTEGER,
            dim INTEGER,
            classes TEXT,
            preprocess TEXT NOT NULL,
            added_at TEXT NOT NULL
        );
        CREATE TABLE segments (
            id INTEGER PRIMARY KEY,
            model_key TEXT NOT NULL REFERENCES models (key),
            array TEXT NOT NULL CHECK (array IN ('probs', 'embedding')),
            file TEXT NOT NULL UNIQUE,
            dtype TEXT NOT NULL,
            width INTEGER NOT NULL,
            rows INTEGER NOT NULL DEFAULT 0,
            sealed INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE embeddings (
            sha256 TEXT NOT NULL,
            model_key TEXT NOT NULL REFERENCES models (key),
            probs_segment INTEGER NOT NULL REFERENCES segments (id),
            probs_row INTEGER NOT NULL,
            embedding_segment INTEGER NOT NULL REFERENCES segments (id),
            embedding_row INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (sha256, model_key)
        ) WITHOUT ROWID;
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            created_at TEXT NOT NULL,
            root TEXT NOT NULL,
            model_key TEXT NOT NULL,
            strategy TEXT NOT NULL,
            params TEXT NOT NULL,
            budget INTEGER,
            pool_size INTEGER NOT NULL,
            labeled_count INTEGER NOT NULL,
            selected INTEGER NOT NULL,
            alselect_version TEXT NOT NULL,
            command TEXT
        );
        CREATE TABLE run_items (
            run_id INTEGER NOT NULL REFERENCES runs (id),
            rank INTEGER NOT NULL,
            image_id INTEGER NOT NULL REFERENCES images (id),
            relpath TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            score REAL NOT NULL,
            predicted INTEGER,
            confidence REAL,
            PRIMARY KEY (run_id, rank)
        ) WITHOUT ROWID;
        CREATE TABLE labels (
            sha256 TEXT PRIMARY KEY,
            source TEXT,
            labeled_at TEXT NOT NULL
        );
        CREATE TABLE exports (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs (id),
            format TEXT NOT NULL,
            destination TEXT NOT NULL,
            count INTEGER NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE exported (
            export_id INTEGER NOT NULL REFERENCES exports (id),
            sha256 TEXT NOT NULL,
            rank INTEGER NOT NULL,
            PRIMARY KEY (export_id, sha256)
        ) WITHOUT ROWID;
        CREATE INDEX exported_sha256 ON exported (sha256);
        """,
    )


@migration
def m002_images_relpath_index(conn: sqlite3.Connection) -> None:
    """``label`` looks images up by folder-relative path alone; UNIQUE (root, relpath) cannot serve that."""
    run_script(conn, "CREATE INDEX images_relpath ON images (relpath)")


@migration
def m003_label_classes(conn: sqlite3.Connection) -> None:
    """Labels may carry the annotated class (from a ``path,label`` CSV or a platform's export)."""
    run_script(conn, "ALTER TABLE labels ADD COLUMN label TEXT")


@migration
def m004_named_outputs(conn: sqlite3.Connection) -> None:
    """Any named per-image arrays per (content, model), failures per (content, model), run models.

    Before: exactly ``probs`` and ``embedding`` per (content, model), each with its own segment and
    row. After: a model has a fixed set of named arrays written together, so one ``slot`` per
    (content, model) locates the row in every array (``array_segments.first_slot`` + row). Old
    segments are kept in place; each gets the slot its first row had (rows of a model's arrays
    were always appended in step), and only rows whose two arrays agree on the slot carry over
    (any other would be re-embedded). Images failed for a model's non-finite output become
    present again: that failure belonged to one model, and is now recorded per model.
    """
    run_script(
        conn,
        """
        ALTER TABLE models ADD COLUMN id INTEGER;
        ALTER TABLE models ADD COLUMN slots INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE models ADD COLUMN outputs TEXT;
        UPDATE models SET id = rowid;
        CREATE UNIQUE INDEX models_id ON models (id);
        CREATE TABLE array_segments (
            id INTEGER PRIMARY KEY,
            model_key TEXT NOT NULL REFERENCES models (key),
            name TEXT NOT NULL,
            file TEXT NOT NULL UNIQUE,
            dtype TEXT NOT NULL,
            shape TEXT NOT NULL,
            first_slot INTEGER NOT NULL,
            rows INTEGER NOT NULL DEFAULT 0,
            sealed INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX array_segments_model ON array_segments (model_key, name, first_slot);
        INSERT INTO array_segments (id, model_key, name, file, dtype, shape, first_slot, rows, sealed)
            SELECT s.id, s.model_key, s.array, s.file, s.dtype, json_array(s.width),
                   (SELECT COALESCE(SUM(p.rows), 0) FROM segments p
                    WHERE p.model_key = s.model_key AND p.array = s.array AND p.id < s.id),
                   s.rows, s.sealed
            FROM segments s;
        CREATE TABLE outputs (
            model INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            slot INTEGER NOT NULL,
            PRIMARY KEY (model, sha256)
        ) WITHOUT ROWID;
        INSERT INTO outputs (model, sha256, slot)
            SELECT m.id, e.sha256, ps.first_slot + e.probs_row
            FROM embeddings e
            JOIN models m ON m.key = e.model_key
            JOIN array_segments ps ON ps.id = e.probs_segment
            JOIN array_segments es ON es.id = e.embedding_segment
            WHERE ps.first_slot + e.probs_row = es.first_slot + e.embedding_row;
        UPDATE models SET
            slots = COALESCE((SELECT MAX(first_slot + rows) FROM array_segments a
                              WHERE a.model_key = models.key), 0),
            outputs = CASE WHEN num_classes IS NOT NULL AND dim IS NOT NULL THEN
                json_object('embedding', json_object('dtype', 'float32', 'shape', json_array(dim)),
                            'probs', json_object('dtype', 'float32', 'shape', json_array(num_classes)))
                END;
        UPDATE array_segments SET sealed = 1
            WHERE first_slot + rows < (SELECT slots FROM models m WHERE m.key = array_segments.model_key);
        DROP TABLE embeddings;
        DROP TABLE segments;
        CREATE TABLE output_failures (
            model INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            reason TEXT NOT NULL,
            failed_at TEXT NOT NULL,
            PRIMARY KEY (model, sha256)
        ) WITHOUT ROWID;
        UPDATE images SET status = 'present', reason = NULL
            WHERE status = 'failed' AND reason LIKE 'model output not finite%';
        ALTER TABLE runs ADD COLUMN models TEXT
        """,
    )


@migration
def m005_ranking_files(conn: sqlite3.Connection) -> None:
    """A run's ranking is an array file (``rankings/run-<id>.npy``); older runs keep ``run_items``."""
    run_script(conn, "ALTER TABLE runs ADD COLUMN ranking TEXT")


@migration
def m006_images_link(conn: sqlite3.Connection) -> None:
    """Whether a path reaches its file through a symlink: a real path represents duplicate content."""
    run_script(conn, "ALTER TABLE images ADD COLUMN link INTEGER NOT NULL DEFAULT 0")


@migration
def m007_images_changed(conn: sqlite3.Connection) -> None:
    """Status and run states at a million images without reading every image row.

    ``images.changed`` is the id of the latest run when the row last changed (content, status):
    rows changed after run R have ``changed >= R``, so how a run's images stand now needs only those
    rows and the non-present ones. Existing rows count as changed after every existing run (exact,
    merely slower, for runs recorded before this migration). ``images_root_status_sha`` serves the
    per-folder counts (distinct contents in index order, no temporary B-tree) and the lookups of
    present copies of a content.
    """
    run_script(
        conn,
        """
        ALTER TABLE images ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
        UPDATE images SET changed = (SELECT COALESCE(MAX(id), 0) FROM runs);
        CREATE INDEX images_root_changed ON images (root, changed);
        CREATE INDEX images_root_status_sha ON images (root, status, sha256)
        """,
    )


@migration
def m008_outputs_log(conn: sqlite3.Connection) -> None:
    """Newly registered outputs go to ``outputs_log`` first, in slot order, and are merged into
    ``outputs`` in large sorted steps (``Store.merge_outputs``).

    ``outputs`` is keyed by content hash, so a batch of a thousand new contents touched about a
    thousand B-tree pages, each rewritten at every batch's commit: registering was bound by SQLite,
    not by the disk. Appending to a log keyed by slot touches a few pages per batch, and one merge
    of many rows rewrites each page once. A content's slot is its latest: the log's (slots only
    grow) over the table's.
    """
    run_script(
        conn,
        """
        CREATE TABLE outputs_log (
            model INTEGER NOT NULL,
            slot INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            PRIMARY KEY (model, slot)
        ) WITHOUT ROWID
        """,
    )


def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Execute ``;``-separated DDL inside the caller's transaction (``executescript`` commits)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def pending(conn: sqlite3.Connection) -> list[tuple[str, Migration]]:
    """Migrations not yet applied; refuses a store written by a newer alselect. Writes nothing."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'")
    applied = {row[0] for row in conn.execute("SELECT name FROM migrations")} if exists.fetchone() else set()
    known = {name for name, _ in MIGRATIONS}
    unknown = applied - known
    if unknown:
        raise StoreError(
            f"store was written by a newer alselect (migrations {sorted(unknown)}); upgrade alselect"
        )
    return [(name, func) for name, func in MIGRATIONS if name not in applied]


def apply(conn: sqlite3.Connection) -> list[str]:
    """Apply pending migrations, each atomically with its record (autocommit connection)."""
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = []
    for name, func in pending(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            func(conn)
            conn.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                (name, datetime.now(timezone.utc).isoformat(timespec="seconds")),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        done.append(name)
    return done
