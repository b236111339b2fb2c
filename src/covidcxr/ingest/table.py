"""Reading metadata tables (CSV) the way real collections write them.

Real files have: a UTF-8 byte-order mark or another encoding (cp1252, latin-1,
UTF-16), ``#`` comment lines above the header, a header ending with a comma (an
unnamed trailing column), headers with commas inside brackets written without
quotes (NIH's ``OriginalImage[Width,Height]``), unquoted commas that spill text
into the unnamed column, short rows, broken quotes. :func:`read_table` reads all of
that, keeps every value, and reports each oddity with its line number instead of
failing or guessing.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from covidcxr.errors import MetadataError
from covidcxr.ingest.report import Action, Issue
from covidcxr.schema.values import Severity

if TYPE_CHECKING:
    from _csv import Reader as _CsvReader

FALLBACK_ENCODINGS = ("cp1252", "latin-1")
#: What an undecodable byte reads as (its row is reported and skipped).
UNDECODABLE = "\ufffd"
MAX_FIELD_CHARS = 1_000_000


@dataclass(frozen=True)
class TableRow:
    """One data row: ``cells`` aligned with the table's headers."""

    line: int
    cells: tuple[str, ...]
    overflow: tuple[str, ...] = ()


@dataclass
class Table:
    """A decoded CSV table with the problems met while reading it."""

    path: Path
    encoding: str
    headers: list[str]
    rows: list[TableRow] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)


def _decode(data: bytes, path: Path, encoding: str | None, issues: list[Issue]) -> tuple[str, str]:
    """Decode ``data``; without an explicit encoding try UTF-8, then fall back."""
    if encoding is not None:
        try:
            return _decode_reporting(data, encoding, issues), encoding
        except LookupError as exc:
            raise MetadataError(f"read_table: unknown encoding {encoding!r} for {path}") from exc
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), "utf-16"
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        first_bad = exc.start
    for fallback in FALLBACK_ENCODINGS:
        try:
            text = data.decode(fallback)
        except UnicodeDecodeError:
            continue
        issues.append(
            Issue(
                Severity.WARNING,
                "not_utf8",
                f"file is not UTF-8 (first bad byte 0x{data[first_bad]:02x} on line {line}); "
                f"read as {fallback}: check accented names, or give the encoding in a mapping",
                str(path),
                line,
            )
        )
        return text, fallback
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def _decode_reporting(data: bytes, encoding: str, issues: list[Issue]) -> str:
    """Decode with the given encoding; each undecodable byte becomes U+FFFD and an
    issue naming its line and offset (its row is then skipped)."""
    pieces: list[str] = []
    position = 0
    while True:
        try:
            pieces.append(data[position:].decode(encoding))
            return "".join(pieces)
        except UnicodeDecodeError as exc:
            bad = position + exc.start
            pieces.append(data[position:bad].decode(encoding))
            pieces.append(UNDECODABLE)
            line = data[:bad].count(b"\n") + 1
            issues.append(
                Issue(
                    Severity.ERROR,
                    "undecodable_value",
                    f"byte 0x{data[bad]:02x} at offset {bad} is not valid {encoding}; the "
                    "row is skipped: fix that byte, or give the file's real encoding",
                    "",
                    line,
                    action=Action.ROW_SKIPPED,
                )
            )
            position = bad + 1


def _merge_bracket_headers(headers: list[str]) -> list[str]:
    """Undo commas inside brackets in an unquoted header.

    ``OriginalImage[Width``, ``Height]`` -> ``OriginalImage[Width]``,
    ``OriginalImage[Height]``: the rows hold one value per part, so the column
    count stays the same.
    """
    merged: list[str] = []
    index = 0
    while index < len(headers):
        head = headers[index]
        if "[" in head and "]" not in head:
            end = index + 1
            while end < len(headers) and "]" not in headers[end]:
                end += 1
            if end < len(headers):
                prefix, first = head.split("[", 1)
                parts = [first, *headers[index + 1 : end], headers[end].split("]", 1)[0]]
                merged.extend(f"{prefix}[{part.strip()}]" for part in parts)
                index = end + 1
                continue
        merged.append(head)
        index += 1
    return merged


def read_table(
    path: str | os.PathLike[str],
    *,
    encoding: str | None = None,
    delimiter: str = ",",
    comment_prefix: str = "#",
    display_name: str | None = None,
) -> Table:
    """Read a CSV metadata table, reporting rather than failing on bad rows.

    Args:
        path: the CSV file.
        encoding: the file's encoding; None tries UTF-8 (with or without BOM,
            UTF-16 with BOM), then cp1252 and latin-1 with a warning.
        delimiter: the field separator.
        comment_prefix: lines starting with this above the header are comments.
        display_name: how issues name the file (default: the path).

    Returns:
        the table; rows that could not be read are left out and reported.

    Raises:
        MetadataError: the file is missing, empty, undecodable with the given
            encoding, has a NUL byte in its header, or has no readable data row.
    """
    path = Path(path)
    name = display_name or str(path)
    text, used, issues = _load_text(path, name, encoding)
    comments, start, lines = _skip_comments(text, comment_prefix, name)
    reader = csv.reader(
        io.StringIO("".join(lines[start:]), newline=""), delimiter=delimiter, strict=True
    )
    csv.field_size_limit(MAX_FIELD_CHARS)
    headers = _read_headers(reader, name, start, issues)
    table = Table(path, used, headers, issues=issues, comments=comments)
    _read_rows(reader, table, name, start, encoding)
    if not table.rows:
        errors = [i for i in table.issues if i.severity is Severity.ERROR]
        why = f"; first problem: {errors[0]}" if errors else ""
        raise MetadataError(
            f"read_table: {name} has a header but no data row that could be read "
            f"({len(errors)} unreadable){why}; a table with no rows would drop every record"
        )
    return table


def _load_text(path: Path, name: str, encoding: str | None) -> tuple[str, str, list[Issue]]:
    """The file's text, the encoding used and the decoding issues (named ``name``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MetadataError(f"read_table: cannot read {name}: {exc.strerror or exc}") from exc
    issues: list[Issue] = []
    text, used = _decode(data, path, encoding, issues)
    issues = [dataclasses.replace(issue, file=name) for issue in issues]
    if not text.strip():
        raise MetadataError(f"read_table: {name} is empty: expected a header line and rows")
    return text, used, issues


def _skip_comments(text: str, comment_prefix: str, name: str) -> tuple[list[str], int, list[str]]:
    """``(comments, index of the header line, lines)``: comment and blank lines above
    the header are skipped."""
    lines = text.splitlines(keepends=True)
    comments: list[str] = []
    start = 0
    while start < len(lines) and (
        lines[start].startswith(comment_prefix) or not lines[start].strip()
    ):
        if lines[start].strip():
            comments.append(lines[start].strip())
        start += 1
    if start == len(lines):
        raise MetadataError(f"read_table: {name} has only comments, no header line")
    return comments, start, lines


def _read_headers(reader: _CsvReader, name: str, start: int, issues: list[Issue]) -> list[str]:
    """The header row, re-joined, trimmed of trailing unnamed columns and named."""
    try:
        raw_headers = next(reader)
    except csv.Error as exc:
        raise MetadataError(
            f"read_table: {name}: the header on line {start + 1} cannot be read as CSV "
            f"({exc}); fix its quotes"
        ) from exc
    for index, header in enumerate(raw_headers):
        if "\x00" in header:
            raise MetadataError(
                f"read_table: {name}: header cell {index + 1} on line {start + 1} "
                f"({header!r}) contains a NUL byte: a corrupt or binary file? Fix the "
                "header; no row is read with a damaged header"
            )
    headers = _merge_bracket_headers([h.strip() for h in raw_headers])
    if len(headers) != len(raw_headers):  # pragma: no cover - merge keeps the count
        raise AssertionError("bracket merge changed the column count")
    if headers != [h.strip() for h in raw_headers]:
        issues.append(
            Issue(
                Severity.INFO,
                "split_header",
                "header cells with unquoted commas inside brackets were re-joined: "
                + ", ".join(h for h in headers if "[" in h),
                name,
                start + 1,
            )
        )
    # A header ending with a comma (upstream metadata.csv) adds one unnamed column.
    while headers and headers[-1] == "":
        headers.pop()
    if not headers:
        raise MetadataError(
            f"read_table: {name}: the header on line {start + 1} names no column; "
            "expected column names such as patientid,filename,..."
        )
    _name_headers(headers, name, start, issues)
    return headers


def _name_headers(headers: list[str], name: str, start: int, issues: list[Issue]) -> None:
    """Name unnamed columns and tell repeated headers apart, in place."""
    seen: dict[str, int] = {}
    for index, header in enumerate(headers):
        if header == "":
            headers[index] = f"column_{index + 1}"
            issues.append(
                Issue(
                    Severity.WARNING,
                    "unnamed_column",
                    f"column {index + 1} has no header; named {headers[index]}",
                    name,
                    start + 1,
                    headers[index],
                )
            )
        elif header in seen:
            headers[index] = f"{header}.{seen[header] + 1}"
            issues.append(
                Issue(
                    Severity.WARNING,
                    "duplicate_header",
                    f"header {header!r} appears more than once; this one is "
                    f"read as {headers[index]!r}",
                    name,
                    start + 1,
                    header,
                )
            )
        seen[header] = seen.get(header, 0) + 1


def _read_rows(
    reader: _CsvReader, table: Table, name: str, line_offset: int, encoding: str | None
) -> None:
    """Append the readable data rows to ``table``, reporting the others.

    ``line_offset``: physical lines before the header.
    """
    previous_end = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            first = line_offset + previous_end + 1
            last = line_offset + reader.line_num
            span = f"line {first}" if first == last else f"lines {first}-{last}"
            table.issues.append(
                Issue(
                    Severity.ERROR,
                    "malformed_csv",
                    f"{span} could not be read as CSV ({exc}); check the quotes on that line",
                    name,
                    first,
                    action=Action.ROW_SKIPPED,
                )
            )
            previous_end = reader.line_num
            continue
        line = line_offset + previous_end + 1
        previous_end = reader.line_num
        row = _row(cells, line, table, name, encoding)
        if row is not None:
            table.rows.append(row)


def _row(
    cells: list[str], line: int, table: Table, name: str, encoding: str | None
) -> TableRow | None:
    """One data row aligned with the headers, or None when it is skipped (reported
    in ``table.issues`` unless blank or already reported when decoding)."""
    headers = table.headers
    width = len(headers)
    if not cells or all(not c.strip() for c in cells):
        return None
    if encoding is not None and any(UNDECODABLE in c for c in cells):
        return None  # reported with its byte when decoding
    if any("\x00" in c for c in cells):
        table.issues.append(
            Issue(
                Severity.ERROR,
                "nul_byte",
                "row contains a NUL byte (a corrupt or binary file?)",
                name,
                line,
                action=Action.ROW_SKIPPED,
            )
        )
        return None
    if len(cells) < width:
        table.issues.append(
            Issue(
                Severity.ERROR,
                "short_row",
                f"row has {len(cells)} fields, the header has {width}: "
                "a line break inside an unquoted value, or missing commas?",
                name,
                line,
                action=Action.ROW_SKIPPED,
            )
        )
        return None
    overflow = tuple(c for c in cells[width:])
    if any(c.strip() for c in overflow):
        spill = [c for c in overflow if c.strip()]
        table.issues.append(
            Issue(
                Severity.WARNING,
                "overflow_values",
                f"{len(spill)} value(s) beyond the last named column "
                f"({headers[-1]!r}): probably an unquoted comma; "
                "kept in the record's extra values",
                name,
                line,
                column=headers[-1],
                value=spill[0],
            )
        )
    else:
        overflow = ()
    return TableRow(line, tuple(cells[:width]), overflow)
