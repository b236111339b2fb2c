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
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from covidcxr.imaging.decode import DEFAULT_MAX_PIXELS, extension_matches
from covidcxr.ingest.annotations import _read_annotations
from covidcxr.ingest.files import (
    FileJob,
    FileOutcome,
    files_progress,
    process_files,
)
from covidcxr.ingest.records import _joined, _read_records
from covidcxr.ingest.report import Action
from covidcxr.ingest.scanned import ScannedImage, ScannedRecord, ScanResult
from covidcxr.ingest.source import IMAGE_EXTENSIONS, SourceSpec, _source_files
from covidcxr.ingest.table import read_table
from covidcxr.schema.columns import BY_NAME
from covidcxr.schema.record import parse_record
from covidcxr.schema.values import Severity

log = logging.getLogger(__name__)


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
