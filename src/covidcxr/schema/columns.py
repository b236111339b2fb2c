"""The metadata columns of the collection: names, types, units, ranges and aliases.

Every column has two names:

* ``name``: ours, snake_case with the unit in the name (``offset_days``,
  ``age_years``); identical in our CSV/JSON output and in the database;
* ``upstream``: the header of the upstream ``metadata.csv`` (``offset``, ``age``),
  used when reading the upstream layout and when exporting it.

The upstream ``SCHEMA.md`` names some columns differently from the CSV header
(``pO2 saturation``, ``wbc count``, ``clinical notes``); those spellings are
aliases. Header matching ignores case, spaces, hyphens and underscores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How a column's text is parsed (see :mod:`covidcxr.schema.values`)."""

    ID = "id"
    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    FLAG = "flag"  # Y / N / blank
    PCR = "pcr"  # Y / N / Unclear / blank
    SEX = "sex"
    VIEW = "view"
    MODALITY = "modality"
    FINDING = "finding"
    DATE = "date"
    PATH = "path"


@dataclass(frozen=True)
class Column:
    """One metadata column.

    Attributes:
        name: our snake_case name (with unit).
        upstream: the upstream CSV header.
        kind: how values are parsed.
        description: what the column holds, with its unit.
        unit: the unit of numeric values, if any.
        minimum: smallest plausible value (inclusive); outside is reported.
        maximum: largest plausible value (inclusive); outside is reported.
        aliases: other header spellings accepted on input.
        required: a row without a value is rejected.
    """

    name: str
    upstream: str
    kind: Kind
    description: str
    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    aliases: tuple[str, ...] = ()
    required: bool = False


# Upstream order of the newest metadata.csv (RT_PCR_positive appeared after June 2020).
COLUMNS: tuple[Column, ...] = (
    Column(
        "patient_id",
        "patientid",
        Kind.ID,
        "patient identifier within its source",
        aliases=("patient id", "patient"),
        required=True,
    ),
    Column(
        "offset_days",
        "offset",
        Kind.INT,
        "days since the start of symptoms or hospitalisation when the image was taken",
        unit="days",
        minimum=-3650,
        maximum=3650,
    ),
    Column("sex", "sex", Kind.SEX, "M, F or blank", aliases=("gender", "patient gender")),
    Column(
        "age_years",
        "age",
        Kind.FLOAT,
        "age in years at the time of the image",
        unit="years",
        minimum=0,
        maximum=120,
        aliases=("patient age",),
    ),
    Column(
        "finding",
        "finding",
        Kind.FINDING,
        "finding as given (flat legacy or hierarchical); parsed into tokens",
        aliases=("findings", "finding labels", "diagnosis"),
    ),
    Column(
        "rt_pcr_positive",
        "RT_PCR_positive",
        Kind.PCR,
        "RT-PCR test for SARS-CoV-2: Y, N, Unclear or blank",
    ),
    Column("survival", "survival", Kind.FLAG, "survived this illness: Y, N or blank"),
    Column(
        "intubated",
        "intubated",
        Kind.FLAG,
        "intubated or ventilated at any point during this illness",
    ),
    Column(
        "intubation_present",
        "intubation_present",
        Kind.FLAG,
        "an intubation is visible in this image",
    ),
    Column("went_icu", "went_icu", Kind.FLAG, "in ICU/CCU at any point during this illness"),
    Column("in_icu", "in_icu", Kind.FLAG, "in ICU when this image was taken"),
    Column(
        "needed_supplemental_o2",
        "needed_supplemental_O2",
        Kind.FLAG,
        "needed supplemental oxygen at any point during this illness",
    ),
    Column("extubated", "extubated", Kind.FLAG, "successfully extubated"),
    Column(
        "temperature_c",
        "temperature",
        Kind.FLOAT,
        "body temperature at the time of the image",
        unit="°C",
        minimum=25,
        maximum=45,
    ),
    Column(
        "po2_saturation_pct",
        "pO2_saturation",
        Kind.FLOAT,
        "oxygen saturation at the time of the image",
        unit="%",
        minimum=0,
        maximum=100,
        aliases=("pO2 saturation", "spo2", "o2 saturation"),
    ),
    Column(
        "leukocyte_count_k_per_ul",
        "leukocyte_count",
        Kind.FLOAT,
        "white blood cell count at the time of the image",
        unit="10^3/uL",
        minimum=0,
        maximum=1000,
        aliases=("wbc count", "wbc", "white blood cell count"),
    ),
    Column(
        "neutrophil_count_k_per_ul",
        "neutrophil_count",
        Kind.FLOAT,
        "neutrophil count at the time of the image",
        unit="10^3/uL",
        minimum=0,
        maximum=1000,
        aliases=("neutrophil count",),
    ),
    Column(
        "lymphocyte_count_k_per_ul",
        "lymphocyte_count",
        Kind.FLOAT,
        "lymphocyte count at the time of the image",
        unit="10^3/uL",
        minimum=0,
        maximum=1000,
        aliases=("lymphocyte count",),
    ),
    Column(
        "view",
        "view",
        Kind.VIEW,
        "PA, AP, AP Supine, AP Erect or L for X-rays; Axial or Coronal for CT",
        aliases=("view position", "projection"),
    ),
    Column("modality", "modality", Kind.MODALITY, "X-ray or CT"),
    Column(
        "date",
        "date",
        Kind.DATE,
        "acquisition date as given; parsed where possible",
        aliases=("study date",),
    ),
    Column("location", "location", Kind.TEXT, "hospital, city, state, country"),
    Column(
        "folder",
        "folder",
        Kind.PATH,
        "folder of the file below the source root",
        aliases=("directory",),
    ),
    Column(
        "filename",
        "filename",
        Kind.PATH,
        "image file name within its folder",
        aliases=("file", "file name", "imagename", "image name", "image index", "image"),
        required=True,
    ),
    Column("doi", "doi", Kind.TEXT, "DOI of the publication the image comes from"),
    Column("url", "url", Kind.TEXT, "URL of the paper or web page the image comes from"),
    Column(
        "license",
        "license",
        Kind.TEXT,
        "licence of the image; blank if unknown",
        aliases=("licence",),
    ),
    Column(
        "clinical_notes",
        "clinical_notes",
        Kind.TEXT,
        "clinical notes about the image or patient",
        aliases=("clinical notes",),
    ),
    Column(
        "other_notes",
        "other_notes",
        Kind.TEXT,
        "other notes, e.g. credit",
        aliases=("other notes",),
    ),
)

BY_NAME: Mapping[str, Column] = {c.name: c for c in COLUMNS}
BY_UPSTREAM: Mapping[str, Column] = {c.upstream: c for c in COLUMNS}
FLAG_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.kind is Kind.FLAG)
NUMERIC_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.kind in (Kind.INT, Kind.FLOAT)
)
# The June-2020 snapshot lacks RT_PCR_positive; everything else is in both.
JUNE_2020_UPSTREAM: tuple[str, ...] = tuple(
    c.upstream for c in COLUMNS if c.name != "rt_pcr_positive"
)

_FOLD = re.compile(r"[\s_\-]+")


def fold_header(header: str) -> str:
    """Return the comparison key of a header: lower case, no spaces/_/-."""
    return _FOLD.sub("", header.strip().lower())


_BY_FOLDED: dict[str, Column] = {}
for _column in COLUMNS:
    for _spelling in (_column.name, _column.upstream, *_column.aliases):
        _BY_FOLDED.setdefault(fold_header(_spelling), _column)


def column_for_header(header: str) -> Column | None:
    """Return the column a header names (any accepted spelling), or None."""
    return _BY_FOLDED.get(fold_header(header))


def match_headers(headers: Iterable[str]) -> dict[str, Column]:
    """Map each recognised header to its column.

    The first header that names a column wins; later ones naming the same column
    are left out (the caller reports them as duplicates).

    Args:
        headers: the header cells of a metadata file.

    Returns:
        header text -> column, for the headers that name a known column.
    """
    matched: dict[str, Column] = {}
    seen: set[str] = set()
    for header in headers:
        column = column_for_header(header)
        if column is None or column.name in seen:
            continue
        seen.add(column.name)
        matched[header] = column
    return matched
