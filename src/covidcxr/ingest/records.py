"""Reading a source's metadata rows into records, through its mapping (a scan step)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from covidcxr.errors import MappingError, MetadataError
from covidcxr.ingest.mapping import (
    UNCERTAIN_EXTRA,
    SourceMapping,
    finding_tokens,
    template_fields,
)
from covidcxr.ingest.report import Action
from covidcxr.ingest.scanned import ScannedRecord, ScanResult
from covidcxr.ingest.source import IMAGE_EXTENSIONS, SourceSpec, _source_files
from covidcxr.ingest.table import Table, TableRow, read_table
from covidcxr.schema.columns import BY_NAME, COLUMNS, Kind, match_headers
from covidcxr.schema.record import parse_record
from covidcxr.schema.values import Severity, looks_like_formula


def _header_map(table: Table, spec: SourceSpec, result: ScanResult) -> dict[str, int]:
    """Our column name -> index in the table, honouring the mapping."""
    report, file = result.report, spec.display(table.path)
    index = {h: i for i, h in enumerate(table.headers)}
    columns: dict[str, int] = {}
    mapped = dict(spec.mapping.columns) if spec.mapping else {}
    _check_derived(table, spec, mapped)
    for name, header in mapped.items():
        if header not in index:
            raise MappingError(
                f"scan: the mapping names column {header!r} for {name}, but {file} has no "
                f"such column; its columns are: {', '.join(table.headers)}"
            )
        columns[name] = index[header]
    used = set(mapped.values()) | _derived_headers(spec.mapping)
    for header, column in match_headers(h for h in table.headers if h not in used).items():
        if column.name in columns:
            report.add(
                Severity.INFO,
                "unused_column",
                f"column {header!r} also names {column.upstream}; the mapping's "
                "choice is used, this one is kept in extra values",
                file=file,
                row=1,
                column=header,
            )
            continue
        columns[column.name] = index[header]
    for header in table.headers:
        if header not in used and index[header] not in columns.values():
            report.add(
                Severity.INFO,
                "unknown_column",
                f"column {header!r} is not in the schema; its values are kept as "
                "extra values of each record",
                file=file,
                row=1,
                column=header,
            )
    given = set(spec.mapping.constants) | set(spec.mapping.derived) if spec.mapping else set()
    for column in COLUMNS:
        if column.required and column.name not in columns and column.name not in given:
            raise MetadataError(
                f"scan: {file} has no {column.upstream} column (required); its columns are: "
                f"{', '.join(table.headers)}; name it with a mapping file "
                f'([columns] {column.name} = "...")'
            )
    return columns


def _derived_headers(mapping: SourceMapping | None) -> set[str]:
    """Headers the mapping reads other than through [columns]."""
    if mapping is None:
        return set()
    labels = set(mapping.labels.columns) if mapping.labels else set()
    return labels | set(template_fields(mapping))


def _check_derived(table: Table, spec: SourceSpec, mapped: Mapping[str, str]) -> None:
    mapping = spec.mapping
    if mapping is None:
        return
    known = set(table.headers) | set(mapped) | set(mapping.constants) | set(mapping.derived)
    known |= {BY_NAME[name].upstream for name in known if name in BY_NAME}
    for name, how in mapping.derived.items():
        for source in how.sources():
            if source not in known:
                raise MappingError(
                    f"scan: the mapping derives {name} from {source!r}, but "
                    f"{spec.display(table.path)} has no such column; its columns are: "
                    f"{', '.join(table.headers)}"
                )
    for header in mapping.labels.columns if mapping.labels else ():
        if header not in table.headers:
            raise MappingError(
                f"scan: the mapping reads label column {header!r}, but "
                f"{spec.display(table.path)} has no such column"
            )


def _map_value(raw: str, column: str, mapping: SourceMapping | None) -> str:
    if mapping is None or column not in mapping.values or column == "finding":
        return raw
    table = mapping.values[column]
    if raw in table:
        return table[raw]
    return table.get(raw.strip(), raw)


def _read_records(spec: SourceSpec, table: Table, result: ScanResult) -> None:
    report, file = result.report, spec.display(table.path)
    report.extend(table.issues)
    columns = _header_map(table, spec, result)
    mapping = spec.mapping
    constants = dict(mapping.constants) if mapping else {}
    known_indexes = set(columns.values())
    seen_keys: dict[tuple[str, str], int] = {}
    extensions = _ExtensionFinder(spec.root)
    dicom_files = _DicomMatcher(spec, result, file)
    for row in table.rows:
        report.count("rows")
        cells = {name: _map_value(row.cells[i], name, mapping) for name, i in columns.items()}
        uncertain: list[str] = []
        if mapping is not None:
            by_header = dict(zip(table.headers, row.cells, strict=True))
            uncertain = _derive(mapping, by_header, cells, result, file, row.line)
            cells["filename"] = extensions.resolve(cells.get("filename", ""), spec)
            if mapping.dicom_match is not None:
                cells["filename"] = dicom_files.file_for(cells.get("filename", ""), row.line)
        cells.update(constants)
        parsed = parse_record(
            cells,
            finding_separator=mapping.finding_separator if mapping else None,
            finding_map=mapping.finding_map if mapping else None,
            default_folder=spec.default_folder,
        )
        for problem in parsed.problems:
            column = BY_NAME[problem.column].upstream if problem.column in BY_NAME else ""
            report.add(
                problem.severity,
                problem.code,
                problem.message,
                file=file,
                row=row.line,
                column=column,
                value=problem.value,
                action=problem.action,
            )
        if parsed.record is None:
            report.count("rows_rejected")
            continue
        record = parsed.record
        key = (record.patient_id, record.relative_path)
        if key in seen_keys:
            report.add(
                Severity.ERROR,
                "duplicate_row",
                f"patient {record.patient_id} and file {record.relative_path} are "
                f"already listed on line {seen_keys[key]}; this row is skipped",
                file=file,
                row=row.line,
                column="filename",
                value=record.filename,
                action=Action.ROW_SKIPPED,
            )
            report.count("rows_rejected")
            continue
        seen_keys[key] = row.line
        extra: dict[str, Any] = {
            header: row.cells[i]
            for i, header in enumerate(table.headers)
            if i not in known_indexes and row.cells[i].strip()
        }
        if row.overflow:
            extra["_overflow"] = [c for c in row.overflow if c.strip()]
        if uncertain:
            extra[UNCERTAIN_EXTRA] = "|".join(dict.fromkeys(uncertain))
        for text_column in COLUMNS:
            value = getattr(record, text_column.name)
            if (
                text_column.kind is Kind.TEXT
                and isinstance(value, str)
                and looks_like_formula(value)
            ):
                report.add(
                    Severity.INFO,
                    "formula_like_value",
                    "text starts like a spreadsheet formula; exports prefix it "
                    "with ' so spreadsheets do not run it",
                    file=file,
                    row=row.line,
                    column=text_column.upstream,
                    value=value,
                )
        result.records.append(ScannedRecord(row.line, record, extra))


def _derive(
    mapping: SourceMapping,
    by_header: Mapping[str, str],
    cells: dict[str, str],
    result: ScanResult,
    file: str,
    line: int,
) -> list[str]:
    """Fill the mapping's derived columns and label findings into ``cells``.

    Returns:
        The row's uncertain findings (vocabulary names or tokens as written).
    """
    for name, how in mapping.derived.items():
        # Patterns may name a header, or one of our columns by its name or upstream name.
        ours = {BY_NAME[n].upstream: v for n, v in cells.items() if n in BY_NAME}
        value, problem = how.value({**by_header, **cells, **ours})
        if problem is not None:
            result.report.add(
                Severity.WARNING,
                "underived_value",
                f"{BY_NAME[name].upstream} cannot be made: {problem}; left blank",
                file=file,
                row=line,
                column=BY_NAME[name].upstream,
                action=Action.VALUE_BLANKED,
            )
        cells[name] = _map_value(value, name, mapping)
    uncertain: list[str] = []
    if mapping.labels is not None:
        positive, uncertain = mapping.labels.read(by_header)
        cells["finding"] = "|".join(positive)
    if "finding" in cells:
        cells["finding"], marked = finding_tokens(cells["finding"], mapping)
        uncertain += marked
    return uncertain


class _DicomMatcher:
    """Finds the DICOM file a row names by an attribute (the mapping's
    ``dicom_match``); the attribute's values are never reported (an accession number
    identifies a patient's study)."""

    def __init__(self, spec: SourceSpec, result: ScanResult, file: str) -> None:
        self.spec, self.result, self.file = spec, result, file
        self._index: dict[str, list[Path]] | None = None

    def file_for(self, value: str, line: int) -> str:
        keyword = self.spec.mapping.dicom_match if self.spec.mapping else None
        if keyword is None or not value.strip():
            return value
        if self._index is None:
            from covidcxr.imaging.dicom import header_index  # the dicom extra

            self._index = header_index(_source_files(self.spec.root), keyword)
        found = sorted(self._index.get(value.strip(), []))
        if len(found) != 1:
            what = "no DICOM file" if not found else f"{len(found)} DICOM files"
            self.result.report.add(
                Severity.ERROR,
                "dicom_unmatched" if not found else "dicom_ambiguous",
                f"{what} in the source folder ha{'s' if not found else 've'} this row's "
                f"{keyword} (value withheld); the row is skipped",
                file=self.file,
                row=line,
                column=keyword,
                action=Action.ROW_SKIPPED,
            )
            return ""
        return found[0].relative_to(self.spec.root).as_posix()


class _ExtensionFinder:
    """Finds ``name.*`` (a mapping's file pattern) in its folder, listing each folder
    once; an image extension wins over others."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listing: dict[str, dict[str, list[str]]] = {}

    def resolve(self, relative: str, spec: SourceSpec) -> str:
        if not relative.endswith(".*"):
            return relative
        stem = relative[:-2]
        folder = "/".join(p for p in (spec.default_folder or "", str(Path(stem).parent)) if p)
        if ".." in Path(folder).parts or Path(folder).is_absolute():
            return relative  # the path check refuses it
        if folder not in self._listing:
            self._listing[folder] = defaultdict(list)
            directory = self.root / folder
            names = sorted(os.listdir(directory)) if directory.is_dir() else []  # noqa: PTH208
            for name in names:
                self._listing[folder][os.path.splitext(name)[0]].append(name)  # noqa: PTH122
        found = self._listing[folder].get(Path(stem).name, [])
        if not found:
            return relative  # reported as a missing image
        images = [n for n in found if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]  # noqa: PTH122
        return str(Path(stem).parent / (images or found)[0]).removeprefix("./")


def _joined(spec: SourceSpec, table: Table, result: ScanResult) -> Table:
    """The table with the mapping's second table's columns added row by row."""
    mapping = spec.mapping
    if mapping is None or mapping.join is None or mapping.join_on is None:
        return table
    other = read_table(
        spec.root / mapping.join,
        encoding=mapping.encoding,
        delimiter=mapping.delimiter,
        display_name=mapping.join,
    )
    key = mapping.join_on
    for which, headers in (
        (spec.display(table.path), table.headers),
        (mapping.join, other.headers),
    ):
        if key not in headers:
            raise MappingError(
                f"scan: the mapping joins on {key!r}, but {which} has no such column; "
                f"its columns are: {', '.join(headers)}"
            )
    result.report.extend(other.issues)
    at = other.headers.index(key)
    added = [h for h in other.headers if h not in table.headers]
    rows_by_key: dict[str, dict[str, str]] = {}
    for row in other.rows:
        rows_by_key.setdefault(
            row.cells[at].strip(), dict(zip(other.headers, row.cells, strict=True))
        )
    merged = Table(table.path, table.encoding, [*table.headers, *added], issues=list(table.issues))
    here = table.headers.index(key)
    for row in table.rows:
        joined = rows_by_key.get(row.cells[here].strip())
        if joined is None:
            result.report.add(
                Severity.WARNING,
                "join_missing",
                f"no row of {mapping.join} has {key} {row.cells[here]!r}; its columns are blank",
                file=spec.display(table.path),
                row=row.line,
                column=key,
                value=row.cells[here],
            )
        cells = (*row.cells, *((joined or {}).get(h, "") for h in added))
        merged.rows.append(TableRow(row.line, cells, row.overflow))
    return merged
