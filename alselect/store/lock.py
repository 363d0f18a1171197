"""An exclusive writer lock on the store: one writer at a time, bounded wait.

POSIX record locks (``lockf``) belong to the process, so DataLoader workers forked while the lock is
held do not hold it, and the lock is released the moment the writer dies. (``flock`` locks belong to
the open file and survive in any orphaned child that inherited the descriptor.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from alselect.errors import StoreError, StoreLockedError

DEFAULT_TIMEOUT_S = 60.0
_HELD_IN_THIS_PROCESS: set[str] = set()


def lock_timeout_from_env() -> float:
    """``ALSELECT_LOCK_TIMEOUT`` seconds, default 60."""
    raw = os.environ.get("ALSELECT_LOCK_TIMEOUT")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S


class WriterLock:
    """Held for the whole of a writing command; released by the OS if the process dies.

    Not re-entrant: a second ``WriterLock`` on the same file in the same process would succeed
    (POSIX locks are per process) and closing it would drop the first one, so open one store
    writer per process.
    """

    def __init__(self, path: Path, timeout: float | None = None, poll: float = 0.1) -> None:
        self.path = path
        self.timeout = lock_timeout_from_env() if timeout is None else timeout
        self.poll = poll
        self._fd: int | None = None

    def acquire(self) -> None:
        key = os.path.realpath(self.path)
        if key in _HELD_IN_THIS_PROCESS:
            raise StoreLockedError(f"store {self.path.parent} is already open for writing in this process")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # EACCES, EROFS, EPERM: a store this user cannot write
            raise StoreError(
                f"cannot lock store {self.path.parent} for writing: {exc.strerror or exc} "
                "(this command needs write access; 'alselect status' only reads)"
            ) from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise StoreLockedError(
                        f"store {self.path.parent} is busy: another alselect process is writing "
                        f"({holder}); gave up after {self.timeout:g} s "
                        "(set ALSELECT_LOCK_TIMEOUT to wait longer)"
                    ) from None
                time.sleep(self.poll)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}".encode(), 0)
        self._fd = fd
        _HELD_IN_THIS_PROCESS.add(key)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            _HELD_IN_THIS_PROCESS.discard(os.path.realpath(self.path))

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
