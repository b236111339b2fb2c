"""Calibration and operating points of the findings head: a temperature per label
(minimum validation NLL), a threshold per label (maximum Youden's J), and the
validation report (AUROC with patient-bootstrap intervals, the gate's confusion)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_curve

from covidcxr.models.bundle import GATE_CLASSES
from covidcxr.models.metrics import AUC, bootstrap, roc_auc

#: Patient-bootstrap replicates for the test-fold intervals.
BOOTSTRAP_REPLICATES: Final = 1000
#: Replicates for the validation-fold intervals (recorded, not decided on).
VALIDATION_REPLICATES: Final = 200


def rounded(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded for a report; None for None and NaN."""
    return None if value is None or math.isnan(value) else round(float(value), digits)


def sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """1 / (1 + exp(-z)) without overflow."""
    result: NDArray[np.float64] = np.exp(-np.logaddexp(0.0, -z))
    return result


def binary_nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``sigmoid(logits / temperature)``; NaN labels
    are ignored (NaN when none is known).

    Computed from the logits (``log(1 + exp(-z))``), so confident mistakes cost their
    full value instead of a probability clipped at machine epsilon.
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    known = ~np.isnan(y)
    if not known.any():
        return math.nan
    z, y = z[known], y[known]
    return float(np.mean(np.logaddexp(0.0, np.where(y >= 0.5, -z, z))))


def fit_temperature(
    logits: Any, labels: Any, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature ``T`` in ``bounds`` minimising :func:`binary_nll` of ``logits / T``.

    The NLL is convex in ``1 / T``: scipy's bounded scalar minimiser searches ``1 / T``
    to 1e-7. Without known labels, or with one class only (the NLL then falls without
    end as ``T`` shrinks), 1.0 is returned.

    Args:
        logits: uncalibrated logits.
        labels: 0/1, NaN = unknown.
        bounds: the allowed range of T.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    known = y[~np.isnan(y)]
    if known.size == 0 or known.min() == known.max():
        return 1.0
    result = minimize_scalar(
        lambda inverse: binary_nll(logits, labels, 1.0 / inverse),
        bounds=(1.0 / bounds[1], 1.0 / bounds[0]),
        method="bounded",
        options={"xatol": 1e-7},
    )
    return float(1.0 / result.x)


def youden_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """The threshold maximising Youden's J = sensitivity + specificity - 1.

    The ROC curve (:func:`sklearn.metrics.roc_curve`) gives J at every distinct score;
    the chosen threshold lies midway between the best cut's score and the next lower
    score (just above the highest score when no cut beats J = 0), and a score >= it is
    positive. Ties in J go to the higher threshold (fewer false positives).

    Returns:
        (threshold, J); (NaN, NaN) when one class is missing.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    known = ~np.isnan(y)
    s, positive = s[known], y[known] >= 0.5
    if positive.all() or not positive.any():
        return math.nan, math.nan
    fpr, tpr, cuts = roc_curve(positive, s, drop_intermediate=False)
    j = tpr - fpr
    # Cuts fall from +inf (nothing positive, J = 0), so the first maximum is the highest
    # threshold; the lowest cut (everything positive, J = 0) never wins a tie with it.
    best = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    threshold = cuts[1] + 1e-6 if best == 0 else (cuts[best] + cuts[best + 1]) / 2
    return float(threshold), float(j[best])


def bootstrap_auroc(
    scores: NDArray[np.float64],
    labels: NDArray[np.float64],
    patients: Sequence[str],
    rng: np.random.Generator,
    replicates: int = BOOTSTRAP_REPLICATES,
) -> tuple[float, float]:
    """95% percentile interval of the AUROC, resampling patients (not images)."""
    seed = int(rng.integers(0, 2**31 - 1))
    estimate = bootstrap([AUC], labels, scores, list(patients), n_resamples=replicates, seed=seed)
    return estimate["auc"].low, estimate["auc"].high


def macro_auroc(logits: NDArray[Any], labels: NDArray[Any]) -> float:
    """Mean AUROC over the labels where it is defined (NaN: none is)."""
    values = [roc_auc(labels[:, j], logits[:, j]) for j in range(labels.shape[1])]
    known = [v for v in values if not math.isnan(v)]
    return float(np.mean(known)) if known else math.nan


def prevalence(column: NDArray[np.float32]) -> float:
    """Share of positives among the known labels (0.5 when none is known)."""
    known = column[~np.isnan(column)]
    return float((known >= 0.5).mean()) if known.size else 0.5


@dataclass(frozen=True)
class Calibration:
    """Per label temperatures and thresholds fitted on the validation fold, with the
    records training stores (``calibration`` and ``validation`` in provenance)."""

    temperatures: tuple[float, ...]
    thresholds: tuple[float, ...]
    record: dict[str, Any]
    validation: dict[str, Any]


def calibrate(
    logits: NDArray[np.float64],
    labels: NDArray[np.float32],
    patients: Sequence[str],
    names: Sequence[str],
    rng: np.random.Generator,
) -> Calibration:
    """Fit a temperature and an operating point per label on validation logits.

    A threshold is NaN where the label lacks validation positives or negatives (the
    caller falls back to the training prevalence).
    """
    temperatures, thresholds, before, after, j_values = [], [], [], [], []
    aurocs: dict[str, float | None] = {}
    intervals: dict[str, list[float | None]] = {}
    positives: dict[str, int] = {}
    negatives: dict[str, int] = {}
    for j, name in enumerate(names):
        z, y = logits[:, j], labels[:, j].astype(np.float64)
        temperature = fit_temperature(z, y)
        temperatures.append(round(temperature, 6))
        before.append(rounded(binary_nll(z, y)))
        after.append(rounded(binary_nll(z, y, temperature)))
        threshold, j_value = youden_threshold(sigmoid(z / temperature), y)
        thresholds.append(threshold)
        j_values.append(rounded(j_value))
        aurocs[name] = rounded(roc_auc(y, z))
        low, high = bootstrap_auroc(z, y, patients, rng, replicates=VALIDATION_REPLICATES)
        intervals[name] = [rounded(low), rounded(high)]
        known = y[~np.isnan(y)]
        positives[name] = int((known >= 0.5).sum())
        negatives[name] = int((known < 0.5).sum())
    record = {
        "method": "bias minus log(pos_weight) (prior correction), then one temperature per "
        "label minimising the validation NLL",
        "temperatures": temperatures,
        "val_nll_before": before,
        "val_nll_after": after,
    }
    validation = {
        "images": len(labels),
        "patients": len(set(patients)),
        "auroc": aurocs,
        "auroc_95ci_patient_bootstrap": intervals,
        "youden_j": dict(zip(names, j_values, strict=True)),
        "positives": positives,
        "negatives": negatives,
    }
    return Calibration(tuple(temperatures), tuple(thresholds), record, validation)


def gate_report(logits: NDArray[np.float32], truth: NDArray[np.int64]) -> dict[str, Any]:
    """Accuracy, recall per class and the confusion table of the gate (truth < 0:
    no gate class, left out)."""
    known = truth >= 0
    predicted = logits.argmax(axis=1)
    confusion = {
        GATE_CLASSES[t]: {
            GATE_CLASSES[p]: int(((truth == t) & (predicted == p)).sum())
            for p in range(len(GATE_CLASSES))
        }
        for t in range(len(GATE_CLASSES))
        if (truth == t).any()
    }
    recall = {
        name: rounded(row[name] / max(1, sum(row.values()))) for name, row in confusion.items()
    }
    return {
        "accuracy": rounded(
            float((predicted[known] == truth[known]).mean()) if known.any() else math.nan
        ),
        "recall": recall,
        "confusion": confusion,
    }


def operating_point_text(names: Sequence[str], validation: dict[str, Any]) -> str:
    """How the thresholds were chosen (the bundle's ``operating_point``)."""
    return (
        "Per label, the threshold on the calibrated probability that maximises Youden's J "
        "(sensitivity + specificity - 1) on the validation fold "
        f"({validation['images']} images of {validation['patients']} patients; positives "
        + ", ".join(f"{name} {validation['positives'][name]}" for name in names)
        + "). Youden's J weighs sensitivity and specificity equally and does not depend "
        "on prevalence, which differs between this collection (mostly COVID-19) and any "
        "clinic. With a handful of validation positives a threshold is uncertain: choose "
        "one on local data before relying on it. A label without validation positives "
        "or negatives falls back to its training prevalence."
    )
