"""Labels back from annotation platforms: Label Studio (real export), CVAT XML, COCO, path,label tables.

Fixtures and how they were made: tests/data/annotations/README.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from alselect.annotations import read_annotations, reader_registry
from alselect.labels import LabelResult, import_labels
from alselect.status import store_status
from alselect.store import Store
from alselect.sync import sync_folder
from tests.helpers import cli

DATA = Path(__file__).parent / "data" / "annotations"
LS_EXPORT = DATA / "label-studio" / "export.json"
LS_MULTIPLE = DATA / "label-studio" / "export_multiple.json"
CVAT_XML = DATA / "cvat" / "annotations.xml"
COCO_JSON = DATA / "cvat" / "instances_default.json"
URI_PREFIX = "https://images.example.com/pool/"


@pytest.fixture
def lab(tmp_path: Path, store_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fixture pool copied to ``root/pool`` and recorded in a store; the working directory is
    an unrelated folder. Returns ``root`` (Label Studio's document root in the fixtures)."""
    root = tmp_path / "root"
    shutil.copytree(DATA / "pool", root / "pool")
    with Store.open(store_path, write=True, create=True) as store:
        sync_folder(store, Path(os.path.realpath(root / "pool")))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root


def sha(relpath: str) -> str:
    return hashlib.sha256((DATA / "pool" / relpath).read_bytes()).hexdigest()


def label_file(store_path: Path, path: Path, **options: Any) -> LabelResult:
    with Store.open(store_path, write=True) as store:
        return import_labels(store, path.read_text(encoding="utf-8"), str(path), **options)


def labels(store_path: Path) -> dict[str, str | None]:
    """relpath -> class (``None``: labeled without a class) for every labeled pool image."""
    by_sha = {sha(p.relative_to(DATA / "pool").as_posix()): p for p in (DATA / "pool").rglob("*.png")}
    with Store.open(store_path) as store:
        rows = store.rows("SELECT sha256, label FROM labels")
    return {by_sha[digest].relative_to(DATA / "pool").as_posix(): label for digest, label in rows}


def ls_task(task_id: int) -> str:
    """The ref a Label Studio task is reported by."""
    tasks = json.loads(LS_EXPORT.read_text(encoding="utf-8"))
    task = next(task for task in tasks if task["id"] == task_id)
    return f"task {task_id} ({task['data']['image']})"


@pytest.mark.parametrize(
    ("path", "fmt"),
    [(LS_EXPORT, "label-studio"), (LS_MULTIPLE, "label-studio"), (CVAT_XML, "cvat"), (COCO_JSON, "coco")],
)
def test_platform_exports_are_recognised_from_content(path: Path, fmt: str) -> None:
    assert read_annotations(path.read_text(encoding="utf-8")).format == fmt


def test_readers_are_asked_platforms_first_and_the_path_list_last() -> None:
    assert list(reader_registry()) == ["label-studio", "coco", "cvat", "jsonl", "csv", "tsv", "paths"]


def test_label_studio_export_matches_by_al_sha256(lab: Path, store_path: Path) -> None:
    result = label_file(store_path, LS_EXPORT)
    assert result.format == "label-studio"
    # predictions ("bird" on every task, also embedded in each annotation) are never taken as labels
    assert labels(store_path) == {
        "img_0001.png": "cat",
        "#1.png": "dog",
        "plain.png": None,  # two annotators disagree: labeled, no class
        "gt.png": "dog",  # the ground-truth annotation wins
        "empty.png": None,  # submitted without a choice
    }
    assert (result.newly_labeled, result.with_class, result.requested) == (5, 3, 8)
    # task 3 needs --folder (its d= path is relative to the document root), task 4 --uri-prefix,
    # task 10's al_sha256 is no stored image (its path is not tried)
    assert result.unknown == [ls_task(3), ls_task(4), ls_task(10)]
    assert result.skipped == [(ls_task(5), "skipped (cancelled)"), (ls_task(6), "not annotated")]
    assert result.notes == [
        "1 task(s) have annotations with different classes and are labeled without one "
        "(mark one annotation as ground truth to choose)",
        "1 task(s) were annotated without a choice: labeled, no class",
        "1 task(s) have no al_sha256 and an image URL that maps to no path "
        "(pass the --uri-prefix given at export)",
    ]


def test_label_studio_local_files_and_uri_prefix_urls_map_back_to_paths(lab: Path, store_path: Path) -> None:
    """``?d=pool/a%20b%2Bc%25.png`` under the document root; ``caf%C3%A9.png`` under the prefix."""
    result = label_file(store_path, LS_EXPORT, folder=str(lab))
    assert labels(store_path)["a b+c%.png"] == "cat"
    assert result.unknown == [ls_task(4), ls_task(10)]
    result = label_file(store_path, LS_EXPORT, uri_prefix=URI_PREFIX)
    assert labels(store_path)["café.png"] == "bird"
    assert result.unknown == [ls_task(3), ls_task(10)]
    assert (result.newly_labeled, result.already_labeled) == (1, 5)


def test_label_studio_multiple_choices_keep_the_first_and_a_new_class_replaces_the_old(
    lab: Path, store_path: Path
) -> None:
    label_file(store_path, LS_EXPORT)
    result = label_file(store_path, LS_MULTIPLE)
    assert result.notes == ["1 annotation(s) chose several classes; the first is kept"]
    assert (result.newly_labeled, result.already_labeled, result.reclassified) == (1, 1, 1)
    assert labels(store_path)["multi.png"] == "dog"
    assert labels(store_path)["img_0001.png"] == "bird"  # re-annotated


def test_label_studio_task_without_a_known_image_is_reported() -> None:
    text = json.dumps(
        [
            {"id": 1, "data": {"image": "/data/upload/3/4f2a-x.png"}, "annotations": [{"result": []}]},
            {"id": 2, "data": {"img": "s3://bucket/pool/y.png", "al_rank": 2}, "annotations": [{}]},
            {"id": 3, "data": {"image": "/data/local-files/?d=a+b%2Bc.png"}, "annotations": [{}]},
            {"id": 4, "data": {"image": "photos/z.png"}, "annotations": [{"was_cancelled": False}]},
        ]
    )
    records = read_annotations(text).records
    assert [(r.ref, r.path) for r in records] == [
        ("task 1 (/data/upload/3/4f2a-x.png)", None),
        ("task 2 (s3://bucket/pool/y.png)", None),
        ("task 3 (/data/local-files/?d=a+b%2Bc.png)", "a b+c.png"),  # as the server decodes it
        ("task 4 (photos/z.png)", "photos/z.png"),
    ]
    assert read_annotations(text, options=None).notes[-1].startswith("2 task(s) have no al_sha256")


def test_cvat_for_images_xml(lab: Path, store_path: Path) -> None:
    result = label_file(store_path, CVAT_XML)
    assert labels(store_path) == {
        "#1.png": "dog",
        "a b+c%.png": "cat",  # an image-level tag wins over shapes
        "empty.png": "cat",  # no tag: the label all its shapes share
        "gt.png": None,  # shapes of two labels
        "img_0001.png": "bird",
        "img_0002.png": None,  # two different tags
        "multi.png": "dog",
        "sub/deep.png": "bird",
    }
    assert result.unknown == ["missing.png"]
    assert result.skipped == [("café.png", "not annotated"), ("plain.png", "not annotated")]
    assert result.notes == ["2 image(s) carry several different labels and are labeled without a class"]


def test_cvat_video_export_is_refused() -> None:
    text = '<?xml version="1.0"?><annotations><version>1.1</version><track id="0" label="cat"/></annotations>'
    with pytest.raises(Exception, match="CVAT for video"):
        read_annotations(text)


def test_xml_with_entity_declarations_is_refused() -> None:
    text = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><annotations>&x;</annotations>'
    with pytest.raises(Exception, match="entities"):
        read_annotations(text)


def test_coco_json(lab: Path, store_path: Path) -> None:
    result = label_file(store_path, COCO_JSON)
    assert labels(store_path) == {
        "#1.png": "dog",
        "a b+c%.png": "cat",  # two annotations, one category
        "gt.png": None,  # a cat and a dog
        "img_0001.png": "bird",
        "sub/deep.png": None,  # its category id is not listed
    }
    assert result.unknown == ["missing.png"]
    assert result.skipped == [("café.png", "not annotated")]
    assert result.notes == [
        "1 image(s) have annotations of several categories and are labeled without a class",
        "1 annotation(s) name a category id the file does not list",
        "1 annotation(s) refer to an image id the file does not list",
    ]


def test_path_label_csv_stores_classes_and_reports_conflicts(lab: Path, store_path: Path) -> None:
    text = (
        "path,label\r\n"
        "img_0001.png,cat\r\n"
        "img_0002.png,dog\r\n"
        "img_0002.png,dog\r\n"  # the same class twice is no conflict
        "plain.png,cat\r\n"
        "plain.png,dog\r\n"
        "gt.png,\r\n"
    )
    with Store.open(store_path, write=True) as store:
        result = import_labels(store, text, "done.csv")
    # an empty class name is refused (defect 17): gt.png is not labeled, and is reported as skipped
    expected = {"img_0001.png": "cat", "img_0002.png": "dog", "plain.png": None}
    assert labels(store_path) == expected
    assert (result.complete, result.conflicting) == (False, ["plain.png"])
    assert [ref for ref, _ in result.skipped] == ["gt.png"] and "empty class" in result.skipped[0][1]
    # a class-less list never erases a class
    with Store.open(store_path, write=True) as store:
        import_labels(store, "img_0001.png\n", "list.txt")
    assert labels(store_path)["img_0001.png"] == "cat"


def test_status_counts_labels_per_class(
    lab: Path, store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    label_file(store_path, CVAT_XML)
    with Store.open(store_path) as store:
        info = store_status(store)
    assert (info["labeled"], info["label_classes"]) == (8, {"bird": 2, "cat": 2, "dog": 2})
    code, out, _ = cli(capsys, "--store", str(store_path), "status")
    assert code == 0
    classes = "  class:   2 bird\n  class:   2 cat\n  class:   2 dog\n"
    assert "labeled:   8 (6 with a class, 2 without)\n" + classes in out
    code, out, _ = cli(capsys, "--store", str(store_path), "status", "--json")
    assert json.loads(out)["label_classes"] == {"bird": 2, "cat": 2, "dog": 2}


def test_status_text_lists_the_largest_classes_only(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = {f"{i:064x}": f"class{i:02d}" for i in range(25)}
    with Store.open(store_path, write=True, create=True) as store:
        store.add_labels([], "test", classes)
        store.add_labels([f"{99:064x}"], "test")
    _, out, _ = cli(capsys, "--store", str(store_path), "status")
    assert "labeled:   26 (25 with a class, 1 without)" in out
    assert out.count("  class:   1 class") == 20 and "  class:   ... 5 more (--json lists all)" in out


def test_label_cli_reads_a_label_studio_export(
    lab: Path, store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --folder is what every relative path is relative to, those from URLs too: the prefix without
    # "pool/" leaves "pool/café.png", like the local-files paths
    prefix = URI_PREFIX.removesuffix("pool/")
    options = ("--folder", str(lab), "--uri-prefix", prefix)
    code, out, err = cli(capsys, "--store", str(store_path), "label", str(LS_EXPORT), *options)
    assert (code, out) == (4, "")  # task 10 names no stored image
    lines = err.splitlines()
    assert lines[0] == "labeled 7 image(s) (0 already labeled); 5 with a class from label-studio input"
    assert lines[1] == (
        "2 item(s) are not labels and were left out: 1 skipped (cancelled), 1 not annotated "
        f"(e.g. {ls_task(5)!r})"
    )
    assert lines[-1] == f"warning: 1 listed image(s) are not in the store: {ls_task(10)!r}"


def test_label_cli_shows_why_nothing_matched(
    lab: Path, store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = json.loads(LS_EXPORT.read_text(encoding="utf-8"))
    only_url = tmp_path / "url-only.json"
    only_url.write_text(json.dumps([task for task in tasks if task["id"] == 4]), encoding="utf-8")
    code, _, err = cli(capsys, "--store", str(store_path), "label", str(only_url))
    assert code == 3
    assert err.splitlines() == [
        "warning: 1 task(s) have no al_sha256 and an image URL that maps to no path "
        "(pass the --uri-prefix given at export)",
        f"alselect: error: none of the 1 listed image(s) could be labeled: 1 are not in the store "
        f"(e.g. {ls_task(4)!r})",
    ]
    code, _, err = cli(capsys, "--store", str(store_path), "label", str(only_url), "--uri-prefix", URI_PREFIX)
    assert code == 0 and "labeled 1 image(s)" in err


def test_label_cli_format_forces_a_reader(
    lab: Path, store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ("--store", str(store_path), "label")
    code, _, err = cli(capsys, *store, str(CVAT_XML), "--format", "coco")
    assert code == 1 and "not a COCO JSON file" in err
    code, _, err = cli(capsys, *store, str(COCO_JSON), "--format", "label-studio")
    assert code == 1 and "a Label Studio JSON export is a list of tasks" in err


def test_an_empty_class_name_is_skipped_with_a_reason_in_every_platform_format() -> None:
    """Label Studio ``choices: [""]``, a CVAT tag or shape labeled "", a COCO category named "" (blanks
    count as empty): the image is left unlabeled with a reason, never labeled without a class."""
    ls = json.dumps(
        [
            {
                "id": 1,
                "data": {"image": "a.png"},
                "annotations": [{"result": [{"value": {"choices": [""]}}]}],
            },
            {
                "id": 2,
                "data": {"image": "b.png"},
                "annotations": [{"result": [{"value": {"choices": ["cat"]}}]}],
            },
            {
                "id": 3,
                "data": {"image": "c.png"},
                "annotations": [{"result": [{"value": {"choices": ["  "]}}]}],
            },
        ]
    )
    cvat = (
        '<annotations><image id="0" name="a.png"><tag label=""/></image>'
        '<image id="1" name="b.png"><tag label="cat"/></image>'
        '<image id="2" name="c.png"><box label=" " xtl="0" ytl="0" xbr="1" ybr="1"/></image></annotations>'
    )
    coco = json.dumps(
        {
            "images": [{"id": i, "file_name": f"{name}.png"} for i, name in ((1, "a"), (2, "b"), (3, "c"))],
            "annotations": [{"image_id": 1, "category_id": 7}, {"image_id": 2, "category_id": 8},
                            {"image_id": 3, "category_id": 8}, {"image_id": 3, "category_id": 7}],
            "categories": [{"id": 7, "name": ""}, {"id": 8, "name": "cat"}],
        }
    )  # fmt: skip
    for text in (ls, cvat, coco):
        result = read_annotations(text)
        assert [(r.path, r.label) for r in result.records] == [("b.png", "cat")], result.format
        assert len(result.skipped) == 2 and all("empty class name" in why for _, why in result.skipped)
