"""Prognosis metrics (AUROC, Brier, calibration, net benefit) with patient-bootstrap intervals."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit

from covidcxr.models.metrics import interval_text

Array = NDArray[np.float64]


# Every metric takes weights ``w`` (resamples x patients: how often each patient is
# drawn), so that a thousand bootstrap resamples are one array operation.


def _logit(p: Array) -> Array:
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    return np.asarray(np.log(clipped / (1 - clipped)), dtype=np.float64)


def _logistic(y: Array, x: Array | None, offset: Array, w: Array) -> Array:
    """Weighted maximum-likelihood fit of ``logit P(y) = offset + a (+ b x)`` by Newton
    steps, one per row of ``w``: ``(a, b)`` per row (``(a,)`` without ``x``); ``NaN``
    where the fit does not converge (separated data)."""
    k = 1 if x is None else 2
    beta = np.zeros((w.shape[0], k))
    done = np.zeros(w.shape[0], dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(25):
            eta = offset + beta[:, :1] + (0.0 if x is None else beta[:, 1:] * x)
            p = expit(eta)
            residual, v = w * (y - p), w * p * (1 - p)
            g0, h00 = residual.sum(1), v.sum(1)
            if x is None:
                step = (g0 / h00)[:, None]
            else:
                g1, h01, h11 = (residual * x).sum(1), (v * x).sum(1), (v * x * x).sum(1)
                det = h00 * h11 - h01 * h01
                step = np.column_stack([(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det])
            beta = np.where(done[:, None], beta, beta + step)
            done |= np.abs(step).max(1) < 1e-8
            if done.all():
                break
    beta[~done] = math.nan
    return beta


def calibration_slope(y: Array, p: Array, w: Array) -> Array:
    """The slope of the logistic regression of the outcome on the logit of the
    prediction (1 = ideal; below 1: predictions too extreme)."""
    return _logistic(y, _logit(p), np.zeros_like(p), w)[:, 1]


def calibration_intercept(y: Array, p: Array, w: Array) -> Array:
    """Calibration in the large: the intercept with the logit of the prediction as an
    offset (slope fixed at 1; 0 = ideal; above 0: risks underestimated)."""
    return _logistic(y, None, _logit(p), w)[:, 0]


def auroc(y: Array, p: Array, w: Array) -> Array:
    """Area under the ROC curve: the (weighted) chance that a patient with the event
    scores above one without, ties counting half (``NaN`` with one class)."""
    values, inverse = np.unique(p, return_inverse=True)
    onehot = np.zeros((len(p), len(values)))
    onehot[np.arange(len(p)), inverse] = 1.0
    positive, negative = (w * y) @ onehot, (w * (1 - y)) @ onehot
    below = np.cumsum(negative, axis=1) - negative
    pairs = positive.sum(1) * negative.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, (positive * (below + 0.5 * negative)).sum(1) / pairs, math.nan)


def brier(y: Array, p: Array, w: Array) -> Array:
    """Mean squared error of the probabilities."""
    return np.asarray((w * (p - y) ** 2).sum(1) / w.sum(1), dtype=np.float64)


Metric = Callable[[Array, Array, Array], Array]
METRICS: Final[Mapping[str, Metric]] = {
    "auroc": auroc,
    "brier": brier,
    "calibration_slope": calibration_slope,
    "calibration_intercept": calibration_intercept,
}


def net_benefit(y: Array, p: Array, thresholds: Sequence[float]) -> Array:
    """Net benefit of treating patients whose risk reaches each threshold:
    ``TP/n - FP/n * t/(1-t)``."""
    n = len(y)
    out = []
    for t in thresholds:
        treat = p >= t
        true_pos = float(np.sum(treat & (y == 1)))
        false_pos = float(np.sum(treat & (y == 0)))
        out.append(true_pos / n - false_pos / n * t / (1 - t))
    return np.array(out)


@dataclass(frozen=True)
class Interval:
    """A value with its 95% patient-bootstrap percentile interval (``NaN`` = none)."""

    value: float
    low: float = math.nan
    high: float = math.nan

    def text(self, digits: int = 2) -> str:
        """``0.71 [0.60, 0.81]``; ``n/a`` when undefined."""
        return interval_text(self.value, self.low, self.high, digits)


def bootstrap_metrics(y: Array, scores: Array, *, resamples: int, seed: int) -> dict[str, Interval]:
    """Each of :data:`METRICS` (mean over repeats) with a 95% percentile interval from
    resampling patients (rows) with replacement; resamples with one class are skipped.

    Args:
        y: 0/1 outcome per patient.
        scores: ``repeats x patients`` out-of-fold probabilities.
        resamples: bootstrap resamples (0: no interval).
        seed: seeds ``np.random.default_rng``.
    """
    n = len(y)
    draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    weights = np.vstack([np.ones((1, n)), draws])
    events = (weights * y).sum(1)
    usable = (events > 0) & (events < n)
    result = {}
    for name, metric in METRICS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no value
            values = np.nanmean([metric(y, row, weights) for row in scores], axis=0)
        finite = values[1:][usable[1:] & np.isfinite(values[1:])]
        low, high = np.percentile(finite, [2.5, 97.5]) if len(finite) >= 20 else (math.nan,) * 2
        result[name] = Interval(float(values[0]), float(low), float(high))
    return result
