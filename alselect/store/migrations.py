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
def m004_images_link(conn: sqlite3.Connection) -> None:
    """Whether a path reaches its file through a symlink: a real path represents duplicate content."""
    run_script(conn, "ALTER TABLE images ADD COLUMN link INTEGER NOT NULL DEFAULT 0")


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
