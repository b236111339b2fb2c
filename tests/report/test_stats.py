"""The report's statistics against scikit-learn and scipy, computed independently."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import (
    brier_score_loss,
    confusion_matrix,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)

from covidcxr.report import stats


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(3)
    y = (rng.random(120) < 0.4).astype(float)
    p = 1 / (1 + np.exp(-(rng.normal(size=120) + 1.2 * y - 0.5)))
    p[:10] = np.round(p[:10], 1)  # some ties
    groups = [f"patient{i // 2}" for i in range(120)]
    return y, p, groups


def test_point_estimates_match_sklearn(scored: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    y, p, groups = scored
    found = stats.patient_bootstrap(stats.STATISTICS, y, p, groups, threshold=0.45, n_resamples=200)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.45).ravel()
    assert found["auc"].value == pytest.approx(roc_auc_score(y, p))
    assert found["sensitivity"].value == pytest.approx(tp / (tp + fn))
    assert found["specificity"].value == pytest.approx(tn / (tn + fp))
    assert found["ppv"].value == pytest.approx(tp / (tp + fp))
    assert found["npv"].value == pytest.approx(tn / (tn + fn))
    for estimate in found.values():
        assert estimate.low <= estimate.value <= estimate.high
        assert "200 resamples, 60 patients" in estimate.method


def test_bootstrap_resamples_patients_together() -> None:
    """Ten copies of each patient's case: the patient-level interval is as wide as the
    one of the ten distinct cases, the image-level one (wrongly) much narrower."""
    y = np.tile([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0], 10)
    p = np.tile([0.2, 0.7, 0.6, 0.4, 0.9, 0.1, 0.8, 0.3, 0.5, 0.35], 10)
    patients = [f"p{i % 10}" for i in range(100)]
    images = [f"i{i}" for i in range(100)]
    by_patient = stats.patient_bootstrap(["auc"], y, p, patients, n_resamples=500)["auc"]
    by_image = stats.patient_bootstrap(["auc"], y, p, images, n_resamples=500)["auc"]
    assert by_patient.value == by_image.value == pytest.approx(roc_auc_score(y, p))
    assert (by_patient.high - by_patient.low) > 2 * (by_image.high - by_image.low)


def test_undefined_auc_has_no_interval() -> None:
    found = stats.patient_bootstrap(["auc"], np.ones(5), np.linspace(0, 1, 5), list("abcde"))
    assert math.isnan(found["auc"].value) and math.isnan(found["auc"].low)
    assert found["auc"].text() == "n/a"


def test_calibration_matches_sklearn(scored: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    y, p, _ = scored
    found = stats.calibration(y, p, bins=10)
    assert found["brier"] == pytest.approx(brier_score_loss(y, p))
    edges = np.linspace(0, 1, 11)
    expected = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (p >= low) & ((p < high) | (high == 1.0))
        if inside.any():
            expected += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    assert found["ece"] == pytest.approx(expected)
    assert sum(b["n"] for b in found["bins"]) == len(y)


def test_platt_recovers_a_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(float)
    reported = 1 / (1 + np.exp(-(z - 1.0) / 2.0))  # logit(reported) = (z - 1) / 2
    a, b = stats.fit_platt(y, reported)
    assert a == pytest.approx(2.0, rel=0.05)
    assert b == pytest.approx(1.0, abs=0.1)
    fixed = stats.apply_platt(reported, a, b)
    assert brier_score_loss(y, fixed) < brier_score_loss(y, reported)


def test_severity_agreement_matches_sklearn() -> None:
    truth = np.array([0.0, 1.5, 3.0, 4.0, 6.5, 8.0])
    guess = np.array([0.5, 1.0, 3.5, 5.0, 5.5, 7.0])
    found = stats.severity_agreement(truth, guess)
    assert found["mae"] == pytest.approx(mean_absolute_error(truth, guess))
    assert found["r2"] == pytest.approx(r2_score(truth, guess))
    diff = guess - truth
    assert found["bias"] == pytest.approx(diff.mean())
    assert found["loa_high"] - found["loa_low"] == pytest.approx(2 * 1.96 * diff.std(ddof=1))


def test_sample_size_reaches_the_target() -> None:
    z = norm.ppf(0.975)
    positives, negatives = stats.auc_cases(0.8, 20, 40)
    assert negatives == pytest.approx(2 * positives, rel=0.02)
    assert z * stats.auc_standard_error(0.8, positives, negatives) <= 0.05
    smaller = (round(positives / 1.1), round(negatives / 1.1))
    assert z * stats.auc_standard_error(0.8, *smaller) > 0.05
    assert stats.proportion_cases(0.8) == math.ceil(z**2 * 0.8 * 0.2 / 0.05**2)


def test_proportions_never_get_a_zero_width_interval() -> None:
    """Two positives of one patient: the bootstrap alone says [1, 1]; the Wilson
    interval (computed here from its formula) widens it."""
    y = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    p = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.4])
    found = stats.patient_bootstrap(["sensitivity"], y, p, list("aabcde"), n_resamples=200)
    z = norm.ppf(0.975)
    centre, half = (1 + z**2 / 4) / (1 + z**2 / 2), z * math.sqrt(z**2 / 16) / (1 + z**2 / 2)
    estimate = found["sensitivity"]
    assert estimate.value == 1.0 and estimate.high == 1.0
    assert estimate.low == pytest.approx(centre - half)
    assert "Wilson" in estimate.method
