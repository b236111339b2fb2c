"""Severity scores from image features: ridge regression, conformal intervals, and the
reference protocol.

The collection has expert severity scores (geographic extent 0-8, opacity 0-6, mean
of three raters) for about 93 images of about 63 patients: far too few to train a
network. Cohen et al. (2020) fit a linear regression on the features of a network
pretrained on ~200k chest X-rays; we do the same with the features our own network
learned from the collection (its pooled features), using ridge regression because
there are more features (~200) than images (~45 per training half).

* :func:`fit_ridge`: ridge on standardised features, the standardisation folded back
  into the coefficients so that the model is one linear map of the *raw* pooled
  features: it is written into the network's severity head (the ONNX graph carries it).
* :func:`choose_alpha`: the ridge penalty, by patient-grouped cross-validation.
* :func:`cross_validated_predictions` and :func:`conformal_half_width`: the stated
  interval is split-conformal: the ``level`` quantile (with the finite-sample
  correction ``ceil((n + 1) level) / n``) of out-of-fold absolute residuals, so that a
  new image from the same population falls inside ``prediction +- half_width`` with
  probability about ``level``.
* :func:`random_split_protocol`: the reference protocol (50 random patient-grouped
  50/50 splits, MAE against the predict-the-training-mean baseline), for honest
  comparison with the literature (geographic MAE 1.14, opacity 0.78; baseline 2.07).
* :func:`lung_zone_features`: intensity statistics per lung zone from a lung mask, for
  measuring whether mask features add anything (they need a mask at prediction time).

Groups: images of one patient (or of patients linked by duplicate pictures) always
fall on the same side of a split. Randomness comes from a ``numpy.random.Generator``
argument. This module needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]

#: Ridge penalties tried (on standardised features; the data term is a sum over images).
ALPHAS: Final[tuple[float, ...]] = tuple(float(10.0**e) for e in np.arange(-1.0, 5.01, 0.5))
#: Standard deviations below this are treated as constant features (not scaled up).
_MIN_STD: Final = 1e-6


def _as_2d(values: Any, name: str) -> Floats:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"severity: {name} must be 1-D or 2-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"severity: {name} holds NaN or infinite values")
    return array


@dataclass(frozen=True)
class RidgeModel:
    """A linear map of raw features: ``features @ coef.T + intercept``.

    Attributes:
        coef: ``(targets, features)``.
        intercept: ``(targets,)``.
        alpha: the penalty it was fitted with.
    """

    coef: Floats
    intercept: Floats
    alpha: float

    def predict(self, features: Any) -> Floats:
        """Predictions ``(n, targets)`` for features ``(n, features)``."""
        x = _as_2d(features, "features")
        result: Floats = x @ self.coef.T + self.intercept
        return result


def fit_ridge(features: Any, targets: Any, alpha: float) -> RidgeModel:
    """Ridge regression on standardised features, returned as a map of raw features.

    Each feature is centred and divided by its standard deviation (constant features
    are left unscaled and get no weight), the targets are centred, and
    ``(X'X + alpha I) w = X'y`` is solved through the SVD of ``X``. The scaling is then
    folded into the coefficients and the intercept.

    Args:
        features: ``(n, d)``.
        targets: ``(n,)`` or ``(n, k)``.
        alpha: the penalty (>= 0; 0 is least squares, minimum-norm when d > n).

    Raises:
        ValueError: shapes that do not match, non-finite values, or a negative alpha.
    """
    x = _as_2d(features, "features")
    y = _as_2d(targets, "targets")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"fit_ridge: {x.shape[0]} feature rows and {y.shape[0]} target rows; "
            "give one row of each per image (and at least one)"
        )
    if alpha < 0:
        raise ValueError(f"fit_ridge: alpha must be >= 0, got {alpha}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std < _MIN_STD, 1.0, std)
    standardised = (x - mean) / std
    y_mean = y.mean(axis=0)
    u, s, vt = np.linalg.svd(standardised, full_matrices=False)
    shrink = np.divide(s, s**2 + alpha, out=np.zeros_like(s), where=(s**2 + alpha) > 0)
    weights = vt.T @ (shrink[:, None] * (u.T @ (y - y_mean)))  # (d, k)
    coef = (weights / std[:, None]).T
    intercept = y_mean - coef @ mean
    return RidgeModel(coef=coef, intercept=intercept, alpha=float(alpha))


def group_folds(
    groups: Sequence[str], folds: int, rng: np.random.Generator
) -> list[NDArray[np.intp]]:
    """Split image positions into ``folds`` test sets, whole groups at a time.

    Groups are shuffled with ``rng`` and dealt, largest first, to the fold with the
    fewest images so far, so folds are balanced in images.

    Raises:
        ValueError: fewer distinct groups than folds, or fewer than 2 folds.
    """
    names = sorted(set(groups))
    if folds < 2 or len(names) < folds:
        raise ValueError(
            f"group_folds: {len(names)} group(s) cannot fill {folds} folds (need >= 2 folds "
            "and at least one group per fold)"
        )
    members: dict[str, list[int]] = {name: [] for name in names}
    for position, group in enumerate(groups):
        members[group].append(position)
    order = [names[int(i)] for i in rng.permutation(len(names))]
    order.sort(key=lambda name: -len(members[name]))  # stable: ties keep the shuffle
    sizes = [0] * folds
    chosen: list[list[int]] = [[] for _ in range(folds)]
    for name in order:
        fold = int(np.argmin(sizes))
        chosen[fold].extend(members[name])
        sizes[fold] += len(members[name])
    return [np.array(sorted(c), dtype=np.intp) for c in chosen]


def cross_validated_predictions(
    features: Any,
    targets: Any,
    groups: Sequence[str],
    alpha: float,
    *,
    folds: int = 5,
    rng: np.random.Generator,
) -> Floats:
    """Out-of-fold ridge predictions ``(n, k)``, folds made of whole groups."""
    x = _as_2d(features, "features")
    y = _as_2d(targets, "targets")
    predictions = np.empty_like(y)
    for test in group_folds(groups, min(folds, len(set(groups))), rng):
        train = np.setdiff1d(np.arange(len(x)), test)
        predictions[test] = fit_ridge(x[train], y[train], alpha).predict(x[test])
    return predictions


def choose_alpha(
    features: Any,
    targets: Any,
    groups: Sequence[str],
    *,
    alphas: Sequence[float] = ALPHAS,
    folds: int = 5,
    rng: np.random.Generator,
    scales: Sequence[float] | None = None,
) -> float:
    """The penalty with the smallest grouped cross-validated MAE (summed over targets,
    each divided by its ``scales`` entry, e.g. its range; default 1).

    The same folds are used for every alpha (drawn once from ``rng``), so the choice
    does not depend on the order of the grid. Ties go to the larger penalty.
    """
    x = _as_2d(features, "features")
    y = _as_2d(targets, "targets")
    weights = np.ones(y.shape[1]) if scales is None else 1.0 / np.asarray(scales, dtype=float)
    test_sets = group_folds(groups, min(folds, len(set(groups))), rng)
    best_alpha, best_error = float(alphas[0]), math.inf
    for alpha in sorted(alphas):
        predictions = np.empty_like(y)
        for test in test_sets:
            train = np.setdiff1d(np.arange(len(x)), test)
            predictions[test] = fit_ridge(x[train], y[train], alpha).predict(x[test])
        error = float((np.abs(predictions - y).mean(axis=0) * weights).sum())
        if error <= best_error + 1e-12:
            best_alpha, best_error = float(alpha), error
    return best_alpha


def conformal_half_width(absolute_residuals: Any, level: float) -> Floats:
    """Split-conformal half widths per target: the ``ceil((n + 1) level)``-th smallest
    absolute residual (infinite when ``n`` is too small for the level).

    Raises:
        ValueError: a level outside (0, 1) or no residuals.
    """
    residuals = _as_2d(absolute_residuals, "absolute_residuals")
    if not 0.0 < level < 1.0:
        raise ValueError(f"conformal_half_width: level must lie in (0, 1), got {level}")
    n = residuals.shape[0]
    if n == 0:
        raise ValueError("conformal_half_width: no residuals")
    rank = math.ceil((n + 1) * level)
    if rank > n:
        return np.full(residuals.shape[1], math.inf)
    result: Floats = np.sort(np.abs(residuals), axis=0)[rank - 1]
    return result


@dataclass(frozen=True)
class SeverityFit:
    """A severity model and its stated uncertainty.

    Attributes:
        ridge: the linear map of pooled features.
        half_width: per target, the conformal half width at ``level``.
        level: the interval's nominal coverage.
        residual_sd: per target, the RMS of the cross-validated residuals (written
            into the head's log-variance outputs).
        cross_validated_mae: per target, the MAE of the out-of-fold predictions.
        n_images: images it was fitted on.
        n_groups: patient groups among them.
    """

    ridge: RidgeModel
    half_width: Floats
    level: float
    residual_sd: Floats
    cross_validated_mae: Floats
    n_images: int
    n_groups: int


def fit_severity(
    features: Any,
    targets: Any,
    groups: Sequence[str],
    *,
    ranges: Sequence[tuple[float, float]],
    level: float = 0.9,
    folds: int = 5,
    rng: np.random.Generator,
) -> SeverityFit:
    """Choose alpha by grouped CV, fit ridge on everything, and state the interval.

    The interval comes from out-of-fold residuals of the chosen alpha (predictions
    clipped to ``ranges``, as they are at prediction time).
    """
    x = _as_2d(features, "features")
    y = _as_2d(targets, "targets")
    scales = [high - low for low, high in ranges]
    alpha = choose_alpha(x, y, groups, folds=folds, rng=rng, scales=scales)
    predictions = clip_to_ranges(
        cross_validated_predictions(x, y, groups, alpha, folds=folds, rng=rng), ranges
    )
    residuals = np.abs(predictions - y)
    return SeverityFit(
        ridge=fit_ridge(x, y, alpha),
        half_width=conformal_half_width(residuals, level),
        level=level,
        residual_sd=np.sqrt((residuals**2).mean(axis=0)),
        cross_validated_mae=residuals.mean(axis=0),
        n_images=int(x.shape[0]),
        n_groups=len(set(groups)),
    )


def clip_to_ranges(values: Any, ranges: Sequence[tuple[float, float]]) -> Floats:
    """Clip each column to its (min, max) (infinite values become the bounds)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[:, None] if array.ndim == 1 else array
    low = np.array([r[0] for r in ranges], dtype=np.float64)
    high = np.array([r[1] for r in ranges], dtype=np.float64)
    clipped: Floats = np.clip(array, low, high)
    return clipped


def severity_head_parameters(fit: SeverityFit) -> tuple[Floats, Floats]:
    """Weight ``(2k, d)`` and bias ``(2k,)`` of the network's severity head.

    Rows ``0..k-1`` are the means (the ridge map); rows ``k..2k-1`` the
    log-variances, constant: ``log(residual_sd^2)`` with zero weights (the interval
    itself is the conformal half width stored in the bundle).
    """
    k, d = fit.ridge.coef.shape
    weight = np.zeros((2 * k, d))
    weight[:k] = fit.ridge.coef
    bias = np.concatenate([fit.ridge.intercept, np.log(np.maximum(fit.residual_sd, 1e-6) ** 2)])
    return weight, bias


def _pearson(a: Floats, b: Floats) -> float:
    if a.std() < 1e-12 or b.std() < 1e-12:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _r2(truth: Floats, predicted: Floats) -> float:
    total = float(((truth - truth.mean()) ** 2).sum())
    if total < 1e-12:
        return math.nan
    return 1.0 - float(((truth - predicted) ** 2).sum()) / total


def half_split(
    groups: Sequence[str], rng: np.random.Generator, train_fraction: float = 0.5
) -> NDArray[np.bool_]:
    """A random split of whole groups: True for training, about ``train_fraction`` of
    the images (groups are shuffled and added until the share is reached)."""
    names = sorted(set(groups))
    order = [names[int(i)] for i in rng.permutation(len(names))]
    counts: dict[str, int] = {}
    for group in groups:
        counts[group] = counts.get(group, 0) + 1
    target = train_fraction * len(groups)
    chosen: set[str] = set()
    taken = 0
    for name in order:
        if taken >= target:
            break
        chosen.add(name)
        taken += counts[name]
    if len(chosen) == len(names):  # keep at least one group to test on
        chosen.discard(order[-1])
    return np.array([g in chosen for g in groups], dtype=bool)


@dataclass
class ProtocolResult:
    """The reference protocol's numbers, per target (mean and sd over the splits).

    Attributes:
        labels: target names.
        splits: how many random splits.
        mae: ridge MAE per target, mean over splits.
        mae_sd: its standard deviation over splits.
        baseline_mae: the predict-the-training-mean MAE, mean over splits.
        baseline_mae_sd: its standard deviation over splits.
        pearson_r: correlation of predictions and truth on the test half, mean.
        r2: coefficient of determination on the test half, mean.
        alphas: the alpha chosen (by inner grouped CV) on each split.
    """

    labels: tuple[str, ...]
    splits: int
    mae: list[float] = field(default_factory=list)
    mae_sd: list[float] = field(default_factory=list)
    baseline_mae: list[float] = field(default_factory=list)
    baseline_mae_sd: list[float] = field(default_factory=list)
    pearson_r: list[float] = field(default_factory=list)
    r2: list[float] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded to 3 decimals."""

        def rounded(values: list[float]) -> list[float | None]:
            return [None if math.isnan(v) else round(v, 3) for v in values]

        return {
            "protocol": f"{self.splits} random patient-grouped 50/50 splits; ridge alpha by "
            "grouped 5-fold CV on each training half; MAE on the test half",
            "labels": list(self.labels),
            "mae": rounded(self.mae),
            "mae_sd": rounded(self.mae_sd),
            "baseline_mae": rounded(self.baseline_mae),
            "baseline_mae_sd": rounded(self.baseline_mae_sd),
            "pearson_r": rounded(self.pearson_r),
            "r2": rounded(self.r2),
            "median_alpha": float(np.median(self.alphas)) if self.alphas else None,
        }


def random_split_protocol(
    features: Any,
    targets: Any,
    groups: Sequence[str],
    *,
    labels: Sequence[str],
    ranges: Sequence[tuple[float, float]],
    splits: int = 50,
    rng: np.random.Generator,
) -> ProtocolResult:
    """Cohen et al.'s protocol: ``splits`` random patient-grouped 50/50 splits; on
    each, ridge (alpha by grouped CV inside the training half) against the training
    mean, scored by MAE (predictions clipped to ``ranges``), Pearson r and R^2 on the
    test half.

    Raises:
        ValueError: fewer than 4 groups (each half needs two for the inner CV).
    """
    x = _as_2d(features, "features")
    y = _as_2d(targets, "targets")
    if len(set(groups)) < 4:
        raise ValueError(
            f"random_split_protocol: {len(set(groups))} patient group(s); need at least 4"
        )
    scales = [high - low for low, high in ranges]
    mae, base, r, r2, alphas = [], [], [], [], []
    group_array = np.asarray(groups, dtype=object)
    for _ in range(splits):
        train = half_split(list(groups), rng)
        test = ~train
        train_groups = [str(g) for g in group_array[train]]
        alpha = choose_alpha(
            x[train],
            y[train],
            train_groups,
            folds=min(5, len(set(train_groups))),
            rng=rng,
            scales=scales,
        )
        predicted = clip_to_ranges(fit_ridge(x[train], y[train], alpha).predict(x[test]), ranges)
        mean = y[train].mean(axis=0)
        mae.append(np.abs(predicted - y[test]).mean(axis=0))
        base.append(np.abs(mean - y[test]).mean(axis=0))
        r.append([_pearson(predicted[:, j], y[test][:, j]) for j in range(y.shape[1])])
        r2.append([_r2(y[test][:, j], predicted[:, j]) for j in range(y.shape[1])])
        alphas.append(alpha)
    mae_array, base_array = np.array(mae), np.array(base)
    return ProtocolResult(
        labels=tuple(labels),
        splits=splits,
        mae=mae_array.mean(axis=0).tolist(),
        mae_sd=mae_array.std(axis=0).tolist(),
        baseline_mae=base_array.mean(axis=0).tolist(),
        baseline_mae_sd=base_array.std(axis=0).tolist(),
        pearson_r=np.nanmean(np.array(r), axis=0).tolist(),
        r2=np.nanmean(np.array(r2), axis=0).tolist(),
        alphas=alphas,
    )


#: Zones of each lung, top to bottom (thirds of the lung's height).
LUNG_ZONES: Final = 3


def lung_zone_features(pixels: NDArray[np.uint8], mask: NDArray[np.uint8]) -> Floats:
    """Intensity statistics per lung zone (for measuring, not used at prediction time).

    The mask's lung pixels are split into the two image halves (right and left lung
    on a frontal view) and each lung into :data:`LUNG_ZONES` bands of equal height
    between its top and bottom rows. Per zone: mean and standard deviation of grey
    level (0..1) and the share of pixels brighter than the lung's median + 0.1 (opaque
    lung); plus each lung's area as a share of the image. A lung missing from the mask
    gives zeros.

    Returns:
        ``2 * (3 * LUNG_ZONES + 1)`` features.

    Raises:
        ValueError: image and mask shapes differ.
    """
    if pixels.shape != mask.shape or pixels.ndim != 2:
        raise ValueError(
            f"lung_zone_features: image {pixels.shape} and mask {mask.shape} must be the "
            "same 2-D shape"
        )
    grey = pixels.astype(np.float64) / 255.0
    lung = mask > 0
    height, width = lung.shape
    features: list[float] = []
    for side in (slice(0, width // 2), slice(width // 2, width)):
        side_mask = np.zeros_like(lung)
        side_mask[:, side] = lung[:, side]
        rows = np.flatnonzero(side_mask.any(axis=1))
        if rows.size == 0:
            features.extend([0.0] * (3 * LUNG_ZONES + 1))
            continue
        values = grey[side_mask]
        bright = float(np.median(values)) + 0.1
        edges = np.linspace(rows[0], rows[-1] + 1, LUNG_ZONES + 1)
        for zone in range(LUNG_ZONES):
            band = np.zeros_like(side_mask)
            band[int(edges[zone]) : int(edges[zone + 1])] = True
            zone_values = grey[side_mask & band]
            if zone_values.size == 0:
                features.extend([0.0, 0.0, 0.0])
                continue
            features.extend(
                [
                    float(zone_values.mean()),
                    float(zone_values.std()),
                    float((zone_values > bright).mean()),
                ]
            )
        features.append(float(side_mask.sum()) / (height * width))
    return np.array(features, dtype=np.float64)
