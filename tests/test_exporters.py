"""Export formats: exact headers, hostile-path round trips, number formatting, atomic output."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest

from alselect.errors import AlselectError, UsageError
from alselect.exporters import CSV_COLUMNS, ExportRow, atomic_output, exporter_registry, get_exporter

HEADER = "rank,path,score,strategy,model,predicted_label,confidence,sha256,folder,uri"

HOSTILE_PATHS = [
    "plain/a.png",
    "with,comma.png",
    'with "double" quote.png',
    "with\nnewline.png",
    "with\r\ncrlf.png",
    "with\ttab.png",
    " leading and trailing space ",
    "café/日本語 ñ.png",
    "emoji 🐝.png",
    'quote,comma\n"all"\tof it .jpg',
    "",
]


def make_rows(paths: list[str]) -> list[ExportRow]:
    return [
        ExportRow(
            rank=i + 1,
            path=path,
            score=1.0 / (i + 3),
            strategy="entropy",
            model="abc123def456",
            predicted_label=["ant", "bee", "chat, noir"][i % 3],
            confidence=None if i % 2 else 0.5 + i / 100,
            sha256=f"{i:064x}",
            folder='/data/pool, "quoted" #1',
            uri="" if i % 3 else f"https://host/pool/{i}.png",
        )
        for i, path in enumerate(paths)
    ]


def write(fmt: str, rows: list[ExportRow]) -> tuple[str, list[ExportRow]]:
    stream = io.StringIO(newline="")
    written = get_exporter(fmt).write(rows, stream)
    return stream.getvalue(), written


def read_dicts(text: str, dialect: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline=""), dialect=dialect))


def expected_record(row: ExportRow) -> dict[str, str]:
    return {
        "rank": str(row.rank),
        "path": row.path,
        "score": format(row.score, ".8g"),
        "strategy": row.strategy,
        "model": row.model,
        "predicted_label": row.predicted_label,
        "confidence": "" if row.confidence is None else format(row.confidence, ".8g"),
        "sha256": row.sha256,
        "folder": row.folder,
        "uri": row.uri,
    }


def test_registry_has_the_documented_formats() -> None:
    assert set(exporter_registry()) == {
        "csv", "tsv", "jsonl", "paths",
        "label-studio", "cvat", "labelbox", "superannotate", "sagemaker", "fiftyone",
    }  # fmt: skip


def test_columns_are_only_ever_appended() -> None:
    """The CSV contract: the first release's eight columns keep their places; new ones come after."""
    first_release = ("rank", "path", "score", "strategy", "model", "predicted_label", "confidence", "sha256")
    assert CSV_COLUMNS[: len(first_release)] == first_release
    assert CSV_COLUMNS[len(first_release) :] == ("folder", "uri")


def test_csv_header_is_exact() -> None:
    text, _ = write("csv", make_rows(["a.png"]))
    assert text.split("\r\n", 1)[0] == HEADER
    assert ",".join(CSV_COLUMNS) == HEADER


def test_csv_header_written_for_empty_export() -> None:
    text, written = write("csv", [])
    assert text == HEADER + "\r\n"  # RFC 4180 line ends
    assert written == []


@pytest.mark.parametrize(("fmt", "dialect"), [("csv", "excel"), ("tsv", "excel-tab")])
def test_hostile_paths_round_trip(fmt: str, dialect: str) -> None:
    rows = make_rows(HOSTILE_PATHS)
    text, written = write(fmt, rows)
    assert written == rows
    records = read_dicts(text, dialect)
    assert [list(r) for r in records] == [list(CSV_COLUMNS)] * len(rows)
    assert [r["path"] for r in records] == HOSTILE_PATHS
    assert records == [expected_record(row) for row in rows]


@pytest.mark.parametrize(("fmt", "dialect"), [("csv", "excel"), ("tsv", "excel-tab")])
def test_bare_carriage_return_in_path_round_trips(fmt: str, dialect: str) -> None:
    paths = ["before.png", "with\rcarriage return.png", "after.png"]
    text, _ = write(fmt, make_rows(paths))
    assert [r["path"] for r in read_dicts(text, dialect)] == paths


def test_tsv_header_and_rows_are_tab_separated() -> None:
    text, _ = write("tsv", make_rows(["a.png", "b,c.png"]))
    lines = text.split("\r\n")
    assert lines[0] == "\t".join(CSV_COLUMNS)
    assert lines[1].split("\t")[:3] == ["1", "a.png", format(1 / 3, ".8g")]
    # a comma needs no quoting in TSV
    assert lines[2].split("\t")[1] == "b,c.png"


def test_rows_appear_in_rank_order() -> None:
    paths = [f"img_{i:03d}.png" for i in range(25)]
    for fmt, dialect in (("csv", "excel"), ("tsv", "excel-tab")):
        records = read_dicts(write(fmt, make_rows(paths))[0], dialect)
        assert [r["rank"] for r in records] == [str(i) for i in range(1, 26)]
        assert [r["path"] for r in records] == paths


def test_numbers_use_eight_significant_digits() -> None:
    cases = [
        (1 / 3, "0.33333333"),
        (2 / 3, "0.66666667"),
        (1.0, "1"),
        (0.0, "0"),
        (0.125, "0.125"),
        (123456789.0, "1.2345679e+08"),
        (1e-9, "1e-09"),
        (0.999999999, "1"),
    ]
    rows = [
        ExportRow(rank=i + 1, path=f"p{i}", score=value, strategy="s", model="m", predicted_label="l",
                  confidence=value, sha256="")
        for i, (value, _) in enumerate(cases)
    ]  # fmt: skip
    records = read_dicts(write("csv", rows)[0], "excel")
    assert [r["score"] for r in records] == [text for _, text in cases]
    assert [r["confidence"] for r in records] == [text for _, text in cases]


def test_confidence_none_is_an_empty_field() -> None:
    row = ExportRow(rank=1, path="x.png", score=0.5, strategy="random", model="m",
                    predicted_label="", confidence=None, sha256="")  # fmt: skip
    text, _ = write("csv", [row])
    assert text.split("\r\n")[1] == "1,x.png,0.5,random,m,,,,,"
    assert read_dicts(text, "excel")[0]["confidence"] == ""


def test_jsonl_one_object_per_line_with_csv_columns() -> None:
    rows = make_rows(HOSTILE_PATHS)
    text, written = write("jsonl", rows)
    assert written == rows
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        record = json.loads(line)
        assert list(record) == list(CSV_COLUMNS)
        assert record["path"] == row.path
        assert record["rank"] == row.rank and type(record["rank"]) is int
        assert type(record["score"]) is float
        assert record["score"] == float(format(row.score, ".8g"))
        if row.confidence is None:
            assert record["confidence"] is None
        else:
            assert record["confidence"] == float(format(row.confidence, ".8g"))
        assert record["sha256"] == row.sha256
        assert record["predicted_label"] == row.predicted_label
        assert record["folder"] == row.folder
        assert record["uri"] == (row.uri or None)


def test_jsonl_numbers_are_json_numbers() -> None:
    row = ExportRow(rank=3, path="a.png", score=1 / 3, strategy="margin", model="m",
                    predicted_label="bee", confidence=None, sha256="")  # fmt: skip
    text, _ = write("jsonl", [row])
    assert text == (
        '{"rank": 3, "path": "a.png", "score": 0.33333333, "strategy": "margin", "model": "m", '
        '"predicted_label": "bee", "confidence": null, "sha256": "", "folder": "", "uri": null}\n'
    )


def test_jsonl_keeps_non_ascii_as_utf8() -> None:
    text, _ = write("jsonl", make_rows(["café/日本語 ñ.png", "emoji 🐝.png"]))
    assert "café/日本語 ñ.png" in text
    assert "🐝" in text
    assert "\\u" not in text
    text.encode("utf-8")  # no lone surrogates


def test_paths_one_per_line_skipping_line_breaks() -> None:
    paths = ["a.png", "with\nnewline.png", "café ñ.png", "with\rcr.png", "tab\there.png", "z.png"]
    rows = [dataclasses.replace(row, uri="") for row in make_rows(paths)]
    text, written = write("paths", rows)
    assert text == "a.png\ncafé ñ.png\ntab\there.png\nz.png\n"
    assert [r.path for r in written] == ["a.png", "café ñ.png", "tab\there.png", "z.png"]
    assert all(r in rows for r in written)


def test_paths_prints_uris_when_there_are_some() -> None:
    rows = [dataclasses.replace(row, uri=f"s3://b/p/{row.path}") for row in make_rows(["a b.png", "c.png"])]
    assert write("paths", rows)[0] == "s3://b/p/a b.png\ns3://b/p/c.png\n"


def test_unknown_format_lists_known_formats() -> None:
    with pytest.raises(UsageError) as excinfo:
        get_exporter("xlsx")
    message = str(excinfo.value)
    assert "xlsx" in message
    for name in exporter_registry():
        assert name in message


# --- atomic_output -----------------------------------------------------------------------------------


def test_atomic_output_writes_content_verbatim(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    content = 'rank,path\n1,"a\r\nb"\n2,café\n'
    with atomic_output(target) as handle:
        handle.write(content)
    assert target.read_bytes() == content.encode("utf-8")
    assert os.listdir(tmp_path) == ["out.csv"]


def test_atomic_output_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_bytes(b"old contents\n")
    with atomic_output(target) as handle:
        handle.write("new\n")
    assert target.read_bytes() == b"new\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_output_failure_leaves_existing_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    original = b"rank,path\r\n1,keep-me.png\r\n\xe2\x9c\x93\n"
    target.write_bytes(original)
    (tmp_path / "neighbour.txt").write_text("unrelated")
    before = sorted(os.listdir(tmp_path))

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), atomic_output(target) as handle:
        handle.write("partial,row\n" * 1000)
        handle.flush()
        raise Boom
    assert target.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == before


def test_atomic_output_failure_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.jsonl"
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as handle:
        handle.write("{}\n")
        raise KeyboardInterrupt
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_output_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "out.csv"
    with pytest.raises(AlselectError), atomic_output(target) as handle:
        handle.write("never")
    assert not (tmp_path / "missing").exists()
    assert os.listdir(tmp_path) == []


def test_exporter_through_atomic_output_round_trips(tmp_path: Path) -> None:
    rows = make_rows(HOSTILE_PATHS)
    target = tmp_path / "export.csv"
    with atomic_output(target) as handle:
        get_exporter("csv").write(rows, handle)
    with target.open(encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [r["path"] for r in records] == HOSTILE_PATHS
