"""read_table: encodings, comments, odd headers, malformed lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.errors import MetadataError
from covidcxr.ingest.table import read_table
from covidcxr.schema.values import Action, Severity


def write(tmp_path: Path, content: bytes, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def codes(table) -> list[str]:  # type: ignore[no-untyped-def]
    return [issue.code for issue in table.issues]


def test_plain_utf8_with_trailing_header_comma(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b"a,b,\n1,2,\n3,4,\n"))
    assert table.headers == ["a", "b"]
    assert [r.cells for r in table.rows] == [("1", "2"), ("3", "4")]
    assert [r.line for r in table.rows] == [2, 3]
    assert table.encoding == "utf-8"
    assert table.issues == []


def test_bom_is_stripped(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, "\ufeffpatientid,age\n1,50\n".encode()))
    assert table.headers == ["patientid", "age"]


def test_cp1252_falls_back_with_warning_naming_line(tmp_path: Path) -> None:
    content = "a,b\n1,ok\n2,Mü€ller\n".encode("cp1252")
    table = read_table(write(tmp_path, content))
    assert table.encoding == "cp1252"
    assert table.rows[1].cells == ("2", "Mü€ller")
    (issue,) = table.issues
    assert issue.code == "not_utf8" and issue.severity is Severity.WARNING
    assert issue.row == 3 and "line 3" in issue.message


def test_utf16_with_bom(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, "a,b\n1,é\n".encode("utf-16")))
    assert table.rows[0].cells == ("1", "é")
    assert table.encoding == "utf-16"


def test_explicit_wrong_encoding_reports_the_row_and_byte(tmp_path: Path) -> None:
    path = write(tmp_path, "a\nx\n\u00e9\ny\n".encode("latin-1"))
    table = read_table(path, encoding="utf-8")
    assert [row.cells for row in table.rows] == [("x",), ("y",)]
    (issue,) = table.issues
    assert (issue.code, issue.row, issue.file) == ("undecodable_value", 3, str(path))
    assert "byte 0xe9 at offset 4 is not valid utf-8" in issue.message


def test_unknown_encoding_name(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="unknown encoding 'nope'"):
        read_table(write(tmp_path, b"a\n1\n"), encoding="nope")


def test_leading_comments_are_kept_apart(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b"## licence: CC BY-SA,,\n## note,,\nf,g\nx.png,1\n"))
    assert table.comments == ["## licence: CC BY-SA,,", "## note,,"]
    assert table.headers == ["f", "g"]
    assert table.rows[0].line == 4


def test_bracket_headers_are_rejoined(tmp_path: Path) -> None:
    content = (
        b"Image Index,OriginalImage[Width,Height],Spacing[x,y],file\n"
        b"a.png,3056,2544,0.1,0.1,a.jpg\n"
    )
    table = read_table(write(tmp_path, content))
    assert table.headers == [
        "Image Index",
        "OriginalImage[Width]",
        "OriginalImage[Height]",
        "Spacing[x]",
        "Spacing[y]",
        "file",
    ]
    assert table.rows[0].cells[-1] == "a.jpg"
    assert "split_header" in codes(table)


def test_overflow_values_are_kept_and_reported(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b"a,notes,\n1,Credit to A., B.\n"))
    (row,) = table.rows
    assert row.cells == ("1", "Credit to A.")
    assert row.overflow == (" B.",)
    (issue,) = table.issues
    assert issue.code == "overflow_values" and issue.row == 2 and issue.value == " B."


def test_short_row_is_rejected_with_line(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b"a,b,c\n1,2,3\n4,5\n6,7,8\n"))
    assert [r.cells[0] for r in table.rows] == ["1", "6"]
    (issue,) = table.issues
    assert (issue.code, issue.row, issue.action) == ("short_row", 3, Action.ROW_SKIPPED)
    assert issue.severity is Severity.ERROR


def test_bad_quote_is_reported_and_reading_goes_on(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b'a,b\n1,2\n3,"x"y\n5,6\n'))
    assert [r.cells for r in table.rows] == [("1", "2"), ("5", "6")]
    assert [r.line for r in table.rows] == [2, 4]
    (issue,) = table.issues
    assert issue.code == "malformed_csv" and issue.row == 3


def test_unterminated_quote_reports_the_lines_lost(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b'a,b\n1,2\n3,"open\n4,5\n'))
    assert [r.cells for r in table.rows] == [("1", "2")]
    (issue,) = table.issues
    assert issue.code == "malformed_csv" and "lines 3-4" in issue.message


def test_quoted_newlines_keep_line_numbers_right(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b'a,b\n1,"two\nlines"\n3,4\n'))
    assert [r.line for r in table.rows] == [2, 4]


def test_nul_byte_row_rejected(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b"a,b\n1,2\x00\n3,4\n"))
    assert [r.cells[0] for r in table.rows] == ["3"]
    assert codes(table) == ["nul_byte"]


def test_duplicate_and_empty_headers_are_renamed(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b"a,,a\n1,2,3\n"))
    assert table.headers == ["a", "column_2", "a.2"]
    assert sorted(codes(table)) == ["duplicate_header", "unnamed_column"]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b"a\n1\n\n,\n2\n"))
    assert [r.cells for r in table.rows] == [("1",), ("2",)]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"  \n\n", "is empty"), (b"# only\n# comments\n", "only comments")],
)
def test_unusable_files_raise(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(MetadataError, match=message):
        read_table(write(tmp_path, content))


def test_missing_file_raises_naming_it(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=r"cannot read .*nothere\.csv"):
        read_table(tmp_path / "nothere.csv")


def test_other_delimiter(tmp_path: Path) -> None:
    table = read_table(write(tmp_path, b"a;b\n1;2\n"), delimiter=";")
    assert table.rows[0].cells == ("1", "2")
