"""The validation report's outcome section on a synthetic site made in code: the shipped
prognosis models on the site's patients, or which columns would enable it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from covidcxr.cli import main
from covidcxr.errors import MetadataError
from covidcxr.models import prognosis_risk
from covidcxr.report.labels import Case
from covidcxr.report.outcomes import outcome_section

HEADER = ["file", "finding", "patient_id", "age", "sex", "pO2_saturation", "survival", "went_icu"]


def _rows(n: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """Two images per patient; death more likely when older and with a lower SpO2; the
    outcome and values on the first row, the second row blank."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = rng.uniform(25, 90)
        spo2 = rng.uniform(80, 99)
        died = rng.random() < 1 / (1 + math.exp(-((age - 65) / 8 + (90 - spo2) / 4)))
        icu = rng.random() < 0.5
        for k in range(2):
            first = k == 0
            rows.append(
                {
                    "file": f"p{i}_{k}.png",
                    "finding": "COVID-19" if i % 3 else "No Finding",
                    "patient_id": f"P{i}",
                    "age": f"{age:.0f}" if first else "",
                    "sex": ("M" if i % 2 else "F") if first else "",
                    "pO2_saturation": f"{spo2:.0f}" if first else "",
                    "survival": ("N" if died else "Y") if first else "",
                    "went_icu": ("Y" if icu else "N") if first else "",
                }
            )
    return rows


def _write(path: Path, rows: list[dict[str, str]], header: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cases(rows: list[dict[str, str]]) -> list[Case]:
    return [
        Case(r["file"], line, {}, r["finding"], r["patient_id"])
        for line, r in enumerate(rows, start=2)
    ]


def _section(path: Path, rows: list[dict[str, str]], model_id: str = "other") -> dict[str, Any]:
    images = [{"opacity": 3.0, "p_covid_19": 0.5} for _ in rows]
    return outcome_section(path, {}, ",", _cases(rows), images, model_id, n_resamples=200, seed=0)


def test_the_shipped_models_are_evaluated_per_patient(tmp_path: Path) -> None:
    rows = _rows()
    section = _section(_write(tmp_path / "labels.csv", rows, HEADER), rows)
    assert section["status"] == "run" and section["note"] == "research estimate, not a diagnosis"
    assert section["outcome_columns"] == {"survival": "survival", "icu": "went_icu"}
    by_outcome = {m["outcome"]: m for m in section["models"]}
    assert set(by_outcome) == {"survival", "icu"}  # no intubation column: not evaluated
    survival = by_outcome["survival"]
    assert survival["patients"] == 60  # one row per patient, not per image
    first = [r for r in rows if r["survival"]]
    y = [r["survival"] == "N" for r in first]
    assert survival["events"] == sum(y)
    model = prognosis_risk.shipped_models()[0]
    risks = [
        prognosis_risk.outcome_risks(
            {
                "age_years": float(r["age"]),
                "sex_male": float(r["sex"] == "M"),
                "po2_saturation_pct": float(r["pO2_saturation"]),
            },
            models=[model],
        )[0].value
        for r in first
    ]
    assert survival["auroc"]["value"] == pytest.approx(roc_auc_score(y, risks))
    assert survival["auroc"]["low"] < survival["auroc"]["value"] < survival["auroc"]["high"]
    assert survival["development_auroc"]["value"] == pytest.approx(model.auroc.value)
    for name in ("brier", "calibration_slope", "calibration_intercept"):
        assert survival[name]["value"] is not None
    assert "not used" in survival["image_inputs"]  # the report's model is not theirs


def test_missing_columns_say_what_would_enable_it(tmp_path: Path) -> None:
    rows = _rows(10)
    no_outcome = _write(tmp_path / "a.csv", rows, HEADER[:6])
    section = _section(no_outcome, rows)
    assert section["status"] == "not run"
    assert "no outcome column" in section["reason"] and "went_icu" in section["reason"]
    no_values = _write(tmp_path / "b.csv", rows, [*HEADER[:3], "survival"])
    section = _section(no_values, rows)
    assert section["status"] == "not run" and "no clinical value column" in section["reason"]
    assert "po2_saturation_pct" in section["reason"]


def test_one_class_gives_counts_not_metrics(tmp_path: Path) -> None:
    rows = [{**r, "survival": "Y" if r["survival"] else ""} for r in _rows(10)]
    section = _section(_write(tmp_path / "labels.csv", rows, HEADER), rows)
    survival = section["models"][0]
    assert survival["events"] == 0 and "auroc" not in survival
    assert "at least 2 patients with and without the event" in survival["reason"]


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("pO2_saturation", "130", "labels.csv line 2: po2_saturation_pct 130 is outside 0..100"),
        ("survival", "dead", "labels.csv line 2: survival 'dead' is not Y/N"),
        ("age", "old", "labels.csv line 2: age_years 'old' is not a number"),
    ],
)
def test_bad_values_name_the_row_and_field(
    tmp_path: Path, column: str, value: str, message: str
) -> None:
    rows = _rows(5)
    rows[0] = {**rows[0], column: value}
    with pytest.raises(MetadataError, match=message):
        _section(_write(tmp_path / "labels.csv", rows, HEADER), rows)


def test_report_shows_the_section(tmp_path: Path) -> None:
    """The whole command on synthetic images with another tool's predictions."""
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    rows = _rows(30)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for row in rows:
        pixels = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(images / row["file"])
    labels = _write(tmp_path / "labels.csv", rows, HEADER)
    predictions = tmp_path / "predictions.csv"
    with predictions.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "p_COVID-19"])
        writer.writerows([r["file"], f"{rng.uniform():.3f}"] for r in rows)
    out = tmp_path / "out"
    argv = ["validate-model", "--images", str(images), "--labels", str(labels)]
    argv += ["--predictions", str(predictions), "--out", str(out), "--resamples", "100"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["outcomes"]["status"] == "run"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Outcomes (prognosis)" in html and "prognosis-v1/survival" in html
    assert "development AUROC" in html
