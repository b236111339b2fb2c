"""Duplicate images in the store: the same picture under several records.

Exact duplicates share their bytes (one blob referenced by several rows); near
duplicates are different files of the same picture (resized, recompressed, framed),
found from the perceptual hashes recorded at ingest (see
:mod:`covidcxr.imaging.duplicates` for the method and its measured limits). A group
lists every record involved with its source and patient, so that a curator can merge
them and so that splits keep them on one side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from covidcxr.imaging.duplicates import find_duplicates
from covidcxr.store.queries import RecordFilter, list_records
from covidcxr.store.tables import Image


@dataclass(frozen=True)
class DuplicateGroup:
    """Records whose images are the same picture.

    Attributes:
        kind: ``exact`` (one file, several rows) or ``near`` (several files).
        max_distance: the largest hash distance inside the group (0 for exact).
        records: record dicts (record_id, source, patient_id, filename,
            image_sha256, view, finding).
    """

    kind: str
    max_distance: int
    records: tuple[dict[str, Any], ...]

    @property
    def images(self) -> list[str]:
        """The distinct image hashes of the group."""
        return sorted({r["image_sha256"] for r in self.records})

    @property
    def patients(self) -> list[str]:
        """The distinct ``source:patient`` keys of the group."""
        return sorted({f"{r['source']}:{r['patient_id']}" for r in self.records})

    @property
    def sources(self) -> list[str]:
        """The distinct sources of the group."""
        return sorted({r["source"] for r in self.records})

    @property
    def crosses_patients(self) -> bool:
        """True if the picture is filed under more than one patient."""
        return len(self.patients) > 1


GROUP_COLUMNS = (
    "group",
    "kind",
    "max_distance",
    "crosses_patients",
    "source",
    "patient_id",
    "record_id",
    "filename",
    "image_sha256",
    "view",
    "finding",
)


def duplicate_groups(
    conn: Connection,
    *,
    max_distance: int | None = None,
    selection: RecordFilter | None = None,
) -> list[DuplicateGroup]:
    """Exact and near-duplicate groups among stored images.

    Args:
        conn: a store connection.
        max_distance: largest Hamming distance (of 128 bits) for a near duplicate;
            default :data:`covidcxr.imaging.duplicates.DEFAULT_MAX_DISTANCE`.
        selection: only consider these records (default: all).

    Returns:
        Groups, exact first, then by size; within a group records are in
        source/line order.
    """
    rows = [r for r in list_records(conn, selection) if r["image_sha256"]]
    hashes = {
        sha: (phash, detail)
        for sha, phash, detail in conn.execute(
            select(Image.sha256, Image.phash, Image.phash_detail)
        )
    }
    by_key = {str(r["record_id"]): r for r in rows}
    items: list[tuple[str, str, str, str | None]] = []
    for row in rows:
        phash, detail = hashes.get(row["image_sha256"], (None, None))
        if phash is not None and detail is not None:
            items.append((str(row["record_id"]), row["image_sha256"], phash, detail))
    groups = [
        DuplicateGroup(
            cluster.kind,
            cluster.max_distance,
            tuple(_brief(by_key[key]) for key in sorted(cluster.members, key=_line_order(by_key))),
        )
        for cluster in find_duplicates(items, max_distance=max_distance)
    ]
    return sorted(groups, key=lambda g: (g.kind != "exact", -len(g.records), g.images))


def _line_order(by_key: dict[str, dict[str, Any]]) -> Any:
    return lambda key: (by_key[key]["source"], by_key[key]["line"])


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: row[k]
        for k in (
            "record_id",
            "source",
            "patient_id",
            "filename",
            "image_sha256",
            "view",
            "finding",
            "line",
        )
    }


def group_rows(groups: Sequence[DuplicateGroup]) -> list[dict[str, Any]]:
    """One row per record per group, for tables and CSV/JSON output."""
    return [
        {
            "group": number,
            "kind": group.kind,
            "max_distance": group.max_distance,
            "crosses_patients": group.crosses_patients,
            **record,
        }
        for number, group in enumerate(groups, start=1)
        for record in group.records
    ]
