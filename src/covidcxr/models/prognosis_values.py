"""Clinical values and outcomes for the prognosis models: the command-line options, the
plausible ranges, and reading them from arguments, a mapping or a CSV row."""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from covidcxr.errors import MetadataError
from covidcxr.models.prognosis_cohort import CLINICAL_FEATURES, OUTCOMES
from covidcxr.schema.columns import BY_NAME, column_for_header, fold_header
from covidcxr.schema.values import parse_flag, parse_sex

#: Value options: option -> input name (the store's column names); ``--sex`` apart.
CLINICAL_OPTIONS: Final = {
    "age": "age_years",
    "temperature": "temperature_c",
    "spo2": "po2_saturation_pct",
    "wbc": "leukocyte_count_k_per_ul",
    "neutrophils": "neutrophil_count_k_per_ul",
    "lymphocytes": "lymphocyte_count_k_per_ul",
}
#: Headers of a values file's image column (compared case-, space- and ``_``-blind).
FILE_HEADERS: Final = ("file", "filename", "image", "image_file")

Values = dict[str, float | None]


def add_value_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--age --sex --temperature --spo2 --wbc --neutrophils --lymphocytes``."""
    for option, name in CLINICAL_OPTIONS.items():
        column = BY_NAME[name]
        parser.add_argument(
            f"--{option}",
            type=float,
            metavar="X",
            help=f"{column.description} ({column.unit})".replace("%", "%%"),
        )
    parser.add_argument("--sex", help="M or F")


def checked(name: str, value: float | None, where: str, command: str) -> float | None:
    """``value`` if it is within the column's plausible range (``None`` stays ``None``).

    Raises:
        MetadataError: naming ``command``, ``where``, the input and its range.
    """
    column = BY_NAME[name]
    if value is None:
        return None
    low, high = column.minimum, column.maximum
    if (
        not math.isfinite(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise MetadataError(
            f"{command}: {where} {name} {value:g} is outside {low:g}..{high:g} "
            f"{column.unit or ''}; give {column.description}"
        )
    return value


def sex_male(text: str | None, where: str, command: str) -> float | None:
    """1.0 for M, 0.0 for F, ``None`` for blank.

    Raises:
        MetadataError: any other text.
    """
    if text is None or not text.strip():
        return None
    sex, _ = parse_sex(text)
    if sex is None:
        raise MetadataError(f"{command}: {where} sex {text!r}: give M or F")
    return float(sex == "M")


def values_from_args(args: argparse.Namespace, command: str) -> Values:
    """The checked values of :func:`add_value_options` (``None`` where not given)."""
    values: Values = {
        name: checked(name, getattr(args, option), f"--{option}", command)
        for option, name in CLINICAL_OPTIONS.items()
    }
    values["sex_male"] = sex_male(args.sex, "--sex", command)
    return values


def check_values(values: Mapping[str, float | None], where: str, command: str) -> Values:
    """Inputs named by :data:`CLINICAL_FEATURES`, range-checked (``sex_male`` is 0 or 1).

    Raises:
        MetadataError: an unknown name or a value outside its plausible range.
    """
    unknown = sorted(set(values) - set(CLINICAL_FEATURES))
    if unknown:
        raise MetadataError(
            f"{command}: {where}: unknown input(s) {unknown}; the clinical inputs are "
            f"{list(CLINICAL_FEATURES)}"
        )
    out: Values = {}
    for name, value in values.items():
        number = None if value is None else float(value)
        if name == "sex_male":
            if number is not None and number not in (0.0, 1.0):
                raise MetadataError(f"{command}: {where} sex_male {value!r}: give 1 (M) or 0 (F)")
            out[name] = number
        else:
            out[name] = checked(name, number, where, command)
    return out


def has_clinical(values: Mapping[str, float | None]) -> bool:
    """Whether any clinical input has a value."""
    return any(
        values.get(name) is not None and math.isfinite(float(values[name]))  # type: ignore[arg-type]
        for name in CLINICAL_FEATURES
    )


def row_values(row: Mapping[str, str | None], where: str, command: str) -> Values:
    """The clinical values of one CSV row; headers by our name, upstream name or alias.

    Raises:
        MetadataError: naming ``where``, the field and why (not a number, out of range,
            not M/F).
    """
    values: Values = {}
    for header, text in row.items():
        column = column_for_header(header or "")
        cell = (text or "").strip()
        if column is None:
            continue
        if column.name == "sex":
            values["sex_male"] = sex_male(cell, where, command)
        elif column.name in CLINICAL_OPTIONS.values() and cell:
            try:
                number = float(cell)
            except ValueError:
                raise MetadataError(
                    f"{command}: {where} {column.name} {cell!r} is not a number; write a "
                    "number or leave it blank"
                ) from None
            values[column.name] = checked(column.name, number, where, command)
    return values


def value_headers(headers: Sequence[str]) -> list[str]:
    """The headers that hold a clinical value."""
    wanted = {*CLINICAL_OPTIONS.values(), "sex"}
    return [h for h in headers if (c := column_for_header(h)) is not None and c.name in wanted]


def file_header(headers: Sequence[str]) -> str | None:
    """The image-file column of a values file, if any."""
    names = {fold_header(h) for h in FILE_HEADERS}
    return next((h for h in headers if fold_header(h) in names), None)


def read_values_file(path: str | Path, command: str) -> list[tuple[int, str, Values]]:
    """``(line, file name, values)`` per row of a CSV with an image-file column and
    clinical value columns (other columns are ignored).

    Raises:
        MetadataError: unreadable file, no file or value column, a blank or repeated
            file name, or a bad value (naming the file, line, field and why).
    """
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            headers = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MetadataError(f"{command}: cannot read {str(path)!r}: {exc}") from None
    name_column = file_header(headers)
    if name_column is None or not value_headers(headers):
        raise MetadataError(
            f"{command}: {path}: needs a file column ({', '.join(FILE_HEADERS)}) and at least "
            f"one clinical column (age_years, sex, temperature_c, po2_saturation_pct, the "
            f"counts, or their upstream names); the header is {headers}"
        )
    found: list[tuple[int, str, Values]] = []
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        name = (row.get(name_column) or "").strip()
        if not name:
            raise MetadataError(f"{command}: {path} line {line}: {name_column} is blank")
        if name in first_line:
            raise MetadataError(
                f"{command}: {path} line {line}: {name!r} is also on line {first_line[name]}; "
                "keep one row per image"
            )
        first_line[name] = line
        where = f"{path} line {line}:"
        values = row_values({h: row.get(h) for h in headers if h != name_column}, where, command)
        found.append((line, name, values))
    return found


def outcome_columns(headers: Sequence[str]) -> dict[str, str]:
    """Outcome name (``survival``, ``icu``, ``intubation``) -> the header holding it."""
    by_field = {outcome.field: name for name, outcome in OUTCOMES.items()}
    found: dict[str, str] = {}
    for header in headers:
        column = column_for_header(header)
        if column is not None and column.name in by_field:
            found.setdefault(by_field[column.name], header)
    return found


def outcome_events(
    row: Mapping[str, str | None], columns: Mapping[str, str], where: str
) -> dict[str, int | None]:
    """Outcome name -> 1 (the event: died, ICU, intubated), 0, or ``None`` (blank).

    Raises:
        MetadataError: a value that is not Y/N (naming ``where`` and the field).
    """
    events: dict[str, int | None] = {}
    for name, header in columns.items():
        text = (row.get(header) or "").strip()
        flag, problem = parse_flag(text)
        if problem is not None:
            raise MetadataError(
                f"validate-model: {where} {header} {text!r} is not Y/N; write Y, N or leave it "
                "blank"
            )
        events[name] = None if flag is None else int(flag == OUTCOMES[name].event_value)
    return events
