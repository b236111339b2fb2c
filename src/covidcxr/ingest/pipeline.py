"""The two entry points curators use: :func:`check_source` and :func:`ingest_source`."""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from covidcxr.errors import IngestRefusedError, MetadataError
from covidcxr.imaging.decode import DEFAULT_MAX_PIXELS
from covidcxr.ingest.mapping import SourceMapping
from covidcxr.ingest.scan import ScanResult, resolve_source, scan_source
from covidcxr.ingest.writer import IngestSummary, write_scan
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
) -> ScanResult:
    """Validate a source without writing anything (the collection's own CI).

    See :func:`covidcxr.ingest.scan.resolve_source` for the arguments.
    """
    spec = resolve_source(path, metadata=metadata, mapping=mapping, name=name)
    return scan_source(spec, workers=workers, max_pixels=max_pixels)


def copy_to_blobs(scan: ScanResult, blobs: BlobStore) -> None:
    """Copy every stored image and mask of a scan into the blob store.

    The bytes are hashed again as they are copied, so a file changed since the
    scan is refused instead of stored under the wrong name.

    Raises:
        MetadataError: a file changed between the scan and the copy.
    """
    files = [(img.sha256, img.path) for img in scan.images.values()]
    files += [
        (a.mask_sha256, a.mask_path)
        for a in scan.annotations
        if a.mask_sha256 is not None and a.mask_path is not None
    ]
    for sha, path in files:
        if blobs.has(sha):
            continue
        data = path.read_bytes()
        if sha256_hex(data) != sha:
            raise MetadataError(
                f"ingest: {path} changed while it was being ingested; run the ingest again"
            )
        blobs.put(data, sha)


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

    Raises:
        IngestRefusedError: ``strict`` and the scan found errors; the report is
            written, the store is unchanged.
    """
    started = dt.datetime.now(dt.UTC)
    spec = resolve_source(path, metadata=metadata, mapping=mapping, name=name)
    scan = scan_source(spec, workers=workers, max_pixels=max_pixels)
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
    copy_to_blobs(scan, store.blobs)
    timings["blobs"] = time.perf_counter() - clock
    clock = time.perf_counter()
    summary = write_scan(store, scan, report_path=str(report_json), started_at=started)
    timings["database"] = time.perf_counter() - clock
    clock = time.perf_counter()
    store.analyze()
    timings["analyze"] = time.perf_counter() - clock
    log.info("ingested %s: %s in %s", spec.name, summary.counts, timings)
    return IngestOutcome(scan, summary, report_json, report_csv, timings)
