"""Validation reports: every problem found in a source, with where and why.

An :class:`Issue` names the file, the row (the line number in that file, 1-based,
header included), the column, the value and the reason, plus what was done about it
(``action``). A :class:`Report` collects the issues and counts of one scan or
ingest and writes them as JSON (everything) and CSV (one issue per line).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr.atomic import atomic_output
from covidcxr.schema.values import Action, Severity, escape_formula
from covidcxr.serialise import to_dict

__all__ = ["Action", "Issue", "Report", "Severity", "escape_control", "write_text_atomic"]


@dataclass(frozen=True)
class Issue:
    """One problem in the input.

    Attributes:
        severity: error (row/file unusable), warning (value dropped or doubtful)
            or info.
        code: short machine-readable reason, e.g. ``image_missing``.
        message: the reason in words, naming the value.
        file: the file the problem is in, relative to the source root where possible.
        row: line number in ``file`` (1-based, header = 1), or None.
        column: the column (upstream header) or empty.
        value: the offending text (truncated to 200 characters) or empty.
        action: what was done, see :class:`Action`.
    """

    severity: Severity
    code: str
    message: str
    file: str = ""
    row: int | None = None
    column: str = ""
    value: str = ""
    action: Action = Action.KEPT

    def location(self) -> str:
        """``file:row [column]`` for humans."""
        where = self.file
        if self.row is not None:
            where += f":{self.row}"
        if self.column:
            where += f" [{self.column}]"
        return where

    def __str__(self) -> str:
        value = f" value {self.value!r}" if self.value else ""
        text = f"{self.severity}: {self.location()}{value}: {self.message} ({self.code})"
        return escape_control(text)


def escape_control(text: str) -> str:
    """``text`` with control characters (escape codes, newlines, NUL, bidi overrides)
    written as Python escapes, so that echoing input cannot spoof a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


REPORT_FIELDS = ("severity", "code", "file", "row", "column", "value", "action", "message")
MAX_VALUE_CHARS = 200


@dataclass
class Report:
    """Issues and counts of one scan/ingest of one source."""

    source: str
    root: str
    issues: list[Issue] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        severity: Severity,
        code: str,
        message: str,
        *,
        file: str | os.PathLike[str] = "",
        row: int | None = None,
        column: str = "",
        value: str = "",
        action: Action = Action.KEPT,
    ) -> Issue:
        """Record an issue and return it."""
        if len(value) > MAX_VALUE_CHARS:
            value = value[:MAX_VALUE_CHARS] + "…"
        issue = Issue(severity, code, message, str(file), row, column, value, action)
        self.issues.append(issue)
        return issue

    def extend(self, issues: Iterable[Issue]) -> None:
        """Add issues made elsewhere."""
        self.issues.extend(issues)

    def count(self, name: str, increment: int = 1) -> None:
        """Increase a named count (rows, images_stored, ...)."""
        self.counts[name] = self.counts.get(name, 0) + increment

    @property
    def errors(self) -> list[Issue]:
        """Issues of severity error."""
        return [i for i in self.issues if i.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Issue]:
        """Issues of severity warning."""
        return [i for i in self.issues if i.severity is Severity.WARNING]

    def by_code(self, severity: Severity | None = None) -> Counter[str]:
        """How many issues of each code (optionally of one severity)."""
        return Counter(i.code for i in self.issues if severity is None or i.severity is severity)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the whole report."""
        return {
            "source": self.source,
            "root": self.root,
            "counts": dict(self.counts),
            "issue_counts": {str(s): dict(sorted(self.by_code(s).items())) for s in Severity},
            "issues": [to_dict(issue) for issue in self.issues],
        }

    def to_csv_text(self) -> str:
        """The issues as CSV text; cells that look like formulas are escaped."""
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(REPORT_FIELDS)
        for issue in self.issues:
            row = to_dict(issue)
            writer.writerow(
                [escape_formula("" if row[k] is None else str(row[k])) for k in REPORT_FIELDS]
            )
        return buffer.getvalue()

    def write(self, directory: str | os.PathLike[str], stem: str) -> tuple[Path, Path]:
        """Write ``stem.json`` and ``stem.csv`` into ``directory`` atomically.

        Returns:
            the JSON and CSV paths.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
        write_text_atomic(json_path, json.dumps(self.as_dict(), indent=2, ensure_ascii=False))
        write_text_atomic(csv_path, self.to_csv_text())
        return json_path, csv_path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`covidcxr.atomic.atomic_output`)."""
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="")
