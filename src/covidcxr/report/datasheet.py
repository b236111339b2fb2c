"""A datasheet (Gebru et al., "Datasheets for Datasets") of what is in the store, every
number computed from the store when it is rendered."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

from covidcxr import RESEARCH_USE_ONLY, __version__
from covidcxr.store.db import Store
from covidcxr.store.duplicates import duplicate_groups
from covidcxr.store.queries import list_records, stats

FORMAT: Final = "covidcxr-datasheet/1"
#: Clinical and provenance fields whose missingness the datasheet shows.
CLINICAL_FIELDS: Final = (
    "sex",
    "age_years",
    "offset_days",
    "rt_pcr_positive",
    "survival",
    "intubated",
    "went_icu",
    "needed_supplemental_o2",
    "temperature_c",
    "po2_saturation_pct",
    "leukocyte_count_k_per_ul",
    "lymphocyte_count_k_per_ul",
    "view",
    "date",
    "location",
    "license",
)
PEDIATRIC_AGE_YEARS: Final = 18
_LISTED: Final = 50


def _counts(values: Sequence[Any]) -> dict[str, int]:
    return dict(Counter("unknown" if v in (None, "") else str(v) for v in values).most_common())


def _findings_by_level(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per depth of the hierarchy, records having a finding at that node."""
    levels: dict[str, Counter[str]] = {}
    for row in rows:
        nodes: set[tuple[int, str]] = set()
        for path in row["findings"]:
            parts = path.split("/")
            nodes.update((depth, "/".join(parts[:depth])) for depth in range(1, len(parts) + 1))
        if not row["findings"]:
            nodes.add((1, f"({row['finding_status']})"))
        for depth, node in nodes:
            levels.setdefault(str(depth), Counter())[node] += 1
    return {level: dict(counts.most_common()) for level, counts in sorted(levels.items())}


def _images_per_patient(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    per_patient = Counter((row["source"], row["patient_id"]) for row in rows)
    spread = Counter(min(n, 10) for n in per_patient.values())
    return {("10+" if n == 10 else str(n)): spread[n] for n in sorted(spread)}


def _region(location: str | None) -> str | None:
    return location.split(",")[-1].strip() or None if location else None


def _missing(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    fields = [f for f in CLINICAL_FIELDS if rows and f in rows[0]]
    return {
        f: round(100.0 * sum(row[f] in (None, "") for row in rows) / len(rows), 1) for f in fields
    }


def composition(rows: Sequence[Mapping[str, Any]], counted: Mapping[str, Any]) -> dict[str, Any]:
    """What the store holds: counts, distributions and missingness."""
    return {
        "records": len(rows),
        "images": len({row["image_sha256"] for row in rows if row["image_sha256"]}),
        "patients": len({(row["source"], row["patient_id"]) for row in rows}),
        "findings_by_level": _findings_by_level(rows),
        "view": _counts([row["view"] for row in rows]),
        "modality": _counts([row["modality"] for row in rows]),
        "sex": _counts([row["sex"] for row in rows]),
        "ages_years": [float(row["age_years"]) for row in rows if row["age_years"] is not None],
        "regions": _counts([_region(row["location"]) for row in rows]),
        "sources": _counts([row["source"] for row in rows]),
        "images_per_patient": _images_per_patient(rows),
        "offsets_days": [
            float(row["offset_days"]) for row in rows if row["offset_days"] is not None
        ],
        "missing_percent": _missing(rows),
        "annotated_images": dict(counted.get("annotated_images", {})),
    }


def _pediatric(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    children = [
        row
        for row in rows
        if row["age_years"] is not None and row["age_years"] < PEDIATRIC_AGE_YEARS
    ]
    findings = Counter(path for row in children for path in row["findings"] or ["(none)"])
    return {
        "records": len(children),
        "patients": len({(row["source"], row["patient_id"]) for row in children}),
        "findings": dict(findings.most_common()),
        "listed": [
            {k: row[k] for k in ("source", "patient_id", "filename", "age_years", "findings")}
            for row in children[:_LISTED]
        ],
    }


def _warnings(
    rows: Sequence[Mapping[str, Any]], groups: Sequence[Any], pediatric: Mapping[str, Any]
) -> list[str]:
    warnings = []
    status = Counter(row["finding_status"] for row in rows if row["finding_status"] != "ok")
    for name, n in status.most_common():
        warnings.append(f"{n} record(s) have finding status {name!r}: no label can come from them")
    missing = sum(row["image_status"] != "stored" for row in rows)
    if missing:
        warnings.append(f"{missing} record(s) have no stored image (image status not stored)")
    crossing = [g for g in groups if g.crosses_patients]
    if crossing:
        warnings.append(
            f"{len(crossing)} duplicate group(s) file one picture under several patients: "
            "splits must keep them together"
        )
    normal = [row for row in rows if any(p.startswith("No Finding") for p in row["findings"])]
    young = [
        r for r in normal if r["age_years"] is not None and r["age_years"] < PEDIATRIC_AGE_YEARS
    ]
    if normal and len(young) * 2 > len(normal):
        warnings.append(
            f"{len(young)} of {len(normal)} 'No Finding' records are children: age alone "
            "separates normal from abnormal here; a model may learn age instead of disease"
        )
    for flag, n in Counter(f for row in rows for f in row["flags"]).most_common():
        warnings.append(f"{n} record(s) flagged {flag!r} at ingest")
    if pediatric["records"]:
        warnings.append(
            f"{pediatric['records']} record(s) of {pediatric['patients']} patient(s) under "
            f"{PEDIATRIC_AGE_YEARS}: pediatric chest X-rays differ from adults'"
        )
    return warnings


def _duplicates(groups: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {
            "kind": g.kind,
            "max_distance": g.max_distance,
            "records": len(g.records),
            "patients": g.patients,
            "sources": g.sources,
            "crosses_patients": g.crosses_patients,
            "filenames": [r["filename"] for r in g.records],
        }
        for g in groups
    ]


def datasheet(store: Store) -> dict[str, Any]:
    """The datasheet's sections, as a JSON-ready dict, from the store's current content."""
    with store.read() as conn:
        rows = list_records(conn)
        counted = stats(conn)
        groups = duplicate_groups(conn)
    years = [row["acquired_year"] for row in rows if row["acquired_year"] is not None]
    pediatric = _pediatric(rows)
    found = composition(rows, counted)
    return {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "covidcxr_version": __version__,
        "store": store.url,
        "motivation": {
            "purpose": "a public collection of COVID-19 and other pneumonia chest images, "
            "to build and test methods for a digital second opinion and severity scoring",
            "note": RESEARCH_USE_ONLY,
        },
        "composition": found,
        "collection": {
            "sources": found["sources"],
            "acquired_years": {"min": min(years, default=None), "max": max(years, default=None)},
            "records_with_doi": sum(bool(row["doi"]) for row in rows),
            "records_with_url": sum(bool(row["url"]) for row in rows),
        },
        "preprocessing": {
            "image_status": _counts([row["image_status"] for row in rows]),
            "finding_status": _counts([row["finding_status"] for row in rows]),
            "duplicate_groups": len(groups),
            "records_in_duplicate_groups": sum(len(g.records) for g in groups),
        },
        "uses": {
            "pediatric_records": pediatric["records"],
            "frontal_xray_records": sum(
                row["modality"] == "X-ray" and row["view"] in ("PA", "AP", "AP Supine", "AP Erect")
                for row in rows
            ),
        },
        "distribution": {"licenses": _counts([row["license"] for row in rows])},
        "maintenance": {"covidcxr_version": __version__},
        "duplicates": _duplicates(groups),
        "pediatric": pediatric,
        "warnings": _warnings(rows, groups, pediatric),
    }
