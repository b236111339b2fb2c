"""Writing a scan into the store, in one transaction, idempotently.

The store holds, per source, exactly the records of the last metadata file
ingested for it: new rows are inserted, changed rows updated in place (their ids
kept), rows no longer in the file removed, unchanged rows left alone. Re-ingesting
the same input changes nothing but the ingest log. Any error rolls the whole ingest
back. Removals are guarded (:class:`RemovalPolicy`): a table with parse errors, or one
that would remove more than a small share of the stored records, is refused unless
removals are allowed. One ingest of a source writes at a time (:func:`_lock_source`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import OperationalError

from covidcxr import __version__
from covidcxr.errors import IngestRefusedError
from covidcxr.ingest.scanned import ScannedAnnotation, ScannedRecord, ScanResult
from covidcxr.schema.columns import COLUMNS
from covidcxr.store.db import Store
from covidcxr.store.tables import (
    Annotation,
    Finding,
    Image,
    IngestLog,
    Observation,
    Patient,
    Record,
    Source,
)

OBSERVATION_FIELDS = tuple(
    c.name for c in COLUMNS if c.name in Observation.__table__.c and c.name != "record_id"
)
RECORD_FIELDS = tuple(
    c.name for c in COLUMNS if c.name in Record.__table__.c and c.name not in ("filename",)
)
_CHUNK = 5000
#: Codes of table-level read errors: after one, rows missing from the scan may only
#: have been unreadable, so no record is removed unless removals are allowed.
PARSE_ERROR_CODES = frozenset({"malformed_csv", "nul_byte", "short_row"})

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RemovalPolicy:
    """When an ingest may remove stored records of its source.

    Attributes:
        allow: remove whatever the new table no longer lists (``--allow-removals``).
        max_fraction: without ``allow``, the largest share of the source's stored
            records one ingest may remove (and never any after a parse error).
    """

    allow: bool = False
    max_fraction: float = 0.1

    def refusal(self, counts: dict[str, int], parse_errors: int) -> str | None:
        """Why an ingest with these counts must not commit (None: it may)."""
        removed = counts.get("records_removed", 0)
        if self.allow or removed == 0:
            return None
        stored = removed + counts.get("records_updated", 0) + counts.get("records_unchanged", 0)
        if parse_errors:
            return (
                f"it would remove {removed} of {stored} stored record(s) after "
                f"{parse_errors} row(s) could not be read"
            )
        if removed > self.max_fraction * stored:
            return (
                f"it would remove {removed} of {stored} stored record(s), more than "
                f"{self.max_fraction:.0%}"
            )
        return None


class RemovalsRefusedError(IngestRefusedError):
    """An ingest would remove records without being allowed to; nothing was written.

    Attributes:
        counts: what the ingest would have changed (added, updated, removed, ...).
    """

    def __init__(self, message: str, counts: dict[str, int], report: object | None = None):
        super().__init__(message, report)
        self.counts = counts


class _RollBackDryRunError(Exception):
    """Raised inside the write transaction to roll a dry run back."""


@dataclass(frozen=True)
class IngestSummary:
    """What an ingest changed.

    Attributes:
        source: the source name.
        log_id: the ingest log row.
        counts: records_added/updated/removed/unchanged, patients_added/removed,
            images_added, annotations_added/removed/unchanged.
    """

    source: str
    log_id: int
    counts: dict[str, int]

    @property
    def changed(self) -> bool:
        """True if the ingest changed any record, image or annotation."""
        return any(
            self.counts.get(k, 0)
            for k in (
                "records_added",
                "records_updated",
                "records_removed",
                "images_added",
                "annotations_added",
                "annotations_removed",
                "patients_removed",
                "blobs_repaired",
            )
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def record_rows(
    scanned: ScannedRecord,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The records-table values, observation values and finding rows of a record.

    The content hash covers all three, so an unchanged row is recognised without
    comparing column by column.
    """
    record = scanned.record
    values: dict[str, Any] = {name: getattr(record, name) for name in RECORD_FIELDS}
    values.update(
        line=scanned.line,
        filename=record.filename,
        image_sha256=scanned.image_sha256,
        image_status=scanned.image_status,
        finding_status=record.finding_status,
        acquired_on=dt.date.fromisoformat(record.acquired_on) if record.acquired_on else None,
        acquired_year=record.acquired_year,
        flags=",".join(sorted(record.flags)),
        extra=scanned.extra or None,
    )
    observation = {name: getattr(record, name) for name in OBSERVATION_FIELDS}
    findings = [
        {"position": position, "path": f.path_str, "token": f.raw}
        for position, f in enumerate(record.findings)
    ]
    digest = hashlib.sha256(
        json.dumps([values, observation, findings], sort_keys=True, default=str).encode()
    ).hexdigest()
    values["content_hash"] = digest
    return values, observation, findings


def _annotation_row(annotation: ScannedAnnotation) -> dict[str, Any]:
    box = annotation.box or (None, None, None, None)
    return {
        "image_sha256": annotation.image_sha256,
        "kind": annotation.kind,
        "annotator": annotation.annotator,
        "label": annotation.label,
        "file": annotation.file,
        "geographic_mean": annotation.geographic_mean,
        "opacity_mean": annotation.opacity_mean,
        "mask_sha256": annotation.mask_sha256,
        "mask_values": annotation.mask_values,
        "box_x": box[0],
        "box_y": box[1],
        "box_width": box[2],
        "box_height": box[3],
    }


def _source_id(conn: Connection, scan: ScanResult) -> int:
    spec = scan.spec
    row = conn.execute(select(Source.id, Source.root).where(Source.name == spec.name)).first()
    description = spec.mapping.description if spec.mapping else None
    if row is None:
        return int(
            conn.execute(
                insert(Source)
                .values(
                    name=spec.name,
                    kind=spec.kind,
                    root=str(spec.root),
                    description=description,
                    created_at=_now(),
                )
                .returning(Source.id)
            ).scalar_one()
        )
    if row.root != str(spec.root):
        conn.execute(update(Source).where(Source.id == row.id).values(root=str(spec.root)))
    return int(row.id)


def _insert_images(conn: Connection, scan: ScanResult) -> int:
    wanted = list(scan.images)
    existing: set[str] = set()
    for chunk in _chunks(wanted):
        existing.update(conn.execute(select(Image.sha256).where(Image.sha256.in_(chunk))).scalars())
    now = _now()
    rows = [
        {
            "sha256": img.sha256,
            "n_bytes": img.info.n_bytes,
            "format": img.info.format,
            "width": img.info.width,
            "height": img.info.height,
            "bit_depth": img.info.bit_depth,
            "channels": img.info.channels,
            "mode": img.info.mode,
            "phash": img.phash,
            "phash_detail": img.phash_detail,
            "created_at": now,
        }
        for sha, img in scan.images.items()
        if sha not in existing
    ]
    for chunk in _chunks(rows):
        conn.execute(insert(Image), list(chunk))
    return len(rows)


def _sync_patients(
    conn: Connection, source_id: int, scan: ScanResult
) -> tuple[dict[str, int], int]:
    existing = {
        patient_id: pk
        for patient_id, pk in conn.execute(
            select(Patient.patient_id, Patient.id).where(Patient.source_id == source_id)
        )
    }
    wanted = sorted({s.record.patient_id for s in scan.records})
    new = [{"source_id": source_id, "patient_id": p} for p in wanted if p not in existing]
    for chunk in _chunks(new):
        for patient_id, pk in conn.execute(
            insert(Patient).returning(Patient.patient_id, Patient.id, sort_by_parameter_order=True),
            list(chunk),
        ):
            existing[patient_id] = pk
    return existing, len(new)


def _sync_records(
    conn: Connection, source_id: int, patients: dict[str, int], scan: ScanResult
) -> dict[str, int]:
    existing = {
        (row.patient_pk, row.row_key): (row.id, row.content_hash)
        for row in conn.execute(
            select(Record.id, Record.patient_pk, Record.row_key, Record.content_hash).where(
                Record.source_id == source_id
            )
        )
    }
    to_insert: list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]] = []
    to_update: list[tuple[int, dict[str, Any], dict[str, Any], list[dict[str, Any]]]] = []
    seen: set[tuple[int, str]] = set()
    unchanged = 0
    for scanned in scan.records:
        values, observation, findings = record_rows(scanned)
        key = (patients[scanned.record.patient_id], scanned.record.relative_path)
        seen.add(key)
        values.update(source_id=source_id, patient_pk=key[0], row_key=key[1])
        if key not in existing:
            to_insert.append((values, observation, findings))
        elif existing[key][1] != values["content_hash"]:
            to_update.append((existing[key][0], values, observation, findings))
        else:
            unchanged += 1
    removed = [record_id for key, (record_id, _) in existing.items() if key not in seen]

    changed_ids = removed + [record_id for record_id, *_ in to_update]
    for chunk in _chunks(changed_ids):
        conn.execute(delete(Finding).where(Finding.record_id.in_(chunk)))
        conn.execute(delete(Observation).where(Observation.record_id.in_(chunk)))
    for chunk in _chunks(removed):
        conn.execute(delete(Record).where(Record.id.in_(chunk)))
    for record_id, values, _, _ in to_update:
        conn.execute(update(Record).where(Record.id == record_id).values(**values))

    observations: list[dict[str, Any]] = []
    findings_rows: list[dict[str, Any]] = []
    for record_id, _, observation, findings in to_update:
        observations.append({"record_id": record_id, **observation})
        findings_rows.extend({"record_id": record_id, **f} for f in findings)
    for chunk in _chunks(to_insert):
        ids = (
            conn.execute(
                insert(Record).returning(Record.id, sort_by_parameter_order=True),
                [values for values, _, _ in chunk],
            )
            .scalars()
            .all()
        )
        for record_id, (_, observation, findings) in zip(ids, chunk, strict=True):
            observations.append({"record_id": record_id, **observation})
            findings_rows.extend({"record_id": record_id, **f} for f in findings)
    for rows_chunk in _chunks(observations):
        conn.execute(insert(Observation), list(rows_chunk))
    for rows_chunk in _chunks(findings_rows):
        conn.execute(insert(Finding), list(rows_chunk))
    return {
        "records_added": len(to_insert),
        "records_updated": len(to_update),
        "records_removed": len(removed),
        "records_unchanged": unchanged,
    }


def _sync_annotations(conn: Connection, source_id: int, scan: ScanResult) -> dict[str, int]:
    key_columns = ("image_sha256", "kind", "annotator", "label")
    existing = {
        tuple(row[c] for c in key_columns): row
        for row in conn.execute(
            select(Annotation).where(Annotation.source_id == source_id)
        ).mappings()
    }
    wanted: dict[tuple[Any, ...], dict[str, Any]] = {}
    for annotation in scan.annotations:
        row = _annotation_row(annotation)
        wanted[tuple(row[c] for c in key_columns)] = row
    stale = [
        existing[key]["id"]
        for key, row in existing.items()
        if key not in wanted or any(row[c] != wanted[key][c] for c in wanted[key])
    ]
    fresh = [
        {"source_id": source_id, **row}
        for key, row in wanted.items()
        if key not in existing or existing[key]["id"] in stale
    ]
    for chunk in _chunks(stale):
        conn.execute(delete(Annotation).where(Annotation.id.in_(chunk)))
    for chunk in _chunks(fresh):
        conn.execute(insert(Annotation), list(chunk))
    replaced = sum(1 for key in wanted if key in existing and existing[key]["id"] in stale)
    return {
        "annotations_added": len(fresh) - replaced,
        "annotations_updated": replaced,
        "annotations_removed": len(stale) - replaced,
        "annotations_unchanged": len(wanted) - len(fresh),
    }


def write_scan(
    store: Store,
    scan: ScanResult,
    *,
    report_path: str | None = None,
    started_at: dt.datetime | None = None,
    removals: RemovalPolicy | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> IngestSummary:
    """Bring the store in line with a scan, in one transaction.

    Images and masks must already be in the blob store (unless ``dry_run``).

    Args:
        store: the open store.
        scan: the scan of the source.
        report_path: the JSON report written for this ingest, logged with it.
        started_at: when the ingest began (default: now).
        removals: when records may be removed (default: :class:`RemovalPolicy`()).
        dry_run: work out the counts, then roll everything back.
        progress: called with ``("database", done, total)`` between the steps.

    Returns:
        the counts of what changed (or, for a dry run, would change; ``log_id`` 0).

    Raises:
        RemovalsRefusedError: the ingest would remove records the policy does not
            allow; nothing is written.
    """
    started = started_at or _now()
    policy = removals or RemovalPolicy()
    parse_errors = sum(1 for i in scan.report.errors if i.code in PARSE_ERROR_CODES)
    try:
        with store.transaction() as conn:
            _lock_source(conn, scan.spec.name)
            counts = _sync_all(conn, scan, progress)
            reason = policy.refusal(counts, parse_errors)
            if reason is not None:
                raise RemovalsRefusedError(
                    f"ingest {scan.spec.name}: refused, nothing written: {reason}; "
                    "fix the table, or pass --allow-removals if the records really are gone "
                    "(--dry-run shows the plan)",
                    counts,
                    scan.report,
                )
            if dry_run:
                raise _RollBackDryRunError(counts)
            log_id = _log_ingest(conn, scan, counts, report_path, started)
    except _RollBackDryRunError:
        return IngestSummary(scan.spec.name, 0, counts)
    return IngestSummary(scan.spec.name, log_id, counts)


def _sync_all(conn: Connection, scan: ScanResult, progress: Progress | None) -> dict[str, int]:
    steps = 5

    def step(done: int) -> None:
        if progress is not None:
            progress("database", done, steps)

    step(0)
    source_id = _source_id(conn, scan)
    counts = {"images_added": _insert_images(conn, scan)}
    step(1)
    patients, patients_added = _sync_patients(conn, source_id, scan)
    counts["patients_added"] = patients_added
    step(2)
    counts.update(_sync_records(conn, source_id, patients, scan))
    step(3)
    counts.update(_sync_annotations(conn, source_id, scan))
    step(4)
    orphans = (
        conn.execute(
            select(Patient.id)
            .where(Patient.source_id == source_id)
            .where(~select(Record.id).where(Record.patient_pk == Patient.id).exists())
        )
        .scalars()
        .all()
    )
    for chunk in _chunks(orphans):
        conn.execute(delete(Patient).where(Patient.id.in_(chunk)))
    counts["patients_removed"] = len(orphans)
    step(5)
    return counts


def _log_ingest(
    conn: Connection,
    scan: ScanResult,
    counts: dict[str, int],
    report_path: str | None,
    started: dt.datetime,
) -> int:
    source_id = conn.execute(select(Source.id).where(Source.name == scan.spec.name)).scalar_one()
    return int(
        conn.execute(
            insert(IngestLog)
            .values(
                source_id=source_id,
                source_name=scan.spec.name,
                started_at=started,
                finished_at=_now(),
                metadata_path=str(scan.spec.metadata),
                metadata_sha256=scan.metadata_sha256,
                tool_version=__version__,
                counts={**scan.report.counts, **counts},
                report_path=report_path,
            )
            .returning(IngestLog.id)
        ).scalar_one()
    )


def _lock_source(conn: Connection, name: str) -> None:
    """Take the write lock of this source's ingest for the rest of the transaction.

    Two ingests of one source then run their writes one after the other (the second
    sees what the first committed) instead of racing to insert the same rows.
    PostgreSQL: a transaction-level advisory lock per source name. SQLite: the
    database's write lock, taken up front (``BEGIN IMMEDIATE``) rather than on the
    first insert, which a transaction that has already read cannot always upgrade to.
    """
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(
            hashlib.sha256(f"covidcxr-ingest:{name}".encode()).digest()[:8], "big", signed=True
        )
        if not conn.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({key})").scalar():
            log.warning("another ingest of %s is writing; waiting for it to finish", name)
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({key})")
        return
    if conn.dialect.name != "sqlite":
        return
    conn.exec_driver_sql("PRAGMA busy_timeout=0")
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except OperationalError:
        log.warning("another process is writing to the store; waiting for it to finish")
        conn.exec_driver_sql("PRAGMA busy_timeout=600000")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    finally:
        conn.exec_driver_sql("PRAGMA busy_timeout=30000")
