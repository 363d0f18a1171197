"""Export rows, the exporter registry, and atomic file output."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TextIO

from alselect.errors import AlselectError
from alselect.fsutil import fsync_directory

CSV_COLUMNS = (
    "rank",
    "path",
    "score",
    "strategy",
    "model",
    "predicted_label",
    "confidence",
    "sha256",
)


@dataclass(frozen=True)
class ExportRow:
    """One image to annotate; ``rank`` 1 = annotate first (contiguous within an export)."""

    rank: int
    path: str
    score: float
    strategy: str
    model: str
    predicted_label: str
    confidence: float | None
    sha256: str

    def values(self) -> dict[str, str]:
        """Column → text, numbers formatted deterministically."""
        return {
            "rank": str(self.rank),
            "path": self.path,
            "score": format_number(self.score),
            "strategy": self.strategy,
            "model": self.model,
            "predicted_label": self.predicted_label,
            "confidence": format_number(self.confidence),
            "sha256": self.sha256,
        }


def format_number(value: float | None) -> str:
    """Eight significant digits: stable across runs, enough to read ties."""
    return "" if value is None else format(float(value), ".8g")


class Exporter:
    """Writes rows to a text stream; ``write`` returns the rows it actually wrote."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def write(self, rows: Iterable[ExportRow], stream: TextIO) -> list[ExportRow]:
        raise NotImplementedError


_REGISTRY: dict[str, type[Exporter]] = {}


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    _REGISTRY[cls.name] = cls
    return cls


def exporter_registry() -> dict[str, type[Exporter]]:
    return dict(sorted(_REGISTRY.items()))


# /dev/stdout, /dev/fd/N, /proc/self/fd/N: an open descriptor of this process, not a file to replace.
_FD_LINK = re.compile(r"^/(?:dev|proc/(?:self|thread-self|\d+))/fd/(\d+)$")


def _descriptor_alias(path: Path) -> tuple[int | None, bool]:
    """``(fd, True)`` when ``path`` (through its symlinks) names this process's descriptor ``fd``;
    ``(None, True)`` for another process's descriptor; ``(None, False)`` otherwise."""
    current = os.path.abspath(path)
    for _ in range(40):
        match = _FD_LINK.match(current)
        if match:
            owner = current.split("/")[2]
            own = current.startswith("/dev/") or owner in ("self", "thread-self", str(os.getpid()))
            return (int(match.group(1)) if own else None), True
        try:
            link = os.readlink(current)
        except OSError:
            break
        current = os.path.normpath(os.path.join(os.path.dirname(current), link))
    return None, False


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    """A new file beside the target, created ``0o666`` so the process umask applies as for any new file."""
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise AlselectError(f"cannot create a temporary file in {directory}")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[TextIO]:
    """Write to a temp file beside ``path``, fsync, then rename over it; nothing on failure.

    A symlink is followed: the file it points at is replaced and the link kept. A target that is
    not a regular file (``/dev/stdout``, a terminal, a FIFO) is written in place, as a stream. A
    replaced file keeps its permission bits (and owner, where allowed); a new one gets
    ``0o666 & ~umask``. The folder is fsynced after the rename so the new file survives a crash.
    """
    try:
        info: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise AlselectError(f"cannot write {path}: {exc.strerror}") from exc
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise AlselectError(f"output {path} is a folder; name a file in it")
    fd_alias, is_alias = _descriptor_alias(path)
    if is_alias or (info is not None and not stat.S_ISREG(info.st_mode)):
        yield from _write_in_place(path, fd_alias)
        return
    target = Path(os.path.realpath(path))
    directory = target.parent
    if not directory.is_dir():
        raise AlselectError(f"output folder does not exist: {directory}")
    try:
        fd, tmp = _create_temp(directory, target.name)
    except OSError as exc:
        raise AlselectError(f"cannot write in {directory}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
            if info is not None:
                _look_like(tmp, handle.fileno(), info)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk, a quota, an I/O error
            raise AlselectError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    fsync_directory(directory)


def _look_like(tmp: Path, fd: int, info: os.stat_result) -> None:
    """Give the replacement the permission bits (and, where allowed, the owner) of the replaced file."""
    created = os.fstat(fd)
    if hasattr(os, "fchown") and (created.st_uid, created.st_gid) != (info.st_uid, info.st_gid):
        with contextlib.suppress(OSError):
            os.fchown(fd, info.st_uid, info.st_gid)
    os.chmod(tmp, stat.S_IMODE(info.st_mode))


def _write_in_place(path: Path, fd_alias: int | None) -> Iterator[TextIO]:
    """Stream to a device, FIFO or open descriptor: no temp file, no rename, no fsync."""
    try:
        if fd_alias is not None:
            fd = os.dup(fd_alias)  # the very same open file (and offset) as this process's descriptor
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise AlselectError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
            yield handle
            handle.flush()
    except OSError as exc:  # the reader went away (broken pipe), a full device
        raise AlselectError(f"cannot write {path}: {exc.strerror or exc}") from exc
