"""Parsers for single metadata values: flags, sex, numbers with units, views, dates.

Every parser takes the raw text of one cell and returns ``(value, problem)``:
``value`` is the typed value or ``None`` when unknown, ``problem`` is ``None`` or a
:class:`ValueProblem` saying why the text was not accepted. A parser never guesses:
text it does not recognise becomes unknown and is reported; the raw text is kept
by the caller.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import PurePosixPath

from covidcxr.schema.columns import Column, Kind


class Severity(StrEnum):
    """How bad a problem is.

    ``error``: the row (or file) cannot be used and is rejected; ``warning``: a
    value is dropped or doubtful and the row is kept; ``info``: worth knowing.
    """

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Action(StrEnum):
    """What was done about a problem (stored in reports)."""

    ROW_SKIPPED = "row_skipped"
    VALUE_BLANKED = "value_blanked"
    KEPT = "kept"
    IMAGE_MISSING = "image_missing"
    IMAGE_REJECTED = "image_rejected"
    FILE_SKIPPED = "file_skipped"
    ANNOTATION_SKIPPED = "annotation_skipped"


@dataclass(frozen=True)
class ValueProblem:
    """Why a value was not accepted as given."""

    code: str
    message: str
    severity: Severity = Severity.WARNING


# Problem codes after which the value is stored as blank.
BLANKING_CODES = frozenset({"unknown_marker", "unrecognised_value", "out_of_range", "not_whole"})

# Text that means "nobody knows": treated as blank but reported, since upstream
# rows use it for values that were never checked.
# "Not visible" and "Would have been stated" are upstream notes meaning "could not
# be judged from the source".
_UNKNOWN_MARKERS = frozenset(
    {
        "?",
        "unknown",
        "n/a",
        "na",
        "nan",
        "none",
        "-",
        "not visible",
        "would have been stated",
        "unclear",
    }
)

_FLAG_TEXT = {
    "y": True,
    "yes": True,
    "true": True,
    "1": True,
    "n": False,
    "no": False,
    "false": False,
    "0": False,
}


def _unknown(raw: str, what: str, accepted: str) -> ValueProblem:
    text = raw.strip()
    if text.lower() in _UNKNOWN_MARKERS:
        return ValueProblem("unknown_marker", f"{text!r} means unknown; stored as blank")
    return ValueProblem(
        "unrecognised_value", f"{text!r} is not a {what}; accepted: {accepted}; stored as blank"
    )


def parse_flag(raw: str) -> tuple[bool | None, ValueProblem | None]:
    """Parse a Y/N/blank flag (also yes/no/true/false/1/0, any case)."""
    text = raw.strip()
    if not text:
        return None, None
    value = _FLAG_TEXT.get(text.lower())
    if value is None:
        return None, _unknown(raw, "Y/N flag", "Y, N or blank")
    return value, None


PCR_VALUES = ("Y", "N", "Unclear")


def parse_pcr(raw: str) -> tuple[str | None, ValueProblem | None]:
    """Parse ``RT_PCR_positive``: Y, N, Unclear or blank."""
    text = raw.strip()
    if not text:
        return None, None
    if text.lower() == "unclear":
        return "Unclear", None
    flag, _ = parse_flag(text)
    if flag is None:
        return None, _unknown(raw, "RT-PCR result", "Y, N, Unclear or blank")
    return ("Y" if flag else "N"), None


_SEX_TEXT = {"m": "M", "male": "M", "f": "F", "female": "F"}


def parse_sex(raw: str) -> tuple[str | None, ValueProblem | None]:
    """Parse sex: M, F (also male/female, any case) or blank."""
    text = raw.strip()
    if not text:
        return None, None
    value = _SEX_TEXT.get(text.lower())
    if value is None:
        return None, _unknown(raw, "sex", "M, F or blank")
    return value, None


# DICOM age strings (nnnD/W/M/Y), e.g. NIH exports write "058Y".
_DICOM_AGE = re.compile(r"^(\d{1,3})\s*([DWMY])$", re.IGNORECASE)
_DICOM_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_number(raw: str, column: Column) -> tuple[float | int | None, ValueProblem | None]:
    """Parse a number of ``column``'s unit and check its plausible range.

    ``INT`` columns accept whole numbers only (``5.0`` is read as 5). Age also
    accepts DICOM age strings (``058Y``, ``6M``).
    """
    text = raw.strip()
    if not text:
        return None, None
    number: float
    try:
        number = float(text)
    except ValueError:
        match = _DICOM_AGE.match(text) if column.name == "age_years" else None
        if match is None:
            return None, _unknown(raw, f"number ({column.unit})", "a plain number")
        number = int(match.group(1)) * _DICOM_AGE_UNIT_YEARS[match.group(2).upper()]
        number = round(number, 3)
    if number != number or number in (float("inf"), float("-inf")):
        return None, _unknown(raw, f"number ({column.unit})", "a finite number")
    if (column.minimum is not None and number < column.minimum) or (
        column.maximum is not None and number > column.maximum
    ):
        hint = ""
        if column.name == "temperature_c" and 86 <= number <= 113:
            hint = " (Fahrenheit?)"
        elif column.name == "po2_saturation_pct" and number > 100:
            hint = " (a partial pressure in mmHg rather than a saturation?)"
        return None, ValueProblem(
            "out_of_range",
            f"{text} {column.unit} is outside the plausible range "
            f"{column.minimum:g}..{column.maximum:g} {column.unit}{hint}; stored as blank",
        )
    if column.kind is Kind.INT:
        if number != int(number):
            return None, ValueProblem(
                "not_whole", f"{text} is not a whole number of {column.unit}; stored as blank"
            )
        return int(number), None
    return number, None


VIEWS = ("PA", "AP", "AP Supine", "AP Erect", "L", "Axial", "Coronal")
X_RAY_VIEWS = frozenset({"PA", "AP", "AP Supine", "AP Erect", "L"})
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP Supine", "AP Erect"})
CT_VIEWS = frozenset({"Axial", "Coronal"})

_VIEW_TEXT = {
    "pa": "PA",
    "posteroanterior": "PA",
    "ap": "AP",
    "anteroposterior": "AP",
    "apsupine": "AP Supine",
    "aps": "AP Supine",
    "supine": "AP Supine",
    # SCHEMA.md: "Bettaufnahme->Supine, Liegend->Supine"
    "bettaufnahme": "AP Supine",
    "liegend": "AP Supine",
    "aperect": "AP Erect",
    "erect": "AP Erect",
    "l": "L",
    "lateral": "L",
    "lat": "L",
    "ll": "L",
    "axial": "Axial",
    "coronal": "Coronal",
}


def parse_view(raw: str) -> tuple[str | None, ValueProblem | None]:
    """Normalise a view: ``AP supine``/``APS``/``Liegend`` -> ``AP Supine``, etc."""
    text = raw.strip()
    if not text:
        return None, None
    value = _VIEW_TEXT.get(re.sub(r"[\s_\-.]+", "", text.lower()))
    if value is None:
        return None, _unknown(raw, "view", ", ".join(VIEWS))
    return value, None


MODALITIES = ("X-ray", "CT")
_MODALITY_TEXT = {
    "xray": "X-ray",
    "cxr": "X-ray",
    "cr": "X-ray",
    "dx": "X-ray",
    "radiograph": "X-ray",
    "ct": "CT",
}


def parse_modality(raw: str) -> tuple[str | None, ValueProblem | None]:
    """Normalise a modality: ``X-Ray``/``xray``/``CR``/``DX`` -> ``X-ray``; ``CT``."""
    text = raw.strip()
    if not text:
        return None, None
    value = _MODALITY_TEXT.get(re.sub(r"[\s_\-]+", "", text.lower()))
    if value is None:
        return None, _unknown(raw, "modality", ", ".join(MODALITIES))
    return value, None


def view_modality_problem(view: str | None, modality: str | None) -> ValueProblem | None:
    """Report a view that cannot belong to the modality (``Axial`` on an X-ray)."""
    if view is None or modality is None:
        return None
    if (modality == "X-ray" and view in CT_VIEWS) or (modality == "CT" and view in X_RAY_VIEWS):
        return ValueProblem(
            "view_modality_mismatch", f"view {view!r} does not belong to modality {modality!r}"
        )
    return None


@dataclass(frozen=True)
class ParsedDate:
    """A date as far as it is known: ``iso`` is set only for a full day."""

    iso: str | None
    year: int | None


_DATE_FORMATS = (
    "%B %d, %Y",
    "%b %d, %Y",
    "%B %d %Y",
    "%b %d %Y",
    "%Y-%m-%d",
    "%d %B %Y",
    "%d %b %Y",
    "%B %Y",
    "%b %Y",
)
_SLASHED = re.compile(r"^(\d{1,2})[/.](\d{1,2})[/.](\d{4}|\d{2})$")


def parse_date(raw: str) -> tuple[ParsedDate, ValueProblem | None]:
    """Parse an acquisition date as far as the text allows.

    ``January 22, 2020`` and ``2020-01-22`` give a full date; ``2020`` and
    ``March 2020`` give only the year; ``3/4/2020`` (month and day could be
    swapped) gives the year and an ``ambiguous_date`` info; ``3/3/2020`` and
    ``03/16/20`` are not ambiguous (two-digit years are read as 20xx).
    """
    text = raw.strip()
    if not text:
        return ParsedDate(None, None), None
    if re.fullmatch(r"\d{4}", text):
        return ParsedDate(None, int(text)), None
    for fmt in _DATE_FORMATS:
        try:
            parsed = dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
        if "%d" not in fmt:
            return ParsedDate(None, parsed.year), None
        return ParsedDate(parsed.isoformat(), parsed.year), None
    slashed = _SLASHED.match(text)
    if slashed:
        first, second, year = (int(g) for g in slashed.groups())
        if year < 100:  # two-digit years: the collection starts in the 2000s
            year += 2000
        candidates = set()
        for month, day in ((first, second), (second, first)):
            with contextlib.suppress(ValueError):
                candidates.add(dt.date(year, month, day))
        if len(candidates) == 1:
            return ParsedDate(candidates.pop().isoformat(), year), None
        if candidates:
            return ParsedDate(None, year), ValueProblem(
                "ambiguous_date",
                f"{text!r}: day and month could be swapped; only the year is kept",
                Severity.INFO,
            )
    return ParsedDate(None, None), ValueProblem(
        "unparsed_date", f"{text!r} is not a date this tool reads; kept as text", Severity.INFO
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_relative_path(
    raw: str, what: str = "file name"
) -> tuple[str | None, ValueProblem | None]:
    """Accept a relative path that stays inside its root; reject anything else.

    Rejected (as errors, so the row is skipped): absolute paths, ``..``
    components (path traversal such as ``../../x``), backslashes, drive letters,
    control characters. ``what`` names the field in messages.
    """
    text = raw.strip()
    if not text:
        return None, None
    reason = None
    if _CONTROL.search(text):
        reason = "contains control characters"
    elif "\\" in text:
        reason = "contains a backslash"
    elif text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        reason = "is an absolute path"
    elif any(part == ".." for part in PurePosixPath(text).parts):
        reason = "climbs out of its folder with '..' (path traversal)"
    if reason is not None:
        return None, ValueProblem("unsafe_path", f"{what} {text!r} {reason}", Severity.ERROR)
    normalised = str(PurePosixPath(text))
    return (None if normalised == "." else normalised), None


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def looks_like_formula(text: str) -> bool:
    """True if a spreadsheet would evaluate this cell text as a formula."""
    return text.startswith(FORMULA_PREFIXES)


def escape_formula(text: str) -> str:
    """Prefix text a spreadsheet would evaluate (``=cmd()``) with a quote."""
    return "'" + text if looks_like_formula(text) else text


def unescape_formula(text: str) -> str:
    """The inverse of :func:`escape_formula`: ``'=1+1`` reads back as ``=1+1``.

    Ingest applies it to every text cell, so that a table covidcxr exported reads back
    with the values that went in. A cell that really starts with a quote followed by
    ``=``, ``+``, ``-`` or ``@`` therefore loses that quote (documented in the README).
    """
    return text[1:] if text.startswith("'") and looks_like_formula(text[1:]) else text


def format_number(value: float) -> str:
    """The shortest plain text that reads back as ``value``.

    Whole numbers lose their fraction (``65.0`` -> ``65``); other floats use the
    shortest digits that round-trip (``0.762``), never an exponent
    (``1e-05`` -> ``0.00001``).
    """
    if isinstance(value, int):
        return str(value)
    if value.is_integer():
        return str(int(value))
    text = repr(value)
    if "e" in text:
        text = format(Decimal(text), "f")
    return text
