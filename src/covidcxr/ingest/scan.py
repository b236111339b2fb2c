"""Scanning a source: everything ``check`` and ``ingest`` know about it, nothing written.

A scan reads the metadata table, parses every row through the schema, resolves
and safely decodes every referenced image, reads the annotations of the upstream
layout (severity scores, lung masks, lung boxes), and reports every problem with
file, row, column, value and reason. ``check`` prints the report; ``ingest``
copies the files into the blob store and hands the scan to
:func:`covidcxr.ingest.writer.write_scan`. A scan itself writes nothing.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr.errors import MappingError, MetadataError
from covidcxr.imaging.decode import DEFAULT_MAX_PIXELS, ImageInfo, extension_matches
from covidcxr.ingest.files import (
    FileJob,
    FileOutcome,
    files_progress,
    is_dicom,
    process_files,
)
from covidcxr.ingest.mapping import (
    UNCERTAIN_EXTRA,
    SourceMapping,
    finding_tokens,
    template_fields,
)
from covidcxr.ingest.report import Action, Report
from covidcxr.ingest.table import Table, TableRow, read_table
from covidcxr.schema.columns import BY_NAME, COLUMNS, Kind, match_headers
from covidcxr.schema.record import MetadataRecord, parse_record
from covidcxr.schema.values import Severity, looks_like_formula

log = logging.getLogger(__name__)

DEFAULT_METADATA = "metadata.csv"
ANNOTATIONS_DIR = "annotations"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe"})


@dataclass(frozen=True)
class SourceSpec:
    """Where a source is and how to read it."""

    name: str
    root: Path
    metadata: Path
    kind: str
    mapping: SourceMapping | None = None
    #: The de-identification key's folder (the store's data directory); DICOM files
    #: are de-identified and kept as PNG. ``None``: a throwaway key (``check``).
    deid_dir: Path | None = None

    @property
    def default_folder(self) -> str | None:
        """Folder of images for rows that name none (from the mapping)."""
        return self.mapping.images if self.mapping else None

    def display(self, path: Path) -> str:
        """``path`` relative to the source root when inside it."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def resolve_source(
    path: str | os.PathLike[str],
    *,
    metadata: str | os.PathLike[str] | None = None,
    mapping: SourceMapping | None = None,
    name: str | None = None,
) -> SourceSpec:
    """Work out the source root, metadata file and name from what the user gave.

    Args:
        path: the source folder (upstream layout: ``metadata.csv``, ``images/``,
            ``annotations/``) or its metadata CSV.
        metadata: another metadata file (relative to the folder, or a path), e.g.
            ``metadata-latest.csv``.
        mapping: a mapping for sources in another layout.
        name: the source name in the store (default: mapping's name or folder name).

    Raises:
        MetadataError: the folder or metadata file does not exist.
    """
    given = Path(path).expanduser()
    if given.is_file():
        root, default_metadata = given.parent, given
    elif given.is_dir():
        meta_name = (mapping.metadata if mapping and mapping.metadata else None) or DEFAULT_METADATA
        root, default_metadata = given, given / meta_name
    else:
        raise MetadataError(f"resolve_source: {given} does not exist")
    root = root.resolve()
    if metadata is not None:
        candidate = Path(metadata).expanduser()
        metadata_path = candidate if candidate.is_absolute() else root / candidate
        if not metadata_path.is_file() and candidate.is_file():
            metadata_path = candidate.resolve()
    else:
        metadata_path = default_metadata
    dicom_folder = metadata is None and not metadata_path.is_file() and given.is_dir()
    if dicom_folder and _holds_dicom(root):
        return SourceSpec(name=name or root.name, root=root, metadata=root, kind="dicom")
    if not metadata_path.is_file():
        raise MetadataError(
            f"resolve_source: no metadata file {metadata_path}; give the folder of a "
            "collection with a metadata.csv, or the CSV itself, or --metadata FILE"
        )
    source_name = name or (mapping.name if mapping and mapping.name else None) or root.name
    return SourceSpec(
        name=source_name,
        root=root,
        metadata=metadata_path.resolve(),
        kind="mapped" if mapping is not None else "upstream",
        mapping=mapping,
    )


def _holds_dicom(root: Path) -> bool:
    """Whether a folder (or any folder under it) holds a DICOM file, by content."""
    return any(is_dicom(_head(path)) for path in _source_files(root))


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(512)
    except OSError:
        return b""


def _source_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root``, sorted, hidden files and folders skipped."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder, name)
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                yield path


@dataclass
class ScannedRecord:
    """A record from one metadata row, with the state of its image."""

    line: int
    record: MetadataRecord
    extra: dict[str, Any]
    image_status: str = "missing"
    image_sha256: str | None = None


@dataclass(frozen=True)
class ScannedImage:
    """A decodable image file (content-addressed) and where it was read."""

    sha256: str
    path: Path
    info: ImageInfo
    phash: str | None
    phash_detail: str | None
    #: ``"DICOM"``: the stored bytes are the de-identified PNG made from ``path``.
    converted_from: str | None = None


@dataclass(frozen=True)
class ScannedAnnotation:
    """An annotation resolved to the image it describes."""

    image_sha256: str
    kind: str
    annotator: str
    file: str
    label: str = ""
    geographic_mean: float | None = None
    opacity_mean: float | None = None
    mask_sha256: str | None = None
    mask_path: Path | None = None
    mask_values: str | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass
class ScanResult:
    """Everything a scan found (a scan writes nothing)."""

    spec: SourceSpec
    metadata_sha256: str
    records: list[ScannedRecord] = field(default_factory=list)
    images: dict[str, ScannedImage] = field(default_factory=dict)
    annotations: list[ScannedAnnotation] = field(default_factory=list)
    #: Seconds spent per phase (metadata, images, annotations), for logs and benchmarks.
    timings: dict[str, float] = field(default_factory=dict)
    #: The key folder DICOM files were de-identified with (see SourceSpec.deid_dir).
    deid_dir: str | None = None
    report: Report = field(init=False)

    def __post_init__(self) -> None:
        self.report = Report(self.spec.name, str(self.spec.root))


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


def _flag_shared_images(result: ScanResult, file: str) -> None:
    by_path: dict[str, list[ScannedRecord]] = defaultdict(list)
    for scanned in result.records:
        by_path[scanned.record.relative_path].append(scanned)
    for path, group in by_path.items():
        if len(group) < 2:
            continue
        patients = sorted({s.record.patient_id for s in group})
        lines = [s.line for s in group]
        for scanned in group:
            scanned.record.flags.add("shared_image")
        result.report.add(
            Severity.WARNING,
            "shared_image",
            f"file {path} is referenced by {len(group)} rows (lines "
            f"{', '.join(map(str, lines))}; patients {', '.join(patients)}): stored once, "
            "listed once per row; check whether these are the same patient",
            file=file,
            row=lines[1],
            column="filename",
            value=path,
        )


class _SourceFiles:
    """Locates the files a source references, refusing any that resolve outside it.

    Equivalent to ``(root / relative).resolve()`` plus a containment check and
    ``is_file()``, but each folder is resolved once, not once per file: with 100,000
    images in one folder, per-file ``resolve()`` (an ``lstat`` per path component) was
    a tenth of the image phase and ran before any worker started. Strings and
    ``os`` calls, not pathlib, for the same reason.
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._prefix = os.path.join(self.root, "")  # noqa: PTH118
        self._folders: dict[str, str] = {}

    def locate(self, relative: str) -> tuple[Path, str]:
        """``(path, status)``: status ``file`` (something is there: the file job
        refuses, with the reason, a FIFO, socket, device or link loop), ``missing``
        (nothing, a folder, or a dangling link) or ``unsafe`` (it resolves outside
        the root, through ``..`` or a link)."""
        folder, _, name = relative.rpartition("/")
        if name in ("", ".", ".."):
            resolved = _resolved(str(Path(self.root, relative)))
        else:
            if folder not in self._folders:
                self._folders[folder] = _resolved(str(Path(self.root, folder)))
            resolved = os.path.join(self._folders[folder], name)  # noqa: PTH118
            if os.path.islink(resolved):  # noqa: PTH114
                resolved = _resolved(resolved)
        if resolved != self.root and not resolved.startswith(self._prefix):
            return Path(resolved), "unsafe"
        present = os.path.lexists(resolved) and not os.path.isdir(resolved)  # noqa: PTH112
        return Path(resolved), "file" if present else "missing"


def _resolved(path: str) -> str:
    """``path`` resolved, or as it is when it is a link loop (its read then fails
    with ELOOP, reported as that file's error)."""
    try:
        return str(Path(path).resolve())
    except (RuntimeError, OSError):
        return path


def _resolve_images(result: ScanResult, workers: int | None, max_pixels: int) -> None:
    spec, report = result.spec, result.report
    file = spec.display(spec.metadata)
    jobs: list[FileJob] = []
    by_path: dict[str, list[ScannedRecord]] = defaultdict(list)
    for scanned in result.records:
        by_path[scanned.record.relative_path].append(scanned)
    files = _SourceFiles(spec.root)
    for relative, group in by_path.items():
        first = group[0]
        target, status = files.locate(relative)
        if status == "unsafe":
            for scanned in group:
                scanned.image_status = "rejected"
            report.add(
                Severity.ERROR,
                "unsafe_path",
                f"{relative} resolves outside the source folder (a symbolic link?); not read",
                file=file,
                row=first.line,
                column="filename",
                value=relative,
                action=Action.IMAGE_REJECTED,
            )
            continue
        if status == "missing":
            report.add(
                Severity.WARNING,
                "image_missing",
                f"image {relative} is not in the source folder; the record is kept "
                "and flagged image-missing",
                file=file,
                row=first.line,
                column="filename",
                value=relative,
                action=Action.IMAGE_MISSING,
            )
            continue
        jobs.append(FileJob(str(target), relative, deid_dir=result.deid_dir))
    report.counts["images_referenced"] = len(by_path)
    with _paused_gc():
        _collect_outcomes(
            result, by_path, process_files(jobs, workers=workers, max_pixels=max_pixels)
        )
    for status in ("stored", "missing", "rejected"):
        report.counts[f"images_{status}"] = sum(
            1 for group in by_path.values() if group[0].image_status == status
        )
    _report_unreferenced(result, by_path.keys())


@contextlib.contextmanager
def _paused_gc() -> Iterator[None]:
    """Switch the cyclic garbage collector off for a block (restored afterwards).

    While outcomes stream in, every full collection walks the scan's 100,000s of
    record objects, none of which can be garbage yet: 7% of the image phase of a
    100,000-file ingest, on a CPU the workers need. The outcomes form no cycles, and
    reference counting still frees everything else at once.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _collect_outcomes(
    result: ScanResult, by_path: dict[str, list[ScannedRecord]], outcomes: Iterable[FileOutcome]
) -> None:
    report = result.report
    for outcome in outcomes:
        group = by_path[outcome.job.name]
        if outcome.info is None or outcome.sha256 is None:
            for scanned in group:
                scanned.image_status = "rejected"
            report.add(
                Severity.ERROR,
                outcome.error_code or "undecodable",
                outcome.error_message or "cannot decode",
                file=outcome.job.name,
                row=None,
                action=Action.IMAGE_REJECTED,
            )
            continue
        _report_dicom(result, outcome)
        if outcome.dicom is None and not extension_matches(outcome.job.name, outcome.info.format):
            report.add(
                Severity.WARNING,
                "format_mismatch",
                f"{outcome.job.name} holds {outcome.info.format} bytes; its extension "
                "says otherwise (decoded by content)",
                file=outcome.job.name,
            )
        if outcome.sha256 not in result.images:
            result.images[outcome.sha256] = ScannedImage(
                outcome.sha256,
                Path(outcome.job.path),
                outcome.info,
                outcome.phash,
                outcome.phash_detail,
                "DICOM" if outcome.dicom is not None else None,
            )
        for scanned in group:
            scanned.image_status = "stored"
            scanned.image_sha256 = outcome.sha256


def _report_dicom(result: ScanResult, outcome: FileOutcome) -> None:
    for note in outcome.dicom.warnings if outcome.dicom else ():
        result.report.add(
            Severity.WARNING,
            "dicom_deidentification",
            f"{note}; stored as a de-identified PNG",
            file=outcome.job.name,
        )


def _dicom_records(result: ScanResult, workers: int | None, max_pixels: int) -> None:
    """A folder of DICOM files without a table: one record per image, from its
    de-identified header (the pseudonym is the patient id)."""
    spec, report = result.spec, result.report
    jobs = [
        FileJob(str(path), path.relative_to(spec.root).as_posix(), deid_dir=result.deid_dir)
        for path in _source_files(spec.root)
    ]
    done: list[FileOutcome] = []
    for outcome in process_files(jobs, workers=workers, max_pixels=max_pixels):
        report.count("rows")
        if outcome.dicom is None or outcome.info is None or outcome.sha256 is None:
            report.add(
                Severity.WARNING if outcome.error_code is None else Severity.ERROR,
                outcome.error_code or "not_dicom",
                outcome.error_message or f"{outcome.job.name} is not a DICOM file; skipped",
                file=outcome.job.name,
                action=Action.FILE_SKIPPED,
            )
            continue
        done.append(outcome)
    days = [(o.dicom.patient_pseudonym, o.dicom.study_day) for o in done if o.dicom]
    first: dict[str, int] = {}
    for patient, day in days:
        if day is not None:
            first[patient] = min(day, first.get(patient, day))
    for outcome in done:
        fields = outcome.dicom
        if fields is None or outcome.info is None or outcome.sha256 is None:
            continue
        offset = (
            None if fields.study_day is None else fields.study_day - first[fields.patient_pseudonym]
        )
        cells = {
            "patient_id": fields.patient_pseudonym,
            "filename": outcome.job.name,
            "offset_days": "" if offset is None else str(offset),
            "modality": fields.modality or "",
            "view": fields.view_position or "",
            "sex": "" if fields.sex not in ("M", "F") else fields.sex or "",
            "age_years": "" if fields.age_years is None else f"{fields.age_years:g}",
        }
        parsed = parse_record(cells)
        for problem in parsed.problems:
            report.add(
                problem.severity,
                problem.code,
                problem.message,
                file=outcome.job.name,
                column=BY_NAME[problem.column].upstream,
                value=problem.value,
                action=problem.action,
            )
        if parsed.record is None:
            continue
        _report_dicom(result, outcome)
        result.images.setdefault(
            outcome.sha256,
            ScannedImage(
                outcome.sha256,
                Path(outcome.job.path),
                outcome.info,
                outcome.phash,
                outcome.phash_detail,
                "DICOM",
            ),
        )
        result.records.append(
            ScannedRecord(0, parsed.record, {}, image_status="stored", image_sha256=outcome.sha256)
        )
    report.counts["images_stored"] = len(result.records)


def _report_unreferenced(result: ScanResult, referenced: Any) -> None:
    spec = result.spec
    referenced_set = set(referenced)
    folders = {str(Path(p).parent) for p in referenced_set}
    count = 0
    for folder in sorted(folders):
        directory = spec.root / folder if folder != "." else spec.root
        if not directory.is_dir() or not directory.resolve().is_relative_to(spec.root):
            continue
        # Names, not Path objects: a folder may hold 100,000 images.
        for name in sorted(os.listdir(directory)):  # noqa: PTH208
            relative = name if folder == "." else f"{folder}/{name}"
            if (
                relative not in referenced_set
                and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS  # noqa: PTH122
                and (directory / name).is_file()
            ):
                count += 1
                result.report.add(
                    Severity.WARNING,
                    "unreferenced_image",
                    f"{relative} is in the source folder but no metadata row "
                    "references it; not stored",
                    file=relative,
                    action=Action.FILE_SKIPPED,
                )
    result.report.counts["images_unreferenced"] = count


# ---------------------------------------------------------------- annotations


@dataclass
class _ImageIndex:
    """Stored images of this scan by file name and by stem (for masks)."""

    by_name: dict[str, str]
    by_stem: dict[str, str]
    sizes: dict[str, tuple[int, int]]

    @classmethod
    def build(cls, result: ScanResult) -> _ImageIndex:
        by_name: dict[str, str] = {}
        by_stem: dict[str, str] = {}
        for scanned in result.records:
            if scanned.image_sha256 is None:
                continue
            name = Path(scanned.record.filename).name
            by_name[name] = scanned.image_sha256
            by_stem[Path(name).stem] = scanned.image_sha256
        sizes = {sha: (img.info.width, img.info.height) for sha, img in result.images.items()}
        return cls(by_name, by_stem, sizes)


def _read_severity(path: Path, result: ScanResult, index: _ImageIndex) -> None:
    spec, report = result.spec, result.report
    file = spec.display(path)
    table = read_table(path, display_name=file)
    report.extend(table.issues)
    headers = {h.lower(): i for i, h in enumerate(table.headers)}
    needed = ("filename", "geographic_mean", "opacity_mean")
    if any(h not in headers for h in needed):
        report.add(
            Severity.ERROR,
            "bad_annotation_file",
            f"expected columns {', '.join(needed)}; found {', '.join(table.headers)}",
            file=file,
            row=1,
            action=Action.FILE_SKIPPED,
        )
        return
    limits = {"geographic_mean": 8.0, "opacity_mean": 6.0}
    for row in table.rows:
        name = row.cells[headers["filename"]].strip()
        scores: dict[str, float] = {}
        for column, high in limits.items():
            text = row.cells[headers[column]].strip()
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not 0 <= value <= high:
                report.add(
                    Severity.WARNING,
                    "bad_severity",
                    f"{column} must be a number in 0..{high:g}; score skipped",
                    file=file,
                    row=row.line,
                    column=column,
                    value=text,
                    action=Action.ANNOTATION_SKIPPED,
                )
                break
            scores[column] = value
        else:
            sha = index.by_name.get(name)
            if sha is None:
                report.add(
                    Severity.WARNING,
                    "annotation_image_missing",
                    f"severity score for {name}, which is not a stored image; skipped",
                    file=file,
                    row=row.line,
                    column="filename",
                    value=name,
                    action=Action.ANNOTATION_SKIPPED,
                )
                continue
            result.annotations.append(
                ScannedAnnotation(
                    sha,
                    "severity",
                    path.stem,
                    file,
                    geographic_mean=scores["geographic_mean"],
                    opacity_mean=scores["opacity_mean"],
                )
            )


def _read_masks(
    directory: Path,
    suffix: str,
    annotator: str,
    result: ScanResult,
    index: _ImageIndex,
    workers: int | None,
    max_pixels: int,
) -> None:
    spec, report = result.spec, result.report
    jobs: list[FileJob] = []
    targets: dict[str, str] = {}
    for entry in sorted(directory.iterdir()):
        if entry.suffix.lower() != ".png" or not entry.name.endswith(suffix):
            continue
        file = spec.display(entry)
        stem = entry.name[: -len(suffix)]
        sha = index.by_stem.get(stem)
        if sha is None:
            report.add(
                Severity.WARNING,
                "annotation_image_missing",
                f"lung mask for image {stem}.*, which is not a stored image; skipped",
                file=file,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        targets[file] = sha
        jobs.append(FileJob(str(entry), file, kind="mask"))
    for outcome in process_files(jobs, workers=workers, max_pixels=max_pixels):
        file = outcome.job.name
        if outcome.info is None or outcome.sha256 is None:
            report.add(
                Severity.WARNING,
                outcome.error_code or "undecodable",
                f"lung mask unusable: {outcome.error_message}",
                file=file,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        sha = targets[file]
        size = (outcome.info.width, outcome.info.height)
        if size != index.sizes[sha]:
            report.add(
                Severity.WARNING,
                "mask_size_mismatch",
                f"mask is {size[0]}x{size[1]}, its image is "
                f"{index.sizes[sha][0]}x{index.sizes[sha][1]}; skipped",
                file=file,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        result.annotations.append(
            ScannedAnnotation(
                sha,
                "lung_mask",
                annotator,
                file,
                mask_sha256=outcome.sha256,
                mask_path=Path(outcome.job.path),
                mask_values=outcome.mask_values,
            )
        )


def _read_boxes(path: Path, result: ScanResult, index: _ImageIndex) -> None:
    spec, report = result.spec, result.report
    file = spec.display(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        images = {img["id"]: img for img in doc["images"]}
        categories = {cat["id"]: cat["name"] for cat in doc["categories"]}
        annotations = doc["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.add(
            Severity.ERROR,
            "bad_annotation_file",
            f"not a COCO annotation file ({exc.__class__.__name__}: {exc}); skipped",
            file=file,
            action=Action.FILE_SKIPPED,
        )
        return
    for number, item in enumerate(annotations, start=1):
        where = f"annotations[{number - 1}]"
        image = images.get(item.get("image_id"))
        bbox = item.get("bbox")
        if image is None:
            report.add(
                Severity.WARNING,
                "bad_box",
                f"{where}: unknown image_id {item.get('image_id')!r}; skipped",
                file=file,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        name = str(image.get("file_name", ""))
        sha = index.by_name.get(name)
        if sha is None:
            report.add(
                Severity.WARNING,
                "annotation_image_missing",
                f"{where}: lung box for {name}, which is not a stored image; skipped",
                file=file,
                value=name,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) for v in bbox)
            or bbox[2] <= 0
            or bbox[3] <= 0
        ):
            report.add(
                Severity.WARNING,
                "bad_box",
                f"{where}: bbox {bbox!r} for {name} is "
                "not [x, y, width, height] with a positive size; skipped",
                file=file,
                value=name,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        width, height = index.sizes[sha]
        x, y, w, h = (float(v) for v in bbox)
        if (image.get("width"), image.get("height")) != (width, height) or (
            x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1
        ):
            report.add(
                Severity.WARNING,
                "box_outside_image",
                f"{where}: box {bbox} for {name} does not fit the stored "
                f"{width}x{height} image; skipped",
                file=file,
                value=name,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        label = str(categories.get(item.get("category_id"), item.get("category_id")))
        result.annotations.append(
            ScannedAnnotation(sha, "lung_box", path.stem, file, label=label, box=(x, y, w, h))
        )


def _read_annotations(result: ScanResult, workers: int | None, max_pixels: int) -> None:
    folder = result.spec.root / ANNOTATIONS_DIR
    if not folder.is_dir():
        return
    index = _ImageIndex.build(result)
    readers: Mapping[str, Callable[[Path], None]] = {
        "covid-severity-scores.csv": lambda p: _read_severity(p, result, index),
        "lungVAE-masks": lambda p: _read_masks(
            p, "_mask.png", "lungVAE", result, index, workers, max_pixels
        ),
        "v7labs-lung-masks": lambda p: _read_masks(
            p, ".png", "v7labs", result, index, workers, max_pixels
        ),
        "imageannotation_ai_lung_bounding_boxes.json": lambda p: _read_boxes(p, result, index),
    }
    for entry in sorted(folder.iterdir()):
        reader = readers.get(entry.name)
        if reader is None:
            result.report.add(
                Severity.INFO,
                "annotation_not_read",
                f"{entry.name} is not an annotation format this tool reads",
                file=result.spec.display(entry),
                action=Action.FILE_SKIPPED,
            )
            continue
        reader(entry)
    for kind in ("severity", "lung_mask", "lung_box"):
        result.report.counts[f"annotations_{kind}"] = sum(
            1 for a in result.annotations if a.kind == kind
        )


@contextlib.contextmanager
def _deid_folder(spec: SourceSpec) -> Iterator[str]:
    """The key folder for DICOM files: the store's, or a throwaway one (``check``)."""
    if spec.deid_dir is not None:
        yield str(spec.deid_dir)
        return
    with tempfile.TemporaryDirectory(prefix="covidcxr-deid-") as folder:
        yield folder


def _scan_table(
    spec: SourceSpec, workers: int | None, max_pixels: int, deid_dir: str, started: float
) -> ScanResult:
    encoding = spec.mapping.encoding if spec.mapping else None
    delimiter = spec.mapping.delimiter if spec.mapping else ","
    metadata_bytes = spec.metadata.read_bytes()
    result = ScanResult(spec, hashlib.sha256(metadata_bytes).hexdigest(), deid_dir=deid_dir)
    table = read_table(
        spec.metadata,
        encoding=encoding,
        delimiter=delimiter,
        display_name=spec.display(spec.metadata),
    )
    _read_records(spec, _joined(spec, table, result), result)
    _flag_shared_images(result, spec.display(spec.metadata))
    result.timings["metadata"] = time.perf_counter() - started
    started = time.perf_counter()
    _resolve_images(result, workers, max_pixels)
    result.timings["images"] = time.perf_counter() - started
    started = time.perf_counter()
    _read_annotations(result, workers, max_pixels)
    result.timings["annotations"] = time.perf_counter() - started
    return result


def scan_source(
    spec: SourceSpec,
    *,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[str, int, int], None] | None = None,
) -> ScanResult:
    """Read and validate a whole source.

    Args:
        spec: the source (see :func:`resolve_source`).
        workers: processes for image decoding (None: one per CPU).
        max_pixels: decompression-bomb limit per image.
        progress: called with ``("scan", files done, files in the batch)`` as files
            are decoded.

    Raises:
        MetadataError: the metadata file cannot be read at all, or lacks a
            required column.
        MappingError: the mapping names a column the file lacks.
    """
    started = time.perf_counter()
    with files_progress(progress), _deid_folder(spec) as deid_dir:
        if spec.kind == "dicom":
            listing = "\n".join(
                p.relative_to(spec.root).as_posix() for p in _source_files(spec.root)
            )
            result = ScanResult(
                spec, hashlib.sha256(listing.encode()).hexdigest(), deid_dir=deid_dir
            )
            _dicom_records(result, workers, max_pixels)
            result.timings["images"] = time.perf_counter() - started
        else:
            result = _scan_table(spec, workers, max_pixels, deid_dir, started)
    report = result.report
    report.counts["records"] = len(result.records)
    report.counts["patients"] = len({s.record.patient_id for s in result.records})
    report.counts["pediatric_records"] = sum(1 for s in result.records if s.record.is_pediatric)
    log.info(
        "scanned %s: %d rows, %d records, %d issues",
        spec.name,
        report.counts.get("rows", 0),
        len(result.records),
        len(report.issues),
    )
    return result
