"""The store: images, patients and statistics (``/api/v1``), and the browse, case and
statistics pages. Filters are those of ``covidcxr list``."""

from __future__ import annotations

import io
import math
import re
from typing import Annotated, Any, Final
from urllib.parse import urlencode

import anyio.to_thread
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from sqlalchemy import Connection

from covidcxr.errors import MetadataError
from covidcxr.imaging.decode import decode_image
from covidcxr.serve.deps import (
    ServiceState,
    State,
    json_bytes,
    json_response,
    render,
    require_reader,
)
from covidcxr.store import accounts, queries
from covidcxr.store.duplicates import duplicate_groups

router = APIRouter(dependencies=[Depends(require_reader)])

PAGE_SIZE: Final = 48
THUMB_SIDE: Final = 256
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_MEDIA: Final = {"PNG": "image/png", "JPEG": "image/jpeg"}


def _flag(text: str | None, name: str) -> bool | None:
    if text is None or not text.strip():
        return None
    value = text.strip().lower()
    if value in ("true", "yes", "y", "1"):
        return True
    if value in ("false", "no", "n", "0"):
        return False
    raise MetadataError(f"filter: {name} {text!r}: use true or false")


def _age(text: str | None, name: str) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 150:
        raise MetadataError(f"filter: {name} {text!r}: give an age in years from 0 to 150")
    return value


def _values(values: list[str] | None) -> list[str]:
    return [v for v in (values or []) if v.strip()]


async def record_filter(
    finding: Annotated[list[str] | None, Query(description="finding at any level")] = None,
    view: Annotated[list[str] | None, Query()] = None,
    modality: Annotated[list[str] | None, Query()] = None,
    sex: Annotated[list[str] | None, Query()] = None,
    age_min: Annotated[str | None, Query(description="years, inclusive")] = None,
    age_max: Annotated[str | None, Query(description="years, inclusive")] = None,
    source: Annotated[list[str] | None, Query()] = None,
    has_severity: str | None = None,
    has_mask: str | None = None,
    has_box: str | None = None,
    survival: str | None = None,
    intubated: str | None = None,
    went_icu: str | None = None,
    needed_supplemental_o2: str | None = None,
) -> queries.RecordFilter:
    """The filter of a request (blank values do not filter).

    Raises:
        MetadataError: a value is not valid (answered 422).
    """
    outcomes = {
        name: queries.parse_outcome(value)
        for name, value in (
            ("survival", survival),
            ("intubated", intubated),
            ("went_icu", went_icu),
            ("needed_supplemental_o2", needed_supplemental_o2),
        )
        if value is not None and value.strip()
    }
    return queries.RecordFilter(
        findings=_values(finding),
        views=_values(view),
        modalities=_values(modality),
        sexes=_values(sex),
        age_min=_age(age_min, "age_min"),
        age_max=_age(age_max, "age_max"),
        sources=_values(source),
        has_severity=_flag(has_severity, "has_severity"),
        has_mask=_flag(has_mask, "has_mask"),
        has_box=_flag(has_box, "has_box"),
        outcomes=outcomes,
    )


Filter = Annotated[queries.RecordFilter, Depends(record_filter)]


def _listing(
    state: ServiceState, selection: queries.RecordFilter, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    with state.store.read() as conn:
        total = queries.count_records(conn, selection)
        rows = queries.list_records(conn, selection, limit=limit, offset=offset)
    return total, rows


def _listing_json(
    state: ServiceState, selection: queries.RecordFilter, limit: int, offset: int
) -> bytes:
    """A page of the listing as JSON, cached until the store's data changes."""
    with state.store.read() as conn:
        generation = accounts.data_generation(conn)
    state.answers.note_generation(generation)

    def make() -> bytes:
        total, rows = _listing(state, selection, limit, offset)
        return json_bytes({"total": total, "limit": limit, "offset": offset, "items": rows})

    return state.answers.get_or_make(_listing_key(selection, limit, offset, generation), make)


def _listing_key(
    selection: queries.RecordFilter, limit: int, offset: int, generation: int
) -> tuple[str, str, int, int, int]:
    return ("images", repr(selection), limit, offset, generation)


@router.get("/api/v1/images")
async def list_images(
    state: State,
    selection: Filter,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Records matching the filters (``covidcxr list --format json`` rows), a page."""
    generation = state.answers.fresh_generation()
    if generation is not None:
        cached = state.answers.peek(_listing_key(selection, limit, offset, generation))
        if cached is not None:  # answered on the event loop: no thread, no database
            return json_response(cached)
    body = await anyio.to_thread.run_sync(_listing_json, state, selection, limit, offset)
    return json_response(body)


def duplicate_index(state: ServiceState, conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """Every stored image's duplicate groups (as ``covidcxr duplicates`` finds them: kind,
    largest hash distance, whether it crosses patients, all its records), by sha256;
    found again only when the store's data has changed."""
    generation = accounts.data_generation(conn)
    known = state.duplicate_index
    if known is not None and known[0] == generation:
        return known[1]
    index: dict[str, list[dict[str, Any]]] = {}
    for group in duplicate_groups(conn):
        entry = {
            "kind": group.kind,
            "max_distance": group.max_distance,
            "crosses_patients": group.crosses_patients,
            "records": list(group.records),
        }
        for sha in group.images:
            index.setdefault(sha, []).append(entry)
    state.duplicate_index = (generation, index)
    return index


def other_copies(groups: list[dict[str, Any]], record_id: Any) -> list[dict[str, Any]]:
    """The other records in a record's duplicate groups, each once (an exact copy, the
    same file, before a near one), with the group's ``kind`` and ``max_distance``."""
    others: dict[Any, dict[str, Any]] = {}
    for group in sorted(groups, key=lambda g: g["kind"] != "exact"):
        for record in group["records"]:
            if record["record_id"] != record_id and record["record_id"] not in others:
                others[record["record_id"]] = {
                    **record,
                    "kind": group["kind"],
                    "max_distance": group["max_distance"],
                }
    return list(others.values())


def _image(state: ServiceState, sha256: str) -> dict[str, Any]:
    if not _SHA256.fullmatch(sha256):
        raise HTTPException(422, f"image {sha256!r}: give the 64 lowercase hex digits of a sha256")
    with state.store.read() as conn:
        details = queries.image_details(conn, [sha256]).get(sha256)
        if details is None:
            raise HTTPException(404, f"no image {sha256} in this store")
        records = queries.find_records(conn, sha256)
        annotations = queries.annotations_for(conn, [sha256]).get(sha256, [])
        duplicates = duplicate_index(state, conn).get(sha256, [])
    return {
        "image": details,
        "records": records,
        "annotations": annotations,
        "duplicate_groups": duplicates,
    }


@router.get("/api/v1/images/{sha256}")
async def image_detail(sha256: str, state: State) -> Response:
    """One image: its file facts, every record that shows it, its annotations, and its
    duplicate groups (``covidcxr duplicates``: exact copies and near duplicates, with
    every record of each group)."""
    return json_response(await anyio.to_thread.run_sync(_image, state, sha256))


@router.get("/api/v1/images/{sha256}/file")
async def image_file(sha256: str, state: State) -> FileResponse:
    """The stored image file."""
    details = (await anyio.to_thread.run_sync(_image, state, sha256))["image"]
    path = state.store.blobs.path(sha256)
    if not path.is_file():
        raise HTTPException(404, f"image {sha256} is described but its file is not stored")
    return FileResponse(path, media_type=_MEDIA.get(details["format"], "application/octet-stream"))


def _thumbnail(state: ServiceState, sha256: str) -> bytes:
    if not _SHA256.fullmatch(sha256):
        raise HTTPException(422, f"image {sha256!r}: give the 64 hex digits of a sha256")
    cached = state.store.data_dir / "thumbnails" / f"{sha256}.png"
    if cached.is_file():
        return cached.read_bytes()
    path = state.store.blobs.path(sha256)
    if not path.is_file():
        raise HTTPException(404, f"no stored file for image {sha256}")
    image = decode_image(path.read_bytes(), name=sha256).image
    if image.mode not in ("L", "RGB"):
        image = (
            image.convert("L") if image.mode in ("I", "I;16", "F", "LA") else image.convert("RGB")
        )
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    cached.parent.mkdir(parents=True, exist_ok=True)
    temporary = cached.with_suffix(".tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(cached)
    return buffer.getvalue()


@router.get("/images/{sha256}/thumbnail")
async def thumbnail(sha256: str, state: State) -> Response:
    """A small PNG of a stored image (cached in the data directory)."""
    data = await anyio.to_thread.run_sync(_thumbnail, state, sha256)
    return Response(data, media_type="image/png", headers={"cache-control": "max-age=86400"})


def _patient(state: ServiceState, source: str, patient_id: str) -> dict[str, Any]:
    selection = queries.RecordFilter(sources=[source], patients=[patient_id])
    with state.store.read() as conn:
        try:
            rows = queries.list_records(conn, selection)
        except MetadataError as exc:  # an unknown source: no such patient either
            raise HTTPException(404, f"no patient {patient_id!r} in source {source!r}") from exc
        shas = {row["image_sha256"] for row in rows if row["image_sha256"]}
        annotations = queries.annotations_for(conn, shas)
        images = queries.image_details(conn, shas)
        index = duplicate_index(state, conn) if rows else {}
    if not rows:
        raise HTTPException(404, f"no patient {patient_id!r} in source {source!r}")
    rows.sort(key=lambda r: (r["offset_days"] is None, r["offset_days"] or 0, r["line"]))
    return {
        "source": source,
        "patient_id": patient_id,
        "records": rows,
        "annotations": annotations,
        "images": images,
        "duplicate_groups": {sha: index[sha] for sha in sorted(shas) if sha in index},
    }


@router.get("/api/v1/patients/{source}/{patient_id}")
async def patient(source: str, patient_id: str, state: State) -> Response:
    """Every record of a patient, in day-offset order, with annotations, image facts and
    the duplicate groups of its images (by sha256)."""
    return json_response(await anyio.to_thread.run_sync(_patient, state, source, patient_id))


def _stats(state: ServiceState, selection: queries.RecordFilter) -> dict[str, Any]:
    with state.store.read() as conn:
        return queries.stats(conn, selection)


@router.get("/api/v1/stats")
async def stats(selection: Filter, state: State) -> dict[str, Any]:
    """Counts over the filtered records (``covidcxr stats --format json``)."""
    return await anyio.to_thread.run_sync(_stats, state, selection)


# --------------------------------------------------------------------------- pages


@router.get("/browse", response_class=HTMLResponse)
async def browse(
    state: State,
    request: Request,
    selection: Filter,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    """A filtered, paginated thumbnail grid of the store."""
    offset = (page - 1) * PAGE_SIZE
    total, rows = await anyio.to_thread.run_sync(_listing, state, selection, PAGE_SIZE, offset)
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "page" and v]
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return render(
        request,
        "browse.html",
        {
            "rows": rows,
            "total": total,
            "page": page,
            "pages": pages,
            "params": dict(query),
            "base_query": urlencode(query),
        },
    )


@router.get("/patients/{source}/{patient_id}", response_class=HTMLResponse)
async def case_page(request: Request, source: str, patient_id: str, state: State) -> HTMLResponse:
    """A patient's images in day-offset order with metadata, provenance, licence and the
    other records of each image's duplicate group."""
    case = await anyio.to_thread.run_sync(_patient, state, source, patient_id)
    groups = case["duplicate_groups"]
    copies = {
        r["record_id"]: other_copies(groups.get(r["image_sha256"], []), r["record_id"])
        for r in case["records"]
    }
    return render(request, "case.html", {**case, "copies": copies})


@router.get("/stats", response_class=HTMLResponse)
async def stats_page(request: Request, selection: Filter, state: State) -> HTMLResponse:
    """Counts with bar charts: findings, views, sex, age, sources, missingness."""
    counts = await anyio.to_thread.run_sync(_stats, state, selection)
    return render(request, "stats.html", {"stats": counts})
