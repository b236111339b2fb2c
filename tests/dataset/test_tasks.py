"""Tasks label records from hierarchy tokens; unknown stays unknown."""

from __future__ import annotations

import math
from typing import Any

import pytest

from covidcxr.dataset import tasks
from covidcxr.errors import MetadataError


def record(*findings: str, status: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"findings": list(findings), "finding_status": status, **extra}


def same(a: tuple[float, ...] | None, b: tuple[float, ...]) -> bool:
    assert a is not None
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True)
    )


def test_findings_task_uses_the_hierarchy() -> None:
    task = tasks.get_task("findings")
    index = {name: i for i, name in enumerate(task.labels)}
    labels, reason = task.label_record(record("Pneumonia/Viral/COVID-19", "ARDS"))
    assert reason is None and labels is not None
    assert labels[index["Pneumonia"]] == 1.0 and labels[index["Pneumonia/Viral"]] == 1.0
    assert labels[index["Pneumonia/Viral/COVID-19"]] == 1.0 and labels[index["ARDS"]] == 1.0
    assert labels[index["Pneumonia/Bacterial"]] == 0.0 and labels[index["No Finding"]] == 0.0


def test_less_specific_finding_makes_labels_unknown_not_negative() -> None:
    task = tasks.get_task("findings")
    index = {name: i for i, name in enumerate(task.labels)}
    labels, _ = task.label_record(record("Pneumonia"))
    assert labels is not None
    assert labels[index["Pneumonia"]] == 1.0
    assert math.isnan(labels[index["Pneumonia/Viral"]])
    assert math.isnan(labels[index["Pneumonia/Viral/COVID-19"]])
    assert labels[index["Tuberculosis"]] == 0.0  # not under Pneumonia: a real negative


@pytest.mark.parametrize("status", ["pending", "unknown", "missing", "invalid"])
def test_unassigned_findings_are_excluded(status: str) -> None:
    for name in ("findings", "covid-vs-other-pneumonia", "viral-vs-bacterial"):
        labels, reason = tasks.get_task(name).label_record(record(status=status))
        assert labels is None and reason == tasks.NO_FINDING_ASSIGNED


@pytest.mark.parametrize(
    ("findings", "expected", "reason"),
    [
        (["Pneumonia/Viral/COVID-19"], (1.0,), None),
        (["Pneumonia/Viral/COVID-19", "ARDS"], (1.0,), None),
        (["Pneumonia/Bacterial/Streptococcus"], (0.0,), None),
        (["Pneumonia/Viral/SARS"], (0.0,), None),
        (["Pneumonia/Viral"], None, tasks.TOO_UNSPECIFIC),
        (["Pneumonia"], None, tasks.TOO_UNSPECIFIC),
        (["No Finding"], None, tasks.NEITHER_CLASS),
        (["Tuberculosis"], None, tasks.NEITHER_CLASS),
        (["Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial/Klebsiella"], None, tasks.BOTH_CLASSES),
    ],
)
def test_covid_vs_other_pneumonia(
    findings: list[str], expected: tuple[float, ...] | None, reason: str | None
) -> None:
    labels, why = tasks.get_task("covid-vs-other-pneumonia").label_record(record(*findings))
    assert why == reason
    assert labels == expected


@pytest.mark.parametrize(
    ("findings", "expected", "reason"),
    [
        (["Pneumonia/Viral/Influenza/H1N1"], (1.0,), None),
        (["Pneumonia/Bacterial"], (0.0,), None),
        (["Pneumonia/Fungal/Pneumocystis"], None, tasks.NEITHER_CLASS),
        (["Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial/E.Coli"], None, tasks.BOTH_CLASSES),
        (["Pneumonia"], None, tasks.TOO_UNSPECIFIC),
    ],
)
def test_viral_vs_bacterial(
    findings: list[str], expected: tuple[float, ...] | None, reason: str | None
) -> None:
    labels, why = tasks.get_task("viral-vs-bacterial").label_record(record(*findings))
    assert (labels, why) == (expected, reason)


def test_severity_and_outcomes() -> None:
    severity = tasks.get_task("severity")
    assert severity.label_record(record(severity=None)) == (None, tasks.NO_SEVERITY)
    labels, _ = severity.label_record(
        record(severity={"geographic_mean": 4.5, "opacity_mean": 3.0})
    )
    assert labels == (4.5, 3.0)
    assert severity.ranges == ((0.0, 8.0), (0.0, 6.0))
    outcomes = tasks.get_task("outcomes")
    assert outcomes.label_record(record()) == (None, tasks.NO_OUTCOME)
    labels, _ = outcomes.label_record(record(survival=False, went_icu=True))
    assert same(labels, (0.0, 1.0, math.nan, math.nan))


def test_custom_findings_task_and_unknown_names() -> None:
    task = tasks.findings_task(["covid-19", "bacterial"])
    assert task.labels == ("Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial")
    assert task.as_dict()["labels"] == list(task.labels)
    with pytest.raises(MetadataError, match="dragonpox"):
        tasks.findings_task(["dragonpox"])
    with pytest.raises(MetadataError, match="unknown task 'nope'; choose one of findings"):
        tasks.get_task("nope")


def test_label_counts() -> None:
    counts = tasks.LabelCounts.of(("a", "b"), [(1.0, math.nan), (0.0, 1.0), (1.0, 0.0)])
    assert (counts.positive, counts.negative, counts.unknown) == ([2, 1], [1, 1], [0, 1])


@pytest.mark.parametrize(
    ("findings", "expected"),
    [
        (["Pneumonia/Viral/COVID-19"], (1.0, 0.0, 0.0, 0.0, 0.0)),
        (["Pneumonia/Viral/SARS"], (0.0, 1.0, 0.0, 0.0, 0.0)),
        (["Pneumonia/Viral"], (math.nan, math.nan, 0.0, 0.0, 0.0)),
        (["Pneumonia"], (math.nan, math.nan, math.nan, math.nan, 0.0)),
        (["Pneumonia/Bacterial/Klebsiella"], (0.0, 0.0, 1.0, 0.0, 0.0)),
        (["Pneumonia/Fungal/Pneumocystis"], (0.0, 0.0, 0.0, 1.0, 0.0)),
        (["No Finding"], (0.0, 0.0, 0.0, 0.0, 1.0)),
        (["Tuberculosis"], (0.0, 0.0, 0.0, 0.0, 0.0)),
    ],
)
def test_second_opinion_labels(findings: list[str], expected: tuple[float, ...]) -> None:
    task = tasks.get_task("second-opinion")
    assert task.labels == (
        "COVID-19",
        "Other viral pneumonia",
        "Bacterial pneumonia",
        "Fungal pneumonia",
        "No finding",
    )
    labels, reason = task.label_record(record(*findings))
    assert reason is None and same(labels, expected)
