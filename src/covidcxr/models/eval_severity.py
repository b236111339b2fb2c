"""The severity protocol of Cohen et al. 2020 on the scored images: random
patient-grouped 50/50 splits, a ridge regression on frozen backbone features, MAE, R^2
and Pearson r against the predict-the-training-mean baseline and the literature."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import Ridge
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covidcxr.dataset.loading import DEFAULT_CACHE_DIR, CacheDir
from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.splits import linked_patients, make_split
from covidcxr.dataset.tasks import get_task
from covidcxr.errors import MetadataError
from covidcxr.models.eval_fit import FitFunction, Progress
from covidcxr.models.eval_pixels import load_pixels, predict_batches
from covidcxr.models.metrics import (
    DEFAULT_RESAMPLES,
    MAE,
    R2,
    REGRESSION_METRICS,
    Estimate,
    bootstrap,
)
from covidcxr.models.severity import ALPHAS, clip_to_ranges
from covidcxr.store.db import Store
from covidcxr.store.duplicates import duplicate_groups

log = logging.getLogger(__name__)

SEVERITY_SPLITS = 50

#: Cohen et al., "Predicting COVID-19 Pneumonia Severity on Chest X-ray with Deep
#: Learning", Cureus 12(7):e9448, 2020: 94 PA images, 50 random patient-grouped 50/50
#: splits, linear regression on a DenseNet pretrained on ~200k external chest X-rays.
LITERATURE_SEVERITY: Mapping[str, Mapping[str, float]] = {
    "geographic_extent": {"mae": 1.14, "pearson_r": 0.81, "r2": 0.60, "baseline_mae": 2.07,
                          "baseline_r2": -0.09},
    "opacity": {"mae": 0.78},
}  # fmt: skip
LITERATURE_SOURCE = (
    "Cohen et al. 2020, Cureus 12(7):e9448 (94 PA images, 50 patient-grouped 50/50 "
    "splits, DenseNet pretrained on ~200k external chest X-rays)"
)


#: Fit a regressor on features X (n x C), targets Y (n x k) and the patient of each row
#: (for any inner, grouped validation); returns its predict (m x C -> m x k).
RegressorFit = Callable[
    [NDArray[np.float64], NDArray[np.float64], Sequence[str]],
    Callable[[NDArray[np.float64]], NDArray[np.float64]],
]


@dataclass(frozen=True)
class SeverityTarget:
    """One severity score's results.

    Attributes:
        target: ``geographic_extent`` or ``opacity``.
        model: mae, r2, pearson_r (mean over splits, patient-bootstrap interval).
        baseline: the same for predicting the training half's mean.
        split_sd: standard deviation over the splits of each model metric.
        literature: the reference numbers, where published.
        verdict: one plain sentence: match, beat or fall short, and by how much.
    """

    target: str
    model: Mapping[str, Estimate]
    baseline: Mapping[str, Estimate]
    split_sd: Mapping[str, float]
    literature: Mapping[str, float]
    verdict: str


@dataclass(frozen=True)
class SeverityResult:
    """The severity evaluation.

    Attributes:
        protocol: the protocol in words.
        n_images: scored images evaluated.
        n_patients: their patients.
        views: image count per view.
        splits: random 50/50 splits.
        backbone: what the feature backbone was trained on (and what was held out).
        targets: per score, its results.
        reason: why we fall short, where we do (None otherwise).
        literature_source: the reference the literature numbers come from.
    """

    protocol: str
    n_images: int
    n_patients: int
    views: Mapping[str, int]
    splits: int
    backbone: Mapping[str, Any]
    targets: tuple[SeverityTarget, ...]
    reason: str | None = None
    literature_source: str = LITERATURE_SOURCE


def _scaled_mae(
    truth: NDArray[np.float64], predicted: NDArray[np.float64], scales: NDArray[np.float64]
) -> float:
    """MAE per target divided by its range, summed over targets."""
    errors = np.abs(np.reshape(predicted, truth.shape) - truth).reshape(len(truth), -1)
    return float((errors.mean(axis=0) / scales).sum())


def ridge_regressor(ranges: Sequence[tuple[float, float]], seed: int = 0) -> RegressorFit:
    """The severity regression the trained model uses (:mod:`covidcxr.models.severity`):
    ridge on standardised features, its penalty (from
    :data:`~covidcxr.models.severity.ALPHAS`) chosen by the smallest patient-grouped
    5-fold cross-validated MAE (each target divided by its range) inside the training
    half, ties to the larger penalty; predictions clipped to ``ranges``.

    Raises:
        ValueError: (from the returned fit) fewer than two patients to cross-validate.
    """
    scales = np.array([high - low for low, high in ranges], dtype=np.float64)

    def fit(
        features: NDArray[np.float64], targets: NDArray[np.float64], groups: Sequence[str]
    ) -> Callable[[NDArray[np.float64]], NDArray[np.float64]]:
        folds = min(5, len(set(groups)))
        if folds < 2:
            raise ValueError(
                f"ridge_regressor: {folds} patient(s) in the training half; the penalty's "
                "grouped cross-validation needs two or more"
            )
        search = GridSearchCV(
            make_pipeline(StandardScaler(), Ridge(solver="svd")),
            # Sorted large to small: a tie goes to the first, the larger penalty.
            {"ridge__alpha": sorted(ALPHAS, reverse=True)},
            scoring=make_scorer(_scaled_mae, greater_is_better=False, scales=scales),
            cv=GroupKFold(folds, shuffle=True, random_state=seed),
        ).fit(features, targets, groups=list(groups))

        def predict(new: NDArray[np.float64]) -> NDArray[np.float64]:
            return clip_to_ranges(search.predict(new), ranges)

        return predict

    return fit


def _severity_verdict(target: str, model: Estimate, literature: Mapping[str, float]) -> str:
    reference = literature.get("mae")
    if not model.defined:
        return f"{target}: MAE not computable ({model.note})"
    ours = model.text()
    if reference is None:
        return f"{target}: MAE {ours}; no published reference"
    if model.value <= reference:
        return f"{target}: MAE {ours} matches or beats the reference {reference:.2f}"
    if math.isfinite(model.low) and model.low <= reference:
        return (
            f"{target}: MAE {ours} is above the reference {reference:.2f} by "
            f"{model.value - reference:.2f}, but the interval includes it"
        )
    return (
        f"{target}: MAE {ours} falls short of the reference {reference:.2f} by "
        f"{model.value - reference:.2f}"
    )


def _held_patients(store: Store, samples: SampleSet, scored: SampleSet) -> set[str]:
    """The scored patients and every patient linked to one by a duplicate picture."""
    with store.read() as conn:
        groups = duplicate_groups(conn)
    scored_patients = set(scored.patients)
    linked = linked_patients(set(samples.patients) | scored_patients, groups)
    return {p for group in linked if scored_patients & set(group) for p in group}


def _split_predictions(
    store: Store,
    scored: SampleSet,
    features: NDArray[np.float64],
    regress: RegressorFit,
    splits: int,
    seed: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Splits x N x targets predictions of the regression and of the first half's mean
    (``NaN`` for the first half's own images)."""
    with store.read() as conn:
        halves = [
            make_split(scored, conn, scheme="kfold", folds=2, seed=seed + i) for i in range(splits)
        ]
    targets = np.array([s.labels for s in scored.samples], dtype=np.float64)
    patient_of = [s.patient for s in scored.samples]
    shape = (splits, len(scored.samples), targets.shape[1])
    predictions, baseline = np.full(shape, np.nan), np.full(shape, np.nan)
    for i, split in enumerate(halves):
        first = np.asarray(split.indices(scored, "0"), dtype=np.intp)
        second = np.asarray(split.indices(scored, "1"), dtype=np.intp)
        predict = regress(features[first], targets[first], [patient_of[j] for j in first])
        predictions[i, second] = np.asarray(predict(features[second]), dtype=np.float64).reshape(
            len(second), shape[2]
        )
        baseline[i, second] = targets[first].mean(axis=0)
    return predictions, baseline


def _score_target(
    name: str,
    targets: NDArray[np.float64],
    predictions: NDArray[np.float64],
    baseline: NDArray[np.float64],
    patient_of: Sequence[str],
    *,
    n_resamples: int,
    seed: int,
) -> SeverityTarget:
    """One target's metrics (N targets, splits x N predictions and baseline)."""
    model = bootstrap(
        REGRESSION_METRICS, targets, predictions, patient_of, n_resamples=n_resamples, seed=seed
    )
    base = bootstrap([MAE, R2], targets, baseline, patient_of, n_resamples=n_resamples, seed=seed)
    base["pearson_r"] = Estimate(
        math.nan, note="pearson_r: the baseline's predictions are constant"
    )
    per_split = {
        metric.name: [metric(targets[~np.isnan(row)], row[~np.isnan(row)]) for row in predictions]
        for metric in REGRESSION_METRICS
    }
    split_sd = {
        k: float(np.nanstd(v)) if np.isfinite(v).any() else math.nan for k, v in per_split.items()
    }
    literature = dict(LITERATURE_SEVERITY.get(name, {}))
    verdict = _severity_verdict(name, model["mae"], literature)
    return SeverityTarget(name, model, base, split_sd, literature, verdict)


def _shortfall(targets: Sequence[SeverityTarget], n_train: int) -> str | None:
    """Why we fall short of the literature's MAE, where we do."""
    short = [
        t.target
        for t in targets
        if "mae" in t.literature and t.model["mae"].defined
        and t.model["mae"].value > t.literature["mae"]
    ]  # fmt: skip
    if not short:
        return None
    return (
        f"We fall short on {', '.join(short)}. The reference's "
        "features come from a DenseNet-121 pretrained on ~200k external chest X-rays "
        "with many radiological labels (opacity, consolidation, ...); ours come from a "
        f"network trained here on {n_train} images of this collection with finding "
        "labels only, so its features encode 'which pneumonia' more than 'how much "
        "lung is affected'. Plugging pretrained weights in as the backbone "
        "(xrv-densenet121:PATH) is the way to close the gap."
    )


def evaluate_severity(
    store: Store,
    fit: FitFunction,
    samples: SampleSet,
    *,
    selection: Selection | None = None,
    splits: int = SEVERITY_SPLITS,
    seed: int = 0,
    regressor: RegressorFit | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    batch_size: int = 32,
    say: Progress | None = None,
) -> SeverityResult:
    """The severity protocol of Cohen et al. 2020 on the scored images.

    1. The scored images (default: frontal X-rays with severity scores) and every
       patient linked to them by a duplicate picture are removed from ``samples``;
       ``fit`` trains the feature backbone on the rest (seed ``seed * 1000 + 900``).
    2. Pooled features of the scored images; for each of ``splits`` patient-grouped,
       duplicate-aware 50/50 splits (k-fold with k = 2, seed ``seed + i``), a
       regression (:func:`ridge_regressor` unless given) on the first half, predicting
       the second; the baseline predicts the first half's mean.
    3. MAE, R^2 and Pearson r, averaged over splits, with patient-bootstrap intervals
       (the same patient draw in every split), next to the baseline and the literature.

    Raises:
        MetadataError: no scored images, or none left to train the backbone on.
    """
    say = say or (lambda line: log.info("%s", line))
    scored = build_samples(store, get_task("severity"), selection or Selection(has_severity=True))
    if len(scored.samples) < 4:
        raise MetadataError(
            f"evaluate_severity: {len(scored.samples)} scored image(s) in the selection; "
            "the protocol needs at least 4 (ingest the severity scores)"
        )
    held = _held_patients(store, samples, scored)
    train = [i for i, s in enumerate(samples.samples) if s.patient not in held]
    if not train:
        raise MetadataError(
            "evaluate_severity: every sample belongs to a scored patient; nothing is left "
            "to train the feature backbone on"
        )
    held_patients = len(held & set(samples.patients))
    held_samples = len(samples.samples) - len(train)
    say(
        f"severity: training the feature backbone on {len(train)} images ({held_samples} "
        f"images of {held_patients} scored or linked patients held out)"
    )
    backbone_seed = seed * 1000 + 900
    model = fit(samples, train, seed=backbone_seed, exclude_patients=frozenset(held))
    pixels = load_pixels(
        scored, range(len(scored.samples)), model.input_size, cache_dir=cache_dir, masks=False
    )
    features = predict_batches(model.features, pixels.images, batch_size)
    n = len(scored.samples)
    say(f"severity: {splits} patient-grouped 50/50 splits of {n} scored images")
    regress = regressor or ridge_regressor(scored.task.ranges, seed)
    predictions, baseline = _split_predictions(store, scored, features, regress, splits, seed)
    targets = np.array([s.labels for s in scored.samples], dtype=np.float64)
    patient_of = [s.patient for s in scored.samples]
    results = tuple(
        _score_target(name, targets[:, t], predictions[:, :, t], baseline[:, :, t], patient_of,
                      n_resamples=n_resamples, seed=seed)
        for t, name in enumerate(scored.task.labels)
    )  # fmt: skip
    views = Counter(str(s.metadata.get("view") or "unknown") for s in scored.samples)
    return SeverityResult(
        protocol=(
            f"{splits} random patient-grouped, duplicate-aware 50/50 splits of the scored "
            f"images (seeds {seed}..{seed + splits - 1}); ridge regression on the pooled "
            "features of a backbone that never saw a scored patient; metrics averaged over "
            f"splits, 95% patient-bootstrap intervals ({n_resamples} resamples)"
        ),
        n_images=n,
        n_patients=len(scored.patients),
        views=dict(views),
        splits=splits,
        backbone={
            "train_samples": len(train),
            "train_patients": len({samples.samples[i].patient for i in train}),
            "held_out_samples": held_samples,
            "held_out_patients": held_patients,
            "seed": backbone_seed,
        },
        targets=results,
        reason=_shortfall(results, len(train)),
    )
