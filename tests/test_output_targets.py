"""Where ``export -o`` may write: FIFOs, devices, descriptors, symlinks, folders, '-', file modes."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from alselect.errors import AlselectError
from alselect.exporters import atomic_output
from tests.helpers import MakeImages, cli, export_rows, score

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file types and modes")


@pytest.fixture
def scored_store(tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages) -> Path:
    make_images(tmp_path / "pool", 5)
    score(tmp_path / "store", tmp_path / "pool", tiny_checkpoint)
    return tmp_path / "store"


@contextlib.contextmanager
def fifo_reader(fifo: Path) -> Iterator[list[bytes]]:
    """Read everything written to ``fifo`` in a thread; the list holds the bytes once it is done."""
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as handle:  # blocks until a writer opens the FIFO
            received.append(handle.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield received
    finally:
        reader.join(timeout=10)
        if reader.is_alive():  # nobody opened it for writing: release the reader, then fail
            with open(fifo, "wb"):
                pass
            reader.join(timeout=10)
            pytest.fail(f"nothing opened {fifo} for writing")


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- streams: written in place, never replaced by a regular file --------------------------------


@posix_only
def test_fifo_stays_a_fifo_and_gets_the_content(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with fifo_reader(fifo) as received, atomic_output(fifo) as handle:
        handle.write("rank,path\n1,café.png\n")
    assert received == ["rank,path\n1,café.png\n".encode()]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []


@posix_only
def test_cli_export_to_a_fifo(scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with fifo_reader(fifo) as received:
        code, out, err = cli(capsys, "--store", str(scored_store), "export", "--top", "3", "-o", str(fifo))
    assert (code, out) == (0, ""), err
    rows = list(csv.DictReader(io.StringIO(received[0].decode("utf-8"), newline="")))
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(export_rows(scored_store)) == 2, "the three written rows were recorded as exported"


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd")
def test_descriptor_alias_writes_to_the_open_file(tmp_path: Path) -> None:
    """``-o /dev/stdout`` with stdout redirected to a file: append at its offset, keep the inode."""
    target = tmp_path / "redirected.csv"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"written by the shell before\n")
        inode = os.fstat(fd).st_ino
        link = tmp_path / "stdout"  # like /dev/stdout -> /proc/self/fd/1
        link.symlink_to(f"/dev/fd/{fd}")
        with atomic_output(link) as handle:
            handle.write("1,a.png\n")
        os.write(fd, b"and after\n")
    finally:
        os.close(fd)
    assert target.read_bytes() == b"written by the shell before\n1,a.png\nand after\n"
    assert target.stat().st_ino == inode
    assert link.is_symlink()
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd")
def test_descriptor_alias_of_a_pipe(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        with atomic_output(Path(f"/dev/fd/{write_end}")) as handle:
            handle.write("rows\n")
        os.close(write_end)
        write_end = -1
        assert os.read(read_end, 100) == b"rows\n"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@posix_only
def test_character_device_is_not_replaced(tmp_path: Path) -> None:
    """What ``-o /dev/stdout`` on a terminal did as root: the device node became a regular file."""
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
        os.close(os.open(device, os.O_WRONLY))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make or open a device node here: {exc}")
    link = tmp_path / "stdout"
    link.symlink_to(device)
    for target in (device, link):
        with atomic_output(target) as handle:
            handle.write("discarded\n")
        assert stat.S_ISCHR(os.stat(device).st_mode)
    assert link.is_symlink()
    assert leftovers(tmp_path) == []


@posix_only
def test_write_errors_on_a_stream_are_one_line_errors(tmp_path: Path) -> None:
    full = tmp_path / "full"
    try:
        os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a private /dev/full
        os.close(os.open(full, os.O_WRONLY))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make or open a device node here: {exc}")
    with pytest.raises(AlselectError, match="No space left"), atomic_output(full) as handle:
        handle.write("rows\n")
    assert stat.S_ISCHR(os.stat(full).st_mode)


@posix_only
def test_reader_going_away_is_a_one_line_error(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def open_and_leave() -> None:
        with open(fifo, "rb"):
            pass

    reader = threading.Thread(target=open_and_leave, daemon=True)
    reader.start()
    with pytest.raises(AlselectError, match="cannot write"), atomic_output(fifo) as handle:
        reader.join(timeout=10)
        handle.write("x" * (1 << 20))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# --- symlinks and folders -----------------------------------------------------------------------


@posix_only
def test_symlink_is_kept_and_its_target_updated(tmp_path: Path) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "batch.csv"
    real.write_text("old\n")
    link = tmp_path / "latest.csv"
    link.symlink_to(Path("real") / "batch.csv")  # relative, into another folder
    with atomic_output(link) as handle:
        handle.write("new\n")
    assert link.is_symlink() and os.readlink(link) == str(Path("real") / "batch.csv")
    assert real.read_text() == "new\n"
    assert leftovers(tmp_path) == [] and leftovers(real_dir) == []


@posix_only
def test_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "latest.csv"
    link.symlink_to(tmp_path / "made.csv")
    with atomic_output(link) as handle:
        handle.write("rows\n")
    assert link.is_symlink() and (tmp_path / "made.csv").read_text() == "rows\n"


def test_folder_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(AlselectError, match="is a folder"), atomic_output(folder) as handle:
        handle.write("never")
    assert list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"]


def test_cli_export_to_a_folder_is_a_one_line_error(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "--store", str(scored_store), "export", "-o", str(tmp_path))
    assert (code, out) == (1, "")
    assert "is a folder" in err and "internal error" not in err and len(err.strip().splitlines()) == 1
    assert len(export_rows(scored_store)) == 5, "nothing was recorded as exported"


# --- '-' is stdout ------------------------------------------------------------------------------


def test_cli_dash_means_stdout(
    scored_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    code, out, err = cli(capsys, "--store", str(scored_store), "export", "--top", "2", "-o", "-")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert [row["rank"] for row in rows] == ["1", "2"]
    assert "to stdout" in err
    assert not (workdir / "-").exists() and list(workdir.iterdir()) == []
    assert len(export_rows(scored_store)) == 3, "the two printed rows were recorded as exported"


# --- permissions and durability -----------------------------------------------------------------


@posix_only
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_replaced_file_keeps_its_mode(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    target.chmod(mode)
    with umask(0o022), atomic_output(target) as handle:
        handle.write("new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == mode


@posix_only
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_respects_the_umask(tmp_path: Path, mask: int, expected: int) -> None:
    target = tmp_path / "out.csv"
    with umask(mask), atomic_output(target) as handle:
        handle.write("rows\n")
    assert stat.S_IMODE(target.stat().st_mode) == expected


@posix_only
def test_folder_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        synced.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_output(tmp_path / "out.csv") as handle:
        handle.write("rows\n")
    assert synced == ["file", "rename", "folder"]


@posix_only
def test_folder_fsync_failure_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_output(tmp_path / "out.csv") as handle:
        handle.write("rows\n")
    assert (tmp_path / "out.csv").read_text() == "rows\n"
