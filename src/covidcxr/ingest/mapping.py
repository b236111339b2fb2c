"""Mapping files: how to read a source whose columns and values differ.

A mapping is a TOML file::

    [source]
    name = "nih-cxr14-subset"    # name of the source in the store
    metadata = "metadata.csv"    # relative to the source folder
    images = "images"            # folder of the images when rows name none
    encoding = "utf-8"           # optional; default: detect
    delimiter = ","              # optional
    join = "labels.csv"          # optional: a second table, joined row by row
    join_on = "study_id"         #   on this column (present in both)
    dicom_match = "SOPInstanceUID"   # optional: the file column holds this DICOM
                                     # attribute (or AccessionNumber, StudyInstanceUID)

    [columns]                    # our column = where its value comes from
    filename = "file"            # a header of the table
    patientid = "Patient ID"
    view = ["AP/PA", "Frontal/Lateral"]                    # the first non-blank one
    # filename = "{patientid}.*"                           # a pattern of other columns;
    #                                                      # ".*": find the extension
    # patientid = { header = "Path", pattern = "(patient\\d+)" }  # part of a value

    [constants]                  # values for columns the source lacks
    modality = "X-ray"

    [values.view]                # text in this source = text we read
    "AP erect" = "AP Erect"

    [values.age]                 # also for free-text values the schema reports
    "50+" = "50"

    [values.finding]             # finding tokens (after splitting)
    "Pleural_Thickening" = "Pleural Thickening"

    [findings]
    separator = "|"              # flat finding lists
    strip = "[]'"                # characters around list items (PadChest)
    uncertain_marker = " uncertain"   # tokens ending so are kept as uncertain

    [labels]                     # one column per label (CheXpert, MIMIC-CXR)
    positive = ["1.0"]
    uncertain = ["-1.0"]         # kept as uncertain findings, never as positive
    [labels.columns]             # header = finding ("" = not in the hierarchy)
    "Pleural Effusion" = "Effusion"

Columns may be named by our name (``age_years``), the upstream header (``age``)
or an alias; one header may feed several columns. Template fields name a header of
the table or one of our columns, with Python's format spec (``{subject_id:.2}`` is
its first two characters). A value that neither the mapping nor the schema can read
is reported, never guessed. Built-in mappings for the big public sets are
:func:`load_preset` (``--preset``).
"""

from __future__ import annotations

import difflib
import os
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr.errors import MappingError
from covidcxr.schema.columns import COLUMNS, Column, column_for_header
from covidcxr.schema.findings import resolve_node

_SECTIONS = {"source", "columns", "constants", "values", "findings", "labels"}
_SOURCE_KEYS = {
    "name",
    "metadata",
    "images",
    "encoding",
    "delimiter",
    "description",
    "join",
    "join_on",
    "dicom_match",
}
#: DICOM attributes a table's file column may name instead of a file (``dicom_match``).
DICOM_MATCH_KEYWORDS = ("SOPInstanceUID", "AccessionNumber", "StudyInstanceUID")
_FINDING_KEYS = {"separator", "strip", "uncertain_marker"}
#: Where the built-in mappings (``--preset NAME``) live.
PRESETS_DIR = Path(__file__).with_name("presets")
#: The extra value holding a record's uncertain findings (``|``-separated paths).
UNCERTAIN_EXTRA = "uncertain_findings"
_FORMATTER = string.Formatter()


@dataclass(frozen=True)
class Derived:
    """A column whose value is computed from the row.

    Exactly one form is set: ``template`` (``"{patientid}.*"``), ``headers`` (the
    first non-blank of several), or ``header`` with ``pattern`` (the regular
    expression's first group, or its whole match).
    """

    template: str | None = None
    headers: tuple[str, ...] = ()
    header: str | None = None
    pattern: str | None = None

    def sources(self) -> tuple[str, ...]:
        """The headers or columns this value reads."""
        if self.template is not None:
            return tuple(name for _, name, _, _ in _FORMATTER.parse(self.template) if name)
        return self.headers or ((self.header,) if self.header else ())

    def value(self, row: Mapping[str, str]) -> tuple[str, str | None]:
        """The value for one row (by header and by our column name), and why it is
        blank when it cannot be made."""
        if self.template is not None:
            missing = [name for name in self.sources() if not row.get(name, "").strip()]
            if missing:
                return "", f"{self.template!r} needs {', '.join(missing)}, blank on this row"
            return self.template.format_map({k: v.strip() for k, v in row.items()}), None
        if self.headers:
            return next((row[h] for h in self.headers if row.get(h, "").strip()), ""), None
        text = row.get(self.header or "", "")
        match = re.search(self.pattern or "", text)
        if match is None:
            problem = None if not text.strip() else f"{text!r} does not match {self.pattern!r}"
            return "", problem
        return (match.group(1) if match.re.groups else match.group(0)), None


@dataclass(frozen=True)
class LabelColumns:
    """Findings written as one column per label (``1.0``, ``-1.0``, ``0.0``, blank)."""

    columns: Mapping[str, str]  # header -> vocabulary path ("" = none)
    positive: frozenset[str]
    uncertain: frozenset[str]

    def read(self, row: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """Positive and uncertain findings of a row, as vocabulary paths; labels the
        hierarchy lacks are left out (their columns stay extra values)."""
        positive: list[str] = []
        uncertain: list[str] = []
        for header, finding in self.columns.items():
            value = row.get(header, "").strip()
            if not finding or not value:
                continue
            if value in self.positive:
                positive.append(finding)
            elif value in self.uncertain:
                uncertain.append(finding)
        return positive, uncertain


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
    derived: Mapping[str, Derived] = field(default_factory=dict)  # our name -> how
    labels: LabelColumns | None = None
    finding_strip: str = ""
    uncertain_marker: str | None = None
    join: str | None = None
    join_on: str | None = None
    dicom_match: str | None = None

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


def _derived(key: str, raw: Any, path: Path) -> Derived | None:
    """A [columns] entry that is not a plain header, or None for a plain header."""
    where = f"load_mapping: {path}: [columns] {key}"
    if isinstance(raw, str):
        if "{" not in raw:
            return None
        try:
            fields = [name for _, name, _, _ in _FORMATTER.parse(raw)]
        except ValueError as exc:
            raise MappingError(f"{where} = {raw!r} is not a valid pattern ({exc})") from exc
        if not any(fields) or any(name is not None and not name for name in fields):
            raise MappingError(f"{where} = {raw!r}: name a column in each {{}}")
        return Derived(template=raw)
    if isinstance(raw, list) and raw and all(isinstance(h, str) for h in raw):
        return Derived(headers=tuple(raw))
    if isinstance(raw, dict) and set(raw) == {"header", "pattern"}:
        header, pattern = raw["header"], raw["pattern"]
        if not isinstance(header, str) or not isinstance(pattern, str):
            raise MappingError(f"{where}: header and pattern must be strings")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise MappingError(f"{where}: pattern {pattern!r} is not valid ({exc})") from exc
        return Derived(header=header, pattern=pattern)
    raise MappingError(
        f"{where} = {raw!r}: expected a string (a header, or a pattern such as "
        '"{patientid}.*"), a list of headers, or { header = "...", pattern = "..." }'
    )


def _read_columns(raw: Any, path: Path) -> tuple[dict[str, str], dict[str, Derived]]:
    if not isinstance(raw, dict):
        raise MappingError(f"load_mapping: {path}: [columns] must be a table")
    plain: dict[str, str] = {}
    derived: dict[str, Derived] = {}
    for key, value in raw.items():
        name = _column(key, "columns", path).name
        how = _derived(key, value, path)
        if how is not None:
            derived[name] = how
        else:
            plain[name] = value
    return plain, derived


def _read_labels(raw: Any, path: Path) -> LabelColumns | None:
    if raw is None:
        return None
    where = f"load_mapping: {path}: [labels]"
    if not isinstance(raw, dict) or set(raw) - {"positive", "uncertain", "columns"}:
        raise MappingError(f"{where} takes positive, uncertain and [labels.columns]")
    lists = {}
    for key in ("positive", "uncertain"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MappingError(f"{where} {key} must be a list of strings")
        lists[key] = frozenset(v.strip() for v in value)
    if not lists["positive"]:
        raise MappingError(f'{where} needs positive = ["..."], the values meaning present')
    columns = _string_table(raw.get("columns", {}), "labels.columns", path)
    resolved = {}
    for header, finding in columns.items():
        try:
            resolved[header] = resolve_node(finding) if finding else ""
        except MappingError as exc:
            raise MappingError(f"{where}.columns] {header!r}: {exc}") from exc
    return LabelColumns(resolved, lists["positive"], lists["uncertain"])


def _read_findings(raw: Any, path: Path) -> dict[str, str]:
    if not isinstance(raw, dict) or set(raw) - _FINDING_KEYS:
        raise MappingError(
            f"load_mapping: {path}: [findings] takes only {', '.join(sorted(_FINDING_KEYS))}"
        )
    for key, value in raw.items():
        if not isinstance(value, str) or not value:
            raise MappingError(f"load_mapping: {path}: [findings] {key} must be a character")
    return dict(raw)


def _read_source(doc: Mapping[str, Any], path: Path) -> dict[str, str]:
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
    if ("join" in source) != ("join_on" in source):
        raise MappingError(f"load_mapping: {path}: [source] join and join_on go together")
    if source.get("dicom_match", DICOM_MATCH_KEYWORDS[0]) not in DICOM_MATCH_KEYWORDS:
        raise MappingError(
            f"load_mapping: {path}: [source] dicom_match {source['dicom_match']!r}: "
            f"expected one of {', '.join(DICOM_MATCH_KEYWORDS)}"
        )
    delimiter = source.get("delimiter", ",")
    if len(delimiter) != 1:
        raise MappingError(
            f"load_mapping: {path}: [source] delimiter {delimiter!r} must be one character"
        )
    return source


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
    source = _read_source(doc, path)
    columns, derived = _read_columns(doc.get("columns", {}), path)
    constants = {
        _column(k, "constants", path).name: v
        for k, v in _string_table(doc.get("constants", {}), "constants", path).items()
    }
    both = (set(columns) | set(derived)) & set(constants)
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
    findings = _read_findings(doc.get("findings", {}), path)
    return SourceMapping(
        path=path,
        name=source.get("name"),
        metadata=source.get("metadata"),
        images=source.get("images"),
        encoding=source.get("encoding"),
        delimiter=source.get("delimiter", ","),
        description=source.get("description"),
        columns=columns,
        constants=constants,
        values=values,
        finding_separator=findings.get("separator"),
        derived=derived,
        labels=_read_labels(doc.get("labels"), path),
        finding_strip=findings.get("strip", ""),
        uncertain_marker=findings.get("uncertain_marker"),
        join=source.get("join"),
        join_on=source.get("join_on"),
        dicom_match=source.get("dicom_match"),
    )


def preset_names() -> tuple[str, ...]:
    """The built-in mappings, by name (``chexpert``, ``mimic-cxr``, ...)."""
    return tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))


def load_preset(name: str) -> SourceMapping:
    """A built-in mapping for one of the big public chest X-ray sets.

    Raises:
        MappingError: no preset has that name (the message lists them).
    """
    path = PRESETS_DIR / f"{name}.toml"
    if name not in preset_names():
        raise MappingError(
            f"load_preset: no preset {name!r}; built in: {', '.join(preset_names())}"
        )
    return load_mapping(path)


def finding_tokens(raw: str, mapping: SourceMapping) -> tuple[str, list[str]]:
    """A finding cell with list punctuation stripped and uncertain tokens set apart.

    Returns:
        The cell's text for the finding parser (certain tokens only) and the uncertain
        tokens as written (marker removed, value map applied).
    """
    separator = mapping.finding_separator
    if not mapping.finding_strip and mapping.uncertain_marker is None:
        return raw, []
    parts = raw.split(separator) if separator else [raw]
    certain: list[str] = []
    uncertain: list[str] = []
    for part in parts:
        token = part.strip().strip(mapping.finding_strip).strip()
        if not token:
            continue
        marker = mapping.uncertain_marker
        if marker and token.lower().endswith(marker.lower()):
            stem = token[: -len(marker)].strip()
            uncertain.append(mapping.finding_map.get(stem, stem))
        else:
            certain.append(token)
    return (separator or ",").join(certain), uncertain


def template_fields(mapping: SourceMapping) -> Sequence[str]:
    """Headers and columns the mapping's derived columns read."""
    return tuple(name for how in mapping.derived.values() for name in how.sources())
