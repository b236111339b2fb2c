"""A metadata row parsed into typed values: :class:`MetadataRecord`.

:func:`parse_record` is the single place where a row's text becomes typed values;
ingest, ``check`` and the mapping of other sources all go through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from covidcxr.schema import values as v
from covidcxr.schema.columns import BY_NAME, COLUMNS, Kind
from covidcxr.schema.findings import Finding, parse_finding

PEDIATRIC_AGE_YEARS = 18


@dataclass(frozen=True)
class FieldProblem:
    """A problem with one field of one row."""

    column: str
    value: str
    code: str
    message: str
    severity: v.Severity
    action: v.Action


@dataclass
class MetadataRecord:
    """One metadata row with typed values (``None`` = unknown).

    Field names are the ``name`` of :data:`covidcxr.schema.columns.COLUMNS`;
    ``finding`` and ``date`` keep the text as given, next to their parsed forms.
    """

    patient_id: str
    filename: str
    folder: str | None = None
    offset_days: int | None = None
    sex: str | None = None
    age_years: float | None = None
    finding: str | None = None
    findings: tuple[Finding, ...] = ()
    finding_status: str = "missing"
    rt_pcr_positive: str | None = None
    survival: bool | None = None
    intubated: bool | None = None
    intubation_present: bool | None = None
    went_icu: bool | None = None
    in_icu: bool | None = None
    needed_supplemental_o2: bool | None = None
    extubated: bool | None = None
    temperature_c: float | None = None
    po2_saturation_pct: float | None = None
    leukocyte_count_k_per_ul: float | None = None
    neutrophil_count_k_per_ul: float | None = None
    lymphocyte_count_k_per_ul: float | None = None
    view: str | None = None
    modality: str | None = None
    date: str | None = None
    acquired_on: str | None = None
    acquired_year: int | None = None
    location: str | None = None
    doi: str | None = None
    url: str | None = None
    license: str | None = None
    clinical_notes: str | None = None
    other_notes: str | None = None
    flags: set[str] = field(default_factory=set)

    @property
    def relative_path(self) -> str:
        """The image path below the source root (``folder/filename``)."""
        return f"{self.folder}/{self.filename}" if self.folder else self.filename

    @property
    def is_pediatric(self) -> bool:
        """True when the age is known and under 18 years."""
        return self.age_years is not None and self.age_years < PEDIATRIC_AGE_YEARS

    def typed_values(self) -> dict[str, Any]:
        """Return column name -> typed value for every schema column."""
        return {c.name: getattr(self, c.name) for c in COLUMNS}


@dataclass(frozen=True)
class RowParse:
    """The result of :func:`parse_record`: a record, or None when rejected."""

    record: MetadataRecord | None
    problems: tuple[FieldProblem, ...]


def _clean_text(raw: str) -> str | None:
    text = v.unescape_formula(raw.strip())
    return text or None


def parse_record(
    cells: Mapping[str, str],
    *,
    finding_separator: str | None = None,
    finding_map: Mapping[str, str] | None = None,
    default_folder: str | None = None,
) -> RowParse:
    """Parse one row given as column name -> raw text.

    Missing columns count as blank. A row is rejected (``record`` is None) when a
    required value is blank or a path is unsafe; other problems blank the value
    and keep the row.

    Args:
        cells: our column names (see :data:`COLUMNS`) mapped to the cell text.
        finding_separator: separator of flat finding lists (``|`` for NIH).
        finding_map: source-specific finding token -> vocabulary name.
        default_folder: folder used when the row names none.
    """
    problems: list[FieldProblem] = []
    parsed: dict[str, Any] = {}
    rejected = False

    def report(column: str, raw: str, problem: v.ValueProblem | None) -> None:
        if problem is None:
            return
        if problem.severity is v.Severity.ERROR:
            action = v.Action.ROW_SKIPPED
        elif problem.code in v.BLANKING_CODES:
            action = v.Action.VALUE_BLANKED
        else:
            action = v.Action.KEPT
        problems.append(
            FieldProblem(column, raw, problem.code, problem.message, problem.severity, action)
        )

    for column in COLUMNS:
        raw = cells.get(column.name, "")
        if column.required and not raw.strip():
            problems.append(
                FieldProblem(
                    column.name,
                    raw,
                    "required_missing",
                    f"{column.upstream} is required",
                    v.Severity.ERROR,
                    v.Action.ROW_SKIPPED,
                )
            )
            rejected = True
            continue
        value: Any
        problem: v.ValueProblem | None = None
        match column.kind:
            case Kind.ID | Kind.TEXT:
                value = _clean_text(raw)
            case Kind.INT | Kind.FLOAT:
                value, problem = v.parse_number(raw, column)
            case Kind.FLAG:
                value, problem = v.parse_flag(raw)
            case Kind.PCR:
                value, problem = v.parse_pcr(raw)
            case Kind.SEX:
                value, problem = v.parse_sex(raw)
            case Kind.VIEW:
                value, problem = v.parse_view(raw)
            case Kind.MODALITY:
                value, problem = v.parse_modality(raw)
            case Kind.DATE:
                value = _clean_text(raw)
                date, problem = v.parse_date(raw)
                parsed["acquired_on"] = date.iso
                parsed["acquired_year"] = date.year
            case Kind.FINDING:
                value = _clean_text(raw)
                finding = parse_finding(raw, separator=finding_separator, value_map=finding_map)
                parsed["findings"] = finding.findings
                parsed["finding_status"] = finding.status
                # The finding text is kept as given whatever its problems; the
                # tokens that resolved are kept too.
                problems.extend(
                    FieldProblem("finding", raw, fp.code, fp.message, fp.severity, v.Action.KEPT)
                    for fp in finding.problems
                )
            case Kind.PATH:
                value, problem = v.check_relative_path(raw, column.upstream)
                if problem is not None:
                    rejected = True
        report(column.name, raw, problem)
        parsed[column.name] = value

    mismatch = v.view_modality_problem(parsed.get("view"), parsed.get("modality"))
    if mismatch is not None:
        report("view", cells.get("view", ""), mismatch)
    if rejected:
        return RowParse(None, tuple(problems))
    if parsed.get("folder") is None:
        parsed["folder"] = default_folder
    record = MetadataRecord(**parsed)
    if record.is_pediatric:
        record.flags.add("pediatric")
        problems.append(
            FieldProblem(
                "age_years",
                cells.get("age_years", ""),
                "pediatric",
                f"patient is {record.age_years:g} years old (under "
                f"{PEDIATRIC_AGE_YEARS}): children as controls bias models",
                v.Severity.INFO,
                v.Action.KEPT,
            )
        )
    if any(p.severity is v.Severity.WARNING for p in problems):
        record.flags.add("has_warnings")
    return RowParse(record, tuple(problems))


def column_description(name: str) -> str:
    """Return ``name``'s description with its unit (for help texts and cards)."""
    column = BY_NAME[name]
    return f"{column.description} [{column.unit}]" if column.unit else column.description
