"""Queries over the store: filtered listings, one image or patient, statistics.

Everything returns plain dicts keyed by our column names (the same names as the
CSV and JSON output), so the CLI, the exports and the ML layers share them.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection, Select, and_, case, func, literal, or_, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import ColumnElement

from covidcxr.errors import MetadataError
from covidcxr.schema.findings import resolve_node
from covidcxr.schema.values import (
    FRONTAL_VIEWS,
    MODALITIES,
    VIEWS,
    parse_flag,
    parse_modality,
    parse_sex,
    parse_view,
)
from covidcxr.store.tables import (
    Annotation,
    Finding,
    Image,
    Observation,
    Patient,
    Record,
    Source,
)

_Query = TypeVar("_Query", bound=Select[*tuple[Any, ...]])

OUTCOME_FIELDS = (
    "survival",
    "intubated",
    "intubation_present",
    "went_icu",
    "in_icu",
    "needed_supplemental_o2",
    "extubated",
)


@dataclass
class RecordFilter:
    """A selection of records. Empty fields do not filter.

    Attributes:
        findings: finding nodes at any level (``COVID-19``, ``viral``,
            ``Pneumonia/Bacterial``); a record matches if any of its findings is
            the node or below it.
        views: views (``PA``, ``AP Supine``; ``frontal`` = PA, AP, AP Supine, AP Erect).
        modalities: ``X-ray``, ``CT``.
        sexes: ``M``, ``F``.
        age_min: youngest age in years (inclusive).
        age_max: oldest age in years (inclusive).
        sources: source names.
        patients: patient ids.
        image_status: ``stored``, ``missing``, ``rejected``.
        has_severity: only records whose image has (True) / lacks (False) scores.
        has_mask: likewise for lung masks.
        has_box: likewise for lung boxes.
        outcomes: outcome field -> True, False or None (None = unknown).
        flags: record flags that must all be set (``pediatric``, ``shared_image``).
    """

    findings: Sequence[str] = ()
    views: Sequence[str] = ()
    modalities: Sequence[str] = ()
    sexes: Sequence[str] = ()
    age_min: float | None = None
    age_max: float | None = None
    sources: Sequence[str] = ()
    patients: Sequence[str] = ()
    image_status: Sequence[str] = ()
    has_severity: bool | None = None
    has_mask: bool | None = None
    has_box: bool | None = None
    outcomes: dict[str, bool | None] = field(default_factory=dict)
    flags: Sequence[str] = ()

    def __post_init__(self) -> None:
        # No stored text holds a NUL byte, and PostgreSQL refuses one in a parameter.
        for name in ("findings", "views", "modalities", "sexes", "sources", "patients"):
            for value in getattr(self, name):
                if "\x00" in value:
                    raise MetadataError(f"filter {name}: {value!r} contains a NUL byte")


RECORD_FLAGS = ("pediatric", "shared_image", "has_warnings")
IMAGE_STATUSES = ("stored", "missing", "rejected")


def _normalised(values: Iterable[str], parser: Any, what: str, accepted: str) -> list[str]:
    result = []
    for value in values:
        parsed, _ = parser(value)
        if parsed is None:
            raise MetadataError(f"unknown {what} {value!r}; accepted: {accepted}")
        result.append(parsed)
    return result


def check_choices(values: Iterable[str], accepted: Sequence[str], what: str) -> list[str]:
    """``values`` if each is one of ``accepted``.

    Raises:
        MetadataError: a value is not accepted; the message lists the accepted values
            and the closest one.
    """
    result = list(values)
    for value in result:
        if value not in accepted:
            close = difflib.get_close_matches(value, accepted, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(accepted) or "none"
            raise MetadataError(f"unknown {what} {value!r}{hint}; accepted: {known}")
    return result


def source_names(conn: Connection) -> list[str]:
    """The names of the sources in the store."""
    return sorted(conn.execute(select(Source.name)).scalars())


def _annotation_exists(kind: str) -> ColumnElement[bool]:
    return (
        select(Annotation.id)
        .where(Annotation.image_sha256 == Record.image_sha256, Annotation.kind == kind)
        .exists()
    )


def stored_paths_under(conn: Connection, nodes: Iterable[str]) -> list[str]:
    """The finding paths in the store that are one of ``nodes`` or below one of them.

    Matching the store's few dozen distinct paths here turns a hierarchy filter into
    equality on an indexed column (no ``LIKE``, no collation rules).
    """
    wanted = list(nodes)
    stored = conn.execute(_distinct_paths()).scalars()
    return sorted(
        path for path in stored if any(path == n or path.startswith(n + "/") for n in wanted)
    )


def _distinct_paths() -> Select[Any]:
    """The distinct finding paths, hopping along the path index one path at a time.

    Kept: PostgreSQL has no skip scan, and ``SELECT DISTINCT`` reads every findings row.
    """
    path = Finding.path
    seed = select(func.min(path).label("path")).cte("stored_paths", recursive=True)
    previous = seed.alias("previous")
    following = select(func.min(path)).where(path > previous.c.path).scalar_subquery()
    walk = seed.union_all(select(following).where(previous.c.path.is_not(None)))
    return select(walk.c.path).where(walk.c.path.is_not(None))


def where_clauses(
    conn: Connection,
    selection: RecordFilter,
    *,
    page: bool = False,
    key: InstrumentedAttribute[int] | None = None,
) -> list[ColumnElement[bool]]:
    """SQL conditions for a filter (over ``records`` joined with its tables).

    Args:
        conn: the store.
        selection: the filter.
        page: the conditions are for one page in listing order.
        key: the record id column the finding condition matches (default
            ``records.id``; ``observations.record_id`` for a query without ``records``).

    Raises:
        MetadataError: a filter value is not valid (an unknown finding, view...).
    """
    clauses: list[ColumnElement[bool]] = []
    if selection.findings:
        paths = stored_paths_under(conn, (resolve_node(f) for f in selection.findings))
        if page:
            # Kept: SQLite sorts a whole IN-set before a LIMIT; EXISTS walks the order.
            found = select(Finding.id).where(Finding.record_id == Record.id)
            clauses.append(found.where(Finding.path.in_(paths)).exists())
        else:
            found_ids = select(Finding.record_id).where(Finding.path.in_(paths))
            clauses.append((Record.id if key is None else key).in_(found_ids))
    if selection.views:
        views: set[str] = set()
        for view in selection.views:
            if view.strip().lower() == "frontal":
                views |= FRONTAL_VIEWS
            else:
                accepted = ", ".join(VIEWS) + " or frontal"
                views.update(_normalised([view], parse_view, "view", accepted))
        clauses.append(Record.view.in_(sorted(views)))
    if selection.modalities:
        modalities = _normalised(
            selection.modalities, parse_modality, "modality", ", ".join(MODALITIES)
        )
        clauses.append(Record.modality.in_(modalities))
    if selection.sexes:
        clauses.append(Observation.sex.in_(_normalised(selection.sexes, parse_sex, "sex", "M, F")))
    if selection.age_min is not None:
        clauses.append(Observation.age_years >= selection.age_min)
    if selection.age_max is not None:
        clauses.append(Observation.age_years <= selection.age_max)
    if selection.sources:
        clauses.append(Source.name.in_(list(selection.sources)))
    if selection.patients:
        clauses.append(Patient.patient_id.in_(list(selection.patients)))
    if selection.image_status:
        statuses = check_choices(selection.image_status, IMAGE_STATUSES, "image status")
        clauses.append(Record.image_status.in_(statuses))
    for kind, wanted in (
        ("severity", selection.has_severity),
        ("lung_mask", selection.has_mask),
        ("lung_box", selection.has_box),
    ):
        if wanted is not None:
            exists = _annotation_exists(kind)
            clauses.append(exists if wanted else ~exists)
    for name, value in selection.outcomes.items():
        if name not in OUTCOME_FIELDS:
            raise MetadataError(
                f"{name!r} is not an outcome field; use one of {', '.join(OUTCOME_FIELDS)}"
            )
        column = Observation.__table__.c[name]
        clauses.append(column.is_(None) if value is None else column == value)
    for flag in check_choices(selection.flags, RECORD_FLAGS, "flag"):
        padded = literal(",") + Record.flags + literal(",")
        clauses.append(padded.contains(f",{flag},", autoescape=True))
    return clauses


def parse_outcome(text: str) -> bool | None:
    """Read an outcome filter value: Y/N, or ``unknown`` for blank."""
    if text.strip().lower() in ("unknown", "blank", "none", "?"):
        return None
    value, _ = parse_flag(text)
    if value is None:
        raise MetadataError(f"unknown outcome value {text!r}; accepted: Y, N or unknown")
    return value


LIST_COLUMNS = (
    "record_id",
    "source",
    "patient_id",
    "folder",
    "filename",
    "line",
    "image_status",
    "image_sha256",
    "view",
    "modality",
    "finding",
    "finding_status",
    "findings",
    "sex",
    "age_years",
    "offset_days",
    "rt_pcr_positive",
    *OUTCOME_FIELDS,
    "temperature_c",
    "po2_saturation_pct",
    "leukocyte_count_k_per_ul",
    "neutrophil_count_k_per_ul",
    "lymphocyte_count_k_per_ul",
    "date",
    "acquired_on",
    "acquired_year",
    "location",
    "doi",
    "url",
    "license",
    "clinical_notes",
    "other_notes",
    "flags",
    "extra",
)


def _base_select() -> Select[*tuple[Any, ...]]:
    obs = Observation.__table__.c
    return (
        select(
            Record.id.label("record_id"),
            Source.name.label("source"),
            Patient.patient_id,
            Record.folder,
            Record.filename,
            Record.line,
            Record.image_status,
            Record.image_sha256,
            Record.view,
            Record.modality,
            Record.finding,
            Record.finding_status,
            obs.sex,
            obs.age_years,
            obs.offset_days,
            obs.rt_pcr_positive,
            *(obs[name] for name in OUTCOME_FIELDS),
            obs.temperature_c,
            obs.po2_saturation_pct,
            obs.leukocyte_count_k_per_ul,
            obs.neutrophil_count_k_per_ul,
            obs.lymphocyte_count_k_per_ul,
            Record.date,
            Record.acquired_on,
            Record.acquired_year,
            Record.location,
            Record.doi,
            Record.url,
            Record.license,
            Record.clinical_notes,
            Record.other_notes,
            Record.flags,
            Record.extra,
        )
        .join(Source, Source.id == Record.source_id)
        .join(Patient, Patient.id == Record.patient_pk)
        .join(Observation, Observation.record_id == Record.id)
    )


# Sources in the order they were first ingested, then metadata lines (the record id
# only breaks ties): the order of the (source_id, line) index, so a listing's first
# page reads that index and stops.
_LISTING_ORDER = (Record.source_id, Record.line, Record.id)


def _fetch(
    conn: Connection,
    clauses: Sequence[ColumnElement[bool]],
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    query = _base_select().where(and_(True, *clauses)).order_by(*_LISTING_ORDER)
    if limit is not None:
        query = query.limit(limit)
    if offset:
        query = query.offset(offset)
    rows = [dict(row) for row in conn.execute(query).mappings()]
    if not rows:
        return rows
    wanted: Any
    if len(rows) > _IN_LIST_MAX:
        # Large results: let the database join instead of sending every id.
        wanted = (
            select(Record.id)
            .join(Source, Source.id == Record.source_id)
            .join(Patient, Patient.id == Record.patient_pk)
            .join(Observation, Observation.record_id == Record.id)
            .where(and_(True, *clauses))
        )
        if limit is not None:
            wanted = wanted.order_by(*_LISTING_ORDER).limit(limit).offset(offset)
        wanted = wanted.scalar_subquery()
    else:
        wanted = [row["record_id"] for row in rows]
    paths: dict[int, list[str]] = defaultdict(list)
    for record_id, path in conn.execute(
        select(Finding.record_id, Finding.path)
        .where(Finding.record_id.in_(wanted))
        .order_by(Finding.record_id, Finding.position)
    ):
        paths[record_id].append(path)
    for row in rows:
        row["findings"] = paths.get(row["record_id"], [])
        row["flags"] = [f for f in row["flags"].split(",") if f]
    return rows


_IN_LIST_MAX = 900


def list_records(
    conn: Connection,
    selection: RecordFilter | None = None,
    *,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Records matching a filter, one per metadata row, by source (in the order the
    sources were first ingested) then metadata line.

    Each dict has the keys of :data:`LIST_COLUMNS`; ``findings`` is the list of
    canonical finding paths, ``flags`` the list of record flags.

    Raises:
        MetadataError: a filter value is not valid.
    """
    selection = selection or RecordFilter()
    if limit is None and not offset:
        return _fetch(conn, where_clauses(conn, selection))
    # A page: find its record ids with a narrow query (sorting ids, not wide rows,
    # and joining only what the filter reads), then read those rows in full.
    query = _filtered(conn, select(Record.id), selection, page=True).order_by(*_LISTING_ORDER)
    page = conn.execute(query.limit(limit).offset(offset)).scalars().all()
    return _fetch(conn, [Record.id.in_(page)]) if page else []


def iter_records(
    conn: Connection, selection: RecordFilter | None = None, *, page_size: int = _IN_LIST_MAX
) -> Iterator[list[dict[str, Any]]]:
    """The rows of :func:`list_records`, in the same order, a page at a time: memory
    holds one page, however large the store (keyset paging on the listing order)."""
    if page_size < 1:
        raise ValueError(f"iter_records: page_size must be at least 1, not {page_size}")
    keys_query = _filtered(conn, select(*_LISTING_ORDER), selection or RecordFilter())
    after: tuple[Any, ...] | None = None
    while True:
        query = keys_query
        if after is not None:
            query = query.where(tuple_(*_LISTING_ORDER) > tuple_(*after))
        keys = conn.execute(query.order_by(*_LISTING_ORDER).limit(page_size)).all()
        if not keys:
            return
        yield _fetch(conn, [Record.id.in_([key.id for key in keys])])
        after = tuple(keys[-1])


def count_records(conn: Connection, selection: RecordFilter | None = None) -> int:
    """How many records match a filter."""
    selection = selection or RecordFilter()
    unset = RecordFilter()
    if _reads_observations(selection) and all(
        getattr(selection, f.name) == getattr(unset, f.name)
        for f in dataclasses.fields(selection)
        if f.name not in _OBSERVATION_FILTERS
    ):
        # Every record has exactly one observations row: count those, not records.
        clauses = where_clauses(conn, selection, key=Observation.record_id)
        query = select(func.count()).select_from(Observation).where(and_(True, *clauses))
    else:
        query = _filtered(conn, select(func.count()).select_from(Record), selection)
    return int(conn.execute(query).scalar_one())


_OBSERVATION_FILTERS = frozenset({"findings", "sexes", "age_min", "age_max", "outcomes"})


def _reads_observations(selection: RecordFilter) -> bool:
    return bool(
        selection.sexes
        or selection.age_min is not None
        or selection.age_max is not None
        or selection.outcomes
    )


def _filtered(
    conn: Connection, query: _Query, selection: RecordFilter, *, page: bool = False
) -> _Query:
    """``query`` (over ``records``) joined with only the tables ``selection`` reads, and
    filtered by it. Every record has exactly one source, patient and observation row,
    so leaving a join out never changes the result, only the work."""
    if selection.sources:
        query = query.join(Source, Source.id == Record.source_id)
    if selection.patients:
        query = query.join(Patient, Patient.id == Record.patient_pk)
    if _reads_observations(selection):
        query = query.join(Observation, Observation.record_id == Record.id)
    return query.where(and_(True, *where_clauses(conn, selection, page=page)))


def count_exclusions(conn: Connection, steps: Sequence[tuple[str, RecordFilter]]) -> Counter[str]:
    """How many records each step of a selection leaves out, in one ``GROUP BY``.

    A record is counted once, under the reason of the first step whose filter it does
    not match (a record with no value for a filtered field does not match it).

    Args:
        conn: the store.
        steps: ``(reason, filter)`` pairs, in the order they apply.

    Raises:
        MetadataError: a filter value is not valid.
    """
    reason: ColumnElement[Any] = literal(None)
    for name, step in reversed(steps):
        condition = and_(True, *where_clauses(conn, step))
        reason = case((condition, reason), else_=literal(name))
    query = (
        select(reason.label("reason"), func.count())
        .select_from(Record)
        .join(Source, Source.id == Record.source_id)
        .join(Patient, Patient.id == Record.patient_pk)
        .join(Observation, Observation.record_id == Record.id)
        .group_by("reason")
    )
    return Counter({name: n for name, n in conn.execute(query) if name is not None})


def image_details(conn: Connection, sha256s: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Image rows (size, format, hashes) by sha256."""
    wanted = list(set(sha256s))
    result: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), 5000):
        chunk = wanted[start : start + 5000]
        for row in conn.execute(select(Image.__table__).where(Image.sha256.in_(chunk))).mappings():
            result[row["sha256"]] = dict(row)
    return result


def annotations_for(conn: Connection, sha256s: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Annotations by image sha256."""
    wanted = list(set(sha256s))
    result: dict[str, list[dict[str, Any]]] = defaultdict(list)
    columns = [c for c in Annotation.__table__.columns if c.name not in ("id", "source_id")]
    for start in range(0, len(wanted), 5000):
        for row in conn.execute(
            select(*columns)
            .where(Annotation.image_sha256.in_(wanted[start : start + 5000]))
            .order_by(Annotation.kind, Annotation.annotator, Annotation.label)
        ).mappings():
            result[row["image_sha256"]].append(
                {k: v for k, v in row.items() if v is not None and k != "image_sha256"}
            )
    return dict(result)


def find_records(conn: Connection, key: str) -> list[dict[str, Any]]:
    """Records for ``show``: by image sha256 (or a prefix of 8+ hex digits), file
    name, record id (``#12``), or patient id (``SOURCE:PATIENT`` or ``PATIENT``).

    Raises:
        MetadataError: nothing matches, or a hash prefix is ambiguous.
    """
    key = key.strip()
    clauses: list[ColumnElement[bool]] = []
    lowered = key.lower()
    if key.startswith("#") and key[1:].isdigit():
        clauses.append(Record.id == int(key[1:]))
    elif len(key) >= 8 and all(c in "0123456789abcdef" for c in lowered):
        shas = (
            conn.execute(select(Image.sha256).where(Image.sha256.startswith(lowered)).limit(2))
            .scalars()
            .all()
        )
        if len(shas) > 1:
            raise MetadataError(f"show: {key!r} matches several images; give more digits")
        if shas:
            clauses.append(Record.image_sha256 == shas[0])
    if not clauses:
        source, _, patient = key.rpartition(":")
        patient_match = Patient.patient_id == patient
        if source:
            patient_match = and_(patient_match, Source.name == source)
        clauses.append(or_(Record.filename == key, Record.row_key == key, patient_match))
    rows = _fetch(conn, clauses)
    if not rows:
        raise MetadataError(
            f"show: nothing matches {key!r}; give an image sha256 (or 8+ leading hex digits), "
            "a file name, #RECORD_ID, or a patient id (SOURCE:PATIENT)"
        )
    return rows


def stats(conn: Connection, selection: RecordFilter | None = None) -> dict[str, Any]:
    """Counts over the (filtered) records: sources, patients, views, findings, outcomes."""
    rows = list_records(conn, selection)
    by_finding: Counter[str] = Counter()
    for row in rows:
        nodes: set[str] = set()
        for path in row["findings"]:
            parts = path.split("/")
            nodes.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        by_finding.update(nodes)
        if not row["findings"]:
            by_finding[f"({row['finding_status']})"] += 1
    shas = {row["image_sha256"] for row in rows if row["image_sha256"]}
    annotations = annotations_for(conn, shas)
    ages = [row["age_years"] for row in rows if row["age_years"] is not None]

    def count(key: str) -> dict[str, int]:
        return dict(
            Counter("unknown" if row[key] is None else str(row[key]) for row in rows).most_common()
        )

    def outcome(key: str) -> dict[str, int]:
        names = {True: "Y", False: "N", None: "unknown"}
        return dict(Counter(names[row[key]] for row in rows).most_common())

    return {
        "records": len(rows),
        "patients": len({(row["source"], row["patient_id"]) for row in rows}),
        "images": len(shas),
        "sources": count("source"),
        "image_status": count("image_status"),
        "modality": count("modality"),
        "view": count("view"),
        "sex": count("sex"),
        "findings": dict(sorted(by_finding.items())),
        "age_years": {
            "known": len(ages),
            "min": min(ages) if ages else None,
            "median": sorted(ages)[len(ages) // 2] if ages else None,
            "max": max(ages) if ages else None,
            "under_18": sum(1 for a in ages if a < 18),
        },
        "outcomes": {key: outcome(key) for key in OUTCOME_FIELDS},
        "annotated_images": {
            kind: sum(1 for items in annotations.values() if any(a["kind"] == kind for a in items))
            for kind in ("severity", "lung_mask", "lung_box")
        },
        "flags": dict(Counter(f for row in rows for f in row["flags"]).most_common()),
    }


BLOB_REFERENCE_COLUMNS = ("sha256", "kind", "record_id", "source", "patient_id", "file")


def blob_references(conn: Connection) -> list[dict[str, Any]]:
    """Every stored blob with what refers to it: images by record, masks by annotation.

    Returns:
        rows with :data:`BLOB_REFERENCE_COLUMNS`: ``kind`` ``image`` (``record_id``
        and ``file`` the record's) or ``mask`` (the mask's annotation file, no record).
    """
    images = conn.execute(
        select(
            Record.image_sha256.label("sha256"),
            Record.id.label("record_id"),
            Source.name.label("source"),
            Patient.patient_id,
            Record.filename.label("file"),
        )
        .join(Source, Source.id == Record.source_id)
        .join(Patient, Patient.id == Record.patient_pk)
        .where(Record.image_sha256.is_not(None))
        .order_by(Record.id)
    ).mappings()
    rows: list[dict[str, Any]] = [{"kind": "image", **row} for row in images]
    masks = conn.execute(
        select(Annotation.mask_sha256.label("sha256"), Source.name.label("source"), Annotation.file)
        .join(Source, Source.id == Annotation.source_id)
        .where(Annotation.mask_sha256.is_not(None))
        .order_by(Annotation.id)
    ).mappings()
    rows += [{"kind": "mask", "record_id": None, "patient_id": None, **row} for row in masks]
    return rows
