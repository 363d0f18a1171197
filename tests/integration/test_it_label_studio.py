"""A real Label Studio server on 127.0.0.1 imports alselect's ``label-studio`` export.

The pool holds hostile file names. Checks: the task count; every task's image URL is served back
with the file's bytes (local-files storage, percent-encoded paths); ``data.al_*`` are numbers the
Data Manager sorts by; ``--predictions`` are accepted with prediction validation switched on (and a
wrong prediction is refused, so the validation is real); a few tasks annotated through the API and
exported from Label Studio label those images in alselect (with their classes) so they are never
selected again.

``ALSELECT_IT_SAVE_FIXTURES=1`` also stores that Label Studio export, the labeling config and the
annotated images under ``tests/data/label-studio/`` (the fixture the ``label`` reader's tests use).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from alselect.exporters.label_studio import classification_config
from alselect.store import Store
from tests.conftest import REPO, TINY_CLASSES
from tests.helpers import HOSTILE_NAMES, export_text, hostile_store
from tests.integration.conftest import venv_python

pytestmark = pytest.mark.integration

TOKEN = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
# Annotated through the API; names a Windows checkout can hold too (they become a committed fixture).
ANNOTATE = {
    "hash#1.png": "ant",
    "percent%20literal.png": "bee",
    "plus+sign.png": "cat",
    "amp&and=eq;semi.png": "bee",
    "comma,name.png": "ant",
    "single'quote.png": "cat",
    "café/日本語 ñ.png": "bee",
    "sub dir/inner #%+&.png": "ant",
}
FIXTURES = REPO / "tests" / "data" / "label-studio"
STARTUP_TIMEOUT = 420


@dataclass
class Server:
    url: str
    root: Path  # LOCAL_FILES_DOCUMENT_ROOT

    def call(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> tuple[int, Any]:
        headers = {"Authorization": f"Token {TOKEN}"}
        data = None
        if isinstance(body, tuple):  # (filename, bytes): a multipart file upload
            boundary = uuid.uuid4().hex
            name, content = body
            data = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                    f"Content-Type: application/json\r\n\r\n"
                ).encode()
                + content
                + f"\r\n--{boundary}--\r\n".encode()
            )
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                payload = response.read()
                return response.status, payload if raw else json.loads(payload or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    python = venv_python("ALSELECT_IT_LABEL_STUDIO")
    base = tmp_path_factory.mktemp("label-studio")
    root = base / "root"
    root.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": "it@alselect.example",
        "LABEL_STUDIO_PASSWORD": "alselect-integration",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        # Predictions are validated against the labeling config only with this flag.
        "fflag_feat_utc_210_prediction_validation_15082025": "true",
    }
    log = (base / "server.log").open("wb")
    command = [
        str(Path(python).parent / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
        "--port", str(port), "--data-dir", str(base / "data"),
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"Label Studio exited ({proc.returncode}):\n{(base / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > STARTUP_TIMEOUT:
                pytest.fail(f"Label Studio did not answer /health in {STARTUP_TIMEOUT} s")
            time.sleep(2)
        print(f"Label Studio up in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield Server(url=url, root=root)
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server we started: its own process group (the server and its workers), by id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Project:
    id: int
    store: Path
    folder: Path
    tasks_file: Path
    config: str
    imported: dict[str, Any]


@pytest.fixture(scope="module")
def project(server: Server, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    base = tmp_path_factory.mktemp("ls-alselect")
    # The pool lives under the document root: root/pool (a storage may not be the root itself).
    store, folder = hostile_store(server.root, tiny_checkpoint)
    tasks_file = base / "tasks.json"
    done = subprocess.run(
        [sys.executable, "-m", "alselect", "--store", str(store), "export", "-f", "label-studio",
         "--predictions", "--ls-document-root", str(server.root), "-o", str(tasks_file)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = classification_config(TINY_CLASSES)
    status, created = server.call("POST", "/api/projects", {"title": "alselect it", "label_config": config})
    assert status == 201, created
    status, storage = server.call(
        "POST", "/api/storages/localfiles", {"project": created["id"], "path": str(folder), "title": "pool"}
    )
    assert status == 201, storage
    status, imported = server.call(
        "POST", f"/api/projects/{created['id']}/import", ("tasks.json", tasks_file.read_bytes())
    )
    assert status == 201, imported
    return Project(created["id"], store, folder, tasks_file, config, imported)


def project_tasks(server: Server, project_id: int, view: int | None = None) -> list[dict[str, Any]]:
    query = f"/api/tasks?project={project_id}&page_size=1000" + (f"&view={view}" if view else "")
    status, listing = server.call("GET", query)
    assert status == 200, listing
    return listing["tasks"] if isinstance(listing, dict) else listing


def test_import_counts_and_serves_every_image(server: Server, project: Project) -> None:
    n = len(HOSTILE_NAMES)
    if "task_count" in project.imported:  # synchronous import
        assert (project.imported["task_count"], project.imported["prediction_count"]) == (n, n)
    tasks = project_tasks(server, project.id)
    assert len(tasks) == n
    ours = {t["data"]["al_sha256"]: t for t in json.loads(project.tasks_file.read_text(encoding="utf-8"))}
    served = 0
    for task in tasks:
        data = task["data"]
        assert data == ours[data["al_sha256"]]["data"]  # every data field survives, numbers as numbers
        assert type(data["al_rank"]) is int and type(data["al_score"]) is float
        status, content = server.call("GET", data["image"], raw=True)
        relpath = data["image"].split("?d=", 1)[1]
        assert status == 200, f"{relpath}: HTTP {status}"
        with Store.open(project.store) as store:
            (path,) = [
                r for (r,) in store.rows("SELECT relpath FROM images WHERE sha256 = ?", [data["al_sha256"]])
            ]
        assert content == (project.folder / path).read_bytes()
        served += 1
    assert served == n
    status, info = server.call("GET", f"/api/projects/{project.id}")
    assert (info["task_number"], info["total_predictions_number"]) == (n, n)


def test_data_manager_sorts_by_al_score(server: Server, project: Project) -> None:
    status, view = server.call(
        "POST",
        "/api/dm/views",
        {"project": project.id, "data": {"ordering": ["-tasks:data.al_score"],
                                         "filters": {"conjunction": "and", "items": []}}},
    )  # fmt: skip
    assert status == 201, view
    ranks = [t["data"]["al_rank"] for t in project_tasks(server, project.id, view=view["id"])]
    scores = [t["data"]["al_score"] for t in project_tasks(server, project.id, view=view["id"])]
    assert scores == sorted(scores, reverse=True)  # numeric order: the values are JSON numbers
    if len(set(scores)) == len(scores):
        assert ranks == sorted(ranks)


def test_prediction_validation_is_on_and_ours_pass(server: Server, project: Project) -> None:
    task = json.loads(project.tasks_file.read_text(encoding="utf-8"))[0]
    bad = json.loads(json.dumps(task))
    bad["predictions"][0]["result"][0]["value"]["choices"] = ["no such class"]
    status, body = server.call("POST", f"/api/projects/{project.id}/import", [bad])
    assert status == 400, (status, body)  # the server really checks predictions
    status, body = server.call("POST", f"/api/projects/{project.id}/import?commit_to_project=false", [task])
    assert status == 201, body


def test_annotations_exported_from_label_studio_label_the_images(server: Server, project: Project) -> None:
    by_sha = {t["data"]["al_sha256"]: t for t in project_tasks(server, project.id)}
    with Store.open(project.store) as store:
        sha_of = dict(store.rows("SELECT relpath, sha256 FROM images"))
    for relpath, label in ANNOTATE.items():
        task = by_sha[sha_of[relpath]]
        result = [
            {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
        ]
        status, body = server.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": result})
        assert status == 201, body
    status, raw = server.call("GET", f"/api/projects/{project.id}/export?exportType=JSON", raw=True)
    assert status == 200
    exported = json.loads(raw)
    assert sorted(t["data"]["al_sha256"] for t in exported) == sorted(sha_of[p] for p in ANNOTATE)
    export_file = project.tasks_file.parent / "label-studio-export.json"
    export_file.write_bytes(raw)
    if os.environ.get("ALSELECT_IT_SAVE_FIXTURES") == "1":
        save_fixture(raw, project)

    done = subprocess.run(
        [sys.executable, "-m", "alselect", "--store", str(project.store), "label", str(export_file)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    status = subprocess.run(
        [sys.executable, "-m", "alselect", "--store", str(project.store), "status", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert json.loads(status.stdout)["labeled"] == len(ANNOTATE)
    with Store.open(project.store) as store:
        classes = store.label_classes()
    assert {sha: classes.get(sha) for sha in (sha_of[p] for p in ANNOTATE)} == {
        sha_of[p]: label for p, label in ANNOTATE.items()
    }
    # Never selected again, even when asking for already-exported images too.
    remaining = export_text(project.store, "paths", include_exported=True, record=False).splitlines()
    assert sorted(remaining) == sorted(set(HOSTILE_NAMES) - set(ANNOTATE))


def save_fixture(raw: bytes, project: Project) -> None:
    """The real export, its config, and the annotated images (paths as in ``data.image``)."""
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    (FIXTURES / "pool").mkdir(parents=True)
    (FIXTURES / "export.json").write_bytes(raw)
    (FIXTURES / "label_config.xml").write_text(project.config, encoding="utf-8")
    for relpath in ANNOTATE:
        target = FIXTURES / "pool" / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(project.folder / relpath, target)
    (FIXTURES / "README.md").write_text(FIXTURE_README.format(n=len(ANNOTATE)), encoding="utf-8")


FIXTURE_README = """# Label Studio export fixture

`export.json` is a real Label Studio 1.23.2 export (`GET /api/projects/ID/export?exportType=JSON`) of a
project that imported alselect's `label-studio` export (with `--predictions` and
`--ls-document-root` = the folder above `pool/`), after {n} tasks were annotated through the API
with the config in `label_config.xml`. `pool/` holds those {n} images at the paths the tasks name
(`data.image` = `/data/local-files/?d=pool/<percent-encoded path>`; `data.al_sha256` is each file's
sha256). Written by `tests/integration/test_it_label_studio.py` with `ALSELECT_IT_SAVE_FIXTURES=1`.
"""
