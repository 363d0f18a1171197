"""alselect's exports read by the platforms' own Python packages (no server, no network).

- label-studio-sdk: ``LabelInterface.validate_prediction``, the check Label Studio's server runs
  when prediction validation is on; alselect's ``--ls-config`` run inside that venv.
- FiftyOne: ``Dataset.from_dir(..., CSVDataset)`` loads the ``fiftyone`` export; sorting by
  ``al_score`` gives the rank order.
- Labelbox: the SDK's own data-row preparation (``DescriptorFileCreator._prepare_items_for_upload``,
  what ``create_data_rows`` runs before uploading), with the README's metadata schemas.
- SuperAnnotate: the SDK's CSV reader for ``attach_items`` and its priority models and clean-up.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

from alselect.exporters.label_studio import classification_config
from tests.conftest import REPO, TINY_CLASSES
from tests.helpers import HOSTILE_NAMES, export_text
from tests.integration.conftest import run_script, venv_python

pytestmark = pytest.mark.integration


def alselect(store: Path, *args: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [python or sys.executable, "-m", "alselect", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def ranked(store: Path) -> list[dict[str, str]]:
    import io

    return list(csv.DictReader(io.StringIO(export_text(store, "csv", record=False), newline="")))


# --- Label Studio SDK -----------------------------------------------------------------------------

VALIDATE = """
import json, sys
from label_studio_sdk.label_interface import LabelInterface
config = open(sys.argv[1], encoding="utf-8").read()
tasks = json.load(open(sys.argv[2], encoding="utf-8"))
li = LabelInterface(config)
errors = [li.validate_prediction(p, return_errors=True) for t in tasks for p in t["predictions"]]
bad = dict(tasks[0]["predictions"][0])
bad["result"] = [dict(bad["result"][0], value={"choices": ["not a class"]})]
print(json.dumps({"errors": errors, "bad": li.validate_prediction(bad, return_errors=True)}))
"""


def test_label_studio_sdk_accepts_the_predictions(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    python = venv_python("ALSELECT_IT_LABEL_STUDIO_SDK")
    store, _ = hostile
    config = tmp_path / "config.xml"
    config.write_text(classification_config(TINY_CLASSES), encoding="utf-8")
    tasks = tmp_path / "tasks.json"
    done = alselect(store, "export", "--dry-run", "-f", "label-studio", "--predictions", "-o", str(tasks))
    assert done.returncode == 0, done.stderr
    result = run_script(python, VALIDATE, str(config), str(tasks))
    assert len(result["errors"]) == len(HOSTILE_NAMES)
    assert result["errors"] == [[]] * len(HOSTILE_NAMES)
    assert result["bad"] and "not a class" in result["bad"][0]  # the check can fail


def test_ls_config_option_inside_the_sdk_venv(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    """alselect's own --ls-config, run where label-studio-sdk is installed (export needs no torch)."""
    python = venv_python("ALSELECT_IT_LABEL_STUDIO_SDK")
    store, _ = hostile
    good = tmp_path / "good.xml"
    good.write_text(classification_config(TINY_CLASSES, "cls", "img"), encoding="utf-8")
    args = ["export", "--dry-run", "-f", "label-studio", "--predictions", "--ls-from-name", "cls"]
    ok = alselect(store, *args, "--ls-to-name", "img", "--ls-config", str(good), python=python)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)) == len(HOSTILE_NAMES)
    predicted = ranked(store)[0]["predicted_label"]
    missing = tmp_path / "missing-class.xml"
    others = [name for name in TINY_CLASSES if name != predicted]
    missing.write_text(classification_config(others, "cls", "img"), encoding="utf-8")
    refused = alselect(store, *args, "--ls-to-name", "img", "--ls-config", str(missing), python=python)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "the labeling config rejects the prediction" in refused.stderr
    wrong_name = alselect(store, *args, "--ls-to-name", "photo", "--ls-config", str(good), python=python)
    assert wrong_name.returncode == 1 and "no object named 'photo'" in wrong_name.stderr


# --- FiftyOne -------------------------------------------------------------------------------------

FIFTYONE = """
import json, sys
import fiftyone as fo
ds = fo.Dataset.from_dir(
    dataset_dir=sys.argv[1], dataset_type=fo.types.CSVDataset,
    fields={"al_rank": int, "al_score": float, "al_confidence": float, "al_strategy": None,
            "al_model": None, "al_sha256": None, "al_predicted_label": None},
)
view = ds.sort_by("al_score", reverse=True)
print(json.dumps({
    "count": len(ds),
    "by_score": view.values("filepath"),
    "ranks_by_score": view.values("al_rank"),
    "by_rank": ds.sort_by("al_rank").values("filepath"),
    "types": [type(ds.first()[k]).__name__ for k in ("al_rank", "al_score", "al_sha256")],
}))
ds.delete()
"""


def test_fiftyone_loads_the_dataset_and_sorts_by_score(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    python = venv_python("ALSELECT_IT_FIFTYONE")
    store, folder = hostile
    done = alselect(store, "export", "--dry-run", "-f", "fiftyone", "-o", str(tmp_path / "dataset"))
    assert done.returncode == 0, done.stderr
    env = {"FIFTYONE_DATABASE_DIR": str(tmp_path / "db"), "FIFTYONE_DO_NOT_TRACK": "true"}
    result = run_script(python, FIFTYONE, str(tmp_path / "dataset"), env=env, timeout=600)
    expected = [str(folder / r["path"]) for r in ranked(store)]
    assert result["count"] == len(HOSTILE_NAMES)
    assert result["by_rank"] == expected
    scores = [float(r["score"]) for r in ranked(store)]
    if len(set(scores)) == len(scores):  # ties would make the score order ambiguous
        assert result["by_score"] == expected
    assert result["ranks_by_score"] == sorted(result["ranks_by_score"])
    assert result["types"] == ["int", "float", "str"]


# --- Labelbox -------------------------------------------------------------------------------------

LABELBOX = """
import json, sys
from labelbox.schema.internal.descriptor_file_creator import DescriptorFileCreator
from labelbox.schema.internal.data_row_upsert_item import DataRowCreateItem
from labelbox.schema.data_row_metadata import DataRowMetadataOntology

SCHEMAS = [  # what the README tells users to create once
    {"id": f"{name:x<25}", "name": name, "kind": kind, "reserved": False, "options": []}
    for name, kind in [("al_rank", "CustomMetadataNumber"), ("al_score", "CustomMetadataNumber"),
                       ("al_strategy", "CustomMetadataString"), ("al_model", "CustomMetadataString"),
                       ("al_sha256", "CustomMetadataString")]
]

class OfflineClient:
    def __init__(self):
        self.uploads = []
    def execute(self, query, *args, **kwargs):
        return {"customMetadataOntology": SCHEMAS}
    def get_data_row_metadata_ontology(self):
        return DataRowMetadataOntology(self)
    def upload_file(self, path):
        self.uploads.append(path)
        return "https://storage.labelbox.example/" + str(len(self.uploads))

def prepare(rows):
    client = OfflineClient()
    items = DescriptorFileCreator(client)._prepare_items_for_upload(DataRowCreateItem.build("DS", rows))
    return [i["payload"] for i in items], client.uploads

out = {}
for name in sys.argv[1:]:
    rows = json.load(open(name, encoding="utf-8"))
    payloads, uploads = prepare(rows)
    out[name] = {"payloads": payloads, "uploads": uploads}
try:
    prepare([dict(rows[0], row_data="s3://bucket/pool/x.png")])
    out["s3"] = "accepted"
except Exception as exc:
    out["s3"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out, default=str))
"""


def test_labelbox_sdk_prepares_the_data_rows(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    python = venv_python("ALSELECT_IT_LABELBOX")
    store, folder = hostile
    web = alselect(store, "export", "--dry-run", "-f", "labelbox", "-o", f"{tmp_path}/web/", "--uri-prefix",
                   "https://bucket.s3.us-east-1.amazonaws.com/pool/")  # fmt: skip
    local = alselect(store, "export", "--dry-run", "-f", "labelbox", "-o", f"{tmp_path}/local/")
    assert web.returncode == 0 and local.returncode == 0, web.stderr + local.stderr
    web_rows, local_rows = tmp_path / "web" / "data_rows.json", tmp_path / "local" / "data_rows.json"
    result = run_script(python, LABELBOX, str(web_rows), str(local_rows))
    expected = {r["path"]: r for r in ranked(store)}
    web_out = result[str(web_rows)]
    assert web_out["uploads"] == []  # URLs are referenced, not uploaded
    # global keys are `<relative path>@<16 hex of (folder, path, content)>`: unique and stable
    keys = {p["global_key"].rpartition("@")[0]: p["global_key"] for p in web_out["payloads"]}
    assert sorted(keys) == sorted(HOSTILE_NAMES) and len(set(keys.values())) == len(HOSTILE_NAMES)
    for payload in web_out["payloads"]:
        metadata = {m["schemaId"].rstrip("x"): m["value"] for m in payload["metadata_fields"]}
        row = expected[payload["global_key"].rpartition("@")[0]]
        assert metadata["al_rank"] == float(row["rank"]) and metadata["al_sha256"] == row["sha256"]
        assert metadata["al_score"] == pytest.approx(float(row["score"]), rel=1e-7)
        assert payload["media_type"] == "IMAGE" and payload["row_data"].startswith("https://bucket.s3")
    local_out = result[str(local_rows)]
    # Without --uri-prefix the SDK uploads each local file, as create_data_rows would.
    assert sorted(local_out["uploads"]) == sorted(str(folder / name) for name in HOSTILE_NAMES)
    assert "s3 assets must start with 'https'" in result["s3"]  # the SDK's own refusal, which we mirror


# --- SuperAnnotate --------------------------------------------------------------------------------

SUPERANNOTATE = """
import json, sys
from pydantic import TypeAdapter
from superannotate.lib.app.helpers import get_name_url_duplicated_from_csv
from superannotate.lib.core.entities.project import AttachmentEntity
from superannotate.lib.core.types import PriorityScoreEntity
from superannotate.lib.core.usecases.annotations import UploadPriorityScoresUseCase

attachments, duplicates = get_name_url_duplicated_from_csv(sys.argv[1])
entities = TypeAdapter(list[AttachmentEntity]).validate_python(attachments)
given = json.load(open(sys.argv[2], encoding="utf-8"))
scores = TypeAdapter(list[PriorityScoreEntity]).validate_python(given)
print(json.dumps({
    "attachments": [{"name": e.name, "url": e.url} for e in entities],
    "duplicates": duplicates,
    "priorities": [{"name": s.name, "sent": UploadPriorityScoresUseCase.get_clean_priority(s.priority),
                    "given": s.priority} for s in scores],
}))
"""


def test_superannotate_sdk_reads_the_attach_csv_and_priorities(
    hostile: tuple[Path, Path], tmp_path: Path
) -> None:
    python = venv_python("ALSELECT_IT_SUPERANNOTATE")
    store, _ = hostile
    done = alselect(store, "export", "--dry-run", "-f", "superannotate", "-o", str(tmp_path / "sa"),
                    "--uri-prefix", "https://cdn.example.com/pool/")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = run_script(
        python, SUPERANNOTATE, str(tmp_path / "sa.attach.csv"), str(tmp_path / "sa.priorities.json"),
        env={"SA_VERSION_CHECK": "false"},
    )  # fmt: skip
    with (tmp_path / "sa.attach.csv").open(encoding="utf-8", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert result["duplicates"] == []  # nothing silently dropped
    assert result["attachments"] == [{"name": r["name"], "url": r["url"]} for r in written]
    assert len(result["attachments"]) == len(HOSTILE_NAMES)
    prio = result["priorities"]
    assert [p["name"] for p in prio] == [r["name"] for r in written]
    assert all(p["sent"] == p["given"] for p in prio)  # no truncation or clamping by the SDK
    assert [p["sent"] for p in prio] == sorted((p["sent"] for p in prio), reverse=True)
