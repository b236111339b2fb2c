"""Value parsers, the column table and record parsing."""

from __future__ import annotations

import pytest

from covidcxr.schema import values as v
from covidcxr.schema.columns import BY_NAME, COLUMNS, JUNE_2020_UPSTREAM, column_for_header
from covidcxr.schema.record import parse_record


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Y", True), ("n", False), ("Yes", True), (" N ", False), ("", None), ("  ", None)],
)
def test_flags(raw: str, expected: bool | None) -> None:
    assert v.parse_flag(raw) == (expected, None)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("?", "unknown_marker"),
        ("Not visible", "unknown_marker"),
        ("Would have been stated", "unknown_marker"),
        ("maybe", "unrecognised_value"),
    ],
)
def test_flag_problems(raw: str, code: str) -> None:
    value, problem = v.parse_flag(raw)
    assert value is None
    assert problem is not None and problem.code == code and repr(raw) in problem.message


def test_pcr_values() -> None:
    assert v.parse_pcr("Unclear") == ("Unclear", None)
    assert v.parse_pcr("y") == ("Y", None)
    value, problem = v.parse_pcr("pending")
    assert value is None and problem is not None and "Y, N, Unclear" in problem.message


@pytest.mark.parametrize(("raw", "expected"), [("M", "M"), ("female", "F"), ("", None)])
def test_sex(raw: str, expected: str | None) -> None:
    assert v.parse_sex(raw) == (expected, None)


def test_sex_unknown_reported() -> None:
    value, problem = v.parse_sex("X")
    assert value is None and problem is not None and problem.code == "unrecognised_value"


@pytest.mark.parametrize(
    ("column", "raw", "expected"),
    [
        ("age_years", "65", 65.0),
        ("age_years", "058Y", 58.0),
        ("age_years", "6M", 0.5),
        ("offset_days", "-4", -4),
        ("offset_days", "5.0", 5),
        ("temperature_c", "38.2", 38.2),
        ("lymphocyte_count_k_per_ul", "0.762", 0.762),
    ],
)
def test_numbers(column: str, raw: str, expected: float) -> None:
    value, problem = v.parse_number(raw, BY_NAME[column])
    assert problem is None and value == expected
    if column == "offset_days":
        assert isinstance(value, int)


@pytest.mark.parametrize(
    ("column", "raw", "code", "hint"),
    [
        ("temperature_c", "95", "out_of_range", "Fahrenheit"),
        ("po2_saturation_pct", "130", "out_of_range", "mmHg"),
        ("age_years", "130", "out_of_range", "0..120"),
        ("age_years", "50+", "unrecognised_value", "plain number"),
        ("offset_days", "2.5", "not_whole", "whole number"),
        ("offset_days", "?", "unknown_marker", "unknown"),
        ("temperature_c", "nan", "unknown_marker", "unknown"),
        ("temperature_c", "inf", "unrecognised_value", "finite"),
    ],
)
def test_number_problems(column: str, raw: str, code: str, hint: str) -> None:
    value, problem = v.parse_number(raw, BY_NAME[column])
    assert value is None
    assert problem is not None and problem.code == code and hint in problem.message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("PA", "PA"),
        ("AP supine", "AP Supine"),
        ("APS", "AP Supine"),
        ("AP erect", "AP Erect"),
        ("Liegend", "AP Supine"),
        ("lateral", "L"),
        ("axial", "Axial"),
        ("", None),
    ],
)
def test_views(raw: str, expected: str | None) -> None:
    assert v.parse_view(raw) == (expected, None)


def test_view_unknown_and_modality() -> None:
    assert v.parse_view("oblique")[1] is not None
    assert v.parse_modality("X-Ray") == ("X-ray", None)
    assert v.parse_modality("CR") == ("X-ray", None)
    assert v.parse_modality("MRI")[1] is not None
    mismatch = v.view_modality_problem("Axial", "X-ray")
    assert mismatch is not None and mismatch.code == "view_modality_mismatch"
    assert v.view_modality_problem("PA", "X-ray") is None


@pytest.mark.parametrize(
    ("raw", "iso", "year", "code"),
    [
        ("January 22, 2020", "2020-01-22", 2020, None),
        ("Mar 3, 2020", "2020-03-03", 2020, None),
        ("2020", None, 2020, None),
        ("March 2020", None, 2020, None),
        ("3/3/2020", "2020-03-03", 2020, None),
        ("03/16/20", "2020-03-16", 2020, None),
        ("3/4/2020", None, 2020, "ambiguous_date"),
        ("January 12", None, None, "unparsed_date"),
        ("", None, None, None),
    ],
)
def test_dates(raw: str, iso: str | None, year: int | None, code: str | None) -> None:
    parsed, problem = v.parse_date(raw)
    assert (parsed.iso, parsed.year) == (iso, year)
    assert (problem.code if problem else None) == code


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("../../etc/passwd", "path traversal"),
        ("images/../../x.png", "path traversal"),
        ("/etc/passwd", "absolute"),
        ("C:/x.png", "absolute"),
        ("a\\b.png", "backslash"),
        ("a\x00.png", "control"),
    ],
)
def test_unsafe_paths_are_errors(raw: str, reason: str) -> None:
    value, problem = v.check_relative_path(raw)
    assert value is None
    assert (
        problem is not None and problem.severity is v.Severity.ERROR and reason in problem.message
    )


def test_safe_paths_are_normalised() -> None:
    assert v.check_relative_path("images/./a.png") == ("images/a.png", None)
    assert v.check_relative_path("a.png") == ("a.png", None)


def test_formula_detection() -> None:
    assert v.looks_like_formula("=HYPERLINK(1)")
    assert v.looks_like_formula("@SUM(A1)")
    assert not v.looks_like_formula("COVID-19")


def test_every_upstream_header_and_alias_is_recognised() -> None:
    for column in COLUMNS:
        for spelling in (column.name, column.upstream, *column.aliases):
            assert column_for_header(spelling) is column
    assert column_for_header("pO2 saturation") is BY_NAME["po2_saturation_pct"]
    assert column_for_header("WBC count") is BY_NAME["leukocyte_count_k_per_ul"]
    assert column_for_header("imagename") is BY_NAME["filename"]
    assert column_for_header("nonsense") is None
    assert "RT_PCR_positive" not in JUNE_2020_UPSTREAM and len(JUNE_2020_UPSTREAM) == 28


def test_parse_record_typed_values_and_flags() -> None:
    parsed = parse_record(
        {
            "patient_id": " 7 ",
            "filename": "a.png",
            "folder": "images",
            "age_years": "12",
            "sex": "F",
            "finding": "COVID-19, ARDS",
            "survival": "?",
            "view": "AP Supine",
            "modality": "X-ray",
            "date": "January 22, 2020",
            "temperature_c": "38.5",
        }
    )
    record = parsed.record
    assert record is not None
    assert record.patient_id == "7" and record.relative_path == "images/a.png"
    assert record.age_years == 12 and record.is_pediatric and "pediatric" in record.flags
    assert [f.path_str for f in record.findings] == ["Pneumonia/Viral/COVID-19", "ARDS"]
    assert record.acquired_on == "2020-01-22" and record.survival is None
    assert "has_warnings" in record.flags
    assert {(p.column, p.code, p.action) for p in parsed.problems} == {
        ("survival", "unknown_marker", v.Action.VALUE_BLANKED),
        ("age_years", "pediatric", v.Action.KEPT),
    }


def test_parse_record_rejects_missing_required_and_unsafe_paths() -> None:
    missing = parse_record({"patient_id": "", "filename": "a.png"})
    assert missing.record is None
    assert [(p.code, p.action) for p in missing.problems] == [
        ("required_missing", v.Action.ROW_SKIPPED)
    ]
    unsafe = parse_record({"patient_id": "1", "filename": "../../x"})
    assert unsafe.record is None and unsafe.problems[0].code == "unsafe_path"


def test_parse_record_keeps_unknown_findings_as_text() -> None:
    parsed = parse_record({"patient_id": "1", "filename": "a.png", "finding": "Dragonpox"})
    assert parsed.record is not None
    assert parsed.record.finding == "Dragonpox" and parsed.record.findings == ()
    assert parsed.problems[0].code == "unknown_finding"
