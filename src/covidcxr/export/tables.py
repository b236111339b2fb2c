"""Tabular exports: the upstream ``metadata.csv`` layout and Parquet.

Both writers are called by :func:`covidcxr.export.export_records`, which selects the
rows and makes the write atomic; they only write the path they are given.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from covidcxr import __version__
from covidcxr.export import FINDING_STYLES, ExportError, ExportJob
from covidcxr.schema.columns import BY_NAME, BY_UPSTREAM, COLUMNS, JUNE_2020_UPSTREAM, Column, Kind
from covidcxr.schema.findings import FindingStatus, ParsedFinding, all_nodes, format_finding
from covidcxr.schema.values import escape_formula, format_number
from covidcxr.serialise import to_dict
from covidcxr.store.blobs import blob_path
from covidcxr.store.queries import LIST_COLUMNS, annotations_for, image_details

# Upstream headers per layout, in upstream order.
UPSTREAM_LAYOUTS: Mapping[str, tuple[str, ...]] = {
    "latest": tuple(column.upstream for column in COLUMNS),
    "june-2020": JUNE_2020_UPSTREAM,
}

_NUMERIC_KINDS = (Kind.INT, Kind.FLOAT)


def finding_text(row: Mapping[str, Any], style: str) -> str:
    """The finding cell of a record in ``style`` (see :data:`FINDING_STYLES`).

    ``as-given`` is the text as read. ``hierarchical`` and ``flat`` rewrite the parsed
    findings with :func:`~covidcxr.schema.findings.format_finding`; a record without
    findings writes its status (``todo``, ``Unknown`` or blank). A finding that did not
    parse (status ``invalid``: an unknown name) keeps its text, so that the unknown
    part is not silently dropped and the value parses back to the same result.
    """
    given: str = row["finding"] or ""
    status = cast(FindingStatus, row["finding_status"])
    if style == "as-given" or status == "invalid":
        return given
    layout: Literal["hierarchical", "flat"] = "flat" if style == "flat" else "hierarchical"
    paths: Sequence[str] = row["findings"]
    if paths:
        return format_finding(paths, layout)
    return format_finding(ParsedFinding((), status), layout)


def _cell(column: Column, value: Any, allow_formulas: bool) -> str:
    if value is None:
        return ""
    if column.kind in _NUMERIC_KINDS:
        # Numbers are never escaped: a negative offset stays -5.
        return format_number(value)
    if isinstance(value, bool):
        return "Y" if value else "N"
    text = str(value)
    return text if allow_formulas else escape_formula(text)


def upstream_cells(
    row: Mapping[str, Any],
    columns: Sequence[Column],
    *,
    findings: str = "as-given",
    allow_formulas: bool = False,
) -> list[str]:
    """One record as the cells of an upstream ``metadata.csv`` row.

    Args:
        row: a record from :func:`~covidcxr.store.queries.list_records`.
        columns: the columns to write, in order.
        findings: the finding style (see :func:`finding_text`).
        allow_formulas: write text starting with ``=``, ``+``, ``-``, ``@`` as is
            instead of prefixing it with ``'``.

    Returns:
        Y/N for flags, blank for unknown, numbers in their shortest form, text as
        stored.
    """
    cells = []
    for column in columns:
        value = finding_text(row, findings) if column.kind is Kind.FINDING else row[column.name]
        cells.append(_cell(column, value, allow_formulas))
    return cells


def write_upstream_csv(
    job: ExportJob,
    path: Path,
    *,
    layout: str = "latest",
    findings: str = "as-given",
    allow_formulas: bool = False,
) -> int:
    """Write the records in the upstream ``metadata.csv`` layout.

    It writes the stored, normalised values, so ingesting the file gives back the
    same values for every row that was ingested without warnings or errors. It is not
    the original text: values the ingest left blank (unknown markers such as ``?``,
    ``Not visible``, ``Would have been stated``; out-of-range values such as a
    temperature of 95) are written blank, whitespace is trimmed, and columns outside
    the layout (a source's extra columns, the text past the last named column) are
    not written; those are in Parquet's ``extra`` column. The store does not keep the
    original cell text: for corrections sent upstream, read the source's own metadata
    file at the record's ``line``.

    Args:
        job: the rows to write.
        path: the file to write.
        layout: ``latest`` (with ``RT_PCR_positive``) or ``june-2020``.
        findings: ``as-given``, ``hierarchical`` or ``flat``.
        allow_formulas: see :func:`upstream_cells`.

    Returns:
        The number of rows written.

    Raises:
        ExportError: an unknown layout or finding style.
    """
    headers = UPSTREAM_LAYOUTS.get(layout)
    if headers is None:
        raise ExportError(
            f"write_upstream_csv: layout {layout!r}; choose one of {', '.join(UPSTREAM_LAYOUTS)}"
        )
    if findings not in FINDING_STYLES:
        raise ExportError(
            f"write_upstream_csv: findings {findings!r}; choose one of {', '.join(FINDING_STYLES)}"
        )
    columns = [BY_UPSTREAM[header] for header in headers]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(headers)
        for row in job.rows:
            writer.writerow(
                upstream_cells(row, columns, findings=findings, allow_formulas=allow_formulas)
            )
    return len(job.rows)


_INT_COLUMNS = frozenset(
    {"record_id", "line", "offset_days", "acquired_year", "image_width", "image_height"}
)
_FLOAT_COLUMNS = frozenset(
    {
        "age_years",
        "temperature_c",
        "po2_saturation_pct",
        "leukocyte_count_k_per_ul",
        "neutrophil_count_k_per_ul",
        "lymphocyte_count_k_per_ul",
        "geographic_mean",
        "opacity_mean",
    }
)
_BOOL_COLUMNS = frozenset(
    {name for name in LIST_COLUMNS if name in BY_NAME and BY_NAME[name].kind is Kind.FLAG}
    | {"has_lung_mask", "has_lung_box"}
)
_LIST_COLUMNS = frozenset({"findings", "flags"})

# Columns added to LIST_COLUMNS, with what they hold.
PARQUET_EXTRA_COLUMNS: Mapping[str, str] = {
    "image_width": "image width in pixels (null when the image is not stored)",
    "image_height": "image height in pixels",
    "image_format": "image file format (PNG, JPEG, ...)",
    "image_phash": "perceptual hash of the image (hex)",
    "geographic_mean": "severity: extent of lung involvement, 0-8 (mean of raters)",
    "opacity_mean": "severity: degree of opacity, 0-6 (mean of raters)",
    "has_lung_mask": "a lung mask of the image is stored",
    "has_lung_box": "lung bounding boxes of the image are stored",
    "image_path": "the stored image file, relative to the data directory "
    "(blobs/<sha256[:2]>/<sha256>; null when the image is not stored)",
}
PARQUET_COLUMNS: tuple[str, ...] = (*LIST_COLUMNS, *PARQUET_EXTRA_COLUMNS)


def _arrow_type(name: str) -> Any:
    import pyarrow as pa

    if name in _INT_COLUMNS:
        return pa.int64()
    if name in _FLOAT_COLUMNS:
        return pa.float64()
    if name in _BOOL_COLUMNS:
        return pa.bool_()
    if name in _LIST_COLUMNS:
        return pa.list_(pa.string())
    if name == "acquired_on":
        return pa.date32()
    return pa.string()


def parquet_schema(metadata: Mapping[str, str] | None = None) -> Any:
    """The Arrow schema of :func:`write_parquet` (``pyarrow.Schema``).

    Each field carries its description (and unit) as field metadata where the
    collection schema describes it.
    """
    import pyarrow as pa

    fields = []
    for name in PARQUET_COLUMNS:
        described: dict[str, str] = {}
        if name in BY_NAME:
            described["description"] = BY_NAME[name].description
            if BY_NAME[name].unit:
                described["unit"] = str(BY_NAME[name].unit)
        elif name in PARQUET_EXTRA_COLUMNS:
            described["description"] = PARQUET_EXTRA_COLUMNS[name]
        fields.append(pa.field(name, _arrow_type(name), nullable=True, metadata=described or None))
    return pa.schema(fields, metadata=dict(metadata) if metadata else None)


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


def parquet_rows(job: ExportJob) -> list[dict[str, Any]]:
    """The rows of :func:`write_parquet`: each record with its image and annotations."""
    shas = [row["image_sha256"] for row in job.rows if row["image_sha256"]]
    images = image_details(job.conn, shas)
    annotations = annotations_for(job.conn, shas)
    result = []
    for row in job.rows:
        sha = row["image_sha256"]
        image = images.get(sha, {}) if sha else {}
        notes = annotations.get(sha, []) if sha else []
        severity = [a for a in notes if a["kind"] == "severity"]
        extra = row["extra"]
        result.append(
            {
                **{name: row[name] for name in LIST_COLUMNS},
                "extra": None
                if extra is None
                else json.dumps(extra, ensure_ascii=False, sort_keys=True),
                "image_width": image.get("width"),
                "image_height": image.get("height"),
                "image_format": image.get("format"),
                "image_phash": image.get("phash"),
                # Several severity annotations (another annotator or source) are averaged.
                "geographic_mean": _mean(a["geographic_mean"] for a in severity),
                "opacity_mean": _mean(a["opacity_mean"] for a in severity),
                "has_lung_mask": any(a["kind"] == "lung_mask" for a in notes),
                "has_lung_box": any(a["kind"] == "lung_box" for a in notes),
                "image_path": blob_path(Path("blobs"), sha).as_posix() if image else None,
            }
        )
    return result


def write_parquet(job: ExportJob, path: Path) -> int:
    """Write the records as Parquet with real column types.

    Columns: every column of :data:`~covidcxr.store.queries.LIST_COLUMNS` (ints as
    int64, floats as float64, flags as nullable bool, ``acquired_on`` as date32,
    ``findings`` and ``flags`` as list<string>, ``extra`` as a JSON string), then
    :data:`PARQUET_EXTRA_COLUMNS`. The schema metadata holds ``covidcxr.version``,
    ``covidcxr.filter`` (the selection, JSON) and ``covidcxr.finding_vocabulary``
    (every finding node in label order, JSON).

    Returns:
        The number of rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = parquet_rows(job)
    schema = parquet_schema(
        {
            "covidcxr.version": __version__,
            "covidcxr.filter": json.dumps(
                to_dict(job.selection), ensure_ascii=False, sort_keys=True
            ),
            "covidcxr.finding_vocabulary": json.dumps(list(all_nodes()), ensure_ascii=False),
        }
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path))
    return int(table.num_rows)
