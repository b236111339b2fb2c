"""Contributed cases: written as a one-patient source in the upstream layout,
validated by the ingest's own scan, kept pending, and ingested when a curator accepts."""

from __future__ import annotations

import csv
import secrets
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from covidcxr.errors import MetadataError
from covidcxr.ingest.pipeline import check_source, ingest_source
from covidcxr.store import accounts
from covidcxr.store.db import Store

#: Upstream metadata columns a contributor fills in (the rest stay blank).
CASE_FIELDS: Final = (
    "patientid",
    "offset",
    "sex",
    "age",
    "finding",
    "survival",
    "view",
    "modality",
    "date",
    "location",
    "doi",
    "url",
    "license",
    "clinical_notes",
)
MAX_FIELD_CHARS: Final = 2000


def case_metadata(form: Mapping[str, Any]) -> dict[str, str]:
    """The case's metadata from a form or JSON body (unknown keys ignored, values cut)."""
    return {name: str(form.get(name) or "").strip()[:MAX_FIELD_CHARS] for name in CASE_FIELDS}


def write_case(
    store: Store, metadata: Mapping[str, str], images: Sequence[tuple[str, bytes]]
) -> Path:
    """A new case folder (``pending/<random>/``): ``images/`` under server-made names and a
    one-row-per-image ``metadata.csv`` in the upstream layout."""
    folder = store.data_dir / "pending" / secrets.token_hex(8)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index, (extension, data) in enumerate(images):
        filename = f"image-{index + 1}.{extension}"
        (folder / "images" / filename).write_bytes(data)
        rows.append({**metadata, "folder": "images", "filename": filename})
    header = [*CASE_FIELDS, "folder", "filename"]
    with (folder / "metadata.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def validate_case(folder: Path) -> dict[str, Any]:
    """The ingest scan's report on a case folder (nothing is written to the store)."""
    scan = check_source(folder, name=folder.name)
    return scan.report.as_dict()


def submit_case(
    store: Store, actor: str, metadata: Mapping[str, str], images: Sequence[tuple[str, bytes]]
) -> tuple[int | None, dict[str, Any]]:
    """Write, validate and (when the report has no error) record a pending case.

    Returns:
        The case id (None when refused: the folder is removed) and the report.
    """
    folder = write_case(store, metadata, images)
    report = validate_case(folder)
    errors = [i for i in report["issues"] if i["severity"] == "error"]
    if errors:
        shutil.rmtree(folder, ignore_errors=True)
        return None, report
    with store.transaction() as conn:
        case_id = accounts.add_case(conn, actor, folder.name, dict(metadata), report)
    return case_id, report


def accept_case(store: Store, case_id: int, actor: str, reason: str) -> None:
    """Ingest a pending case as source ``contributed-<id>`` and mark it accepted.

    Raises:
        MetadataError: no such pending case, or no reason.
    """
    with store.read() as conn:
        found = accounts.case(conn, case_id)
    if found is None or found["status"] != "pending":
        raise MetadataError(f"cases: no pending case {case_id}")
    if not reason.strip():
        raise MetadataError(f"cases: give a reason to accept case {case_id}")
    folder = store.data_dir / "pending" / found["folder"]
    ingest_source(folder, store, name=f"contributed-{case_id}")
    with store.transaction() as conn:
        accounts.decide_case(conn, case_id, actor, True, reason)


def reject_case(store: Store, case_id: int, actor: str, reason: str) -> None:
    """Mark a pending case rejected and delete its files.

    Raises:
        MetadataError: no such pending case, or no reason.
    """
    with store.transaction() as conn:
        accounts.decide_case(conn, case_id, actor, False, reason)
        found = accounts.case(conn, case_id)
    if found is not None:
        shutil.rmtree(store.data_dir / "pending" / found["folder"], ignore_errors=True)
