"""Export rows, the exporter registry, the options every writer sees, and atomic file output."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, ClassVar, Literal, TextIO, overload

from alselect.errors import AlselectError, UsageError
from alselect.fsutil import fsync_directory
from alselect.uris import BUCKET_SCHEMES, is_utf8, join_uri, uri_scheme

__all__ = ["join_uri", "uri_scheme"]  # re-exported: exporters import them from here

CSV_COLUMNS = (
    "rank",
    "path",
    "score",
    "strategy",
    "model",
    "predicted_label",
    "confidence",
    "sha256",
    "folder",
    "uri",
)
# Appended for detection runs only (issue #10): stored boxes at or above the run's detection threshold.
DETECTION_COLUMNS = ("detections",)

SCORE_DIRECTION = "higher score = annotate first; rank 1 = annotate first"


@dataclass(frozen=True)
class ExportRow:
    """One image to annotate; ``rank`` 1 = annotate first (contiguous within an export).

    ``path`` is what the tabular formats print (folder-relative, or absolute with ``--absolute``);
    ``relpath`` is always relative to ``folder``, the absolute scored folder; ``uri`` is the
    image's URI when a ``--uri-prefix`` was given, else empty.
    """

    rank: int
    path: str
    score: float
    strategy: str
    model: str
    predicted_label: str
    confidence: float | None
    sha256: str
    folder: str = ""
    uri: str = ""
    relpath: str | None = None
    detections: int | None = None  # detection runs: the image's detection count

    @property
    def relative(self) -> str:
        """The folder-relative path, with ``/`` separators."""
        return self.path if self.relpath is None else self.relpath

    @property
    def file(self) -> Path:
        """The image file on this machine."""
        return Path(self.folder) / self.relative

    def values(self) -> dict[str, str]:
        """Column → text, numbers formatted deterministically (``detections`` only when known)."""
        extra = {} if self.detections is None else {"detections": str(self.detections)}
        return extra | {
            "rank": str(self.rank),
            "path": self.path,
            "score": format_number(self.score),
            "strategy": self.strategy,
            "model": self.model,
            "predicted_label": self.predicted_label,
            "confidence": format_number(self.confidence),
            "sha256": self.sha256,
            "folder": self.folder,
            "uri": self.uri,
        }


def columns_for(rows: Sequence[ExportRow]) -> tuple[str, ...]:
    """The csv columns: ``CSV_COLUMNS``, plus ``DETECTION_COLUMNS`` for a detection run's rows."""
    return CSV_COLUMNS + (DETECTION_COLUMNS if any(r.detections is not None for r in rows) else ())


def format_number(value: float | None) -> str:
    """Eight significant digits: stable across runs, enough to read ties."""
    return "" if value is None else format(float(value), ".8g")


def not_utf8_reason(platform: str) -> str:
    """The reason a platform format leaves out a file whose name is not valid UTF-8."""
    return f"file name is not valid UTF-8, which {platform} cannot refer to (rename the file)"


def finite_or_none(value: float | None) -> float | None:
    """A number as JSON allows it: NaN and infinities become ``None`` (null)."""
    return value if value is not None and math.isfinite(value) else None


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def json_text(value: Any, indent: int | None = None) -> str:
    """JSON, UTF-8 as is, with the bytes of a file name that are not UTF-8 (surrogate escapes)
    written as ``\\udcXX`` escapes: the text stays valid UTF-8, and ``json.loads`` gives back the
    name ``os.fsencode`` turns into the original bytes."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, indent=indent)
    return _NOT_UTF8.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def write_json_array(stream: TextIO, items: Sequence[Any]) -> None:
    """A JSON array with one compact item per line: one document, still readable and diffable."""
    stream.write("[\n" if items else "[")
    for i, item in enumerate(items):
        stream.write(json_text(item))
        stream.write(",\n" if i + 1 < len(items) else "\n")
    stream.write("]\n")


def relative_to_root(row: ExportRow, document_root: Path | None) -> str:
    """The image's path relative to ``document_root`` (resolved; ``/`` separators), or its
    folder-relative path when there is none. Used where a platform names files from a root of its
    own (Label Studio's local-files root, CVAT's share root)."""
    if document_root is None:
        return row.relative
    rel = os.path.relpath(row.file, document_root.resolve())
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise UsageError(f"image {row.file} is not under --ls-document-root {document_root}")
    return rel.replace(os.sep, "/")


@dataclass(frozen=True)
class RunInfo:
    """The scoring run an export comes from (for sidecars, model versions and label configs)."""

    id: int = 0
    created_at: str = ""
    folder: str = ""
    strategy: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None
    pool_size: int = 0
    labeled_count: int = 0
    selected: int = 0
    command: str | None = None
    alselect_version: str | None = None
    model: str = ""
    model_key: str = ""
    checkpoint_sha256: str = ""
    checkpoint_path: str = ""
    classes: tuple[str, ...] | None = None
    num_classes: int = 0
    models: tuple[dict[str, Any], ...] = ()  # every model the run read, with its role

    @property
    def class_names(self) -> tuple[str, ...]:
        """The labels exports write: the checkpoint's class names, else ``"0"``..``"C-1"``."""
        return self.classes or tuple(str(i) for i in range(self.num_classes))


@dataclass(frozen=True)
class ExportOptions:
    """What a user may ask of any format; each writer reads the fields that concern it.

    ``uri_prefix``: images' base URI (``s3://bucket/pool/``, ``https://host/pool/``).
    ``document_root``: the folder image paths are made relative to, for Label Studio's local-files
    URLs and CVAT manifest names (default: the scored folder). ``predictions``: add the model's top
    class as a pre-annotation where the format has a place for it. ``ls_*``: Label Studio's
    control (``from_name``) and object (``to_name``) names, and a labeling config (XML text) to
    check predictions against.
    """

    # metadata "flag": the command-line option that sets the field (named in usage errors)
    uri_prefix: str | None = field(default=None, metadata={"flag": "--uri-prefix"})
    absolute: bool = field(default=False, metadata={"flag": "--absolute"})
    document_root: Path | None = field(default=None, metadata={"flag": "--document-root"})
    predictions: bool = field(default=False, metadata={"flag": "--predictions"})
    ls_from_name: str = field(default="label", metadata={"flag": "--ls-from-name"})
    ls_to_name: str = field(default="image", metadata={"flag": "--ls-to-name"})
    ls_config: str | None = field(default=None, metadata={"flag": "--ls-config"})

    def given(self) -> list[str]:
        """The fields set to something other than their default, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]


def option_flag(name: str) -> str:
    """The command-line option of the ``ExportOptions`` field ``name``."""
    return next(f.metadata["flag"] for f in fields(ExportOptions) if f.name == name)


@dataclass(frozen=True)
class ExportContext:
    """Everything a writer may need beyond the rows."""

    options: ExportOptions = field(default_factory=ExportOptions)
    run: RunInfo = field(default_factory=RunInfo)
    # detection runs: each exported content's stored boxes (alselect.tasks.export.StoredDetections)
    detections: Mapping[str, Any] | None = None


class FileSet:
    """Where a multi-file format writes: ``-o DIR/`` (or an existing folder) puts each file in DIR
    under its default name; any other ``-o PREFIX`` writes ``PREFIX.<name>``. Each file is atomic.
    """

    def __init__(self, target: Path, folder: bool) -> None:
        self.target = target
        self.folder = folder
        self.written: list[Path] = []

    @classmethod
    def resolve(cls, output: Path | str, *, always_folder: bool = False) -> FileSet:
        """``always_folder``: the format is a folder (a dataset directory), whatever ``-o`` looks like."""
        text = os.fspath(output)
        path = Path(text)
        if always_folder or text.endswith(("/", os.sep)) or path.is_dir():
            if not path.is_dir():
                parent = path.absolute().parent
                if not parent.is_dir():
                    raise AlselectError(f"output folder does not exist: {parent}")
                try:
                    path.mkdir()
                except OSError as exc:
                    raise AlselectError(f"cannot create {path}: {exc.strerror}") from exc
            return cls(path, folder=True)
        if path.is_symlink() or path.exists():
            raise AlselectError(
                f"output {path} is a file, and this format writes several files: give a folder "
                "(ending in /) or a prefix"
            )
        if not path.absolute().parent.is_dir():
            raise AlselectError(f"output folder does not exist: {path.absolute().parent}")
        return cls(path, folder=False)

    def path(self, name: str) -> Path:
        """Where the file called ``name`` goes (``DIR/name`` or ``PREFIX.name``)."""
        return self.target / name if self.folder else self.target.with_name(f"{self.target.name}.{name}")

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[TextIO]:
        path = self.path(name)
        with atomic_output(path) as handle:
            yield handle
        self.written.append(path)

    @property
    def sidecar(self) -> Path:
        return self.path("run.json")


class Exporter:
    """A format. Single-stream formats implement ``write``; multi-file ones set ``layout`` and
    implement ``write_files``. ``check`` refuses impossible exports before anything is written;
    ``notes`` are lines for the user (stderr) after a successful write.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # "stream": one text stream (stdout or one file); "files": several files (-o DIR/ or PREFIX);
    # "folder": a dataset folder (-o DIR, created when missing).
    layout: ClassVar[Literal["stream", "files", "folder"]] = "stream"
    # URI schemes the format accepts in image references; empty: local paths, URIs optional.
    uri_schemes: ClassVar[tuple[str, ...]] = ()
    uri_required: ClassVar[bool] = False
    # the ExportOptions fields the format reads; any other one given is a usage error (check_options)
    reads: ClassVar[frozenset[str]] = frozenset()
    file_names: ClassVar[tuple[str, ...]] = ()  # "files"/"folder" layouts: the files it writes

    def check(self, rows: Sequence[ExportRow], context: ExportContext) -> None:
        """Refuse (``DataError``/``UsageError``) what the platform would reject or mangle."""
        check_options(type(self), context.options)
        prefix = context.options.uri_prefix
        if self.uri_required and prefix is None:
            example = "s3://BUCKET/pool/" if "s3" in self.uri_schemes else "https://HOST/pool/"
            raise UsageError(
                f"--format {self.name} needs image URLs: pass --uri-prefix with the location the scored "
                f"folder is served from (e.g. {example})"
            )
        if prefix is not None and self.uri_schemes and uri_scheme(prefix) not in self.uri_schemes:
            allowed = ", ".join(f"{s}://" for s in self.uri_schemes)
            raise UsageError(f"--format {self.name} takes {allowed} URIs, not {prefix!r} (--uri-prefix)")

    def unwritable(self, row: ExportRow, context: ExportContext) -> str | None:
        """Why ``row`` cannot be written in this format, or ``None``. ``export`` leaves such rows
        out before writing (the ranks of the others stay contiguous), says why on stderr and does
        not record them. Here: a bucket URI (``s3://``, ``gs://``) of a file name that is not
        UTF-8, which no object key can be."""
        if row.uri and uri_scheme(row.uri) in BUCKET_SCHEMES and not is_utf8(row.uri):
            return "file name is not valid UTF-8, which S3 and GCS object keys must be"
        return None

    def write(
        self, rows: Iterable[ExportRow], stream: TextIO, context: ExportContext | None = None
    ) -> list[ExportRow]:
        raise NotImplementedError

    def write_files(
        self, rows: Sequence[ExportRow], files: FileSet, context: ExportContext
    ) -> list[ExportRow]:
        raise NotImplementedError

    def notes(self, rows: Sequence[ExportRow], context: ExportContext, written: Sequence[Path]) -> list[str]:
        return []


_REGISTRY: dict[str, type[Exporter]] = {}


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    _REGISTRY[cls.name] = cls
    return cls


def exporter_registry() -> dict[str, type[Exporter]]:
    return dict(sorted(_REGISTRY.items()))


def check_options(exporter: type[Exporter], options: ExportOptions) -> None:
    """A usage error for an option the format would ignore, naming the formats that read it."""
    for name in options.given():
        if name not in exporter.reads:
            users = [fmt for fmt, cls in exporter_registry().items() if name in cls.reads]
            raise UsageError(
                f"{option_flag(name)} does not apply to --format {exporter.name} "
                f"(formats that read it: {', '.join(users)})"
            )


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


def is_stream_target(path: Path) -> bool:
    """True when ``-o path`` is written through in place (a FIFO, device or descriptor), not replaced."""
    try:
        info = os.stat(path)
    except OSError:
        info = None
    return _descriptor_alias(path)[1] or (
        info is not None and not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode)
    )


@overload
def atomic_output(
    path: Path, binary: Literal[False] = False
) -> contextlib.AbstractContextManager[TextIO]: ...
@overload
def atomic_output(path: Path, binary: Literal[True]) -> contextlib.AbstractContextManager[IO[bytes]]: ...
def atomic_output(path: Path, binary: bool = False) -> contextlib.AbstractContextManager[IO[Any]]:
    """Write to a temp file beside ``path``, fsync, then rename over it; nothing on failure.

    A symlink is followed: the file it points at is replaced and the link kept. A target that is
    not a regular file (``/dev/stdout``, a terminal, a FIFO) is written in place, as a stream. A
    replaced file keeps its permission bits (and owner, where allowed); a new one gets
    ``0o666 & ~umask``. The folder is fsynced after the rename so the new file survives a crash.
    Text is UTF-8 with no newline translation; ``binary`` yields a bytes handle.
    """
    return _atomic_output(path, binary)


@contextlib.contextmanager
def _atomic_output(path: Path, binary: bool) -> Iterator[IO[Any]]:
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
        yield from _write_in_place(path, fd_alias, binary)
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
        with _fdopen(fd, binary) as handle:
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


def _fdopen(fd: int, binary: bool) -> IO[Any]:
    if binary:
        return os.fdopen(fd, "wb")
    # names that are not UTF-8 keep their original bytes (surrogate escapes), as in alselect.cli.app
    return os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="")


def _look_like(tmp: Path, fd: int, info: os.stat_result) -> None:
    """Give the replacement the permission bits (and, where allowed, the owner) of the replaced file."""
    created = os.fstat(fd)
    if hasattr(os, "fchown") and (created.st_uid, created.st_gid) != (info.st_uid, info.st_gid):
        with contextlib.suppress(OSError):
            os.fchown(fd, info.st_uid, info.st_gid)
    os.chmod(tmp, stat.S_IMODE(info.st_mode))


def _write_in_place(path: Path, fd_alias: int | None, binary: bool) -> Iterator[IO[Any]]:
    """Stream to a device, FIFO or open descriptor: no temp file, no rename, no fsync."""
    try:
        if fd_alias is not None:
            fd = os.dup(fd_alias)  # the very same open file (and offset) as this process's descriptor
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise AlselectError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with _fdopen(fd, binary) as handle:
            yield handle
            handle.flush()
    except OSError as exc:  # the reader went away (broken pipe), a full device
        raise AlselectError(f"cannot write {path}: {exc.strerror or exc}") from exc
