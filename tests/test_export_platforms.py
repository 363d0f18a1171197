"""Platform formats, parsed back and checked against the facts in export-formats.md.

Every format is written from a real store whose folder holds hostile file names (spaces, ``#``,
``%``, ``+``, ``&``, quotes, commas, unicode, shell and XML metacharacters, sub-folders) and parsed
back; each check is a fact the platform depends on (URL encoding, name rules, priority direction,
header lines, sizes after EXIF orientation).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from PIL import Image

from alselect.errors import DataError, UsageError
from alselect.export import export_latest
from alselect.exporters import (
    ExportContext,
    ExportOptions,
    ExportRow,
    FileSet,
    RunInfo,
    get_exporter,
    join_uri,
)
from alselect.exporters.cvat import HINT_FILE_LIST_LIMIT, CvatExporter
from alselect.exporters.label_studio import classification_config, local_files_url
from alselect.exporters.superannotate import MAX_NAME, item_name, priorities, unique_names
from alselect.store import Store
from tests.conftest import TINY_CLASSES, write_image
from tests.helpers import HOSTILE_NAMES, hostile_store, score


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[Path, Path]:
    """``(store, folder)``: every hostile name scored once."""
    base = tmp_path_factory.mktemp("hostile")
    return hostile_store(base, tiny_checkpoint)


def export(store: Path, fmt: str, output: Path | str | None = None, **kwargs: Any) -> tuple[str, Any]:
    """Run ``export_latest`` without recording; returns (stdout text, result)."""
    buffer = io.StringIO(newline="")
    options = ExportOptions(**kwargs.pop("options", {}))
    with Store.open(store, write=True) as handle:
        result = export_latest(
            handle, fmt, output=output, stdout=lambda: buffer, record=False, options=options, **kwargs
        )
    return buffer.getvalue(), result


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ranked_csv(store: Path) -> list[dict[str, str]]:
    text, _ = export(store, "csv")
    return list(csv.DictReader(io.StringIO(text, newline="")))


# --- URIs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "relpath", "expected"),
    [
        ("https://host/pool/", "a b#1%+&,'\"?.png", "https://host/pool/a%20b%231%25%2B%26%2C%27%22%3F.png"),
        ("https://host/pool", "sub dir/ñ.png", "https://host/pool/sub%20dir/%C3%B1.png"),
        ("http://h/p/", "emoji 🐝.png", "http://h/p/emoji%20%F0%9F%90%9D.png"),
        ("s3://bucket/pool/", "a b#1+&.png", "s3://bucket/pool/a b#1+&.png"),
        ("gs://bucket/pool", "x/y z.png", "gs://bucket/pool/x/y z.png"),
    ],
)
def test_uri_prefix_encodes_web_urls_and_keeps_bucket_keys(prefix: str, relpath: str, expected: str) -> None:
    assert join_uri(prefix, relpath) == expected
    if expected.startswith("http"):
        assert unquote(expected[len(prefix.rstrip("/")) + 1 :]) == relpath


def test_csv_uri_and_folder_columns_from_a_store(hostile: tuple[Path, Path]) -> None:
    store, folder = hostile
    text, _ = export(store, "csv", options={"uri_prefix": "https://cdn.example/pool/"})
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert sorted(r["path"] for r in rows) == sorted(HOSTILE_NAMES)
    for row in rows:
        assert row["folder"] == str(folder)
        assert row["uri"] == "https://cdn.example/pool/" + quote(row["path"], safe="/")
        assert sha256_of(Path(row["folder"]) / row["path"]) == row["sha256"]
    plain = ranked_csv(store)
    assert {r["uri"] for r in plain} == {""}


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_folder_column_in_tsv_and_jsonl(hostile: tuple[Path, Path], fmt: str) -> None:
    store, folder = hostile
    text, _ = export(store, fmt, absolute=True)
    if fmt == "tsv":
        records: list[dict[str, Any]] = list(
            csv.DictReader(io.StringIO(text, newline=""), dialect="excel-tab")
        )
    else:
        records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == len(HOSTILE_NAMES)
    for record in records:
        assert record["folder"] == str(folder)
        assert Path(record["path"]).is_relative_to(folder)  # --absolute: the folder is still given


# --- Label Studio ---------------------------------------------------------------------------------


def test_label_studio_tasks_local_files(hostile: tuple[Path, Path]) -> None:
    store, folder = hostile
    text, _ = export(store, "label-studio")
    tasks = json.loads(text)
    expected = ranked_csv(store)
    assert isinstance(tasks, list) and len(tasks) == len(expected)
    for task, row in zip(tasks, expected, strict=True):
        data = task["data"]
        assert set(data) == {"image", "al_rank", "al_score", "al_strategy", "al_model", "al_sha256"}
        assert data["image"] == "/data/local-files/?d=" + quote(row["path"], safe="/")
        assert unquote(data["image"].split("?d=", 1)[1]) == row["path"]
        query = data["image"].split("?d=", 1)[1]
        assert not set(query) & set(" #+&,'\"?") and re.fullmatch(r"([^%]|%[0-9A-F]{2})*", query)
        assert type(data["al_rank"]) is int and data["al_rank"] == int(row["rank"])
        assert type(data["al_score"]) is float and format(data["al_score"], ".8g") == row["score"]
        assert (data["al_strategy"], data["al_model"]) == (row["strategy"], row["model"])
        assert data["al_sha256"] == sha256_of(folder / row["path"])
        assert "predictions" not in task


def test_label_studio_document_root_and_uri_prefix(hostile: tuple[Path, Path]) -> None:
    store, folder = hostile
    tasks = json.loads(export(store, "label-studio", options={"document_root": folder.parent})[0])
    rows = ranked_csv(store)
    assert [t["data"]["image"] for t in tasks] == [local_files_url("pool/" + r["path"]) for r in rows]
    tasks = json.loads(export(store, "label-studio", options={"uri_prefix": "https://h/p/"})[0])
    assert [t["data"]["image"] for t in tasks] == ["https://h/p/" + quote(r["path"]) for r in rows]
    with pytest.raises(UsageError, match="not under --ls-document-root"):
        export(store, "label-studio", options={"document_root": folder / "sub dir"})


def test_label_studio_predictions_lowest_score_first(hostile: tuple[Path, Path]) -> None:
    store, _ = hostile
    options = {"predictions": True, "ls_from_name": "cls", "ls_to_name": "img"}
    tasks = json.loads(export(store, "label-studio", options=options)[0])
    rows = ranked_csv(store)
    scores = []
    for task, row in zip(tasks, rows, strict=True):
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == row["model"]
        assert prediction["result"] == [
            {
                "from_name": "cls",
                "to_name": "img",
                "type": "choices",
                "value": {"choices": [row["predicted_label"]]},
            }
        ]
        assert row["predicted_label"] in TINY_CLASSES
        scores.append(prediction["score"])
    # Label Studio's uncertainty sampling serves the lowest prediction score first: rank 1 = 0.
    assert scores == sorted(scores) and len(set(scores)) == len(scores)
    assert scores[0] == 0.0 and all(0.0 <= s < 1.0 for s in scores)


def test_label_studio_empty_export_is_an_empty_array(tmp_path: Path) -> None:
    stream = io.StringIO()
    assert get_exporter("label-studio").write([], stream) == []
    assert json.loads(stream.getvalue()) == []


def test_ls_config_without_the_sdk_names_the_extra(
    hostile: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "label_studio_sdk", None)
    monkeypatch.setitem(sys.modules, "label_studio_sdk.label_interface", None)
    config = classification_config(TINY_CLASSES)
    with pytest.raises(UsageError, match=r"alselect\[label-studio\]"):
        export(hostile[0], "label-studio", options={"predictions": True, "ls_config": config})
    with pytest.raises(UsageError, match="--predictions"):
        export(hostile[0], "label-studio", options={"ls_config": config})


def test_models_without_class_names_use_class_indices() -> None:
    assert RunInfo(num_classes=3).class_names == ("0", "1", "2")
    assert RunInfo(classes=("a", "b"), num_classes=2).class_names == ("a", "b")


def test_classification_config_lists_the_classes() -> None:
    classes = ['cat "tabby"', "dog & puppy", "<bird>", "ünïcode"]
    root = ET.fromstring(classification_config(classes, from_name="cls", to_name="img"))
    image = root.find("Image")
    choices = root.find("Choices")
    assert image is not None and choices is not None
    assert (image.get("name"), image.get("value")) == ("img", "$image")
    assert (choices.get("name"), choices.get("toName"), choices.get("choice")) == ("cls", "img", "single")
    assert [c.get("value") for c in choices.findall("Choice")] == classes


# --- CVAT -----------------------------------------------------------------------------------------


def test_cvat_manifest(hostile: tuple[Path, Path]) -> None:
    store, folder = hostile
    text, result = export(store, "cvat")
    lines = text.split("\n")
    assert lines[:2] == ['{"version":"1.1"}', '{"type":"images"}']
    assert lines[-1] == "" and "" not in lines[:-1]  # no blank lines
    text.encode("ascii")  # compact ASCII JSON, as CVAT's own tool writes
    rows = ranked_csv(store)
    items = [json.loads(line) for line in lines[2:-1]]
    assert len(items) == len(rows)
    for item, row in zip(items, rows, strict=True):  # rank order = frame order
        assert list(item) == ["name", "extension", "width", "height"]
        assert item["name"] + item["extension"] == row["path"]
        assert item["extension"] == ".png"
        with Image.open(folder / row["path"]) as img:
            assert (item["width"], item["height"]) == img.size
        assert ", " not in lines[2 + items.index(item)] and '": ' not in lines[2 + items.index(item)]
    hint = "\n".join(result.notes)
    assert "share" in hint and "--sorting-method predefined" in hint


def test_cvat_size_after_exif_orientation(tmp_path: Path, tiny_checkpoint: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for orientation, name in (
        (1, "upright.jpg"),
        (6, "turned.jpg"),
        (8, "turned_back.jpg"),
        (3, "flipped.jpg"),
    ):
        exif = Image.Exif()
        exif[274] = orientation
        Image.new("RGB", (40, 20), (orientation * 30, 0, 0)).save(pool / name, exif=exif)
    score(tmp_path / "store", pool, tiny_checkpoint)
    text, _ = export(tmp_path / "store", "cvat")
    sizes = {i["name"]: (i["width"], i["height"]) for i in map(json.loads, text.splitlines()[2:])}
    assert sizes == {"upright": (40, 20), "flipped": (40, 20), "turned": (20, 40), "turned_back": (20, 40)}


def test_cvat_refuses_paths_that_collide(tmp_path: Path, tiny_checkpoint: Path) -> None:
    write_image(tmp_path / "pool" / "a" / "x.png", seed=1)
    write_image(tmp_path / "pool" / "a" / "x.jpg", seed=2)
    write_image(tmp_path / "pool" / "b" / "x.png", seed=3)
    score(tmp_path / "store", tmp_path / "pool", tiny_checkpoint)
    target = tmp_path / "manifest.jsonl"
    with pytest.raises(DataError, match=r"'a/x\.(png|jpg)' and 'a/x\.(png|jpg)' would collide in CVAT"):
        export(tmp_path / "store", "cvat", output=target)
    assert not target.exists()
    # Once one of the pair is labeled, the rest export; the same base name in two folders is fine for
    # share or cloud storage, and the hint warns that a local upload would mix them up.
    with Store.open(tmp_path / "store", write=True) as handle:
        handle.add_labels([sha256_of(tmp_path / "pool" / "a" / "x.jpg")], "test")
    text, result = export(tmp_path / "store", "cvat")
    names = sorted(json.loads(line)["name"] for line in text.splitlines()[2:])
    assert names == ["a/x", "b/x"] and any("local upload" in note for note in result.notes)


def test_cvat_hint_reads_the_file_list_back_from_the_manifest(
    hostile: tuple[Path, Path], tmp_path: Path
) -> None:
    """Past a few files the hint lists them with a python one-liner: run it, get the files in order."""
    store, _ = hostile
    manifest = tmp_path / "manifest.jsonl"
    _, result = export(store, "cvat", output=manifest)
    assert len(HOSTILE_NAMES) > HINT_FILE_LIST_LIMIT
    mapfile = next(line for line in result.notes if "mapfile" in line)
    script = mapfile.split("python3 -c ", 1)[1].rsplit(" ", 1)[0]
    import shlex

    (code,) = shlex.split(script)
    listed = subprocess.run(
        [sys.executable, "-c", code, str(manifest)], capture_output=True, text=True, check=True
    ).stdout
    rows = [r["path"] for r in ranked_csv(store)]
    assert listed.split("\n")[:-1] == rows  # "tab\there.png" survives; no name holds a newline
    assert any('--labels \'[{"name": "ant"}' in line for line in result.notes)


def cvat_commands(notes: list[str]) -> list[list[str]]:
    """The ``cvat-cli`` command lines of a CVAT hint, split as a shell would."""
    import shlex

    return [shlex.split(line.strip()) for line in notes if line.strip().startswith("cvat-cli ")]


def test_cvat_hint_says_where_files_go_and_gives_a_command_cvat_cli_accepts(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Defect 17: the share is the folder CVAT mounts; without class names the command must not name
    a labels file that does not exist (cvat-cli refuses it) without saying to write it."""

    folder = tmp_path / "pool"
    row = ExportRow(1, "a b.png", 0.5, "entropy", "m", "", None, "0" * 64, folder=str(folder))
    with_classes = CvatExporter().notes([row], ExportContext(run=RunInfo(id=7, classes=("cat", "dog"))), [])
    assert with_classes[0].startswith(f"CVAT: {folder} must be the folder mounted as CVAT's file share")
    assert "manifest.jsonl to its top level" in with_classes[0]
    (command,) = cvat_commands(with_classes)
    assert command[command.index("--labels") + 1] == '[{"name": "cat"}, {"name": "dog"}]'
    assert command[command.index("share") + 1 :][:2] == ["manifest.jsonl", "a b.png"]

    without = CvatExporter().notes([row], ExportContext(run=RunInfo(id=7)), [])
    (command,) = cvat_commands(without)
    assert command[command.index("--labels") + 1] == "labels.json"
    assert any("write the task's labels to labels.json" in line for line in without)

    cvat_cli = shutil.which("cvat-cli")  # the real parser, where installed
    if cvat_cli is None:
        pytest.skip("cvat-cli is not installed")
    (tmp_path / "labels.json").write_text('[{"name": "cat"}]')
    for command in (cvat_commands(with_classes)[0], cvat_commands(without)[0]):
        # an unreachable server: arguments cvat-cli accepts fail on the connection (1), not usage (2)
        argv = [cvat_cli, "--server-host", "http://127.0.0.1:9", "--auth", "u:p", *command[5:]]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode != 2 and "error: argument" not in done.stderr, done.stderr


def test_cvat_takes_no_uri_prefix(hostile: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError, match="--uri-prefix does not apply"):
        export(hostile[0], "cvat", options={"uri_prefix": "s3://b/p/"})


# --- Labelbox -------------------------------------------------------------------------------------


def test_labelbox_rows_and_priorities(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    store, folder = hostile
    _, result = export(
        store, "labelbox", output=str(tmp_path / "out") + "/", options={"uri_prefix": "https://h/p"}
    )
    assert result.files == [
        str(tmp_path / "out" / "data_rows.json"),
        str(tmp_path / "out" / "priorities.csv"),
    ]
    rows = ranked_csv(store)
    data_rows = json.loads((tmp_path / "out" / "data_rows.json").read_text(encoding="utf-8"))
    assert len(data_rows) == len(rows)
    for data_row, row in zip(data_rows, rows, strict=True):
        assert set(data_row) == {"row_data", "global_key", "media_type", "metadata_fields"}
        assert data_row["row_data"] == "https://h/p/" + quote(row["path"])
        identity = "\0".join([str(folder), row["path"], row["sha256"]]).encode()
        assert data_row["global_key"] == f"{row['path']}@{hashlib.sha256(identity).hexdigest()[:16]}"
        assert data_row["media_type"] == "IMAGE"
        metadata = {m["name"]: m["value"] for m in data_row["metadata_fields"]}
        assert metadata["al_rank"] == int(row["rank"])
        assert format(metadata["al_score"], ".8g") == row["score"]
        assert metadata["al_sha256"] == sha256_of(folder / row["path"])
        assert (metadata["al_strategy"], metadata["al_model"]) == (row["strategy"], row["model"])
    assert len({d["global_key"] for d in data_rows}) == len(data_rows)
    with (tmp_path / "out" / "priorities.csv").open(encoding="utf-8", newline="") as handle:
        records = list(csv.reader(handle))
    assert records[0] == ["global_key", "priority"]
    # Labelbox serves lower priority numbers first: rank 1 gets priority 1.
    assert records[1:] == [[d["global_key"], r["rank"]] for d, r in zip(data_rows, rows, strict=True)]


def test_labelbox_global_keys_are_unique_per_folder_path_and_content_and_stable(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Defect 7: the same relative path in two folders, and an edited file, collided in Labelbox."""
    keys: list[str] = []
    store = tmp_path / "store"

    def labelbox_keys(folder: Path, name: str) -> list[str]:
        score(store, folder, tiny_checkpoint)
        export(store, "labelbox", output=tmp_path / f"lb-{name}", options={"uri_prefix": "https://h/p/"})
        return [d["global_key"] for d in json.loads((tmp_path / f"lb-{name}.data_rows.json").read_text())]

    for folder, seed in (("a", 1), ("b", 2)):
        write_image(tmp_path / folder / "x.png", seed=seed)
        keys += labelbox_keys(tmp_path / folder, folder)
    assert labelbox_keys(tmp_path / "b", "b-again") == keys[1:]  # stable across reruns
    write_image(tmp_path / "b" / "x.png", seed=3)  # edited: new content at the same path
    keys += labelbox_keys(tmp_path / "b", "b-edited")
    assert len(keys) == len(set(keys)) == 3 and all(k.startswith("x.png@") for k in keys)


def test_labelbox_local_paths_without_prefix_and_no_s3(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    store, folder = hostile
    export(store, "labelbox", output=tmp_path / "batch")  # a prefix
    data_rows = json.loads((tmp_path / "batch.data_rows.json").read_text(encoding="utf-8"))
    assert all(
        Path(d["row_data"]).is_file() and Path(d["row_data"]).is_relative_to(folder) for d in data_rows
    )
    assert (tmp_path / "batch.priorities.csv").is_file() and (tmp_path / "batch.run.json").is_file()
    with pytest.raises(UsageError, match=r"Labelbox rejects s3://.*https://"):
        export(store, "labelbox", output=tmp_path / "s3", options={"uri_prefix": "s3://bucket/pool/"})
    assert not list(tmp_path.glob("s3*"))


# --- SuperAnnotate --------------------------------------------------------------------------------


def test_superannotate_attach_csv_and_priorities(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = hostile
    export(
        store, "superannotate", output=tmp_path / "sa", options={"uri_prefix": "https://bucket.example/pool/"}
    )
    with (tmp_path / "sa.attach.csv").open(encoding="utf-8", newline="") as handle:
        attach = list(csv.reader(handle))
    assert attach[0] == ["url", "name"]  # every other column would be dropped silently
    rows = ranked_csv(store)
    names = [name for _, name in attach[1:]]
    assert [url for url, _ in attach[1:]] == ["https://bucket.example/pool/" + quote(r["path"]) for r in rows]
    assert len(set(names)) == len(names)  # duplicates are silently not uploaded
    for name in names:
        assert 0 < len(name) <= MAX_NAME
        assert not set(name) & set("<>:\"'/\\?*&$!+\t\n\r"), name
        assert name == name.strip()
    long_name = next(n for n, r in zip(names, rows, strict=True) if r["path"].startswith("xxx"))
    assert long_name.endswith(".png") and len(long_name) == MAX_NAME
    prio = json.loads((tmp_path / "sa.priorities.json").read_text(encoding="utf-8"))
    assert [p["name"] for p in prio] == names
    values = [p["priority"] for p in prio]
    assert all(type(v) is int and 0 <= v <= 1_000_000 for v in values)
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)  # higher first


def test_superannotate_names_stay_unique_after_sanitising() -> None:
    rows = [
        ExportRow(rank=i + 1, path=p, score=0.5, strategy="s", model="m", predicted_label="", confidence=None,
                  sha256=f"{i:x}" * 64)
        for i, p in enumerate(["a&b.png", "a+b.png", "a_b.png", "d/e.png", "d__e.png", "y" * 300 + ".jpeg"])
    ]  # fmt: skip
    names = unique_names(rows)
    assert len(set(names)) == len(names)
    assert names[2] not in (names[0], names[1]) and names[0].startswith("a_b~")
    assert all(len(n) <= MAX_NAME for n in names) and names[5].endswith(".jpeg")
    assert item_name("sub/dir/x?.png") == "sub__dir__x_.png"


def test_superannotate_priorities_stay_in_range_for_huge_exports() -> None:
    assert priorities(3) == [3, 2, 1]
    huge = priorities(2_000_001)
    assert huge[0] == 1_000_000 and huge[-1] == 0
    assert all(a >= b for a, b in itertools.pairwise(huge))


def test_superannotate_needs_a_web_url(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--uri-prefix"):
        export(hostile[0], "superannotate", output=tmp_path / "x")
    with pytest.raises(UsageError, match="http://, https://"):
        export(hostile[0], "superannotate", output=tmp_path / "x", options={"uri_prefix": "s3://b/p/"})


# --- SageMaker Ground Truth ------------------------------------------------------------------------


def test_sagemaker_manifest(hostile: tuple[Path, Path]) -> None:
    store, _ = hostile
    text, _ = export(store, "sagemaker", options={"uri_prefix": "s3://bucket/pool"})
    rows = ranked_csv(store)
    lines = text.split("\n")
    assert lines[-1] == ""
    for line, row in zip(lines[:-1], rows, strict=True):
        record = json.loads(line)
        assert record["source-ref"] == "s3://bucket/pool/" + row["path"]  # object keys as they are
        assert record["al-rank"] == int(row["rank"]) and format(record["al-score"], ".8g") == row["score"]
        assert not any(key.startswith("$") for key in record)
        assert len(line) <= 100_000


@pytest.mark.parametrize("prefix", [None, "https://host/pool/", "/mnt/pool/"])
def test_sagemaker_refuses_anything_but_s3(hostile: tuple[Path, Path], prefix: str | None) -> None:
    with pytest.raises(UsageError, match="--uri-prefix" if prefix is None else "s3://"):
        export(hostile[0], "sagemaker", options={"uri_prefix": prefix})


# --- FiftyOne -------------------------------------------------------------------------------------


def test_fiftyone_csv_dataset(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    store, folder = hostile
    _, result = export(store, "fiftyone", output=tmp_path / "dataset")
    labels = tmp_path / "dataset" / "labels.csv"
    assert result.files == [str(labels)] and result.sidecar == str(tmp_path / "dataset" / "run.json")
    assert (tmp_path / "dataset" / "data").is_dir()  # FiftyOne's importer refuses a dataset without it
    with open(labels, encoding="utf-8") as handle:  # as FiftyOne reads it: universal newlines
        records = list(csv.DictReader(handle))
    rows = ranked_csv(store)
    assert list(records[0]) == [
        "filepath", "al_rank", "al_score", "al_strategy", "al_model", "al_sha256", "al_predicted_label",
        "al_confidence",
    ]  # fmt: skip
    for record, row in zip(records, rows, strict=True):
        assert record["filepath"] == str(folder / row["path"]) and Path(record["filepath"]).is_file()
        assert (int(record["al_rank"]), record["al_score"], record["al_sha256"]) == (
            int(row["rank"]),
            row["score"],
            row["sha256"],
        )
        assert record["al_predicted_label"] == row["predicted_label"]


def test_fiftyone_skips_carriage_returns(tmp_path: Path) -> None:
    rows = [
        ExportRow(rank=i + 1, path=p, score=0.5, strategy="s", model="m", predicted_label="", confidence=None,
                  sha256="0" * 64, folder="/pool", relpath=p)
        for i, p in enumerate(["a.png", "b\rc.png", "d\ne.png"])
    ]  # fmt: skip
    from alselect.export import writable_rows

    exporter = get_exporter("fiftyone")
    kept, skipped = writable_rows(exporter, rows, ExportContext())
    assert [(r.path, r.rank) for r in kept] == [("a.png", 1), ("d\ne.png", 2)]  # ranks stay contiguous
    assert [path for path, _ in skipped] == ["b\rc.png"] and "carriage return" in skipped[0][1]
    written = exporter.write_files(kept, FileSet(tmp_path, folder=True), ExportContext())
    assert [r.path for r in written] == ["a.png", "d\ne.png"]
    with open(tmp_path / "labels.csv", encoding="utf-8") as handle:  # universal newlines, as FiftyOne
        assert [r["filepath"] for r in csv.DictReader(handle)] == ["/pool/a.png", "/pool/d\ne.png"]


# --- multi-file outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["labelbox", "superannotate", "fiftyone"])
def test_multi_file_formats_need_an_output(hostile: tuple[Path, Path], fmt: str) -> None:
    options = {} if fmt == "fiftyone" else {"uri_prefix": "https://h/p/"}
    with pytest.raises(UsageError, match="writes several files: give -o"):
        export(hostile[0], fmt, options=options)


def test_multi_file_output_refuses_an_existing_file(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("keep")
    with pytest.raises(Exception, match="is a file"):
        export(hostile[0], "labelbox", output=target)
    assert target.read_text() == "keep"


def test_every_format_round_trips_the_hostile_names(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    """Each format, parsed back, names exactly the scored files (no name lost or mangled)."""
    store, folder = hostile
    expected = sorted(HOSTILE_NAMES)
    https = {"uri_prefix": "https://h/p/"}

    def from_url(url: str, prefix: str) -> str:
        assert url.startswith(prefix)
        return unquote(url[len(prefix) :])

    got: dict[str, list[str]] = {}
    got["csv"] = [r["path"] for r in ranked_csv(store)]
    got["label-studio"] = [
        from_url(t["data"]["image"], "/data/local-files/?d=")
        for t in json.loads(export(store, "label-studio")[0])
    ]
    got["cvat"] = [
        i["name"] + i["extension"] for i in map(json.loads, export(store, "cvat")[0].splitlines()[2:])
    ]
    got["sagemaker"] = [
        json.loads(line)["source-ref"].removeprefix("s3://b/")
        for line in export(store, "sagemaker", options={"uri_prefix": "s3://b/"})[0].splitlines()
    ]
    export(store, "labelbox", output=tmp_path / "lb", options=https)
    got["labelbox"] = [
        from_url(d["row_data"], "https://h/p/")
        for d in json.loads((tmp_path / "lb.data_rows.json").read_text())
    ]
    export(store, "superannotate", output=tmp_path / "sa", options=https)
    with (tmp_path / "sa.attach.csv").open(encoding="utf-8", newline="") as handle:
        got["superannotate"] = [from_url(r["url"], "https://h/p/") for r in csv.DictReader(handle)]
    export(store, "fiftyone", output=tmp_path / "fo")
    with (tmp_path / "fo" / "labels.csv").open(encoding="utf-8") as handle:
        got["fiftyone"] = [str(Path(r["filepath"]).relative_to(folder)) for r in csv.DictReader(handle)]
    export(store, "paths", output=tmp_path / "p.txt")
    got["paths"] = (tmp_path / "p.txt").read_text(encoding="utf-8").splitlines()
    for fmt, names in got.items():
        assert sorted(names) == expected, fmt
        assert names == got["csv"], f"{fmt} is not in rank order"


def test_rows_are_built_from_the_store_with_relpath_and_file(hostile: tuple[Path, Path]) -> None:
    _, folder = hostile
    rel = "sub dir/inner #%+&.png"
    row = ExportRow(rank=1, path="/abs", score=0.0, strategy="s", model="m", predicted_label="",
                    confidence=None, sha256="", folder=str(folder), relpath=rel)  # fmt: skip
    assert row.file == folder / "sub dir" / "inner #%+&.png" and row.relative == "sub dir/inner #%+&.png"
    assert dataclasses.replace(row, relpath=None).relative == "/abs"


@pytest.mark.parametrize("prefix", ["s3://b/pool/", "gs://b/pool", "https://h/pool/"])
@pytest.mark.parametrize("fmt", ["paths", "label-studio"])
def test_uri_exports_label_back_exactly_the_exported_images(
    hostile: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str, fmt: str
) -> None:
    """Defects 1 and 8: reading a URI export back (no sha256: a paths list, or Label Studio tasks
    without al_sha256) labels exactly the exported images, whatever their names hold."""
    import shutil

    from alselect.labels import import_labels

    store = tmp_path / "store"
    shutil.copytree(hostile[0], store)
    text, _ = export(store, fmt, options={"uri_prefix": prefix})
    if fmt == "label-studio":
        tasks = json.loads(text)
        for task in tasks:
            del task["data"]["al_sha256"]
            task["annotations"] = [{"result": [{"value": {"choices": ["ant"]}}]}]
        text = json.dumps(tasks)
    monkeypatch.chdir(tmp_path)
    with Store.open(store, write=True) as handle:
        result = import_labels(handle, text, "back", uri_prefix=prefix)
        got = {row[0] for row in handle.rows("SELECT sha256 FROM labels")}
    assert (result.unknown, result.ambiguous) == ([], [])
    assert got == {r["sha256"] for r in ranked_csv(hostile[0])} and len(got) == len(HOSTILE_NAMES)
