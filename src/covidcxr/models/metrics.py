"""Evaluation metrics with patient-level bootstrap confidence intervals.

Point metrics take a label vector and a score vector. A ``NaN`` label means *unknown*
(see :mod:`covidcxr.dataset.tasks`): the pair is ignored, never counted as a negative.
A ``NaN`` score next to a known label is a bug in the caller (a model gave no output)
and raises ``ValueError``. A metric that is undefined on the data (an AUC over one
class, an R^2 over constant targets) returns ``NaN``; :meth:`Metric.why_undefined`
says why, in words that go into the report.

The metrics are numpy/scipy one-liners, not scikit-learn calls: the bootstrap calls
them hundreds of thousands of times and scikit-learn's input checks cost milliseconds
a call (docs/decisions/0030-evaluation-metrics-libraries.md). Tests check each against
scikit-learn.

:func:`bootstrap` resamples *patients* with replacement and keeps all their images (a
cluster bootstrap: films of one patient are not independent). It gives percentile
intervals from ``np.random.default_rng(seed)``. Scores may come from several repeats
of a cross-validation (``R x N``, ``NaN`` where an image was not predicted in that
repeat): the point estimate is the mean over repeats of the metric, and each resample
applies the same patient draw to every repeat. The calibration error is a sum of
absolute gaps, so its interval can lie entirely above a point estimate near 0: read it
as "how large the error could be".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

Array = NDArray[np.float64]

#: Equal-width bins over [0, 1] for the calibration error and the reliability table.
CALIBRATION_BINS = 10
#: Bootstrap resamples (percentile intervals need about 1000 or more for 95 %).
DEFAULT_RESAMPLES = 2000
#: Two-sided confidence level.
DEFAULT_LEVEL = 0.95
#: Fewer defined resamples than this give no interval (the percentiles would be noise).
MIN_DEFINED_RESAMPLES = 100
#: An interval needs the metric defined in at least this share of the resamples: a label
#: with one or two positive patients is missed by 37 % or 14 % of the resamples, and the
#: percentiles of the rest would look far more certain than the data are.
MIN_DEFINED_FRACTION = 0.9

Needs = Literal["both_classes", "positives", "negatives", "probabilities", "spread", "none"]


# --- inputs -----------------------------------------------------------------------------


def _pairs(function: str, labels: ArrayLike, scores: ArrayLike) -> tuple[Array, Array]:
    """The (label, score) pairs with a known label, as float64 vectors."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(
            f"{function}: {y.size} labels but {s.size} scores; give one score per label"
        )
    known = ~np.isnan(y)
    y, s = y[known], s[known]
    if np.isnan(s).any():
        raise ValueError(
            f"{function}: {int(np.isnan(s).sum())} NaN score(s) next to known labels; "
            "every image with a label needs a prediction"
        )
    return y, s


def _binary(function: str, labels: ArrayLike, scores: ArrayLike) -> tuple[Array, Array]:
    y, s = _pairs(function, labels, scores)
    bad = (y != 0.0) & (y != 1.0)
    if bad.any():
        raise ValueError(
            f"{function}: labels must be 0, 1 or NaN (unknown), got {y[bad][:3].tolist()}"
        )
    return y, s


def _probabilities(function: str, labels: ArrayLike, probs: ArrayLike) -> tuple[Array, Array]:
    y, p = _binary(function, labels, probs)
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(
            f"{function}: probabilities must lie in [0, 1], got [{p.min():.4g}, {p.max():.4g}]; "
            "pass calibrated probabilities, not logits"
        )
    return y, p


# --- classification -------------------------------------------------------------------


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting one half (Mann-Whitney U over average ranks).
    ``NaN`` when the known labels hold one class only."""
    y, s = _binary("roc_auc", labels, scores)
    positive = y == 1.0
    n_pos = int(positive.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    u = float(rankdata(s)[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def sensitivity(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> float:
    """True positive rate with ``score >= threshold`` called positive (``NaN``: no
    positives)."""
    y, s = _binary("sensitivity", labels, scores)
    positive = y == 1.0
    return float(np.mean(s[positive] >= threshold)) if positive.any() else math.nan


def specificity(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> float:
    """True negative rate with ``score < threshold`` called negative (``NaN``: no
    negatives)."""
    y, s = _binary("specificity", labels, scores)
    negative = y == 0.0
    return float(np.mean(s[negative] < threshold)) if negative.any() else math.nan


def brier_score(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean squared difference between probability and outcome (``NaN``: no known
    label)."""
    y, p = _probabilities("brier_score", labels, probs)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram.

    Attributes:
        lower: the bin's lower edge (included).
        upper: the upper edge (excluded, but 1.0 is in the last bin).
        n: images in the bin.
        mean_probability: their mean predicted probability (``NaN`` when empty).
        observed_rate: the fraction of them that are positive (``NaN`` when empty).
    """

    lower: float
    upper: float
    n: int
    mean_probability: float
    observed_rate: float


def _bin_index(p: Array, bins: int) -> NDArray[np.intp]:
    if bins < 1:
        raise ValueError(f"calibration: bins must be >= 1, got {bins}")
    index: NDArray[np.intp] = np.minimum((p * bins).astype(np.intp), bins - 1)
    return index


def reliability_table(
    labels: ArrayLike, probs: ArrayLike, bins: int = CALIBRATION_BINS
) -> list[ReliabilityBin]:
    """Per equal-width probability bin over [0, 1] (empty ones included): count, mean
    probability and observed rate."""
    y, p = _probabilities("reliability_table", labels, probs)
    index = _bin_index(p, bins)
    n = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_probability = np.bincount(index, weights=p, minlength=bins) / n
        observed_rate = np.bincount(index, weights=y, minlength=bins) / n
    return [
        ReliabilityBin(
            b / bins, (b + 1) / bins, int(n[b]), float(mean_probability[b]), float(observed_rate[b])
        )
        for b in range(bins)
    ]


def expected_calibration_error(
    labels: ArrayLike, probs: ArrayLike, bins: int = CALIBRATION_BINS
) -> float:
    """``sum_b (n_b / n) |observed rate_b - mean probability_b|`` over equal-width bins
    (``NaN``: no known label)."""
    y, p = _probabilities("expected_calibration_error", labels, probs)
    if not y.size:
        return math.nan
    # Per bin, sum(y - p) = n_b (observed rate_b - mean probability_b).
    gap = np.bincount(_bin_index(p, bins), weights=y - p, minlength=bins)
    return float(np.abs(gap).sum() / y.size)


# --- regression -----------------------------------------------------------------------


def mean_absolute_error(targets: ArrayLike, predictions: ArrayLike) -> float:
    """Mean of ``|prediction - target|`` (``NaN``: no known target)."""
    y, s = _pairs("mean_absolute_error", targets, predictions)
    return float(np.mean(np.abs(s - y))) if y.size else math.nan


def r_squared(targets: ArrayLike, predictions: ArrayLike) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (``SS_tot`` around the mean
    of these targets, so predicting another set's mean can score below 0); ``NaN`` when
    the targets are constant."""
    y, s = _pairs("r_squared", targets, predictions)
    total = float(np.sum((y - y.mean()) ** 2)) if y.size else 0.0
    return 1.0 - float(np.sum((y - s) ** 2)) / total if total > 0.0 else math.nan


def pearson_r(targets: ArrayLike, predictions: ArrayLike) -> float:
    """Pearson correlation; ``NaN`` when targets or predictions are constant."""
    y, s = _pairs("pearson_r", targets, predictions)
    if y.size < 2 or np.ptp(y) == 0.0 or np.ptp(s) == 0.0:
        return math.nan
    return float(np.clip(np.corrcoef(y, s)[0, 1], -1.0, 1.0))


# --- metrics as data ------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A named metric and what it needs to be defined.

    Attributes:
        name: the key in reports (``auc``, ``sensitivity``, ``mae``, ...).
        function: ``(labels, scores) -> float``.
        needs: ``both_classes``, ``positives``, ``negatives``, ``probabilities``
            (any known label), ``spread`` (targets not all equal) or ``none``.
        higher_is_better: for tables and comparisons.
    """

    name: str
    function: Callable[[ArrayLike, ArrayLike], float]
    needs: Needs = "none"
    higher_is_better: bool = True

    def __call__(self, labels: ArrayLike, scores: ArrayLike) -> float:
        return self.function(labels, scores)

    def why_undefined(self, labels: ArrayLike, scores: ArrayLike | None = None) -> str | None:
        """Why the metric is undefined on these labels, or None if it is defined."""
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        y = y[~np.isnan(y)]
        if y.size == 0:
            return f"{self.name}: no image with a known label"
        n_pos = int((y == 1.0).sum())
        n_neg = int((y == 0.0).sum())
        if self.needs == "both_classes" and (n_pos == 0 or n_neg == 0):
            which = "positive" if n_pos else "negative"
            return (
                f"{self.name}: all {y.size} known labels are {which}; "
                "it needs positives and negatives"
            )
        if self.needs == "positives" and n_pos == 0:
            return f"{self.name}: no positive among the {y.size} known labels"
        if self.needs == "negatives" and n_neg == 0:
            return f"{self.name}: no negative among the {y.size} known labels"
        if self.needs == "spread" and (y.size < 2 or float(np.ptp(y)) == 0.0):
            return f"{self.name}: all {y.size} known targets are equal"
        if self.name == "pearson_r" and scores is not None:
            s = np.asarray(scores, dtype=np.float64).reshape(-1)
            s = s[~np.isnan(s)]
            if s.size and float(np.ptp(s)) == 0.0:
                return "pearson_r: the predictions are constant"
        return None


def operating_point_metrics(threshold: float = 0.0) -> tuple[Metric, Metric]:
    """Sensitivity and specificity at ``threshold``. Evaluation passes per-image
    margins ``probability - threshold of the image's model`` with ``threshold=0``:
    ``p >= t`` exactly when ``p - t >= 0`` in floating point."""

    def sens(labels: ArrayLike, scores: ArrayLike) -> float:
        return sensitivity(labels, scores, threshold)

    def spec(labels: ArrayLike, scores: ArrayLike) -> float:
        return specificity(labels, scores, threshold)

    return (
        Metric("sensitivity", sens, "positives"),
        Metric("specificity", spec, "negatives"),
    )


AUC = Metric("auc", roc_auc, "both_classes")
BRIER = Metric("brier", brier_score, "probabilities", higher_is_better=False)
ECE = Metric("ece", expected_calibration_error, "probabilities", higher_is_better=False)
MAE = Metric("mae", mean_absolute_error, "none", higher_is_better=False)
R2 = Metric("r2", r_squared, "spread")
PEARSON = Metric("pearson_r", pearson_r, "spread")

#: The regression metrics of the severity table.
REGRESSION_METRICS: tuple[Metric, ...] = (MAE, R2, PEARSON)


# --- bootstrap ------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A metric's value with its confidence interval.

    Attributes:
        value: the point estimate (mean over repeats); ``NaN`` when undefined.
        low: lower bound of the percentile interval (``NaN`` when there is none).
        high: upper bound.
        n: images with a known label (and a prediction) that entered it.
        patients: their patients (the bootstrap's resampling units).
        resamples: bootstrap resamples on which the metric was defined.
        level: the interval's confidence level.
        note: why the value or the interval is missing, or a caveat.
    """

    value: float
    low: float = math.nan
    high: float = math.nan
    n: int = 0
    patients: int = 0
    resamples: int = 0
    level: float = DEFAULT_LEVEL
    note: str | None = None

    @property
    def defined(self) -> bool:
        """Whether the point estimate exists."""
        return math.isfinite(self.value)

    def text(self, digits: int = 2) -> str:
        """``0.81 [0.74, 0.87]``, ``0.81`` without an interval, ``n/a`` when undefined."""
        return interval_text(self.value, self.low, self.high, digits)


def interval_text(value: float, low: float, high: float, digits: int = 2) -> str:
    """``0.81 [0.74, 0.87]``; ``0.81`` when the interval is not finite; ``n/a`` when the
    value is not."""
    if not math.isfinite(value):
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def constant_estimate(value: float, note: str) -> Estimate:
    """An estimate known without data (a constant predictor's AUC of 0.5)."""
    return Estimate(value, value, value, note=note)


def _as_repeats(scores: ArrayLike, n: int) -> Array:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[1] != n:
        raise ValueError(
            f"bootstrap: scores have shape {np.shape(scores)}; expected ({n},) or "
            f"(repeats, {n}) for {n} labels"
        )
    return s


def _mean_over_repeats(
    metrics: Sequence[Metric], labels: Array, scores: Array, weights: NDArray[np.intp] | None
) -> dict[str, float]:
    """Each metric per repeat on the predicted images (each repeated ``weights`` times),
    then its mean over the repeats where it is defined."""
    values: dict[str, list[float]] = {m.name: [] for m in metrics}
    for row in scores:
        present = ~np.isnan(row)
        if weights is None:
            y, s = labels[present], row[present]
        else:
            counts = np.where(present, weights, 0)
            y, s = np.repeat(labels, counts), np.repeat(row, counts)
        if not y.size:
            continue
        for metric in metrics:
            value = metric(y, s)
            if math.isfinite(value):
                values[metric.name].append(value)
    return {name: float(np.mean(v)) if v else math.nan for name, v in values.items()}


@dataclass(frozen=True)
class _Clustered:
    """The images that take part (known label, at least one prediction), by patient."""

    labels: Array
    scores: Array
    group_of: NDArray[np.intp]
    n_groups: int


def _clustered(labels: ArrayLike, scores: ArrayLike, groups: Any) -> _Clustered:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = _as_repeats(scores, y.size)
    keys = list(np.asarray(groups, dtype=object).reshape(-1))
    if len(keys) != y.size:
        raise ValueError(f"bootstrap: {y.size} labels but {len(keys)} group keys")
    # Only images that can contribute take part, so that every drawn patient counts.
    usable = ~np.isnan(y) & ~np.isnan(s).all(axis=0)
    index_of: dict[Any, int] = {}
    group_of = [
        index_of.setdefault(k, len(index_of))
        for k, u in zip(keys, usable.tolist(), strict=True)
        if u
    ]
    return _Clustered(y[usable], s[:, usable], np.asarray(group_of, dtype=np.intp), len(index_of))


def _interval(
    metric: Metric, value: float, draws: Array, data: _Clustered, n_resamples: int, level: float
) -> Estimate:
    """The estimate of one metric from its point value and its resampled values."""
    defined = draws[np.isfinite(draws)]
    base = Estimate(
        value,
        n=int(data.labels.size),
        patients=data.n_groups,
        resamples=int(defined.size),
        level=level,
    )
    if not math.isfinite(value):
        single = data.scores[0] if data.scores.shape[0] == 1 else None
        note = metric.why_undefined(data.labels, single)
        return replace(
            base, note=note or f"{metric.name}: undefined on these {data.labels.size} images"
        )
    if n_resamples == 0:
        return base
    if defined.size < max(MIN_DEFINED_RESAMPLES, MIN_DEFINED_FRACTION * n_resamples):
        return replace(
            base,
            note=(
                f"no interval: {metric.name} was defined in only {defined.size} of "
                f"{n_resamples} resamples of {data.n_groups} patients"
            ),
        )
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = (float(v) for v in np.percentile(defined, [tail, 100.0 - tail]))
    note = None
    if defined.size < n_resamples:
        note = (
            f"interval from the {defined.size} of {n_resamples} resamples where "
            f"{metric.name} was defined"
        )
    return replace(base, low=low, high=high, note=note)


def bootstrap(
    metrics: Sequence[Metric],
    labels: ArrayLike,
    scores: ArrayLike,
    groups: Sequence[Hashable] | ArrayLike,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Point estimates and patient (cluster) bootstrap percentile intervals.

    Args:
        metrics: the metrics to compute (they share the resamples).
        labels: N labels (``NaN`` = unknown: left out).
        scores: N scores, or ``R x N`` for R repeats (``NaN`` = not predicted in that
            repeat). The point estimate is the mean over repeats.
        groups: N cluster keys (the patient of each image).
        n_resamples: bootstrap resamples (0: point estimates only).
        level: confidence level of the two-sided percentile interval.
        seed: seeds ``np.random.default_rng``: the same seed, the same interval.

    Returns:
        metric name -> :class:`Estimate`. Undefined metrics have ``NaN`` and a note
        saying why; intervals from fewer than :data:`MIN_DEFINED_RESAMPLES` defined
        resamples, or from less than :data:`MIN_DEFINED_FRACTION` of them, are left
        out, with a note.

    Raises:
        ValueError: shapes that do not match, or a bad level or resample count.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    if n_resamples < 0:
        raise ValueError(f"bootstrap: n_resamples must be >= 0, got {n_resamples}")
    data = _clustered(labels, scores, groups)
    points = _mean_over_repeats(metrics, data.labels, data.scores, None)
    draws: list[dict[str, float]] = []
    if n_resamples and data.n_groups:
        picks = np.random.default_rng(seed).integers(0, data.n_groups, (n_resamples, data.n_groups))
        for pick in picks:
            weights = np.bincount(pick, minlength=data.n_groups)[data.group_of]
            draws.append(_mean_over_repeats(metrics, data.labels, data.scores, weights))
    return {
        m.name: _interval(
            m, points[m.name], np.array([d[m.name] for d in draws]), data, n_resamples, level
        )
        for m in metrics
    }
