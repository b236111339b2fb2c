"""Reading a site's reference labels and another tool's predictions for validation.

``labels.csv`` needs a file name and a reference label per image; optional columns
give severity scores, patient id, age, sex, view, site and acquisition date. Headers
are found by our name, the collection's upstream name or an alias (as in ingest), or
named with a mapping file's ``[columns]`` / ``--column ours=theirs``; values of
``sex``, ``view`` and ``finding`` go through the mapping's ``[values]``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from covidcxr.errors import MetadataError
from covidcxr.ingest.mapping import SourceMapping
from covidcxr.schema.columns import column_for_header
from covidcxr.schema.findings import parse_finding
from covidcxr.schema.values import parse_date, parse_sex, parse_view

#: Our column names in a labels file, with the other headers accepted for each.
LABEL_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "filename": ("file", "image", "imagename", "image_name", "image index"),
    "finding": ("label", "reference", "diagnosis", "covid", "covid19", "covid-19"),
    "patient_id": ("patientid", "patient", "patient id"),
    "age_years": ("age", "patient age"),
    "sex": ("gender", "patient gender"),
    "view": ("view position", "projection"),
    "site": ("location", "hospital", "centre", "center"),
    "acquired_on": ("date", "acquisition_date", "study_date"),
    "geographic_extent": ("geographic_mean", "geographic"),
    "opacity": ("opacity_mean",),
}
_POSITIVE: Final = frozenset({"1", "y", "yes", "true", "positive", "pos", "covid-19 positive"})
_NEGATIVE: Final = frozenset({"0", "n", "no", "false", "negative", "neg", "covid-19 negative"})
#: The label a yes/no reference column speaks about.
BINARY_LABEL: Final = "COVID-19"


@dataclass(frozen=True)
class Case:
    """One labelled image of the local set.

    Attributes:
        filename: the file name as written in the labels file (relative to the images).
        line: the labels file's line.
        labels: model label -> 1.0, 0.0 or ``nan`` (unknown from this reference).
        reference: the reference label as written.
        patient_id: the patient (the file name when not given).
        age_years: age, or ``None``.
        sex: ``M``/``F`` or ``None``.
        view: the view (``PA``, ``AP``...) or ``None``.
        site: the site or ``None``.
        acquired_on: the acquisition date (ISO) or ``None``.
        severity: severity output -> the reference score, when given.
    """

    filename: str
    line: int
    labels: Mapping[str, float]
    reference: str
    patient_id: str
    age_years: float | None = None
    sex: str | None = None
    view: str | None = None
    site: str | None = None
    acquired_on: str | None = None
    severity: Mapping[str, float] | None = None


def _fold(text: str) -> str:
    return " ".join(text.strip().casefold().replace("_", " ").split())


def find_columns(
    headers: Sequence[str], path: Path, chosen: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Our column -> the header that holds it.

    Raises:
        MetadataError: a chosen header is absent, or no file or label column is found.
    """
    columns: dict[str, str] = {}
    for ours, theirs in (chosen or {}).items():
        if theirs not in headers:
            raise MetadataError(
                f"validate-model: {path}: column {theirs!r} (given for {ours}) is not in the "
                f"header {list(headers)}"
            )
        columns[ours] = theirs
    for header in headers:
        folded = _fold(header)
        schema = column_for_header(header)
        for ours, aliases in LABEL_COLUMNS.items():
            names = {_fold(ours), *map(_fold, aliases)}
            if ours not in columns and (folded in names or (schema and schema.name == ours)):
                columns[ours] = header
    for needed in ("filename", "finding"):
        if needed not in columns:
            raise MetadataError(
                f"validate-model: {path}: no {needed} column among {list(headers)}; name it "
                f"with --column {needed}=HEADER or a mapping file's [columns]"
            )
    return columns


def reference_labels(
    text: str, definitions: Mapping[str, Mapping[str, Sequence[str]]], mapping: SourceMapping
) -> dict[str, float] | None:
    """Model label -> 1/0/nan from a reference label; ``None`` when it cannot be read.

    ``positive``/``negative`` (and 1/0, yes/no) speak about COVID-19 only; a finding
    name or path of the hierarchy gives every label its definition's value.
    """
    from covidcxr.dataset.tasks import LabelDefinition

    folded = text.strip().casefold()
    if folded in _POSITIVE or folded in _NEGATIVE:
        value = 1.0 if folded in _POSITIVE else 0.0
        return {name: value if name == BINARY_LABEL else math.nan for name in definitions}
    parsed = parse_finding(text, value_map=mapping.finding_map)
    if parsed.status != "ok":
        return None
    paths = ["/".join(f.path) for f in parsed.findings]
    return {
        name: LabelDefinition(
            name, tuple(spec.get("include", ())), tuple(spec.get("exclude", ()))
        ).value(paths)
        for name, spec in definitions.items()
    }


def _number(text: str, path: Path, line: int, column: str) -> float | None:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise MetadataError(
            f"validate-model: {path} line {line}: {column} = {text!r} is not a number; "
            "write a number or leave it blank"
        ) from None


def _mapped(value: str, column: str, mapping: SourceMapping) -> str:
    table = {k.strip().casefold(): v for k, v in mapping.values.get(column, {}).items()}
    return table.get(value.strip().casefold(), value)


def _case(
    row: Mapping[str, str],
    columns: Mapping[str, str],
    definitions: Mapping[str, Mapping[str, Sequence[str]]],
    mapping: SourceMapping,
    where: tuple[Path, int],
) -> Case:
    path, line = where

    def cell(name: str) -> str:
        return (row.get(columns[name]) or "").strip() if name in columns else ""

    reference = _mapped(cell("finding"), "finding", mapping)
    labels = reference_labels(reference, definitions, mapping)
    if labels is None:
        raise MetadataError(
            f"validate-model: {path} line {line}: reference label {reference!r} is neither "
            "positive/negative nor a finding of the hierarchy (e.g. COVID-19, No Finding, "
            "Pneumonia/Bacterial); map it with a mapping file's [values.finding]"
        )
    sex = parse_sex(_mapped(cell("sex"), "sex", mapping))[0] if cell("sex") else None
    view = parse_view(_mapped(cell("view"), "view", mapping))[0] if cell("view") else None
    date = parse_date(cell("acquired_on"))[0] if cell("acquired_on") else None
    severity = {
        name: value
        for name in ("geographic_extent", "opacity")
        if (value := _number(cell(name), path, line, name)) is not None
    }
    return Case(
        filename=cell("filename"),
        line=line,
        labels=labels,
        reference=reference,
        patient_id=cell("patient_id") or cell("filename"),
        age_years=_number(cell("age_years"), path, line, "age_years"),
        sex=sex,
        view=view,
        site=cell("site") or None,
        acquired_on=None if date is None else date.iso,
        severity=severity or None,
    )


def read_labels(
    path: str | os.PathLike[str],
    definitions: Mapping[str, Mapping[str, Sequence[str]]],
    *,
    mapping: SourceMapping | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[Case]:
    """The cases of a labels file.

    Args:
        path: the CSV.
        definitions: the model's label definitions (``include``/``exclude`` nodes).
        mapping: a mapping file's columns and value maps.
        columns: ``--column`` choices, our name -> header (win over the mapping).

    Raises:
        MetadataError: unreadable file, missing columns, an unreadable label or number,
            or a file named twice (the message names the file and lines).
    """
    mapping = mapping or SourceMapping()
    file = Path(path)
    chosen = {**mapping.columns, **(columns or {})}
    if "patientid" in chosen:
        chosen["patient_id"] = chosen.pop("patientid")
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=mapping.delimiter)
            found = find_columns(reader.fieldnames or [], file, chosen)
            cases = [
                _case(row, found, definitions, mapping, (file, line))
                for line, row in enumerate(reader, start=2)
            ]
    except OSError as exc:
        raise MetadataError(f"validate-model: cannot read {file}: {exc.strerror}") from exc
    seen: dict[str, int] = {}
    for case in cases:
        if case.filename in seen:
            raise MetadataError(
                f"validate-model: {file}: {case.filename!r} is labelled on lines "
                f"{seen[case.filename]} and {case.line}; keep one row per image"
            )
        seen[case.filename] = case.line
    return cases


def read_predictions(
    path: str | os.PathLike[str], labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """File name -> label -> probability, from another tool's CSV.

    The CSV has a file column (``file``, ``filename``...) and one probability column
    per label (``p_<label>`` or ``<label>``); a single ``probability`` column is
    COVID-19's.

    Raises:
        MetadataError: no file column, no probability column, or a value outside [0, 1].
    """
    file = Path(path)
    with file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        headers = reader.fieldnames or []
        name = next((h for h in headers if _fold(h) in ("file", "filename", "image")), None)
        wanted = {
            label: next(
                (h for h in headers if _fold(h) in (_fold(label), _fold(f"p_{label}"))), None
            )
            for label in labels
        }
        if wanted.get(BINARY_LABEL) is None:
            wanted[BINARY_LABEL] = next((h for h in headers if _fold(h) == "probability"), None)
        found = {label: header for label, header in wanted.items() if header}
        if name is None or not found:
            raise MetadataError(
                f"validate-model: {file}: needs a file column and a probability column per "
                f"label (p_<label> or <label>, e.g. p_COVID-19, or 'probability'); header is "
                f"{headers}"
            )
        result: dict[str, dict[str, float]] = {}
        for line, row in enumerate(reader, start=2):
            probs = {}
            for label, header in found.items():
                value = _number(row.get(header) or "", file, line, header)
                if value is not None and not 0.0 <= value <= 1.0:
                    raise MetadataError(
                        f"validate-model: {file} line {line}: {header} = {value} is not a "
                        "probability in [0, 1]"
                    )
                if value is not None:
                    probs[label] = value
            result[(row.get(name) or "").strip()] = probs
    return result
