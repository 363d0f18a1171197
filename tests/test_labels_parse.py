"""parse_label_input: plain path lists and alselect CSV exports."""

from __future__ import annotations

import hashlib
import io

from alselect.exporters import ExportRow, get_exporter
from alselect.labels import parse_label_input


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


def test_plain_list_one_path_per_line() -> None:
    text = "a.png\nsub/b.jpg\nc d/e f.png\n"
    assert parse_label_input(text) == (["a.png", "sub/b.jpg", "c d/e f.png"], [])


def test_plain_list_skips_blank_lines_and_comments() -> None:
    text = "# annotated on monday\n\na.png\n   \n#b.png\nnot#comment.png\n\n# end\n"
    assert parse_label_input(text) == (["a.png", "not#comment.png"], [])


def test_plain_list_strips_crlf() -> None:
    text = "a.png\r\nmy photos/b 1.png\r\n\r\n# note\r\nc.png"
    assert parse_label_input(text) == (["a.png", "my photos/b 1.png", "c.png"], [])


def test_plain_list_keeps_non_ascii() -> None:
    paths = ["café/日本語 ñ.png", "emoji 🐝.png"]
    assert parse_label_input("café/日本語 ñ.png\nemoji 🐝.png\n") == (paths, [])


def test_empty_input() -> None:
    assert parse_label_input("") == ([], [])
    assert parse_label_input("\n# only a comment\n\n") == ([], [])


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
    ]
    text = csv_export([(p, "") for p in paths])
    assert parse_label_input(text) == (paths, [])


def test_csv_export_prefers_valid_sha256() -> None:
    digest_a, digest_c = sha("a"), sha("c")
    text = csv_export(
        [
            ("a,1.png", digest_a),
            ("b\n2.png", ""),
            ("c.png", digest_c),
        ]
    )
    assert parse_label_input(text) == (["b\n2.png"], [digest_a, digest_c])


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
    assert parse_label_input(text) == (["short.png", "long.png", "nonhex.png", "spaced.png"], [good])


def test_csv_uppercase_sha256_is_normalised() -> None:
    good = sha("x")
    text = f"path,sha256\r\nx.png,{good.upper()}\r\n"
    assert parse_label_input(text) == ([], [good])


def test_bom_is_ignored_for_csv() -> None:
    good = sha("bom")
    text = "\ufeffrank,path,sha256\n1,a.png,\n2,b.png," + good + "\n"
    assert parse_label_input(text) == (["a.png"], [good])


def test_bom_is_ignored_for_plain_list() -> None:
    assert parse_label_input("\ufeffa.png\nb.png\n") == (["a.png", "b.png"], [])


def test_csv_with_only_a_path_column() -> None:
    text = 'path\r\na.png\r\n"b,c.png"\r\n"multi\nline.png"\r\n\r\nd e.png\r\n'
    assert parse_label_input(text) == (["a.png", "b,c.png", "multi\nline.png", "d e.png"], [])


def test_csv_with_only_a_sha256_column() -> None:
    first, second = sha("1"), sha("2")
    assert parse_label_input(f"sha256\n{first}\n{second}\n") == ([], [first, second])
