"""The two entry points curators use: :func:`check_source` and :func:`ingest_source`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from covidcxr.errors import IngestRefusedError, MetadataError
from covidcxr.imaging.decode import DEFAULT_MAX_PIXELS
from covidcxr.ingest.files import dicom_png
from covidcxr.ingest.mapping import SourceMapping
from covidcxr.ingest.scan import scan_source
from covidcxr.ingest.scanned import ScannedImage, ScanResult
from covidcxr.ingest.source import resolve_source
from covidcxr.ingest.writer import IngestSummary, Progress, RemovalPolicy, write_scan
from covidcxr.store.blobs import BlobStore, sha256_hex
from covidcxr.store.db import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOutcome:
    """The scan, what the store changed, and where the report went."""

    scan: ScanResult
    summary: IngestSummary
    report_json: Path
    report_csv: Path
    #: Seconds per phase: the scan's, then blobs (copying files) and database.
    timings: dict[str, float]


def check_source(
    path: str | os.PathLike[str],
    *,
    metadata: str | os.PathLike[str] | None = None,
    mapping: SourceMapping | None = None,
    name: str | None = None,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
) -> ScanResult:
    """Validate a source without writing anything (the collection's own CI).

    See :func:`covidcxr.ingest.source.resolve_source` for the arguments; ``progress`` is
    called with (phase, done, total) as in :func:`ingest_source`.
    """
    spec = resolve_source(path, metadata=metadata, mapping=mapping, name=name)
    return scan_source(spec, workers=workers, max_pixels=max_pixels, progress=progress)


def copy_to_blobs(scan: ScanResult, blobs: BlobStore, progress: Progress | None = None) -> int:
    """Copy every stored image and mask of a scan into the blob store.

    The bytes are hashed again as they are copied, so a file changed since the
    scan is refused instead of stored under the wrong name. A blob already there
    whose size is not its image's (truncated or overwritten on disk) is repaired
    from the source's bytes.

    Returns:
        how many damaged blobs were repaired.

    Raises:
        MetadataError: a file changed between the scan and the copy.
    """
    files: list[tuple[str, ScannedImage | Path, int | None]] = [
        (img.sha256, img, img.info.n_bytes) for img in scan.images.values()
    ]
    files += [
        (a.mask_sha256, a.mask_path, None)
        for a in scan.annotations
        if a.mask_sha256 is not None and a.mask_path is not None
    ]
    repaired = 0
    for done, (sha, path, n_bytes) in enumerate(files):
        if progress is not None and done % 64 == 0:
            progress("blobs", done, len(files))
        state = blobs.state(sha, n_bytes)
        if state == "ok":
            continue
        data = _stored_bytes(scan, path)
        if sha256_hex(data) != sha:
            raise MetadataError(
                f"ingest: {getattr(path, 'path', path)} changed while it was being ingested; "
                "run the ingest again"
            )
        blobs.put(data, sha, replace=state == "damaged")
        if state == "damaged":
            log.warning("repaired damaged blob %s from %s", sha, getattr(path, "path", path))
            repaired += 1
    if progress is not None:
        progress("blobs", len(files), len(files))
    return repaired


def _stored_bytes(scan: ScanResult, item: ScannedImage | Path) -> bytes:
    """The bytes the blob store keeps for an image or mask: the file's own, or for a
    DICOM file the de-identified PNG the scan made of it."""
    if isinstance(item, Path):
        return item.read_bytes()
    data = item.path.read_bytes()
    if item.converted_from == "DICOM" and scan.deid_dir is not None:
        return dicom_png(data, str(item.path), scan.deid_dir, DEFAULT_MAX_PIXELS)[0]
    return data


def ingest_source(
    path: str | os.PathLike[str],
    store: Store,
    *,
    metadata: str | os.PathLike[str] | None = None,
    mapping: SourceMapping | None = None,
    name: str | None = None,
    strict: bool = False,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    report_dir: str | os.PathLike[str] | None = None,
    allow_removals: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> IngestOutcome:
    """Scan a source and bring the store in line with it, in one transaction.

    Args:
        path: the source folder or its metadata CSV.
        store: the open store.
        metadata: another metadata file of the same source (``metadata-latest.csv``).
        mapping: how to read a source in another layout.
        name: the source's name in the store.
        strict: refuse the whole ingest (write nothing but the report) when the
            scan finds any error.
        workers: processes for image decoding.
        max_pixels: decompression-bomb limit per image.
        report_dir: where the JSON/CSV report goes (default: the store's reports dir).
        allow_removals: remove stored records the table no longer lists, however
            many and even after a parse error (see :class:`RemovalPolicy`).
        dry_run: scan and work out what would change; write no blob and no row
            (the report is still written).
        progress: called with ``(phase, done, total)``: phase ``scan`` (files
            decoded), ``blobs`` (files copied) and ``database`` (write steps).

    Raises:
        IngestRefusedError: ``strict`` and the scan found errors; the report is
            written, the store is unchanged.
        RemovalsRefusedError: the ingest would remove records without being
            allowed to; the store is unchanged.
    """
    started = dt.datetime.now(dt.UTC)
    spec = resolve_source(path, metadata=metadata, mapping=mapping, name=name)
    # DICOM files are de-identified with the store's own key (kept in its data dir).
    spec = dataclasses.replace(spec, deid_dir=store.data_dir)
    scan = scan_source(spec, workers=workers, max_pixels=max_pixels, progress=progress)
    stem = f"{spec.name}-{started:%Y%m%dT%H%M%S%fZ}"
    report_json, report_csv = scan.report.write(Path(report_dir or store.reports_dir), stem)
    errors = scan.report.errors
    if strict and errors:
        raise IngestRefusedError(
            f"ingest --strict: {len(errors)} error(s) in {spec.name}, nothing written; "
            f"first: {errors[0]}; full report: {report_json}",
            scan.report,
        )
    timings = dict(scan.timings)
    clock = time.perf_counter()
    repaired = 0 if dry_run else copy_to_blobs(scan, store.blobs, progress)
    timings["blobs"] = time.perf_counter() - clock
    clock = time.perf_counter()
    summary = write_scan(
        store,
        scan,
        report_path=str(report_json),
        started_at=started,
        removals=RemovalPolicy(allow=allow_removals),
        dry_run=dry_run,
        progress=progress,
    )
    summary.counts["blobs_repaired"] = repaired
    timings["database"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if not dry_run:
        store.analyze()
    timings["analyze"] = time.perf_counter() - clock
    log.info("ingested %s: %s in %s", spec.name, summary.counts, timings)
    return IngestOutcome(scan, summary, report_json, report_csv, timings)
