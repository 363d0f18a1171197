"""Produce tests/data/annotations/label-studio/*.json with a real Label Studio server (not run by the tests).

    python -m venv /tmp/lsvenv && /tmp/lsvenv/bin/pip install label-studio
    python scripts/make_label_studio_fixture.py --label-studio /tmp/lsvenv/bin/label-studio

Starts a throwaway server on 127.0.0.1 (its own data folder, no network), serves
tests/data/annotations/pool through a Local Files storage, imports tasks shaped like alselect's
export (``data.image`` as a local-files URL, or a URL under a ``--uri-prefix``, ``data.al_*``
fields, a top-1 prediction), annotates them through the REST API as an annotator would (choices,
a skipped task, disagreeing annotators, a ground truth, an empty submission), and writes what the
JSON export endpoint returns. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "annotations"
HERE = DATA / "label-studio"
TOKEN = "alselect-fixture-token-0123456789abcdef"
URI_PREFIX = "https://images.example.com/pool/"
SINGLE = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single">
    <Choice value="cat"/><Choice value="dog"/><Choice value="bird"/>
  </Choices>
</View>"""
MULTIPLE = SINGLE.replace('choice="single"', 'choice="multiple"')

# relpath in the pool -> (with al_sha256, URL kind, annotations); an annotation is a list of choices,
# "cancelled", or a (choices, ground_truth) pair
SINGLE_TASKS: dict[str, tuple[bool, str, list[Any]]] = {
    "img_0001.png": (True, "local", [["cat"]]),
    "#1.png": (True, "local", [["dog"]]),
    "a b+c%.png": (False, "local", [["cat"]]),
    "café.png": (False, "prefix", [["bird"]]),
    "sub/deep.png": (True, "local", ["cancelled"]),
    "img_0002.png": (True, "local", []),
    "plain.png": (True, "local", [["cat"], ["dog"]]),
    "gt.png": (True, "local", [["cat"], (["dog"], True)]),
    "empty.png": (True, "local", [[]]),
    "gone.png": (True, "local", [["cat"]]),  # its al_sha256 is no image of the pool
}
MULTIPLE_TASKS: dict[str, tuple[bool, str, list[Any]]] = {
    "multi.png": (True, "local", [["dog", "cat"]]),
    "img_0001.png": (True, "local", [["bird"]]),
}


class Server:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Token {TOKEN}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return json.loads(payload) if payload else None


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise SystemExit(f"Label Studio did not answer at {url} within {seconds:.0f} s")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def task_for(relpath: str, with_sha: bool, kind: str, rank: int, pool: Path) -> dict[str, Any]:
    file = pool / relpath
    sha = digest(file) if file.exists() else hashlib.sha256(b"not in the pool").hexdigest()
    image = (
        "/data/local-files/?d=" + quote(f"pool/{relpath}", safe="/")
        if kind == "local"
        else URI_PREFIX + quote(relpath, safe="/")
    )
    data: dict[str, Any] = {"image": image, "al_rank": rank, "al_score": round(1 - rank / 100, 4)}
    data["al_model"] = "tiny@0123456789ab"
    if with_sha:
        data["al_sha256"] = sha
    prediction = {
        "model_version": "tiny@0123456789ab",
        "score": 0.0,
        "result": [choices_result(["bird"])],  # a prediction is never an annotation
    }
    return {"data": data, "predictions": [prediction]}


def choices_result(choices: list[str]) -> dict[str, Any]:
    return {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": choices}}


def make_project(server: Server, title: str, config: str, tasks: dict[str, Any], pool: Path) -> Any:
    project = server.call("POST", "/api/projects", {"title": title, "label_config": config})
    pid = project["id"]
    server.call(
        "POST",
        "/api/storages/localfiles",
        {"project": pid, "path": str(pool), "title": "pool", "use_blob_urls": False},
    )
    payload = [
        task_for(relpath, with_sha, kind, rank, pool)
        for rank, (relpath, (with_sha, kind, _)) in enumerate(tasks.items(), start=1)
    ]
    server.call("POST", f"/api/projects/{pid}/import", payload)
    created = server.call("GET", f"/api/tasks?project={pid}&page_size=100")
    by_image = {task["data"]["image"]: task["id"] for task in created["tasks"]}
    for item, (relpath, (_, _, given)) in zip(payload, tasks.items(), strict=True):
        task_id = by_image[item["data"]["image"]]
        for annotation in given:
            if annotation == "cancelled":
                body: dict[str, Any] = {"result": [], "was_cancelled": True}
            else:
                choices, ground_truth = annotation if isinstance(annotation, tuple) else (annotation, False)
                result = [choices_result(choices)] if choices else []
                body = {"result": result, "was_cancelled": False, "ground_truth": ground_truth}
            server.call("POST", f"/api/tasks/{task_id}/annotations", body)
        print(f"  task {task_id}: {relpath} ({len(given)} annotation(s))", file=sys.stderr)
    return server.call("GET", f"/api/projects/{pid}/export?exportType=JSON&download_all_tasks=true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label-studio", default="label-studio", help="the label-studio executable")
    parser.add_argument("--port", type=int, default=18131)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alselect-ls-"))
    root = work / "root"
    pool = root / "pool"
    shutil.copytree(DATA / "pool", pool)
    env = dict(
        os.environ,
        LABEL_STUDIO_USERNAME="fixture@example.com",
        LABEL_STUDIO_PASSWORD="fixture-password-123",
        LABEL_STUDIO_USER_TOKEN=TOKEN,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LOCAL_FILES_SERVING_ENABLED="true",
        LOCAL_FILES_DOCUMENT_ROOT=str(root),
        LATEST_VERSION_CHECK="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
    )
    url = f"http://127.0.0.1:{args.port}"
    command = [args.label_studio, "start", "--no-browser", "--internal-host", "127.0.0.1"]
    command += ["--port", str(args.port), "--data-dir", str(work / "data")]
    log = (work / "server.log").open("wb")
    server_process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(url, 300)
        server = Server(url)
        version = server.call("GET", "/api/version")
        single = make_project(server, "alselect single", SINGLE, SINGLE_TASKS, pool)
        multiple = make_project(server, "alselect multiple", MULTIPLE, MULTIPLE_TASKS, pool)
    finally:
        server_process.terminate()
        server_process.wait(timeout=60)
    for name, export in (("export.json", single), ("export_multiple.json", multiple)):
        (HERE / name).write_text(json.dumps(export, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    release = version.get("release") if isinstance(version, dict) else version
    print(f"Label Studio {release}: wrote {HERE}/export.json and export_multiple.json", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
