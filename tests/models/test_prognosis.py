"""Outcome prognosis: one row per patient, grouped folds, imputation inside folds,
metrics, the comparison table, the model file and the ``prognosis`` CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from covidcxr.cli import main
from covidcxr.errors import MetadataError
from covidcxr.models import prognosis, prognosis_cohort, prognosis_stats
from covidcxr.models.bundle import load_bundle
from covidcxr.serialise import to_dict

SURVIVAL = prognosis_cohort.OUTCOMES["survival"]
FINDINGS = ("COVID-19", "No finding")


def _records(n: int = 90, seed: int = 0) -> list[dict[str, Any]]:
    """Two records per patient: day 0 (frontal image, age, sex, SpO2 often missing) and
    day 5 (lateral, the outcome, for every third patient a later SpO2). Death depends on
    age only."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        age = float(rng.uniform(20, 90))
        died = bool(rng.random() < 1 / (1 + math.exp(-(age - 60) / 6)))
        spo2 = None if rng.random() < 0.4 else float(rng.uniform(80, 99))
        base = {"source": "synthetic", "patient_id": str(i), "modality": "X-ray"}
        records.append(
            {
                **base,
                "line": 2 * i,
                "offset_days": 0,
                "view": "PA",
                "image_status": "stored",
                "image_sha256": f"{i:064x}",
                "age_years": age,
                "sex": "M" if i % 2 else "F",
                "po2_saturation_pct": spo2,
                "survival": None,
            }
        )
        records.append(
            {
                **base,
                "line": 2 * i + 1,
                "offset_days": 5,
                "view": "L",
                "image_status": "stored",
                "image_sha256": f"{i + 10_000:064x}",
                "po2_saturation_pct": 70.0 if i % 3 == 0 else None,
                "survival": not died,
            }
        )
    return records


def _scorer(shas: Sequence[str]) -> Mapping[str, Mapping[str, float]]:
    """Image inputs that carry no signal (deterministic noise from the hash)."""
    out = {}
    for sha in shas:
        rng = np.random.default_rng(int(sha, 16) % 2**32)
        out[sha] = {
            "geographic_extent": float(rng.uniform(0, 8)),
            "opacity": float(rng.uniform(0, 6)),
            "p_covid_19": float(rng.uniform()),
            "p_no_finding": float(rng.uniform()),
        }
    return out


def _cohort(n: int = 90, seen: frozenset[str] = frozenset()) -> prognosis_cohort.Cohort:
    return prognosis_cohort.build_cohort(_records(n), SURVIVAL, _scorer, seen)


# ---------------------------------------------------------------- one row per patient


def test_patient_rows_one_per_patient_with_stated_aggregation() -> None:
    records = _records(4)
    records.append(  # a patient with an outcome but only a lateral image: left out
        {"source": "synthetic", "patient_id": "x", "line": 99, "offset_days": 0, "view": "L"}
        | {"modality": "X-ray", "image_status": "stored", "image_sha256": "f" * 64}
        | {"survival": False}
    )
    rows, excluded = prognosis_cohort.patient_rows(records, SURVIVAL)
    assert [r["patient"] for r in rows] == [f"synthetic:{i}" for i in range(4)]
    assert excluded == {"no stored frontal X-ray": 1}
    by_day: dict[tuple[str, int], dict[str, Any]] = {
        (f"synthetic:{r['patient_id']}", r["offset_days"]): r for r in records
    }
    for row in rows:
        first, later = by_day[row["patient"], 0], by_day[row["patient"], 5]
        assert row["image_sha256"] == first["image_sha256"]  # the day-0 frontal image
        # The earliest value that exists: day 0 when given, else day 5 (or none).
        expected = first["po2_saturation_pct"] or later["po2_saturation_pct"]
        assert row["po2_saturation_pct"] == expected
        assert row["sex_male"] == (first["sex"] == "M")


def test_outcome_event_is_death_for_survival() -> None:
    records = _records(30)
    cohort = prognosis_cohort.build_cohort(records, SURVIVAL, _scorer)
    died = {f"synthetic:{r['patient_id']}" for r in records if r["survival"] is False}
    assert {p for p, e in zip(cohort.patients, cohort.events, strict=True) if e} == died


def test_no_cohort_is_an_error_naming_the_fix() -> None:
    with pytest.raises(MetadataError, match=r"went_icu.*ingest a source with outcomes"):
        prognosis_cohort.build_cohort(_records(5), prognosis_cohort.OUTCOMES["icu"], _scorer)


# ---------------------------------------------------------------- folds and leaks


def test_no_patient_on_both_sides_of_any_fold() -> None:
    # Several rows per patient, to make the grouping do real work.
    groups = [f"p{i // 3}" for i in range(90)]
    events = np.array([(i // 3) % 3 == 0 for i in range(90)], dtype=np.int64)
    tested = np.zeros((3, 90), dtype=int)
    for repeat, train, test in prognosis.grouped_folds(events, groups, folds=4, repeats=3, seed=0):
        assert not {groups[i] for i in train} & {groups[i] for i in test}
        tested[repeat, test] += 1
    assert (tested == 1).all()  # every row tested exactly once per repeat


def test_patients_sharing_an_image_stay_on_one_side() -> None:
    records = _records(60)
    shared = records[0]["image_sha256"]
    records[2]["image_sha256"] = shared  # patient 1's first image is patient 0's file
    cohort = prognosis_cohort.build_cohort(records, SURVIVAL, _scorer)
    assert cohort.groups[:3] == ("synthetic:0", "synthetic:0", "synthetic:2")
    for _, train, test in prognosis.grouped_folds(
        cohort.events, cohort.groups, folds=5, repeats=4, seed=1
    ):
        sides = {cohort.patients[i]: i in set(test) for i in (*train, *test)}
        assert sides["synthetic:0"] == sides["synthetic:1"]


@pytest.mark.parametrize("step", ["evaluate", "fit", "risk"])
def test_help(step: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prognosis", step, "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


def test_penalty_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["prognosis", "evaluate", "--c", "0"])
    assert "'0': give a positive number" in capsys.readouterr().err


def test_too_few_events_for_the_folds() -> None:
    events = np.array([1, 1, 0, 0, 0, 0], dtype=np.int64)
    with pytest.raises(MetadataError, match=r"3 folds need.*there are 2 and 4.*lower --folds"):
        list(prognosis.grouped_folds(events, list("abcdef"), folds=3, repeats=1, seed=0))


def test_imputation_is_fitted_inside_the_training_fold() -> None:
    cohort = _cohort()
    features = ("age_years", "po2_saturation_pct")
    x, y = cohort.matrix(features), cohort.events
    _, train, test = next(prognosis.grouped_folds(y, cohort.patients, folds=5, repeats=1, seed=0))
    fitted = prognosis.make_pipeline().fit(x[train], y[train])
    # Extreme values in the test-fold patients: a statistic over all patients sees them...
    leaked = x.copy()
    leaked[test, 1] = 1e6
    assert np.nanmedian(leaked[:, 1]) != np.nanmedian(x[:, 1])
    # ...the training fold's imputer, scaler and coefficients do not.
    refitted = prognosis.make_pipeline().fit(leaked[train], y[train])
    for step, attribute in (("impute", "statistics_"), ("scale", "mean_"), ("model", "coef_")):
        np.testing.assert_array_equal(
            getattr(refitted.named_steps[step], attribute),
            getattr(fitted.named_steps[step], attribute),
        )
    # And the out-of-fold predictions of the other patients do not change either.
    other = np.setdiff1d(np.arange(len(y)), test)
    np.testing.assert_array_equal(
        fitted.predict_proba(x[other]), refitted.predict_proba(leaked[other])
    )


def test_missing_values_get_an_indicator() -> None:
    cohort = _cohort()
    features = ("age_years", "po2_saturation_pct")
    pipeline = prognosis.make_pipeline().fit(cohort.matrix(features), cohort.events)
    model = prognosis.LinearRisk.from_pipeline(pipeline, features)
    assert model.indicators == ("po2_saturation_pct",)
    x = cohort.matrix(features)
    for row in x[:10]:
        values = dict(zip(features, (float(v) for v in row), strict=True))
        expected = pipeline.predict_proba(row[None, :])[0, 1]
        assert model.probability(values) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- metrics


def _predictions(n: int = 400, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.round(rng.uniform(0.02, 0.98, n), 2)  # rounded: ties
    y = (rng.uniform(size=n) < np.clip(p + rng.normal(0, 0.2, n), 0, 1)).astype(float)
    return y, p


def test_auroc_matches_sklearn_and_weights_act_as_resampling() -> None:
    y, p = _predictions()
    one = np.ones((1, len(y)))
    assert prognosis_stats.auroc(y, p, one)[0] == pytest.approx(roc_auc_score(y, p))
    pick = np.random.default_rng(0).integers(0, len(y), len(y))
    counts = np.bincount(pick, minlength=len(y))[None, :].astype(float)
    assert prognosis_stats.auroc(y, p, counts)[0] == pytest.approx(roc_auc_score(y[pick], p[pick]))
    assert math.isnan(prognosis_stats.auroc(np.zeros(5), np.arange(5.0), np.ones((1, 5)))[0])


def test_calibration_slope_and_intercept() -> None:
    y, p = _predictions()
    one = np.ones((1, len(y)))
    logit = np.log(p / (1 - p))[:, None]
    reference = LogisticRegression(C=np.inf, max_iter=1000).fit(logit, y)
    slope = prognosis_stats.calibration_slope(y, p, one)[0]
    assert slope == pytest.approx(reference.coef_[0, 0], rel=1e-3)
    # Calibrated predictions of a large sample: slope near 1, intercept near 0.
    rng = np.random.default_rng(1)
    q = rng.uniform(0.05, 0.95, 20_000)
    outcome = (rng.uniform(size=q.size) < q).astype(float)
    ones = np.ones((1, q.size))
    assert prognosis_stats.calibration_slope(outcome, q, ones)[0] == pytest.approx(1.0, abs=0.1)
    assert prognosis_stats.calibration_intercept(outcome, q, ones)[0] == pytest.approx(0.0, abs=0.1)
    # Separated data: no maximum-likelihood slope.
    separated = prognosis_stats.calibration_slope(
        np.array([0.0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), np.ones((1, 4))
    )
    assert math.isnan(separated[0])


def test_net_benefit() -> None:
    y = np.array([1.0, 1, 0, 0, 0])
    p = np.array([0.9, 0.3, 0.6, 0.1, 0.05])
    # At 0.5: treat patients 0 and 2: TP 1, FP 1 -> 1/5 - 1/5 * 0.5/0.5.
    # At 0.2: treat 0, 1, 2: TP 2, FP 1 -> 2/5 - 1/5 * 0.25.
    np.testing.assert_allclose(prognosis_stats.net_benefit(y, p, (0.5, 0.2)), [0.0, 0.35])


def test_bootstrap_interval_brackets_the_point() -> None:
    y, p = _predictions(200)
    intervals = prognosis_stats.bootstrap_metrics(y, np.vstack([p, p]), resamples=300, seed=0)
    assert set(intervals) == set(prognosis_stats.METRICS)
    for interval in intervals.values():
        assert interval.low <= interval.value <= interval.high
    assert prognosis_stats.bootstrap_metrics(y, p[None, :], resamples=0, seed=0)[
        "auroc"
    ].text() == (f"{roc_auc_score(y, p):.2f}")


# ---------------------------------------------------------------- the comparison table


def test_evaluation_has_every_baseline_and_finds_the_signal() -> None:
    seen = frozenset(f"synthetic:{i}" for i in range(0, 120, 2))
    cohort = prognosis_cohort.build_cohort(_records(120), SURVIVAL, _scorer, seen)
    sets = prognosis_cohort.input_sets(FINDINGS)
    evaluation = prognosis.evaluate(cohort, sets, folds=3, repeats=2, resamples=200)
    assert [r.inputs for r in evaluation.results] == ["age", "severity", "clinical", "image", "all"]
    assert sets["image"] == ("geographic_extent", "opacity", "p_covid_19", "p_no_finding")
    age, severity = evaluation.result("age"), evaluation.result("severity")
    assert age.auroc.low > 0.5  # death depends on age
    assert severity.auroc.low < 0.5 < severity.auroc.high  # the noise image carries none
    assert "age" in prognosis.signal_summary(evaluation)
    # The unseen table: the same CV, only the patients the image model never saw.
    assert [r.patients for r in evaluation.unseen] == [60] * 5
    assert len(evaluation.thresholds) == len(evaluation.treat_all) == len(age.net_benefit)
    section = prognosis.markdown_section([evaluation])
    for name in sets:
        assert f"| {name} | 120 |" in section
    assert "never saw" in section


# ---------------------------------------------------------------- model file and CLI


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cohort = _cohort(120)
    sets = prognosis_cohort.input_sets(FINDINGS)
    shipped = load_bundle().model_id
    evaluation = prognosis.evaluate(
        cohort, {"all": sets["all"]}, folds=3, repeats=1, resamples=100, image_model=shipped
    )
    model = prognosis.fit_model(cohort, sets["all"], evaluation, refits=50, command="test")
    path = tmp_path_factory.mktemp("prognosis") / "model.json"
    path.write_text(json.dumps(to_dict(model)), encoding="utf-8")
    return path


def test_risk_for_one_patient_from_the_cli(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = ["prognosis", "risk", "--model", str(model_file), "--age", "85", "--sex", "M"]
    young = ["prognosis", "risk", "--model", str(model_file), "--age", "25", "--spo2", "97"]
    assert main(old) == 0
    old_text = capsys.readouterr().out
    assert main(young) == 0
    young_text = capsys.readouterr().out
    risks = []
    for text in (old_text, young_text):
        assert "research estimate, not a diagnosis" in text
        assert "model AUROC" in text and "patient-grouped 3-fold CV" in text
        value, low, high = (float(v) for v in _risk_numbers(text))
        assert 0 <= low <= value <= high <= 1
        risks.append(value)
    assert risks[0] > risks[1]  # the synthetic risk rises with age
    assert "training median: " in old_text and "po2_saturation_pct" in old_text


def _risk_numbers(text: str) -> tuple[str, str, str]:
    line = next(line for line in text.splitlines() if line.startswith("risk (died): "))
    value, rest = line.removeprefix("risk (died): ").split(" [", 1)
    low, high = rest.split("]", 1)[0].split(", ")
    return value, low, high


def test_risk_with_an_image_that_fails_the_input_check(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")  # the image is scored by the shipped model
    image = tmp_path / "red.png"
    Image.new("RGB", (256, 256), (220, 30, 30)).save(image)
    argv = ["prognosis", "risk", "--model", str(model_file), "--age", "70", "--image", str(image)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "red.png: the image failed the input check" in captured.err
    assert "opacity" in captured.out.split("training median: ")[1]  # imputed, and said so
    assert "research estimate, not a diagnosis" in captured.out


def test_risk_from_a_csv(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "patients.csv"
    table.write_text("age,sex,pO2_saturation\n64,F,91\n30,M,\n", encoding="utf-8")
    assert main(["prognosis", "risk", "--model", str(model_file), "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert "patient 1:" in out and "patient 2:" in out
    assert out.count("research estimate, not a diagnosis") == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--spo2", "130"], "--spo2 po2_saturation_pct 130 is outside 0..100"),
        (["--sex", "X"], "--sex sex 'X': give M or F"),
    ],
)
def test_risk_refuses_bad_values(
    model_file: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prognosis", "risk", "--model", str(model_file), *extra]) == 2
    assert message in capsys.readouterr().err


def test_risk_refuses_a_file_that_is_not_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"format": "something"}', encoding="utf-8")
    assert main(["prognosis", "risk", "--model", str(other), "--age", "50"]) == 2
    assert "not a covidcxr-prognosis/1 file" in capsys.readouterr().err


def test_image_inputs_are_cached(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def score(paths: Sequence[str]) -> dict[str, dict[str, float]]:
        calls.append(list(paths))
        return {p: {"opacity": 1.5, "p_covid_19": math.nan} for p in paths}

    scorer = prognosis_cohort.cached_scorer(
        score, tmp_path / "c" / "inputs.csv", lambda s: tmp_path / s
    )
    first = scorer(["a" * 64, "b" * 64])
    again = scorer(["b" * 64, "c" * 64])
    assert calls == [
        [str(tmp_path / ("a" * 64)), str(tmp_path / ("b" * 64))],
        [str(tmp_path / ("c" * 64))],
    ]
    assert first["a" * 64]["opacity"] == 1.5 and math.isnan(again["b" * 64]["p_covid_19"])


# ---------------------------------------------------------------- the real collection


@pytest.mark.shared_data
def test_real_collection_survival(covid_dir: Path, tmp_path: Path) -> None:
    """Patients with a known survival (newest metadata), ingested with their images,
    evaluated end to end with the shipped image model (one repeat, few resamples)."""
    pytest.importorskip("onnxruntime")
    source = tmp_path / "covid-chestxray"
    (source / "images").mkdir(parents=True)
    with (covid_dir / "metadata-latest.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        column = header.index("survival")
        rows = [row for row in reader if len(row) > column and row[column].strip()]
    with (source / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    for name in {row[header.index("filename")] for row in rows}:  # copies in tmp_path only
        if (covid_dir / "images" / name).is_file():
            shutil.copyfile(covid_dir / "images" / name, source / "images" / name)
    assert main(["ingest", str(source), "--workers", "1", "--show", "0"]) in (0, 1)
    out = tmp_path / "out"
    argv = ["prognosis", "evaluate", "--outcome", "survival", "--repeats", "1"]
    assert main([*argv, "--folds", "3", "--resamples", "100", "--out", str(out)]) == 0
    result = json.loads((out / "prognosis-survival.json").read_text(encoding="utf-8"))
    tables = {r["inputs"]: r for r in result["results"]}
    assert list(tables) == ["age", "severity", "clinical", "image", "all"]
    patients = tables["all"]["patients"]
    assert patients > 50 and 0 < tables["all"]["events"] < patients
    assert all(0 <= r["auroc"]["value"] <= 1 for r in tables.values())
    assert 0 < result["unseen"][0]["patients"] < patients
    assert "## Outcomes" in (out / "prognosis.md").read_text(encoding="utf-8")
