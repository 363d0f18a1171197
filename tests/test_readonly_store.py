"""A store the user can read but not write: reading commands work, writing ones say so in one line.

Tests run as root, for whom permission bits block nothing. Two real ways to take write access
away are used where the machine allows them: the immutable attribute (``chattr +i``, which stops
root too) and running a reader as an unprivileged user (``setpriv``). The decision logic is also
tested on its own, everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from alselect.errors import StoreError
from alselect.store import DB_FILE, Store
from alselect.store import connect as store_connect
from tests.conftest import REPO
from tests.helpers import MakeImages, cli, cli_score


def tree_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """``chattr +i`` on the folder and everything in it; skips the test where that is not possible."""
    paths = [folder, *folder.rglob("*")]
    done = (
        subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True)
        if shutil.which("chattr")
        else None
    )
    if done is None or done.returncode != 0:
        if done is not None:
            subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    try:
        probe = folder / "probe"
        with pytest.raises(OSError):
            probe.write_bytes(b"")
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


@pytest.fixture
def scored(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> Path:
    make_images(tmp_path / "pool", 6)
    cli_score(capsys, tmp_path / "store", tmp_path / "pool", tiny_checkpoint)
    return tmp_path / "store"


def test_reading_commands_work_and_writing_commands_refuse_on_an_immutable_store(
    scored: Path, tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "done.txt"
    listing.write_text(str(tmp_path / "pool" / "img_0000.png") + "\n")
    before = tree_state(scored)
    with immutable(scored):
        code, out, err = cli(capsys, "--store", str(scored), "status", "--json")
        assert code == 0, err
        info = json.loads(out)
        assert info["images"]["present"] == 6 and info["latest_run"]["selected"] == 6

        code, out, err = cli(capsys, "--store", str(scored), "export", "--top", "3", "--dry-run")
        assert code == 0, err
        assert len(out.splitlines()) == 4  # header + 3 rows

        code, _, err = cli(
            capsys, "--store", str(scored), "preview", "--top", "4", "-o", str(tmp_path / "p.png")
        )
        assert code == 0, err
        assert (tmp_path / "p.png").stat().st_size > 0

        for args in (
            ["export", "--top", "3"],
            ["label", str(listing)],
            ["score", str(tmp_path / "pool"), "-m", str(tiny_checkpoint), "-s", "entropy", "--workers", "0"],
        ):
            code, out, err = cli(capsys, "--store", str(scored), *args)
            assert code == 1, (args, err)
            assert out == "" and len(err.strip().splitlines()) == 1, err
            assert "read-only for this user" in err and "Traceback" not in err
    assert tree_state(scored) == before


def deny_writes(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``os.access`` say ``folder`` is not writable, as it would for another user."""
    real_access = os.access

    def access(path: str | Path, mode: int) -> bool:
        inside = Path(path) == folder or folder in Path(path).parents
        return not (inside and mode & os.W_OK) and real_access(path, mode)

    monkeypatch.setattr(store_connect.os, "access", access)


def test_a_read_only_reader_writes_nothing_and_needs_no_lock(
    scored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated: ``os.access`` says the store is not writable (as it would for another user)."""
    deny_writes(monkeypatch, scored)
    assert store_connect.open_mode(scored, scored / DB_FILE, write=False) == store_connect.READ_IMMUTABLE
    before = tree_state(scored)
    with Store.open(scored) as store:
        assert store.read_only
        assert store.scalar("SELECT COUNT(*) FROM images") == 6
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.conn.execute("DELETE FROM labels")
    assert tree_state(scored) == before
    with pytest.raises(StoreError, match="read-only for this user"):
        Store.open(scored, write=True)


def test_open_mode_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / DB_FILE
    db.write_bytes(b"")
    assert store_connect.open_mode(tmp_path, db, write=False) == store_connect.WRITE
    monkeypatch.setattr(store_connect.os, "access", lambda path, mode: not mode & os.W_OK)
    assert store_connect.open_mode(tmp_path, db, write=True) == store_connect.WRITE  # refused earlier
    assert store_connect.open_mode(tmp_path, db, write=False) == store_connect.READ_IMMUTABLE
    wal = tmp_path / (DB_FILE + "-wal")
    wal.write_bytes(b"")
    assert store_connect.open_mode(tmp_path, db, write=False) == store_connect.READ_IMMUTABLE
    wal.write_bytes(b"\0" * 32)
    assert store_connect.open_mode(tmp_path, db, write=False) == store_connect.READ_WAL


def test_lock_that_cannot_be_created_is_one_store_error(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from alselect.store import lock

    Store.open(store_path, write=True, create=True).close()
    (store_path / "lock").unlink()

    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(lock.os, "open", refuse)
    with pytest.raises(StoreError, match=r"cannot lock store .* Read-only file system"):
        lock.WriterLock(store_path / "lock", timeout=0).acquire()


def test_an_old_store_that_needs_upgrading_is_explained(
    scored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alselect.store import migrations

    with sqlite3.connect(scored / DB_FILE) as conn:
        conn.execute("DELETE FROM migrations WHERE name = ?", (migrations.MIGRATIONS[-1][0],))
    monkeypatch.setattr(store_connect.os, "access", lambda path, mode: not mode & os.W_OK)
    with pytest.raises(StoreError, match="must be upgraded, which needs write access"):
        Store.open(scored)


# --- an unprivileged user, for real ----------------------------------------------------------------

READER = r"""
import importlib.util, json, sqlite3, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("connect", Path(sys.argv[1]) / "alselect/store/connect.py")
connect = importlib.util.module_from_spec(spec)
spec.loader.exec_module(connect)
store = Path(sys.argv[2])
db = store / "alselect.db"
out = {"mode": connect.open_mode(store, db, write=False)}
with connect.open_connection(db, out["mode"]) as conn:
    out["images"] = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
try:  # what alselect did before: a plain connection
    sqlite3.connect(db).execute("SELECT COUNT(*) FROM images").fetchone()
    out["plain"] = "ok"
except sqlite3.Error as exc:
    out["plain"] = str(exc)
print(json.dumps(out))
"""


def unprivileged_python() -> list[str]:
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(python):
        pytest.skip("needs root, setpriv and a system python to run a reader as another user")
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python]
    probe = subprocess.run([*command, "-c", "import sqlite3"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the system python cannot run as an unprivileged user here")
    return command


def test_another_user_reads_a_store_with_and_without_a_running_writer(
    tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    python = unprivileged_python()
    if not os.access(REPO, os.R_OK) or oct(REPO.stat().st_mode)[-1] not in "57":
        pytest.skip("the checkout is not readable by other users")
    shared = Path(tempfile.mkdtemp(prefix="alselect-shared-"))
    try:
        shared.chmod(0o755)
        make_images(shared / "pool", 4)
        store = shared / "store"
        cli_score(capsys, store, shared / "pool", tiny_checkpoint)

        def read() -> dict[str, object]:
            done = subprocess.run(
                [*python, "-c", READER, str(REPO), str(store)], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        idle = read()
        assert idle["mode"] == "immutable" and idle["images"] == 4
        assert "readonly" in str(idle["plain"])  # the old way failed for this user

        with Store.open(store, write=True) as writer:  # the owner's cron run, mid-way
            writer.upsert_images("/elsewhere", [("new.png", "0" * 64, 1, 1, "present", None)])
            busy = read()
        assert busy["mode"] == "read-only" and busy["images"] == 5
    finally:
        shutil.rmtree(shared)


def test_gc_dry_run_works_on_a_store_you_cannot_write(
    scored: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 13: ``gc --dry-run`` writes nothing, yet it was refused on a read-only store."""
    deny_writes(monkeypatch, scored)
    before = tree_state(scored)
    code, out, err = cli(capsys, "--store", str(scored), "gc", "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["dry_run"] is True
    code, _, err = cli(capsys, "--store", str(scored), "gc")
    assert code == 1 and "read-only for this user" in err
    assert tree_state(scored) == before
