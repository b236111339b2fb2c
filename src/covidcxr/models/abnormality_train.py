"""Fit the lung-zone pneumonia model (:mod:`covidcxr.models.abnormality`) and measure
it honestly.

- :func:`measure` measures every stored frontal X-ray with a second-opinion label.
- :func:`within_source_cv`: patient-grouped, repeated cross-validation inside one source
  (NIH: normal and pneumonia from the same hospital, so the source cannot help), AUC
  with a patient-bootstrap interval.
- :func:`transfer`: fitted on one source, scored on another (leave-one-source-out, for
  the label both sources carry).
- :func:`source_probe`: how well the same features tell the sources apart (patient-
  grouped cross-validated AUC); high means a model fitted on several sources *could*
  learn the source, which is why this one is fitted on one.
- :func:`processing_drift`: how P(pneumonia) of the same chests moves under the ordinary
  processing steps of :mod:`covidcxr.models.processing` (equalisation, gamma,
  sharpening, JPEG, ...), which differ between hospitals.

Why: ``docs/decisions/0072-pneumonia-from-lung-zones.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.dataset.samples import Selection, build_samples
from covidcxr.dataset.splits import linked_patients
from covidcxr.dataset.tasks import get_task
from covidcxr.models import metrics, processing
from covidcxr.models.abnormality import LinearRisk, PneumoniaModel, features
from covidcxr.models.coherence import COVID, NO_FINDING
from covidcxr.models.lungs import LungSegmenter
from covidcxr.store.db import Store
from covidcxr.store.duplicates import duplicate_groups

log = logging.getLogger(__name__)

#: The logistic regression's inverse regularisation strength (scikit-learn ``C``).
C: Final = 0.1
#: The source the shipped model is fitted on: normal and pneumonia from one hospital.
DEFAULT_SOURCE: Final = "nih-cxr14-subset"
#: How many of the training source's normal chests :func:`processing_drift` processes.
DRIFT_IMAGES: Final = 200


@dataclass
class ZoneData:
    """Feature rows of frontal X-rays with labels (NaN: unknown), source, patient group,
    patient and image file.

    ``pneumonia`` is 1 - the No finding label; ``covid`` the COVID-19 label.
    """

    x: NDArray[np.float64]
    pneumonia: NDArray[np.float64]
    covid: NDArray[np.float64]
    source: NDArray[np.str_]
    group: NDArray[np.str_]
    patient: NDArray[np.str_]
    path: NDArray[np.str_]

    def take(self, rows: NDArray[np.intp]) -> ZoneData:
        """The rows at ``rows`` (of every field)."""
        return ZoneData(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def labelled(self, source: str | None = None) -> NDArray[np.intp]:
        """Rows with a known pneumonia label (of ``source``, when given)."""
        keep = ~np.isnan(self.pneumonia)
        if source is not None:
            keep &= self.source == source
        return np.flatnonzero(keep)


def measure(store: Store, segmenter: LungSegmenter) -> ZoneData:
    """Every stored frontal X-ray with second-opinion labels, measured."""
    task = get_task("second-opinion")
    samples = build_samples(store, task, Selection())
    with store.read() as conn:
        groups = linked_patients(samples.patients, duplicate_groups(conn))
    group_of = {patient: members[0] for members in groups for patient in members}
    no_finding, covid = task.labels.index(NO_FINDING), task.labels.index(COVID)
    rows, pneumonia, covid_labels, sources, patient_groups = [], [], [], [], []
    patients, paths = [], []
    for number, sample in enumerate(samples.samples, 1):
        paths.append(str(samples.image_path(sample)))
        patients.append(sample.patient)
        with Image.open(paths[-1]) as image:
            image.load()
            rows.append(features(segmenter, image))
        pneumonia.append(1.0 - float(sample.labels[no_finding]))
        covid_labels.append(float(sample.labels[covid]))
        sources.append(sample.source)
        patient_groups.append(group_of.get(sample.patient, sample.patient))
        if number % 250 == 0:
            log.info("pneumonia model: measured %d of %d images", number, len(samples.samples))
    return ZoneData(
        np.asarray(rows),
        np.asarray(pneumonia),
        np.asarray(covid_labels),
        np.asarray(sources),
        np.asarray(patient_groups),
        np.asarray(patients),
        np.asarray(paths),
    )


def fit(x: NDArray[np.float64], y: NDArray[np.float64]) -> LinearRisk:
    """Standardise, then a logistic regression with ``C`` = :data:`C`.

    Raises:
        ValueError: ``y`` does not hold both classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(y.tolist())) != 2:
        raise ValueError("fit: the pneumonia model needs normal and pneumonia images")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    return LinearRisk.from_sklearn(pipeline.fit(x, y))


def _auc(labels: NDArray[np.float64], scores: Any, groups: Any, seed: int) -> dict[str, Any]:
    estimate = metrics.bootstrap([metrics.AUC], labels, scores, groups, seed=seed)["auc"]
    return {
        "auc": round(estimate.value, 4),
        "low": round(estimate.low, 4),
        "high": round(estimate.high, 4),
        "images": len(labels),
        "positives": int(np.nansum(labels)),
        "patients": len(set(np.asarray(groups).tolist())),
    }


def out_of_fold(
    data: ZoneData, source: str, folds: int = 5, repeats: int = 3, seed: int = 0
) -> tuple[ZoneData, NDArray[np.float64]]:
    """The labelled images of ``source`` and their ``(repeats, n)`` out-of-fold
    P(pneumonia) from patient-grouped ``folds``-fold CV with shuffled groups."""
    from sklearn.model_selection import GroupKFold

    part = data.take(data.labelled(source))
    scores = np.full((repeats, len(part.pneumonia)), np.nan)
    for repeat in range(repeats):
        names = np.unique(part.group)
        order = np.random.default_rng(seed + repeat).permutation(len(names))
        shuffled = dict(zip(names, order, strict=True))
        keys = [shuffled[g] for g in part.group]
        for train, test in GroupKFold(folds).split(part.x, groups=keys):
            model = fit(part.x[train], part.pneumonia[train])
            scores[repeat, test] = model.probability(part.x[test])
    return part, scores


def within_source_cv(
    data: ZoneData, source: str, folds: int = 5, repeats: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Pneumonia vs no finding inside ``source`` by :func:`out_of_fold`: AUC (mean over
    repeats) with a patient-bootstrap interval."""
    part, scores = out_of_fold(data, source, folds, repeats, seed)
    return {"source": source, "folds": folds, "repeats": repeats} | _auc(
        part.pneumonia, scores, part.group, seed
    )


def transfer(data: ZoneData, train_source: str, test_source: str, seed: int = 0) -> dict[str, Any]:
    """Fitted on ``train_source``, scored on ``test_source``: pneumonia vs no finding,
    and the share of the test source's COVID-19 images called pneumonia (P >= 0.5)."""
    train, test = data.take(data.labelled(train_source)), data.take(data.labelled(test_source))
    model = fit(train.x, train.pneumonia)
    scores = model.probability(test.x)
    covid = test.covid == 1.0
    result: dict[str, Any] = {"train_source": train_source, "test_source": test_source}
    result |= _auc(test.pneumonia, scores, test.group, seed)
    normal = test.pneumonia == 0
    called = (scores[covid] >= 0.5).mean() if covid.any() else None
    median = np.median(scores[normal]) if normal.any() else None
    result["covid_called_pneumonia"] = None if called is None else round(float(called), 4)
    result["no_finding_median_p"] = None if median is None else round(float(median), 4)
    return result


def source_probe(data: ZoneData, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """How well the features tell two sources apart (the first two, alphabetically):
    patient-grouped cross-validated AUC of a logistic regression."""
    from sklearn.model_selection import GroupKFold

    names = sorted(set(data.source.tolist()))[:2]
    rows = np.flatnonzero(np.isin(data.source, names))
    part = data.take(rows)
    target = (part.source == names[1]).astype(np.float64)
    scores = np.zeros(len(target))
    for train, test in GroupKFold(folds).split(part.x, groups=part.group):
        scores[test] = fit(part.x[train], target[train]).probability(part.x[test])
    return {"sources": names, "target": names[1]} | _auc(target, scores, part.group, seed)


def processing_drift(
    probability: Callable[[Image.Image], float],
    paths: Sequence[str],
    steps: Mapping[str, processing.Step] = processing.PROCESSING,
) -> dict[str, Any]:
    """How a model's P(pneumonia) of the same chests moves when only their processing
    changes: per step, the mean change and mean absolute change of P, and the share of
    the images at or above 0.5 before and after.

    Raises:
        ValueError: no path is given.
    """
    if not paths:
        raise ValueError("processing_drift: no image to process")
    before: list[float] = []
    after: dict[str, list[float]] = {name: [] for name in steps}
    for path in paths:
        with Image.open(path) as image:
            image.load()
            before.append(probability(image))
            for name, step in steps.items():
                after[name].append(probability(step(image)))
    start = np.asarray(before)
    called = _rounded((start >= 0.5).mean())
    result: dict[str, Any] = {"images": len(paths), "called_before": called}
    for name, values in after.items():
        change = np.asarray(values) - start
        result[name] = {
            "mean_change": _rounded(change.mean()),
            "mean_abs_change": _rounded(np.abs(change).mean()),
            "called_after": _rounded((np.asarray(values) >= 0.5).mean()),
        }
    return result


def _rounded(value: Any) -> float:
    return round(float(value), 4)


def _drift_of_fitted(
    data: ZoneData, train_source: str, segmenter: LungSegmenter, seed: int
) -> dict[str, Any]:
    """:func:`processing_drift` of the model fitted on ``train_source``, on up to
    :data:`DRIFT_IMAGES` of its normal chests (drawn with ``seed``)."""
    train = data.take(data.labelled(train_source))
    model = PneumoniaModel(segmenter, fit(train.x, train.pneumonia))
    normal = train.path[train.pneumonia == 0]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(normal, size=min(DRIFT_IMAGES, len(normal)), replace=False))
    return {"source": train_source} | processing_drift(model.probability, [str(p) for p in chosen])


def evaluate(
    data: ZoneData,
    train_source: str = DEFAULT_SOURCE,
    seed: int = 0,
    segmenter: LungSegmenter | None = None,
) -> dict[str, Any]:
    """Every measurement of the module, for the model card; with ``segmenter``, also
    the :func:`processing_drift` of the fitted model on the training source's normal
    chests."""
    others = sorted(set(data.source.tolist()) - {train_source})
    result = {
        "within_source_cv": within_source_cv(data, train_source, seed=seed),
        "transfer": [transfer(data, train_source, other, seed) for other in others],
        "source_probe": source_probe(data, seed=seed),
    }
    if segmenter is not None and (data.pneumonia[data.labelled(train_source)] == 0).any():
        result["processing_drift"] = _drift_of_fitted(data, train_source, segmenter, seed)
    return result


def prevalence(data: ZoneData, train_source: str = DEFAULT_SOURCE) -> float:
    """The share of pneumonia among the training source's labelled images (the prior
    the fitted probabilities carry)."""
    labels = data.pneumonia[data.labelled(train_source)]
    return float(labels.mean())


def summary_lines(evaluation: dict[str, Any]) -> Sequence[str]:
    """The measurements as Markdown bullet lines."""
    cv = evaluation["within_source_cv"]
    probe = evaluation["source_probe"]
    lines = [
        f"- Pneumonia vs no finding within {cv['source']} (patient-grouped {cv['folds']}-fold "
        f"CV x{cv['repeats']}, {cv['images']} images, {cv['patients']} patients): AUC "
        f"{cv['auc']:.2f} [{cv['low']:.2f}, {cv['high']:.2f}]",
    ]
    for row in evaluation["transfer"]:
        called, median = row["covid_called_pneumonia"], row["no_finding_median_p"]
        lines.append(
            f"- Fitted on {row['train_source']}, scored on {row['test_source']} "
            f"({row['images']} images, {row['images'] - row['positives']} no finding): AUC "
            f"{row['auc']:.2f} [{row['low']:.2f}, {row['high']:.2f}]; COVID-19 images "
            "called pneumonia "
            + ("n/a" if called is None else f"{100 * called:.0f}%")
            + "; median P(pneumonia) of its no-finding images "
            + ("n/a" if median is None else f"{median:.2f}")
        )
    lines.append(
        f"- Source probe (the same features predicting {probe['target']} vs "
        f"{probe['sources'][0]}): AUC {probe['auc']:.2f} [{probe['low']:.2f}, "
        f"{probe['high']:.2f}]"
    )
    drift = evaluation.get("processing_drift")
    return [*lines, *_drift_lines(drift)] if isinstance(drift, dict) else lines


def _drift_lines(drift: dict[str, Any]) -> list[str]:
    """The :func:`processing_drift` record as a bullet and one sub-bullet per step."""
    steps = {k: v for k, v in drift.items() if isinstance(v, dict)}
    lines = [
        f"- Processing only, the chest unchanged ({drift['images']} normal chests of "
        f"{drift['source']}, each processed and scored again by the fitted model; called "
        f"pneumonia at 0.5: {100 * drift['called_before']:.0f}% unprocessed):"
    ]
    for name, row in steps.items():
        lines.append(
            f"  - {name}: P(pneumonia) {row['mean_change']:+.2f} on average (mean |change| "
            f"{row['mean_abs_change']:.2f}); called pneumonia {100 * row['called_after']:.0f}%"
        )
    return lines
