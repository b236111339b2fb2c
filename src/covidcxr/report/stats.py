"""Statistics of the validation report: patient-level bootstrap, operating points,
calibration, recalibration, severity agreement and sample-size statements."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm
from sklearn.metrics import brier_score_loss, roc_curve

from covidcxr.models.metrics import interval_text

Floats = NDArray[np.float64]

#: Bootstrap resamples for every interval of the report.
DEFAULT_RESAMPLES: Final = 1000
#: Interval level of every interval of the report.
LEVEL: Final = 0.95
#: Half width the sample-size statement aims for.
TARGET_HALF_WIDTH: Final = 0.05
#: Reliability-diagram bins (equal width).
CALIBRATION_BINS: Final = 10


@dataclass(frozen=True)
class Estimate:
    """A number with its 95% interval (``nan`` ends when it cannot be computed).

    Attributes:
        value: the point estimate on all cases.
        low: the interval's lower end.
        high: the interval's upper end.
        method: how the interval was computed.
    """

    value: float
    low: float = math.nan
    high: float = math.nan
    method: str = ""

    def text(self, digits: int = 2) -> str:
        """``0.81 [0.72, 0.90]``, or ``n/a``."""
        return interval_text(self.value, self.low, self.high, digits)


#: The statistics :func:`patient_bootstrap` computes.
STATISTICS: Final = ("auc", "sensitivity", "specificity", "ppv", "npv")


def _ratio(top: Floats, bottom: Floats) -> Floats:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)


def weighted_statistic(
    name: str, y: Floats, p: Floats, weights: Floats, threshold: float = 0.5
) -> Floats:
    """One statistic for each row of ``weights`` (R x N case multiplicities).

    A bootstrap resample is a weight per case (how often it was drawn), so R resamples
    are one matrix product instead of R Python loops.
    """
    positive, called = y == 1, p >= threshold
    if name == "auc":
        pos, neg = p[positive], p[~positive]
        wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        pairs = np.einsum("ri,ij,rj->r", weights[:, positive], wins, weights[:, ~positive])
        return _ratio(pairs, weights[:, positive].sum(1) * weights[:, ~positive].sum(1))
    hits, total = _masks(name, positive, called)
    return _ratio(weights[:, hits].sum(1), weights[:, total].sum(1))


_WILSON: Final = ", widened to cover the Wilson interval"


def _masks(name: str, positive: NDArray[np.bool_], called: NDArray[np.bool_]) -> tuple[Any, Any]:
    return {
        "sensitivity": (called & positive, positive),
        "specificity": (~called & ~positive, ~positive),
        "ppv": (called & positive, called),
        "npv": (~called & ~positive, ~called),
    }[name]


def _counts(name: str, y: Floats, p: Floats, threshold: float) -> tuple[int, int]:
    hits, total = _masks(name, y == 1, p >= threshold)
    return int(hits.sum()), int(total.sum())


def wilson(hits: float, total: float) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (``nan`` when ``total`` is 0)."""
    if total <= 0:
        return math.nan, math.nan
    z = float(norm.ppf(0.5 + LEVEL / 2))
    rate = hits / total
    centre = (rate + z**2 / (2 * total)) / (1 + z**2 / total)
    half = z * math.sqrt(rate * (1 - rate) / total + z**2 / (4 * total**2)) / (1 + z**2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def patient_bootstrap(
    names: Sequence[str],
    y: Floats,
    p: Floats,
    groups: Sequence[Hashable],
    *,
    threshold: float = 0.5,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Percentile intervals from resampling patients (all their images) with replacement.

    Args:
        names: statistics among :data:`STATISTICS`.
        y: 0/1 labels.
        p: scores.
        groups: a patient key per case (cases of one patient are resampled together).
        threshold: the operating point of sensitivity, specificity, PPV and NPV.
        n_resamples: resamples.
        seed: the generator's seed (the same draws for every statistic).

    Returns:
        name -> estimate; the interval is ``nan`` when fewer than half the resamples
        give a finite value. A proportion's interval also covers its Wilson interval:
        with few cases (or all of them from a few patients) the bootstrap alone gives
        intervals of zero width, which would read as certainty.
    """
    keys = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]
    patients = int(keys.max()) + 1 if len(y) else 0
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, max(patients, 1), (n_resamples, patients))
    counts = np.stack([np.bincount(row, minlength=patients) for row in drawn]) if patients else None
    weights = counts[:, keys].astype(np.float64) if counts is not None else np.zeros((0, 0))
    method = f"patient-level bootstrap ({n_resamples} resamples, {patients} patients)"
    result = {}
    for name in names:
        value = float(weighted_statistic(name, y, p, np.ones((1, len(y))), threshold)[0])
        values = weighted_statistic(name, y, p, weights, threshold) if patients else np.zeros(0)
        values = values[np.isfinite(values)]
        low = high = math.nan
        if len(values) >= n_resamples / 2:
            low, high = (float(q) for q in np.quantile(values, [0.025, 0.975]))
        if name != "auc" and math.isfinite(low):
            hits, total = _counts(name, y, p, threshold)
            wide_low, wide_high = wilson(hits, total)
            low, high = min(low, wide_low), max(high, wide_high)
        result[name] = Estimate(value, low, high, method + _WILSON * (name != "auc"))
    return result


def youden_threshold(y: Floats, p: Floats) -> float:
    """The threshold maximising sensitivity + specificity - 1 on these cases."""
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def roc_points(y: Floats, p: Floats) -> dict[str, list[float]]:
    """The ROC curve's points (false and true positive rates)."""
    fpr, tpr, _ = roc_curve(y, p)
    return {"fpr": [round(float(v), 4) for v in fpr], "tpr": [round(float(v), 4) for v in tpr]}


def calibration(y: Floats, p: Floats, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Brier score, expected calibration error and the reliability diagram's bins.

    ECE is the case-weighted mean of ``|observed rate - mean probability|`` over
    ``bins`` equal-width bins (empty bins left out).
    """
    index = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        inside = index == b
        if not inside.any():
            continue
        observed, predicted = float(y[inside].mean()), float(p[inside].mean())
        ece += inside.sum() / len(p) * abs(observed - predicted)
        rows.append({"bin": b, "n": int(inside.sum()), "mean_p": predicted, "observed": observed})
    return {"brier": float(brier_score_loss(y, p)), "ece": float(ece), "bins": rows}


def logit(p: Floats) -> Floats:
    """``log(p / (1 - p))`` with p clipped to [1e-6, 1 - 1e-6]."""
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


def fit_platt(y: Floats, p: Floats) -> tuple[float, float]:
    """Platt scaling on the logit: ``p' = sigmoid(a * logit(p) + b)``; returns (a, b)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e6, max_iter=1000)
    model.fit(logit(p)[:, None], y.astype(int))
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def apply_platt(p: Floats, a: float, b: float) -> Floats:
    """The recalibrated probabilities ``sigmoid(a * logit(p) + b)``."""
    return np.asarray(1.0 / (1.0 + np.exp(-(a * logit(p) + b))), dtype=np.float64)


def severity_agreement(truth: Floats, predicted: Floats) -> dict[str, float]:
    """MAE, R^2 and the Bland-Altman bias with its 95% limits of agreement."""
    diff = predicted - truth
    total = float(((truth - truth.mean()) ** 2).sum())
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
    return {
        "n": len(truth),
        "mae": float(np.abs(diff).mean()),
        "r2": 1.0 - float((diff**2).sum()) / total if total else math.nan,
        "bias": float(diff.mean()),
        "loa_low": float(diff.mean()) - 1.96 * sd,
        "loa_high": float(diff.mean()) + 1.96 * sd,
    }


def proportion_cases(rate: float, half_width: float = TARGET_HALF_WIDTH) -> int:
    """Cases a proportion needs for a 95% Wald interval of ``+/- half_width``."""
    z = float(norm.ppf(0.5 + LEVEL / 2))
    rate = min(max(rate, 0.05), 0.95) if math.isfinite(rate) else 0.5
    return math.ceil(z**2 * rate * (1 - rate) / half_width**2)


def auc_standard_error(value: float, positives: int, negatives: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUC."""
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    variance = (
        value * (1 - value) + (positives - 1) * (q1 - value**2) + (negatives - 1) * (q2 - value**2)
    ) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def auc_cases(value: float, positives: int, negatives: int) -> tuple[int, int]:
    """(positives, negatives), at the same ratio, for an AUC interval of +/- 0.05."""
    if not math.isfinite(value) or positives < 1 or negatives < 1:
        return 0, 0
    value = min(max(value, 0.55), 0.97)
    z = float(norm.ppf(0.5 + LEVEL / 2))
    scale = 1.0
    while z * auc_standard_error(value, round(positives * scale), round(negatives * scale)) > (
        TARGET_HALF_WIDTH
    ):
        scale *= 1.05
    return max(round(positives * scale), 1), max(round(negatives * scale), 1)
