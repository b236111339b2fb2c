"""Rows as text for people and programs: a table, CSV or JSON (the one formatter that
the CLI and the service share, so that a download equals ``covidcxr predict`` output)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from covidcxr.schema.values import escape_formula, format_number

__all__ = ["FORMATS", "cell_text", "escape_text", "write_mapping", "write_rows"]

FORMATS = ("table", "csv", "json")


def cell_text(value: Any) -> str:
    """A value as text: Y/N for booleans, blank for None, lists joined with ``;``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, list | tuple):
        return ";".join(cell_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def escape_text(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (escape codes, newlines,
    carriage returns, C1 controls) shown as ``\\xNN`` / ``\\uNNNN`` escapes, so that a
    file name or a cell cannot move the cursor, recolour the screen or fake a line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    fmt: str,
    *,
    table_columns: Sequence[str] | None = None,
    max_width: int = 40,
    out: TextIO | None = None,
) -> None:
    """Print rows in ``fmt``.

    Args:
        rows: dicts keyed by column name.
        columns: the columns for CSV and JSON (all of them).
        fmt: ``table``, ``csv`` or ``json``.
        table_columns: the narrower set shown as a table (default: ``columns``).
        max_width: on a terminal, table cells longer than this are cut with ``…``;
            never in a pipe or file, so that every value can be pasted back.
        out: where to write (default: stdout).
    """
    stream = out or sys.stdout
    if fmt == "json":
        json.dump(
            [{c: row.get(c) for c in columns} for row in rows],
            stream,
            indent=2,
            ensure_ascii=False,
            default=_json_default,
        )
        stream.write("\n")
    elif fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([escape_formula(cell_text(row.get(c))) for c in columns])
    elif fmt == "table":
        shown = list(table_columns or columns)
        texts = [[escape_text(cell_text(row.get(c))) for c in shown] for row in rows]
        if stream.isatty():
            texts = [[_cut(t, max_width) for t in r] for r in texts]
        widths = [max([len(c), *(len(r[i]) for r in texts)]) for i, c in enumerate(shown)]
        stream.write(
            "  ".join(c.ljust(w) for c, w in zip(shown, widths, strict=True)).rstrip() + "\n"
        )
        for r in texts:
            stream.write(
                "  ".join(t.ljust(w) for t, w in zip(r, widths, strict=True)).rstrip() + "\n"
            )
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(f"unknown format {fmt!r}")


def write_mapping(data: Mapping[str, Any], fmt: str, out: TextIO | None = None) -> None:
    """Print a nested mapping (stats) as JSON or as indented text."""
    stream = out or sys.stdout
    if fmt == "json":
        json.dump(data, stream, indent=2, ensure_ascii=False, default=_json_default)
        stream.write("\n")
        return

    def emit(value: Any, indent: int) -> None:
        for key, item in value.items():
            if isinstance(item, Mapping):
                stream.write(f"{' ' * indent}{escape_text(str(key))}:\n")
                emit(item, indent + 2)
            else:
                stream.write(
                    f"{' ' * indent}{escape_text(str(key))}: {escape_text(cell_text(item))}\n"
                )

    emit(data, 0)
