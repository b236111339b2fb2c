"""Mapping files: how to read a source whose columns and values differ.

A mapping is a TOML file::

    [source]
    name = "nih-cxr14-subset"    # name of the source in the store
    metadata = "metadata.csv"    # relative to the source folder
    images = "images"            # folder of the images when rows name none
    encoding = "utf-8"           # optional; default: detect
    delimiter = ","              # optional

    [columns]                    # our column = the header in this source
    filename = "file"
    patientid = "Patient ID"

    [constants]                  # values for columns the source lacks
    modality = "X-ray"

    [values.view]                # text in this source = text we read
    "AP erect" = "AP Erect"

    [values.finding]             # finding tokens (after splitting)
    "Pleural_Thickening" = "Pleural Thickening"

    [findings]
    separator = "|"              # flat finding lists

Columns may be named by our name (``age_years``), the upstream header (``age``)
or an alias. A value that neither the mapping nor the schema can read is
reported, never guessed.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr.errors import MappingError
from covidcxr.schema.columns import COLUMNS, Column, column_for_header

_SECTIONS = {"source", "columns", "constants", "values", "findings"}
_SOURCE_KEYS = {"name", "metadata", "images", "encoding", "delimiter", "description"}


@dataclass(frozen=True)
class SourceMapping:
    """A parsed mapping file (see the module docstring for the format)."""

    path: Path | None = None
    name: str | None = None
    metadata: str | None = None
    images: str | None = None
    encoding: str | None = None
    delimiter: str = ","
    description: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)  # our name -> header
    constants: Mapping[str, str] = field(default_factory=dict)  # our name -> text
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # our name -> map
    finding_separator: str | None = None

    @property
    def finding_map(self) -> Mapping[str, str]:
        """Finding token -> vocabulary name."""
        return self.values.get("finding", {})


def _column(key: str, where: str, path: Path) -> Column:
    column = column_for_header(key)
    if column is None:
        names = [c.name for c in COLUMNS] + [c.upstream for c in COLUMNS]
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise MappingError(f"load_mapping: {path}: [{where}] names unknown column {key!r}{hint}")
    return column


def _string_table(raw: Any, where: str, path: Path) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise MappingError(f"load_mapping: {path}: [{where}] must be a table of strings")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise MappingError(
                f"load_mapping: {path}: [{where}] {key} = {value!r}: expected a string"
            )
    return dict(raw)


def load_mapping(path: str | os.PathLike[str]) -> SourceMapping:
    """Read and validate a mapping file.

    Raises:
        MappingError: the file is unreadable, not TOML, or names unknown
            sections, keys or columns (the message names the key and the fix).
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MappingError(f"load_mapping: cannot read {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MappingError(f"load_mapping: {path} is not valid TOML: {exc}") from exc
    unknown = set(doc) - _SECTIONS
    if unknown:
        raise MappingError(
            f"load_mapping: {path}: unknown section(s) {sorted(unknown)}; "
            f"expected {sorted(_SECTIONS)}"
        )
    source = doc.get("source", {})
    if not isinstance(source, dict) or set(source) - _SOURCE_KEYS:
        extra = sorted(set(source) - _SOURCE_KEYS) if isinstance(source, dict) else source
        raise MappingError(
            f"load_mapping: {path}: [source] has unknown key(s) {extra}; "
            f"expected {sorted(_SOURCE_KEYS)}"
        )
    for key, value in source.items():
        if not isinstance(value, str):
            raise MappingError(f"load_mapping: {path}: [source] {key} must be a string")

    columns = {
        _column(k, "columns", path).name: v
        for k, v in _string_table(doc.get("columns", {}), "columns", path).items()
    }
    constants = {
        _column(k, "constants", path).name: v
        for k, v in _string_table(doc.get("constants", {}), "constants", path).items()
    }
    both = set(columns) & set(constants)
    if both:
        raise MappingError(
            f"load_mapping: {path}: {sorted(both)} given both in [columns] and [constants]"
        )
    raw_values = doc.get("values", {})
    if not isinstance(raw_values, dict):
        raise MappingError(f"load_mapping: {path}: [values] must hold one table per column")
    values = {
        _column(k, f"values.{k}", path).name: _string_table(v, f"values.{k}", path)
        for k, v in raw_values.items()
    }
    findings = doc.get("findings", {})
    if not isinstance(findings, dict) or set(findings) - {"separator"}:
        raise MappingError(f"load_mapping: {path}: [findings] takes only 'separator'")
    separator = findings.get("separator")
    if separator is not None and (not isinstance(separator, str) or not separator):
        raise MappingError(f"load_mapping: {path}: [findings] separator must be a character")
    delimiter = source.get("delimiter", ",")
    if len(delimiter) != 1:
        raise MappingError(
            f"load_mapping: {path}: [source] delimiter {delimiter!r} must be one character"
        )
    return SourceMapping(
        path=path,
        name=source.get("name"),
        metadata=source.get("metadata"),
        images=source.get("images"),
        encoding=source.get("encoding"),
        delimiter=delimiter,
        description=source.get("description"),
        columns=columns,
        constants=constants,
        values=values,
        finding_separator=separator,
    )
