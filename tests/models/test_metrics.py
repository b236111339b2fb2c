"""Metrics against hand-computed values and scikit-learn/scipy; the patient bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk
from sklearn.calibration import calibration_curve

from covidcxr.models import metrics
from covidcxr.models.metrics import (
    AUC,
    BRIER,
    ECE,
    MAE,
    PEARSON,
    R2,
    Estimate,
    bootstrap,
    brier_score,
    expected_calibration_error,
    mean_absolute_error,
    operating_point_metrics,
    pearson_r,
    r_squared,
    reliability_table,
    roc_auc,
    sensitivity,
    specificity,
)
from covidcxr.serialise import from_dict, to_dict

NAN = math.nan

# --- ranks and AUC -------------------------------------------------------------------


def _random_problem(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(float)
    probs = np.round(np.clip(0.3 * labels + 0.7 * rng.random(n), 0, 1), 2)  # with ties
    return labels, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn_and_scipy(seed: int) -> None:
    labels, probs = _random_problem(seed)
    assert roc_auc(labels, probs) == pytest.approx(sk.roc_auc_score(labels, probs))
    assert brier_score(labels, probs) == pytest.approx(sk.brier_score_loss(labels, probs))
    calls = (probs >= 0.5).astype(int)
    assert sensitivity(labels, probs) == pytest.approx(sk.recall_score(labels, calls))
    assert specificity(labels, probs) == pytest.approx(sk.recall_score(labels, calls, pos_label=0))
    targets = 8 * probs
    predictions = targets + np.random.default_rng(seed).normal(0, 1, targets.size)
    assert mean_absolute_error(targets, predictions) == pytest.approx(
        sk.mean_absolute_error(targets, predictions)
    )
    assert r_squared(targets, predictions) == pytest.approx(sk.r2_score(targets, predictions))
    assert pearson_r(targets, predictions) == pytest.approx(
        stats.pearsonr(targets, predictions).statistic
    )


def test_reliability_table_agrees_with_calibration_curve() -> None:
    labels, probs = _random_problem(4, 500)
    probs = probs + 0.001  # off the bin edges, where the two may round differently
    table = reliability_table(labels, np.clip(probs, 0, 1))
    observed, predicted = calibration_curve(labels, np.clip(probs, 0, 1), n_bins=10)
    filled = [b for b in table if b.n]
    assert [b.observed_rate for b in filled] == pytest.approx(observed.tolist())
    assert [b.mean_probability for b in filled] == pytest.approx(predicted.tolist())
    ece = sum(b.n * abs(b.observed_rate - b.mean_probability) for b in filled) / labels.size
    assert expected_calibration_error(labels, np.clip(probs, 0, 1)) == pytest.approx(ece)


def test_auc_hand_computed() -> None:
    # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) lose, (0.8, *) win: 3 of 4.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_perfect_inverted_constant() -> None:
    labels = [0, 0, 1, 1, 1]
    assert roc_auc(labels, [1, 2, 3, 4, 5]) == 1.0
    assert roc_auc(labels, [5, 4, 3, 2, 1]) == 0.0
    assert roc_auc(labels, [0.3] * 5) == 0.5


def test_auc_ties_count_one_half() -> None:
    # pos {0.5, 0.9} vs neg {0.5, 0.2}: 0.5 + 1 + 1 + 1 = 3.5 of 4 pairs.
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)


def test_auc_random_scores_near_one_half() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 4000)
    assert roc_auc(labels, rng.random(4000)) == pytest.approx(0.5, abs=0.03)


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 6, 60).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert roc_auc(labels, scores) == pytest.approx(pairwise)


def test_auc_one_class_is_nan_with_a_reason() -> None:
    assert math.isnan(roc_auc([1, 1, NAN], [0.2, 0.3, 0.4]))
    reason = AUC.why_undefined([1, 1, NAN])
    assert reason is not None
    assert "positive" in reason
    assert "2 known labels" in reason
    assert AUC.why_undefined([0, 1]) is None


def test_nan_labels_are_ignored_everywhere() -> None:
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    noisy_labels = [0, NAN, 0, 1, NAN, 1]
    noisy_scores = [0.1, 0.99, 0.4, 0.35, 0.01, 0.8]
    for function in (roc_auc, brier_score, expected_calibration_error):
        assert function(noisy_labels, noisy_scores) == pytest.approx(function(labels, scores))
    for function in (sensitivity, specificity):
        assert function(noisy_labels, noisy_scores) == function(labels, scores)
    targets = [1.0, NAN, 2.0, 3.0]
    predictions = [2.0, 100.0, 2.0, 5.0]
    assert mean_absolute_error(targets, predictions) == pytest.approx(1.0)
    assert r_squared(targets, predictions) == pytest.approx(-1.5)
    assert pearson_r(targets, predictions) == pytest.approx(3 / math.sqrt(12))


def test_bad_inputs_raise_with_the_function_name() -> None:
    with pytest.raises(ValueError, match="roc_auc: labels must be 0, 1 or NaN"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="roc_auc: 2 labels but 3 scores"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="brier_score: probabilities must lie in"):
        brier_score([0, 1], [-2.0, 3.0])
    with pytest.raises(ValueError, match="NaN score"):
        mean_absolute_error([1.0, 2.0], [1.0, NAN])
    # A NaN score next to an unknown label is fine: that image is not evaluated.
    assert mean_absolute_error([1.0, NAN], [1.5, NAN]) == 0.5


# --- operating point, Brier, calibration --------------------------------------------


def test_sensitivity_specificity_at_threshold() -> None:
    labels = [1, 1, 1, 0, 0]
    scores = [0.9, 0.5, 0.2, 0.6, 0.1]
    assert sensitivity(labels, scores, 0.5) == pytest.approx(2 / 3)  # 0.5 counts positive
    assert specificity(labels, scores, 0.5) == pytest.approx(1 / 2)
    assert math.isnan(sensitivity([0, 0], [0.1, 0.9]))
    assert math.isnan(specificity([1, 1], [0.1, 0.9]))


def test_operating_point_margins_match_per_image_thresholds() -> None:
    labels = np.array([1, 1, 0, 0])
    probs = np.array([0.30, 0.70, 0.30, 0.70])
    thresholds = np.array([0.30, 0.80, 0.35, 0.60])  # each image's own model's threshold
    sens, spec = operating_point_metrics()
    assert sens(labels, probs - thresholds) == 0.5  # 0.30 >= 0.30 yes; 0.70 >= 0.80 no
    assert spec(labels, probs - thresholds) == 0.5  # 0.30 < 0.35 yes; 0.70 < 0.60 no


def test_brier_and_the_prevalence_baseline() -> None:
    assert brier_score([1, 0], [0.8, 0.3]) == pytest.approx(0.065)
    labels = [1, 0, 0, 0, NAN]
    # The constant prediction p = prevalence scores p (1 - p) and ranks nothing.
    assert brier_score(labels, [0.25] * 5) == pytest.approx(0.25 * 0.75)
    assert roc_auc(labels, [0.25] * 5) == 0.5
    assert math.isnan(brier_score([NAN], [0.5]))


def test_expected_calibration_error_and_reliability_table() -> None:
    labels = [0, 1, 1, 1]
    probs = [0.15, 0.15, 0.85, 0.85]
    # bin [0.1, 0.2): p 0.15, rate 0.5 -> 0.35 * 2/4; bin [0.8, 0.9): 0.15 * 2/4.
    assert expected_calibration_error(labels, probs) == pytest.approx(0.25)
    assert metrics.CALIBRATION_BINS == 10
    table = reliability_table(labels, probs)
    assert len(table) == 10
    assert [b.n for b in table] == [0, 2, 0, 0, 0, 0, 0, 0, 2, 0]
    assert table[1].mean_probability == pytest.approx(0.15)
    assert table[1].observed_rate == 0.5
    assert to_dict(table[0])["observed_rate"] is None
    # 1.0 falls in the last bin; perfectly calibrated extremes give 0.
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert reliability_table([1], [1.0], bins=4)[3].n == 1


def test_regression_metrics_hand_computed() -> None:
    targets, predictions = [1.0, 2.0, 3.0], [2.0, 2.0, 5.0]
    assert mean_absolute_error(targets, predictions) == pytest.approx(1.0)
    assert r_squared(targets, predictions) == pytest.approx(-1.5)
    assert pearson_r(targets, predictions) == pytest.approx(0.8660254)
    assert r_squared(targets, targets) == 1.0
    # Predicting the mean of these targets: R^2 0; pearson undefined (constant).
    assert r_squared(targets, [2.0] * 3) == 0.0
    assert math.isnan(pearson_r(targets, [2.0] * 3))
    assert PEARSON.why_undefined(targets, [2.0] * 3) == "pearson_r: the predictions are constant"
    assert math.isnan(r_squared([2.0, 2.0], [1.0, 3.0]))
    assert R2.why_undefined([2.0, 2.0]) == "r2: all 2 known targets are equal"


# --- bootstrap -----------------------------------------------------------------------


def _noisy_problem(n_patients: int = 60, seed: int = 3) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, n_patients)
    groups = np.repeat(np.arange(n_patients), per_patient)
    patient_label = rng.integers(0, 2, n_patients)
    labels = patient_label[groups].astype(float)
    probs = np.clip(0.3 * labels + 0.7 * rng.random(groups.size), 0, 1)
    return labels, probs, groups


def test_bootstrap_contains_point_and_is_deterministic() -> None:
    labels, probs, groups = _noisy_problem()
    chosen = [AUC, BRIER, ECE]
    first = bootstrap(chosen, labels, probs, groups, n_resamples=300, seed=7)
    again = bootstrap(chosen, labels, probs, groups, n_resamples=300, seed=7)
    other = bootstrap(chosen, labels, probs, groups, n_resamples=300, seed=8)
    assert first == again
    assert first["auc"].low != other["auc"].low
    for name, estimate in first.items():
        assert estimate.low <= estimate.value <= estimate.high, name
        assert estimate.n == labels.size
        assert estimate.patients == 60
        assert estimate.resamples == 300
        assert estimate.note is None
    assert first["auc"].value == pytest.approx(roc_auc(labels, probs))


def test_bootstrap_resamples_patients_not_images() -> None:
    # Each patient's image copied 5 times: the same information, so a patient-level
    # bootstrap gives exactly the same interval; an image-level one would be narrower.
    rng = np.random.default_rng(4)
    targets = rng.normal(4, 2, 40)
    predictions = targets + rng.normal(0, 1, 40)
    groups = np.arange(40)
    once = bootstrap([MAE, R2], targets, predictions, groups, n_resamples=200, seed=1)
    copied = bootstrap(
        [MAE, R2],
        np.repeat(targets, 5),
        np.repeat(predictions, 5),
        np.repeat(groups, 5),
        n_resamples=200,
        seed=1,
    )
    for name in ("mae", "r2"):
        assert copied[name].value == pytest.approx(once[name].value)
        assert copied[name].low == pytest.approx(once[name].low)
        assert copied[name].high == pytest.approx(once[name].high)
    assert copied["mae"].n == 200
    assert copied["mae"].patients == 40


def test_bootstrap_undefined_metric_has_a_note_and_no_interval() -> None:
    result = bootstrap([AUC, BRIER], [1, 1, 1, NAN], [0.2, 0.5, 0.9, 0.1], ["a", "b", "c", "d"])
    assert math.isnan(result["auc"].value)
    assert result["auc"].note is not None
    assert "all 3 known labels are positive" in result["auc"].note
    assert result["brier"].defined
    assert result["brier"].patients == 3  # patient d has no known label


def test_bootstrap_rare_class_interval_is_flagged() -> None:
    # One positive patient among 30: a third of the resamples miss it -> no interval.
    labels = np.zeros(30)
    labels[0] = 1
    scores = np.linspace(0, 1, 30)[::-1]
    result = bootstrap([AUC], labels, scores, np.arange(30), n_resamples=150, seed=0)
    assert result["auc"].value == 1.0
    assert math.isnan(result["auc"].low)
    assert result["auc"].note is not None
    assert "defined in only" in result["auc"].note


def test_bootstrap_over_repeats_averages_and_skips_unpredicted() -> None:
    targets = np.array([1.0, 2.0, 3.0, 4.0])
    # Repeat 0 predicted images 0-1, repeat 1 images 2-3 (like 50/50 splits).
    scores = np.array([[2.0, 2.0, NAN, NAN], [NAN, NAN, 3.0, 6.0]])
    result = bootstrap([MAE], targets, scores, [0, 1, 2, 3], n_resamples=0)
    assert result["mae"].value == pytest.approx((0.5 + 1.0) / 2)
    assert math.isnan(result["mae"].low)
    assert result["mae"].n == 4


def test_bootstrap_argument_checks() -> None:
    with pytest.raises(ValueError, match="bootstrap: scores have shape"):
        bootstrap([MAE], [1.0, 2.0], [[1.0, 2.0, 3.0]], [0, 1])
    with pytest.raises(ValueError, match="bootstrap: 2 labels but 1 group keys"):
        bootstrap([MAE], [1.0, 2.0], [1.0, 2.0], [0])
    with pytest.raises(ValueError, match="level"):
        bootstrap([MAE], [1.0, 2.0], [1.0, 2.0], [0, 1], level=1.5)


def test_estimate_json_round_trip_and_text() -> None:
    estimate = Estimate(0.81234, 0.7, 0.9, n=10, patients=8, resamples=2000)
    data = json.loads(json.dumps(to_dict(estimate), allow_nan=False))
    assert from_dict(Estimate, data) == estimate
    assert estimate.text() == "0.81 [0.70, 0.90]"
    undefined = Estimate(NAN, note="auc: all 3 known labels are positive")
    assert to_dict(undefined)["value"] is None
    back = from_dict(Estimate, json.loads(json.dumps(to_dict(undefined), allow_nan=False)))
    assert math.isnan(back.value)
    assert back.note == undefined.note
    assert undefined.text() == "n/a"
    assert Estimate(0.5).text() == "0.50"
