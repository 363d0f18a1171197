"""Open the store's SQLite database: for writing, or for reading by a user who cannot write to it.

A team often shares one store that only its owner (the cron job) writes; others run ``status`` or
``export --dry-run``. SQLite in WAL mode normally needs a reader to create or write the ``-shm``
index beside the database, which such a user cannot do. So when the store is not writable:

- if a write-ahead log with content exists (a writer is running, or died before checkpointing),
  the database is opened ``mode=ro``: SQLite reads the log through the existing ``-shm`` file,
  which it can map read-only (SQLite 3.22+);
- otherwise every commit is in the database file itself, and it is opened ``immutable=1``: no
  ``-shm``, no locks, nothing written. A writer that starts meanwhile only appends to its log, so
  the reader keeps a consistent snapshot (a checkpoint, the one in-place write, needs 16,384
  pages, 64 MiB, of log first: ``WAL_CHECKPOINT_PAGES``; or the writer's close).

This module imports neither numpy nor anything else heavy, so it can be checked on its own.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from alselect.errors import StoreError

WRITE, READ_WAL, READ_IMMUTABLE = "write", "read-only", "immutable"


def can_write(store: Path, db_path: Path) -> bool:
    """Whether this process may create files in ``store`` and write the database and its companions.

    ``os.access`` answers for the real user and also says no on a read-only file system (EROFS)
    and for immutable files, where permission bits alone would say yes (e.g. for root).
    """
    if not os.access(store, os.W_OK | os.X_OK):
        return False
    companions = (db_path, *_companions(db_path))
    return all(os.access(path, os.W_OK) for path in companions if os.path.lexists(path))


def open_mode(store: Path, db_path: Path, write: bool) -> str:
    """``write`` for writers and for readers who could write; else how to read without writing."""
    if write or can_write(store, db_path):
        return WRITE
    wal = _companions(db_path)[0]
    try:
        has_log = wal.stat().st_size > 0
    except OSError:
        has_log = False
    return READ_WAL if has_log else READ_IMMUTABLE


def open_connection(db_path: Path, mode: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) opened as ``mode`` says."""
    if mode == WRITE:
        # An embedding pass writes from one background thread (``alselect.store.writer``) while
        # the loop that opened the store waits: one thread at a time, never two.
        return sqlite3.connect(db_path, isolation_level=None, timeout=30.0, check_same_thread=False)
    query = "mode=ro" if mode == READ_WAL else "immutable=1"
    uri = f"{db_path.resolve().as_uri()}?{query}"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)


def read_only_error(store: Path) -> StoreError:
    """The one-line refusal for a command that must write to a store this user cannot write."""
    return StoreError(
        f"store {store} is read-only for this user: this command records its results there and needs "
        "write access ('alselect status' and 'alselect export --dry-run' only read)"
    )


def _companions(db_path: Path) -> tuple[Path, Path]:
    return db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")
