"""Reading label inputs without a store: path lists, alselect exports, ``path,label`` tables."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from alselect.annotations import LabelRecord, read_annotations
from alselect.errors import DataError, UsageError
from alselect.exporters import ExportRow, get_exporter


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def csv_export(paths_and_shas: list[tuple[str, str]]) -> str:
    rows = [
        ExportRow(rank=i + 1, path=path, score=0.5, strategy="entropy", model="m",
                  predicted_label="ant", confidence=None, sha256=digest)
        for i, (path, digest) in enumerate(paths_and_shas)
    ]  # fmt: skip
    stream = io.StringIO(newline="")
    get_exporter("csv").write(rows, stream)
    return stream.getvalue()


def parse(text: str, fmt: str | None = None) -> tuple[list[str], list[str]]:
    """``(paths, sha256s)`` of the records: a valid sha256 wins over the path of its record."""
    records = read_annotations(text, fmt).records
    return [r.path for r in records if r.path and not r.sha256], [r.sha256 for r in records if r.sha256]


def formats(text: str) -> str:
    return read_annotations(text).format


def test_plain_list_one_path_per_line() -> None:
    text = "a.png\nsub/b.jpg\nc d/e f.png\n"
    assert parse(text) == (["a.png", "sub/b.jpg", "c d/e f.png"], [])
    assert formats(text) == "paths"


def test_plain_list_has_no_comment_syntax() -> None:
    """Issue #5: ``#1.png`` is an image name, not a comment; blank lines cannot name an image."""
    text = "#1.png\n\na.png\n   \n# annotated monday.png\nnot#comment.png\n\n"
    assert parse(text) == (["#1.png", "a.png", "# annotated monday.png", "not#comment.png"], [])


def test_plain_list_strips_crlf_but_keeps_other_blanks() -> None:
    text = "a.png\r\nmy photos/b 1.png\r\n\r\n c.png \r\n#d.png"
    assert parse(text) == (["a.png", "my photos/b 1.png", " c.png ", "#d.png"], [])


def test_plain_list_keeps_non_ascii() -> None:
    paths = ["café/日本語 ñ.png", "emoji 🐝.png"]
    assert parse("café/日本語 ñ.png\nemoji 🐝.png\n") == (paths, [])


def test_empty_input_has_no_records() -> None:
    assert parse("") == ([], [])
    assert parse("\n  \n\r\n") == ([], [])


def test_path_records_name_themselves() -> None:
    assert read_annotations("a.png\n").records == [LabelRecord("a.png", path="a.png")]


def test_csv_export_round_trips_paths() -> None:
    paths = [
        "plain.png",
        "with,comma.png",
        "with\nnewline.png",
        "with\r\ncrlf.png",
        'say "cheese".png',
        "tab\there.png",
        " spaced .png",
        "café ñ.png",
        "#hash.png",
    ]
    text = csv_export([(p, "") for p in paths])
    assert parse(text) == (paths, [])
    assert formats(text) == "csv"


def test_csv_export_prefers_valid_sha256() -> None:
    digest_a, digest_c = sha("a"), sha("c")
    text = csv_export([("a,1.png", digest_a), ("b\n2.png", ""), ("c.png", digest_c)])
    assert parse(text) == (["b\n2.png"], [digest_a, digest_c])


def test_csv_invalid_sha256_falls_back_to_path() -> None:
    good = sha("good")
    text = csv_export(
        [
            ("short.png", good[:63]),
            ("long.png", good + "0"),
            ("nonhex.png", "g" * 64),
            ("spaced.png", good[:32] + " " + good[33:]),
            ("good.png", good),
        ]
    )
    assert parse(text) == (["short.png", "long.png", "nonhex.png", "spaced.png"], [good])


def test_csv_uppercase_sha256_is_normalised() -> None:
    good = sha("x")
    assert parse(f"path,sha256\r\nx.png,{good.upper()}\r\n") == ([], [good])


def test_bom_is_ignored() -> None:
    good = sha("bom")
    assert parse("\ufeffrank,path,sha256\n1,a.png,\n2,b.png," + good + "\n") == (["a.png"], [good])
    assert parse("\ufeffa.png\nb.png\n") == (["a.png", "b.png"], [])


def test_csv_with_only_a_path_column_needs_format_csv() -> None:
    text = 'path\r\na.png\r\n"b,c.png"\r\n"multi\nline.png"\r\n\r\nd e.png\r\n'
    assert parse(text, "csv") == (["a.png", "b,c.png", "multi\nline.png", "d e.png"], [])


def test_csv_with_only_a_sha256_column_needs_format_csv() -> None:
    first, second = sha("1"), sha("2")
    assert parse(f"sha256\n{first}\n{second}\n", "csv") == ([], [first, second])


@pytest.mark.parametrize("first", ["path", "sha256", "path\r", "label"])
def test_a_path_list_whose_first_line_is_a_column_name_stays_a_list(first: str) -> None:
    """Defect 10: every line of a path list is a path; ``path`` alone is not a CSV header."""
    text = f'{first}\nb.png\n"q".png\n'
    assert formats(text) == "paths"
    assert parse(text) == ([first.removesuffix("\r"), "b.png", '"q".png'], [])


@pytest.mark.parametrize(
    ("header", "fmt"),
    [("path,label", "csv"), ("sha256,path", "csv"), ("rank,path", "csv"), ("path\tlabel", "tsv")],
)
def test_a_header_of_two_or_more_columns_with_path_or_sha256_is_a_table(header: str, fmt: str) -> None:
    sep = "\t" if fmt == "tsv" else ","
    text = f"{header}\n" + sep.join(["x.png" if c == "path" else "" for c in header.split(sep)]) + "\n"
    assert formats(text) == fmt


@pytest.mark.parametrize("header", ["path,path", "path,", ",path"])
def test_a_header_with_blank_or_repeated_columns_is_a_path(header: str) -> None:
    assert formats(f"{header}\nb.png\n") == "paths"


def test_a_path_list_whose_first_name_looks_like_a_header_stays_a_list() -> None:
    text = "my,path,holiday.png\nb.png\n"
    assert formats(text) == "paths"
    assert parse(text) == (["my,path,holiday.png", "b.png"], [])


def test_path_label_csv_carries_classes_and_folder() -> None:
    text = 'path,label,folder\r\na.png,cat,/data/p\r\nb.png, dog ,\r\nc.png,,/data/q\r\n"d,1.png",42,\r\n'
    read = read_annotations(text)
    assert read.records == [
        LabelRecord("a.png", path="a.png", folder="/data/p", label="cat"),
        LabelRecord("b.png", path="b.png", label="dog"),
        LabelRecord("d,1.png", path="d,1.png", label="42"),
    ]
    # defect 17: an empty class name is refused with a reason, not taken as "no class"
    assert [(ref, "empty class" in why) for ref, why in read.skipped] == [("c.png", True)]


def test_a_table_without_a_label_column_labels_without_a_class() -> None:
    assert read_annotations("path,folder\na.png,/p\n").records == [
        LabelRecord("a.png", path="a.png", folder="/p")
    ]
    assert read_annotations('{"path": "a.png", "label": null}\n').records == [
        LabelRecord("a.png", path="a.png")
    ]


def test_predicted_label_is_not_a_class() -> None:
    records = read_annotations(csv_export([("a.png", "")])).records
    assert records == [LabelRecord("a.png", path="a.png")]


def test_a_row_without_path_or_sha256_is_named_by_its_number() -> None:
    records = read_annotations("path,sha256,label\r\n,,cat\r\nb.png,,dog\r\n").records
    assert [r.ref for r in records] == ["row 1", "b.png"]


def test_tsv_with_quoted_tabs_and_newlines() -> None:
    text = 'rank\tpath\tsha256\r\n1\t"tab\there.png"\t\r\n2\t"new\nline.png"\t\r\n3\tplain, comma.png\t\r\n'
    assert parse(text) == (["tab\there.png", "new\nline.png", "plain, comma.png"], [])
    assert formats(text) == "tsv"


def test_jsonl_keeps_exact_paths_and_prefers_sha256() -> None:
    good = hashlib.sha256(b"x").hexdigest()
    records = [
        {"path": "a\r\nb.png", "sha256": ""},
        {"path": "line\u2028sep.png", "label": 3, "folder": "/p"},
        {"path": "ignored.png", "sha256": good.upper(), "label": "cat"},
        {"rank": 4, "label": True},
    ]
    text = "\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
    assert read_annotations(text).records == [
        LabelRecord("a\r\nb.png", path="a\r\nb.png"),
        LabelRecord("line\u2028sep.png", path="line\u2028sep.png", folder="/p", label="3"),
        LabelRecord("ignored.png", sha256=good, path="ignored.png", label="cat"),
        LabelRecord("object 4"),
    ]


def test_plain_list_starting_with_a_brace_or_bracket_stays_a_list() -> None:
    assert parse("{draft}.png\nb.png\n") == (["{draft}.png", "b.png"], [])
    assert parse('{"path": 1}x.png\n') == (['{"path": 1}x.png'], [])
    assert parse("[1].png\n<2>.png\n") == (["[1].png", "<2>.png"], [])


def test_jsonl_with_a_broken_later_line_is_an_error() -> None:
    with pytest.raises(DataError, match="line 3"):
        read_annotations('{"path": "a.png"}\n\n{"path": "b.png"\n')


def test_jsonl_needs_a_path_or_sha256_key_to_be_recognised() -> None:
    assert read_annotations('{"path": "a.png"}\n').format == "jsonl"
    assert read_annotations('{"rank": 1, "sha256": ""}\n').format == "jsonl"
    with pytest.raises(DataError, match="--format"):
        read_annotations('{"source-ref": "s3://b/a.png"}\n')
    assert read_annotations('{"source-ref": "s3://b/a.png"}\n', "jsonl").records == [LabelRecord("object 1")]


def test_unrecognised_json_is_an_error_not_a_path_list() -> None:
    with pytest.raises(DataError, match="--format"):
        read_annotations('[\n  {"image": "a.png", "choice": "cat"}\n]\n')
    with pytest.raises(DataError, match="--format"):
        read_annotations("<annotation><filename>a.png</filename></annotation>\n")


def test_format_can_be_forced() -> None:
    assert parse("path,label\n", "paths") == (["path,label"], [])
    assert parse("path\nx.png\n", "csv") == (["x.png"], [])
    with pytest.raises(DataError, match="no 'path' or 'sha256' column"):
        read_annotations("a.png\n", "csv")
    with pytest.raises(UsageError, match="unknown label format 'xml'"):
        read_annotations("a.png\n", "xml")


@pytest.mark.parametrize(
    "text",
    [
        '[{"data": {"image": "/data/local-files/?d=a.png"}, "annotations": [{"res',  # Label Studio, cut
        '[\n  {"id": 1, "data": {"image": "a.png"}},\n',
        '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [',  # COCO, cut
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <image id="0" name="a.png"',  # CVAT
        "<annotations>\n  <image id='0' name='a.png'>\n",
    ],
)
def test_a_truncated_json_or_xml_export_is_an_error_not_a_path_list(text: str) -> None:
    """Defect 9: a half-written export used to be read as a list of paths."""
    with pytest.raises(DataError, match="does not parse") as error:
        read_annotations(text)
    assert "\n" not in str(error.value)
    assert read_annotations(text, "paths").format == "paths"  # unless the user says it is one


@pytest.mark.parametrize(
    ("fmt", "text"), [("label-studio", '[{"data": {'), ("coco", '{"images": ['), ("cvat", "<a")]
)
def test_a_forced_format_names_the_parse_error(fmt: str, text: str) -> None:
    with pytest.raises(DataError, match=r"does not parse as (JSON|XML)"):
        read_annotations(text, fmt)


def test_path_lists_that_start_like_json_or_xml_stay_lists() -> None:
    for text in ('{"a": 1}x.png\nb.png\n', "<angle>&amp;.png\nb.png\n", "<2>.png\n", "[1].png\n"):
        assert formats(text) == "paths", text


@pytest.mark.parametrize(
    ("prefix", "name"),
    [
        ("s3://b/pool/", "pct%41 #1?x.png"),
        ("gs://b/pool", "sub dir/café ñ+.png"),
        ("https://h/pool/", "pct%41 #1?x.png"),
        ("http://h/pool", "sub dir/café ñ+.png"),
        ("https://h/pool/", "caf\udce9.png"),  # not UTF-8: its bytes are percent-encoded
    ],
)
def test_uri_paths_export_reads_back_to_the_exact_relative_path(prefix: str, name: str) -> None:
    """Defects 1 and 8: bucket keys are verbatim (never percent-decoded), web URLs are decoded once."""
    from alselect.annotations import ReadOptions
    from alselect.uris import join_uri

    row = ExportRow(rank=1, path=name, score=0.5, strategy="e", model="m", predicted_label="",
                    confidence=None, sha256="", uri=join_uri(prefix, name))  # fmt: skip
    stream = io.StringIO(newline="")
    get_exporter("paths").write([row], stream)
    back = read_annotations(stream.getvalue(), options=ReadOptions(uri_prefix=prefix))
    assert [r.path for r in back.records] == [name]
    unprefixed = read_annotations(stream.getvalue())
    assert any("--uri-prefix" in note for note in unprefixed.notes)
