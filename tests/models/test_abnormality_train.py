"""Fitting and measuring the lung-zone pneumonia model on synthetic feature rows: no
patient leaks into its own out-of-fold score, the measurements' keys and ranges, and the
lung bundle's operating points."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from covidcxr.models import abnormality_train, metrics, processing
from covidcxr.models.abnormality import LinearRisk
from covidcxr.models.abnormality_train import (
    ZoneData,
    evaluate,
    fit,
    out_of_fold,
    prevalence,
    processing_drift,
    source_probe,
    summary_lines,
    transfer,
    within_source_cv,
)
from covidcxr.models.bundle import ModelBundle, load_bundle
from covidcxr.models.calibration import youden_threshold
from covidcxr.models.coherence import NO_FINDING
from covidcxr.models.lung_model import operating_points

DIMENSIONS = 20
AUC_KEYS = {"auc", "low", "high", "images", "positives", "patients"}


def zone_data(
    x: NDArray[np.float64],
    pneumonia: NDArray[np.float64],
    source: str,
    covid: NDArray[np.float64] | None = None,
) -> ZoneData:
    """Rows of one source, two images a patient (rows 2k and 2k+1 are patient k)."""
    n = len(x)
    group = np.asarray([f"{source}-patient-{k // 2}" for k in range(n)])
    return ZoneData(
        x,
        pneumonia.astype(np.float64),
        np.zeros(n) if covid is None else covid,
        np.full(n, source),
        group,
        group.copy(),
        np.asarray([f"{source}/{k}.png" for k in range(n)]),
    )


def concatenate(*parts: ZoneData) -> ZoneData:
    fields = [f.name for f in dataclasses.fields(ZoneData)]
    return ZoneData(*(np.concatenate([getattr(p, name) for p in parts]) for name in fields))


def two_sources(seed: int = 0, patients: int = 30) -> ZoneData:
    """Sources "a" and "b": pneumonia follows x[:, 0] in both; "b" is shifted along
    x[:, 1] (so a probe can tell them apart) and half its pneumonia is COVID-19. Two of
    "a"'s images have no label."""
    rng = np.random.default_rng(seed)
    parts = []
    for name, shift in (("a", 0.0), ("b", 3.0)):
        x = rng.normal(size=(2 * patients, DIMENSIONS))
        x[:, 1] += shift
        pneumonia = (x[:, 0] + rng.normal(0.0, 0.3, len(x)) > 0).astype(np.float64)
        covid = pneumonia * (rng.random(len(x)) < 0.5) if name == "b" else None
        parts.append(zone_data(x, pneumonia, name, covid))
    parts[0].pneumonia[:2] = np.nan
    return concatenate(*parts)


def auc(labels: NDArray[np.float64], scores: NDArray[np.float64]) -> float:
    return metrics.roc_auc(labels, scores)


# --- fit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [np.zeros(10), np.ones(10)])
def test_fit_refuses_labels_of_one_class(labels: NDArray[np.float64]) -> None:
    with pytest.raises(ValueError, match="needs normal and pneumonia"):
        fit(np.random.default_rng(0).normal(size=(10, 3)), labels)


def test_fit_learns_the_signal() -> None:
    data = two_sources()
    rows = data.labelled("a")
    model = fit(data.x[rows], data.pneumonia[rows])
    assert isinstance(model, LinearRisk)
    assert np.argmax(np.abs(model.coef)) == 0
    assert auc(data.pneumonia[rows], model.probability(data.x[rows])) > 0.9


# --- out of fold: no leaks ----------------------------------------------------------------


def twins(seed: int = 0, patients: int = 20) -> ZoneData:
    """Each patient's two images are identical copies; the label is a coin toss per
    patient, so only a model that saw an image's twin can score it well."""
    rng = np.random.default_rng(seed)
    x = np.repeat(rng.normal(size=(patients, DIMENSIONS)), 2, axis=0)
    labels = np.repeat(rng.permutation(np.arange(patients) % 2), 2)
    return zone_data(x, labels.astype(np.float64), "leak")


def test_out_of_fold_scores_do_not_leak_a_patients_twin() -> None:
    data = twins()
    in_sample = fit(data.x, data.pneumonia).probability(data.x)
    part, scores = out_of_fold(data, "leak", folds=5, repeats=3, seed=0)
    out_of_sample = float(np.mean([auc(part.pneumonia, row) for row in scores]))
    assert auc(data.pneumonia, in_sample) > 0.9  # a model that saw the twin knows it
    assert abs(out_of_sample - 0.5) < 0.2


def test_out_of_fold_never_scores_an_image_with_a_model_that_saw_its_patient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = two_sources()
    data.x[:, -1] = np.arange(len(data.x))  # each row names itself
    seen: list[tuple[set[str], set[str]]] = []

    class Spy:
        def __init__(self, trained_on: set[str]) -> None:
            self.trained_on = trained_on

        def probability(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
            seen.append((self.trained_on, {str(data.group[int(i)]) for i in x[:, -1]}))
            return np.full(len(x), 0.5)

    def spy_fit(x: NDArray[np.float64], y: NDArray[np.float64]) -> Spy:
        return Spy({str(data.group[int(i)]) for i in x[:, -1]})

    monkeypatch.setattr(abnormality_train, "fit", spy_fit)
    part, scores = out_of_fold(data, "a", folds=4, repeats=2, seed=3)
    assert len(seen) == 4 * 2
    assert all(not (trained & scored) for trained, scored in seen)
    assert set(part.source.tolist()) == {"a"}
    assert len(part.x) == len(data.labelled("a"))
    assert scores.shape == (2, len(part.x))
    assert np.isfinite(scores).all()  # every labelled image scored once per repeat


def test_out_of_fold_repeats_shuffle_the_patients() -> None:
    data = two_sources()
    _, scores = out_of_fold(data, "a", folds=5, repeats=2, seed=0)
    assert not np.allclose(scores[0], scores[1])


# --- measurements -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> ZoneData:
    return two_sources()


@pytest.fixture(scope="module")
def evaluation(data: ZoneData) -> dict[str, Any]:
    return evaluate(data, "a", seed=0)


def check_auc(result: dict[str, Any], images: int, patients: int) -> None:
    assert set(result) >= AUC_KEYS
    assert 0.0 <= result["low"] <= result["auc"] <= result["high"] <= 1.0
    assert result["images"] == images
    assert result["patients"] == patients
    assert 0 < result["positives"] < images


def test_within_source_cv_measures_the_labelled_images_of_the_source(
    data: ZoneData, evaluation: dict[str, Any]
) -> None:
    result = evaluation["within_source_cv"]
    assert result == within_source_cv(data, "a", seed=0)
    assert {"source": "a", "folds": 5, "repeats": 3}.items() <= result.items()
    labelled = data.labelled("a")
    check_auc(result, len(labelled), len(set(data.group[labelled].tolist())))
    assert result["auc"] > 0.8  # the label follows x[:, 0]


def test_transfer_scores_the_other_source(data: ZoneData, evaluation: dict[str, Any]) -> None:
    [result] = evaluation["transfer"]
    assert result == transfer(data, "a", "b", seed=0)
    assert result["train_source"] == "a"
    assert result["test_source"] == "b"
    rows = data.labelled("b")
    check_auc(result, len(rows), len(set(data.group[rows].tolist())))
    assert result["auc"] > 0.8
    assert 0.0 <= result["covid_called_pneumonia"] <= 1.0
    assert 0.0 <= result["no_finding_median_p"] <= 1.0
    # COVID-19 images are pneumonia images here, and the model sees pneumonia.
    assert result["covid_called_pneumonia"] > result["no_finding_median_p"]


def test_transfer_to_a_source_without_covid_images_states_none(data: ZoneData) -> None:
    no_covid = dataclasses.replace(data, covid=np.zeros(len(data.x)))
    assert transfer(no_covid, "a", "b")["covid_called_pneumonia"] is None


def test_the_source_probe_tells_the_first_two_sources_apart(
    data: ZoneData, evaluation: dict[str, Any]
) -> None:
    result = evaluation["source_probe"]
    assert result["sources"] == ["a", "b"]
    assert result["target"] == "b"
    check_auc(result, len(data.x), len(set(data.group.tolist())))
    assert result["auc"] > 0.8  # "b" is shifted along x[:, 1]


def test_the_source_probe_uses_only_the_first_two_sources(data: ZoneData) -> None:
    rng = np.random.default_rng(5)
    labels = (np.arange(20) % 2).astype(np.float64)
    extra = zone_data(rng.normal(size=(20, DIMENSIONS)), labels, "c")
    result = source_probe(concatenate(data, extra))
    assert result["sources"] == ["a", "b"]
    assert result["images"] == len(data.x)


def test_prevalence_is_the_share_of_pneumonia_in_the_training_source(data: ZoneData) -> None:
    labels = data.pneumonia[(data.source == "a") & ~np.isnan(data.pneumonia)]
    assert prevalence(data, "a") == pytest.approx(labels.sum() / len(labels))
    assert 0.0 < prevalence(data, "a") < 1.0


def test_summary_lines_name_the_sources(evaluation: dict[str, Any]) -> None:
    lines = summary_lines(evaluation)
    assert len(lines) >= 3
    assert all(isinstance(line, str) and line.startswith("- ") for line in lines)
    assert "within a" in lines[0]
    assert any("Fitted on a, scored on b" in line for line in lines)
    assert "predicting b vs a" in lines[-1]
    assert f"{evaluation['within_source_cv']['auc']:.2f}" in lines[0]


# --- operating points of the lung bundle --------------------------------------------------


def base_bundle() -> ModelBundle:
    return dataclasses.replace(
        load_bundle("covidcxr-small-v1"), thresholds=(0.61, 0.62, 0.63, 0.64, 0.65)
    )


def test_operating_points_take_no_finding_from_the_out_of_fold_scores() -> None:
    base = base_bundle()
    rng = np.random.default_rng(0)
    n = 40
    labels = np.zeros((n, len(base.findings)))
    labels[: n // 2, :] = 1.0
    # Every column separates its classes around 0.5 except "Fungal pneumonia" (no positives)
    # and "No finding", whose validation column would put its cut near 0.95.
    table = np.where(
        labels == 1.0, rng.uniform(0.6, 0.9, labels.shape), rng.uniform(0.1, 0.4, labels.shape)
    )
    fungal, no_finding = base.findings.index("Fungal pneumonia"), base.findings.index(NO_FINDING)
    labels[:, fungal] = 0.0
    table[:, no_finding] = np.where(labels[:, no_finding] == 1.0, 0.97, 0.93)
    oof_labels = np.repeat([1.0, 0.0], 30)  # pneumonia
    oof_scores = np.where(oof_labels == 1.0, rng.uniform(0.7, 0.8, 60), rng.uniform(0.2, 0.3, 60))
    thresholds, record = operating_points(base, table, labels, (oof_labels, oof_scores))
    assert len(thresholds) == len(base.findings)
    # No finding = 1 - P(pneumonia): its cut lies between 0.2-0.3 and 0.7-0.8.
    assert 0.3 < thresholds[no_finding] < 0.7
    assert thresholds[no_finding] == youden_threshold(1.0 - oof_scores, 1.0 - oof_labels)[0]
    assert "out-of-fold" in record[NO_FINDING]["on"]
    assert record[NO_FINDING]["youden_j"] == pytest.approx(1.0)
    for k, name in enumerate(base.findings):
        if k in (fungal, no_finding):
            continue
        assert 0.4 < thresholds[k] < 0.6
        assert thresholds[k] == youden_threshold(table[:, k], labels[:, k])[0]
        assert "validation" in record[name]["on"]
    assert thresholds[fungal] == base.thresholds[fungal]
    assert "kept from the base" in record["Fungal pneumonia"]["on"]
    assert record["Fungal pneumonia"]["threshold"] == round(base.thresholds[fungal], 6)


# --- processing drift -----------------------------------------------------------------------


def brightness(image: Image.Image) -> float:
    """A stand-in 'model': the image's mean grey level over 255."""
    return float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255)


def mid_grey_files(folder: Path, count: int = 3) -> list[str]:
    paths = []
    for k in range(count):
        path = folder / f"chest-{k}.png"
        Image.fromarray(np.full((32, 40), 100 + 4 * k, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_processing_drift_reports_how_each_step_moves_the_probability(tmp_path: Path) -> None:
    paths = mid_grey_files(tmp_path)
    steps = {"brighter": processing.gamma(0.5), "darker": processing.gamma(2.0)}
    drift = processing_drift(brightness, paths, steps)
    assert drift["images"] == 3
    assert drift["called_before"] == 0.0  # 100-108 of 255 is below 0.5
    assert drift["brighter"]["mean_change"] > 0.1
    assert drift["brighter"]["called_after"] == 1.0
    assert drift["darker"]["mean_change"] < -0.1
    assert drift["darker"]["mean_abs_change"] == pytest.approx(-drift["darker"]["mean_change"])
    assert drift["darker"]["called_after"] == 0.0


def test_processing_drift_refuses_no_images() -> None:
    with pytest.raises(ValueError, match="no image"):
        processing_drift(brightness, [])


def test_summary_lines_list_the_processing_drift(evaluation: dict[str, Any]) -> None:
    drift = {
        "source": "a",
        "images": 3,
        "called_before": 0.1,
        "histogram equalised": {"mean_change": 0.29, "mean_abs_change": 0.33, "called_after": 0.6},
    }
    lines = summary_lines({**evaluation, "processing_drift": drift})
    assert "3 normal chests of a" in lines[-2]
    assert "10% unprocessed" in lines[-2]
    assert lines[-1] == (
        "  - histogram equalised: P(pneumonia) +0.29 on average (mean |change| 0.33); "
        "called pneumonia 60%"
    )
    assert not any("Processing" in line for line in summary_lines(evaluation))
