"""Outcome prognosis (death, ICU, intubation) from clinical values and image-model outputs:
penalised logistic regression under patient-grouped repeated CV; research estimates."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from covidcxr.atomic import atomic_output
from covidcxr.errors import MetadataError
from covidcxr.schema.values import FRONTAL_VIEWS

if TYPE_CHECKING:
    from covidcxr.models.runtime import PredictionRow

log = logging.getLogger(__name__)

Array = NDArray[np.float64]

RESEARCH_ESTIMATE: Final = "research estimate, not a diagnosis"
MODEL_FORMAT: Final = "covidcxr-prognosis/1"


@dataclass(frozen=True)
class Outcome:
    """An outcome to predict.

    Attributes:
        name: the command-line name (``survival``, ``icu``, ``intubation``).
        field: the store's outcome field.
        event_value: the field's value that counts as the event (death: survival N).
        event: the event in words (``died``).
    """

    name: str
    field: str
    event_value: bool
    event: str


OUTCOMES: Final[Mapping[str, Outcome]] = {
    "survival": Outcome("survival", "survival", False, "died"),
    "icu": Outcome("icu", "went_icu", True, "admitted to ICU"),
    "intubation": Outcome("intubation", "intubated", True, "intubated"),
}

#: Clinical inputs: the store's columns, plus ``sex_male`` (1 for M, 0 for F).
CLINICAL_FEATURES: Final = (
    "age_years",
    "sex_male",
    "temperature_c",
    "po2_saturation_pct",
    "leukocyte_count_k_per_ul",
    "neutrophil_count_k_per_ul",
    "lymphocyte_count_k_per_ul",
)
SEVERITY_FEATURES: Final = ("geographic_extent", "opacity")

AGGREGATION: Final = (
    "one row per patient (source, patient id): the outcome is the event if any of the "
    "patient's records states it; each clinical value is the one on the earliest record "
    "that has it (by offset_days, then metadata line); the image inputs come from the "
    "earliest stored frontal X-ray; patients without a stored frontal X-ray are left out"
)
DEFAULT_THRESHOLDS: Final = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def finding_feature(label: str) -> str:
    """The input name of a finding probability: ``COVID-19`` -> ``p_covid_19``."""
    return "p_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def input_sets(finding_labels: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The compared inputs: the baselines (age, severity, clinical, image) and all together.

    ``severity`` is the image model's predicted severity; ``image`` adds its finding
    probabilities.
    """
    image = SEVERITY_FEATURES + tuple(finding_feature(label) for label in finding_labels)
    return {
        "age": ("age_years",),
        "severity": SEVERITY_FEATURES,
        "clinical": CLINICAL_FEATURES,
        "image": image,
        "all": CLINICAL_FEATURES + image,
    }


# ---------------------------------------------------------------- one row per patient


@dataclass(frozen=True)
class Cohort:
    """The patients of one outcome, one row each.

    Attributes:
        outcome: what is predicted.
        patients: ``source:patient_id`` per row.
        groups: the CV grouping key per row: the patient, or for patients whose image
            is the same file, the first of them (so a shared image is never on both
            sides of a fold).
        events: 1 where the event happened, else 0.
        values: input name -> one value per row (``NaN`` = missing).
        images: sha256 of the image the image inputs come from, per row.
        image_seen: per row, whether the image model trained on (or fitted its severity
            head on) this patient, so that its image inputs may be optimistic.
        excluded: reason -> patients with a known outcome left out.
    """

    outcome: Outcome
    patients: tuple[str, ...]
    groups: tuple[str, ...]
    events: NDArray[np.int64]
    values: Mapping[str, Array]
    images: tuple[str, ...]
    image_seen: NDArray[np.bool_]
    excluded: Mapping[str, int] = field(default_factory=dict)

    def matrix(self, features: Sequence[str]) -> Array:
        """The rows x features matrix (``NaN`` = missing)."""
        n = len(self.patients)
        return np.column_stack([self.values.get(f, np.full(n, math.nan)) for f in features])


def _time_order(record: Mapping[str, Any]) -> tuple[float, int]:
    offset = record.get("offset_days")
    return (math.inf if offset is None else float(offset), int(record.get("line") or 0))


def _is_frontal_image(record: Mapping[str, Any]) -> bool:
    return (
        record.get("image_status") == "stored"
        and record.get("modality") == "X-ray"
        and record.get("view") in FRONTAL_VIEWS
    )


def patient_rows(
    records: Sequence[Mapping[str, Any]], outcome: Outcome
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Fold a store listing into one row per patient with a known outcome (see
    :data:`AGGREGATION`).

    Args:
        records: rows of :func:`covidcxr.store.queries.list_records`.
        outcome: the outcome.

    Returns:
        The rows (``patient``, ``event``, ``image_sha256``, the clinical inputs) in
        listing order of their patients, and reason -> patients left out.
    """
    by_patient: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_patient[f"{record['source']}:{record['patient_id']}"].append(record)
    rows: list[dict[str, Any]] = []
    excluded: dict[str, int] = defaultdict(int)
    for patient, items in by_patient.items():
        known = [r[outcome.field] for r in items if r.get(outcome.field) is not None]
        if not known:
            continue
        ordered = sorted(items, key=_time_order)
        frontal = [r for r in ordered if _is_frontal_image(r)]
        if not frontal:
            excluded["no stored frontal X-ray"] += 1
            continue
        row: dict[str, Any] = {
            "patient": patient,
            "event": int(outcome.event_value in known),
            "image_sha256": frontal[0]["image_sha256"],
        }
        for name in CLINICAL_FEATURES:
            column = "sex" if name == "sex_male" else name
            value = next((r[column] for r in ordered if r.get(column) is not None), None)
            row[name] = (value == "M") if name == "sex_male" and value is not None else value
        rows.append(row)
    return rows, dict(excluded)


#: Scores images: sha256s in, per sha256 the image inputs (``NaN`` when the image
#: failed the input check) out.
ImageScorer = Callable[[Sequence[str]], Mapping[str, Mapping[str, float]]]


def build_cohort(
    records: Sequence[Mapping[str, Any]],
    outcome: Outcome,
    score_images: ImageScorer,
    seen_patients: frozenset[str] = frozenset(),
) -> Cohort:
    """The cohort of one outcome: patient rows joined with their image inputs.

    Args:
        records: rows of :func:`covidcxr.store.queries.list_records`.
        outcome: the outcome.
        score_images: gives the image inputs of each image (see :class:`ImageScorer`).
        seen_patients: ``source:patient_id`` keys the image model trained on.

    Raises:
        MetadataError: no patient has the outcome and a stored frontal X-ray.
    """
    rows, excluded = patient_rows(records, outcome)
    if not rows:
        raise MetadataError(
            f"prognosis: no patient has a known {outcome.field!r} and a stored frontal "
            "X-ray; ingest a source with outcomes (e.g. metadata-latest.csv)"
        )
    images = tuple(row["image_sha256"] for row in rows)
    scores = score_images(images)
    names = sorted({name for per_image in scores.values() for name in per_image})
    values: dict[str, Array] = {
        name: np.array([math.nan if row[name] is None else float(row[name]) for row in rows])
        for name in CLINICAL_FEATURES
    }
    for name in names:
        values[name] = np.array([scores.get(sha, {}).get(name, math.nan) for sha in images])
    patients = tuple(row["patient"] for row in rows)
    first_with_image: dict[str, str] = {}
    return Cohort(
        outcome=outcome,
        patients=patients,
        groups=tuple(
            first_with_image.setdefault(s, p) for s, p in zip(images, patients, strict=True)
        ),
        events=np.array([row["event"] for row in rows], dtype=np.int64),
        values=values,
        images=images,
        image_seen=np.array([p in seen_patients for p in patients], dtype=np.bool_),
        excluded=excluded,
    )


# ---------------------------------------------------------------- image inputs


def image_inputs(row: PredictionRow) -> dict[str, float]:
    """The image inputs of one :class:`~covidcxr.models.runtime.PredictionRow`: the
    predicted severity and finding probabilities (``NaN`` when the image failed the
    input check)."""
    values = {
        name: math.nan if score is None else float(score.mean)
        for name, score in row.severity.items()
    }
    for label, probability in row.probabilities.items():
        values[finding_feature(label)] = math.nan if probability is None else float(probability)
    return values


def cached_scorer(
    score: ImageScorer, cache_file: Path, blob_path: Callable[[str], Path]
) -> ImageScorer:
    """Wrap a scorer with a CSV cache keyed by image sha256 (only new images are scored).

    Args:
        score: scores image files: takes paths as strings, returns inputs by path.
        cache_file: the CSV (created with its folder; one file per image model).
        blob_path: where the image with a sha256 lives.
    """

    def scorer(shas: Sequence[str]) -> Mapping[str, Mapping[str, float]]:
        cached = _read_cache(cache_file)
        todo = sorted(set(shas) - set(cached))
        if todo:
            log.info("prognosis: scoring %d images with the image model", len(todo))
            by_path = score([str(blob_path(sha)) for sha in todo])
            for sha in todo:
                cached[sha] = dict(by_path[str(blob_path(sha))])
            _write_cache(cache_file, cached)
        return {sha: cached[sha] for sha in shas}

    return scorer


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        return {
            row.pop("image_sha256"): {k: float(v) if v else math.nan for k, v in row.items()}
            for row in csv.DictReader(handle)
        }


def _write_cache(path: Path, scores: Mapping[str, Mapping[str, float]]) -> None:
    names = sorted({name for values in scores.values() for name in values})
    with atomic_output(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_sha256", *names])
        for sha, values in sorted(scores.items()):
            cells = [values.get(n, math.nan) for n in names]
            writer.writerow([sha, *("" if math.isnan(v) else repr(v) for v in cells)])


# ---------------------------------------------------------------- model and folds


#: Inverse strength of the L2 penalty (see docs/prognosis.md for why 0.1).
DEFAULT_C: Final = 0.1


def make_pipeline(c: float = DEFAULT_C) -> Pipeline:
    """Median imputation with a missing-value indicator, standardisation, and logistic
    regression with the L2 penalty (inverse strength ``c``): fitted as one, so that every
    statistic comes from the rows it is fitted on."""
    return Pipeline(
        [
            (
                "impute",
                SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            ),
            ("scale", StandardScaler()),
            ("model", LogisticRegression(C=c, max_iter=1000)),
        ]
    )


def grouped_folds(
    events: NDArray[np.int64], groups: Sequence[str], *, folds: int, repeats: int, seed: int
) -> Iterator[tuple[int, NDArray[np.intp], NDArray[np.intp]]]:
    """``(repeat, train rows, test rows)`` of patient-grouped, outcome-stratified
    repeated k-fold CV: a patient's rows are all on one side.

    Raises:
        MetadataError: fewer events or non-events than folds.
    """
    _check_folds(events, folds)
    rows = np.zeros((len(events), 1))
    for repeat in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for train, test in splitter.split(rows, events, groups):
            yield repeat, train, test


def _check_folds(events: NDArray[np.int64], folds: int) -> None:
    n_events = int(events.sum())
    n_other = len(events) - n_events
    if folds < 2 or min(n_events, n_other) < folds:
        raise MetadataError(
            f"prognosis: {folds} folds need at least {max(folds, 2)} patients with and "
            f"without the event; there are {n_events} and {n_other}: lower --folds "
            "(at least 2) or add patients with a known outcome"
        )


def cross_validated(
    cohort: Cohort,
    features: Sequence[str],
    *,
    folds: int,
    repeats: int,
    seed: int,
    c: float = DEFAULT_C,
) -> Array:
    """Out-of-fold probabilities, ``repeats x patients``: each fold's model (imputer,
    scaler and regression) is fitted on its training patients only."""
    x = cohort.matrix(features)
    out = np.full((repeats, len(cohort.patients)), math.nan)
    for repeat, train, test in grouped_folds(
        cohort.events, cohort.groups, folds=folds, repeats=repeats, seed=seed
    ):
        model = make_pipeline(c).fit(x[train], cohort.events[train])
        out[repeat, test] = model.predict_proba(x[test])[:, 1]
    return out


# ---------------------------------------------------------------- metrics
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
        if not math.isfinite(self.value):
            return "n/a"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


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


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class InputsResult:
    """The metrics of one set of inputs.

    Attributes:
        inputs: the set's name (``age``, ``clinical``, ``all``...).
        features: its inputs.
        patients: patients evaluated.
        events: of them, with the event.
        auroc: area under the ROC curve.
        brier: Brier score.
        calibration_slope: 1 = ideal.
        calibration_intercept: 0 = ideal.
        net_benefit: at each of the evaluation's thresholds (mean over repeats).
    """

    inputs: str
    features: tuple[str, ...]
    patients: int
    events: int
    auroc: Interval
    brier: Interval
    calibration_slope: Interval
    calibration_intercept: Interval
    net_benefit: tuple[float, ...]


@dataclass(frozen=True)
class PrognosisEvaluation:
    """The comparison table of one outcome.

    Attributes:
        outcome: the outcome's name; ``event`` says what counts as the event.
        event: the event in words.
        folds: folds per repeat.
        repeats: repeats of the k-fold split.
        resamples: bootstrap resamples.
        seed: the random seed.
        c: the inverse strength of the L2 penalty.
        aggregation: how records became one row per patient.
        thresholds: the decision-curve thresholds.
        treat_all: net benefit of treating everyone, per threshold (all patients).
        results: one per input set, on all patients.
        unseen: one per input set, on the patients the image model never saw
            (out-of-fold predictions of the same CV, restricted to them).
        unseen_treat_all: treat-all net benefit on those patients.
        image_model: the image model's id.
        excluded: reason -> patients with a known outcome left out.
        command: the command that produced it.
    """

    outcome: str
    event: str
    folds: int
    repeats: int
    resamples: int
    seed: int
    c: float
    aggregation: str
    thresholds: tuple[float, ...]
    treat_all: tuple[float, ...]
    results: tuple[InputsResult, ...]
    unseen: tuple[InputsResult, ...]
    unseen_treat_all: tuple[float, ...]
    image_model: str
    excluded: Mapping[str, int]
    command: str = ""

    def result(self, inputs: str) -> InputsResult:
        """The all-patients result of one input set."""
        return next(r for r in self.results if r.inputs == inputs)


def _result(
    name: str,
    features: Sequence[str],
    y: Array,
    scores: Array,
    thresholds: Sequence[float],
    *,
    resamples: int,
    seed: int,
) -> InputsResult:
    metrics = bootstrap_metrics(y, scores, resamples=resamples, seed=seed)
    benefit = np.mean([net_benefit(y, row, thresholds) for row in scores], axis=0)
    return InputsResult(
        inputs=name,
        features=tuple(features),
        patients=len(y),
        events=int(y.sum()),
        net_benefit=tuple(float(v) for v in benefit),
        **metrics,
    )


def evaluate(
    cohort: Cohort,
    sets: Mapping[str, Sequence[str]],
    *,
    folds: int = 5,
    repeats: int = 5,
    resamples: int = 1000,
    seed: int = 0,
    c: float = DEFAULT_C,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    image_model: str = "",
    command: str = "",
) -> PrognosisEvaluation:
    """Compare input sets under the same patient-grouped repeated CV.

    Every set is fitted on the same folds (same seed); metrics are on the out-of-fold
    predictions, on all patients and on those the image model never saw.

    Raises:
        MetadataError: fewer events or non-events than folds.
    """
    y = cohort.events.astype(np.float64)
    unseen = ~cohort.image_seen
    results, unseen_results = [], []
    for name, features in sets.items():
        scores = cross_validated(cohort, features, folds=folds, repeats=repeats, seed=seed, c=c)
        common = {"resamples": resamples, "seed": seed}
        results.append(_result(name, features, y, scores, thresholds, **common))
        if unseen.any():
            unseen_results.append(
                _result(name, features, y[unseen], scores[:, unseen], thresholds, **common)
            )
    return PrognosisEvaluation(
        outcome=cohort.outcome.name,
        event=cohort.outcome.event,
        folds=folds,
        repeats=repeats,
        resamples=resamples,
        seed=seed,
        c=c,
        aggregation=AGGREGATION,
        thresholds=tuple(thresholds),
        treat_all=tuple(_treat_all(y, thresholds)),
        results=tuple(results),
        unseen=tuple(unseen_results),
        unseen_treat_all=tuple(_treat_all(y[unseen], thresholds)) if unseen.any() else (),
        image_model=image_model,
        excluded=dict(cohort.excluded),
        command=command,
    )


def _treat_all(y: Array, thresholds: Sequence[float]) -> list[float]:
    return [float(v) for v in net_benefit(y, np.ones(len(y)), thresholds)]


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def _is_missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def signal_summary(evaluation: PrognosisEvaluation) -> str:
    """One plain sentence on which inputs carry signal: those whose AUROC interval
    lies above 0.5, and the best point estimate."""
    carrying = [r.inputs for r in evaluation.results if r.auroc.low > 0.5]
    best = max(evaluation.results, key=lambda r: _finite_or(r.auroc.value, 0.0))
    if not carrying:
        return (
            f"{evaluation.outcome}: no set of inputs is distinguishable from chance "
            f"(every AUROC interval includes 0.5); the best point estimate is "
            f"{best.inputs} ({best.auroc.text()})."
        )
    return (
        f"{evaluation.outcome}: AUROC interval above chance for {', '.join(carrying)}; "
        f"best point estimate {best.inputs} ({best.auroc.text()})."
    )


def markdown_section(evaluations: Sequence[PrognosisEvaluation]) -> str:
    """The "Outcomes" section of a model card or validation report (markdown)."""
    lines = ["## Outcomes (research estimates, not a diagnosis)", ""]
    if evaluations:
        first = evaluations[0]
        lines += [
            f"Logistic regression with an L2 penalty (C={first.c:g}) on median-imputed, "
            "standardised inputs with missing-value indicators, all fitted inside each "
            f"training fold; patient-grouped {first.folds}-fold CV repeated "
            f"{first.repeats} times, 95% patient-bootstrap intervals ({first.resamples} "
            f"resamples). {first.aggregation[0].upper()}{first.aggregation[1:]}. "
            f"Image inputs are the predictions of {first.image_model}, which was trained "
            "on this same collection: on the patients it saw they may be optimistic, so "
            "each table is repeated on the patients it never saw.",
            "",
        ]
        if first.command:
            lines += ["Command:", "", f"    {first.command}", ""]
    for evaluation in evaluations:
        lines += _markdown_outcome(evaluation)
    return "\n".join(lines).rstrip() + "\n"


def _markdown_outcome(evaluation: PrognosisEvaluation) -> list[str]:
    head = evaluation.results[0] if evaluation.results else None
    lines = [f"### {evaluation.outcome} (event: {evaluation.event})", ""]
    if head is not None:
        excluded = ", ".join(f"{n} {reason}" for reason, n in evaluation.excluded.items())
        lines.append(
            f"{head.patients} patients, {head.events} events"
            + (f" (left out: {excluded})" if excluded else "")
            + "."
        )
        lines.append("")
    lines += _markdown_table(evaluation.results, evaluation.thresholds, evaluation.treat_all)
    if evaluation.unseen:
        lines += ["", "Patients the image model never saw:", ""]
        lines += _markdown_table(
            evaluation.unseen, evaluation.thresholds, evaluation.unseen_treat_all
        )
    lines += ["", signal_summary(evaluation), ""]
    return lines


def _markdown_table(
    results: Sequence[InputsResult], thresholds: Sequence[float], treat_all: Sequence[float]
) -> list[str]:
    shown = [i for i, t in enumerate(thresholds) if t in (0.1, 0.2, 0.3)]
    benefit_heads = [f"NB@{thresholds[i]:g}" for i in shown]
    header = ["inputs", "n", "events", "AUROC", "Brier", "cal. slope", "cal. intercept"]
    lines = [
        "| " + " | ".join(header + benefit_heads) + " |",
        "|" + "---|" * (len(header) + len(benefit_heads)),
    ]
    for r in results:
        cells = [r.inputs, str(r.patients), str(r.events), r.auroc.text(), r.brier.text(3)]
        cells += [r.calibration_slope.text(), r.calibration_intercept.text()]
        cells += [f"{r.net_benefit[i]:.3f}" for i in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "| treat all | | | | | | | " + " | ".join(f"{treat_all[i]:.3f}" for i in shown) + " |"
    )
    return lines


# ---------------------------------------------------------------- fitted model and risk


@dataclass(frozen=True)
class LinearRisk:
    """A fitted :func:`make_pipeline` as plain numbers.

    Attributes:
        features: the inputs, in order.
        fill: the median each missing input is replaced by.
        indicators: the inputs that get a missing-value indicator (1 when missing).
        mean: the scaler's mean of each input, then of each indicator.
        scale: the scaler's standard deviation, in the same order.
        coef: the regression coefficients, in the same order.
        intercept: the regression intercept.
    """

    features: tuple[str, ...]
    fill: tuple[float, ...]
    indicators: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline, features: Sequence[str]) -> LinearRisk:
        """Read the numbers of a fitted :func:`make_pipeline`."""
        imputer, scaler, model = (pipeline.named_steps[s] for s in ("impute", "scale", "model"))
        flagged = imputer.indicator_.features_ if imputer.indicator_ is not None else []
        return cls(
            features=tuple(features),
            fill=tuple(float(v) for v in imputer.statistics_),
            indicators=tuple(features[int(i)] for i in flagged),
            mean=tuple(float(v) for v in scaler.mean_),
            scale=tuple(float(v) for v in scaler.scale_),
            coef=tuple(float(v) for v in model.coef_[0]),
            intercept=float(model.intercept_[0]),
        )

    def probability(self, values: Mapping[str, float | None]) -> float:
        """The predicted risk for one patient; absent or ``None`` inputs are missing."""
        raw = [values.get(f) for f in self.features]
        missing = [_is_missing(v) for v in raw]
        filled = [
            fill if v is None or gone else v
            for v, fill, gone in zip(raw, self.fill, missing, strict=True)
        ]
        flags = [float(missing[self.features.index(f)]) for f in self.indicators]
        x = (np.array(filled + flags) - np.array(self.mean)) / np.array(self.scale)
        return float(1.0 / (1.0 + math.exp(-(self.intercept + float(x @ np.array(self.coef))))))


@dataclass(frozen=True)
class PrognosisModel:
    """A saved outcome model: the fit on all patients, bootstrap refits for the interval,
    and its measured quality.

    Attributes:
        outcome: the outcome's name.
        event: the event in words.
        model: the fit on all patients.
        bootstrap: refits on patients resampled with replacement.
        auroc: the cross-validated AUROC of these inputs, with its interval.
        auroc_how: how the AUROC was measured.
        patients: training patients.
        events: of them, with the event.
        image_model: the image model whose outputs are inputs (``""`` if none).
        command: the command that made it.
        created: UTC time of creation (ISO 8601).
        format: the file format.
        note: "research estimate, not a diagnosis".
    """

    outcome: str
    event: str
    model: LinearRisk
    bootstrap: tuple[LinearRisk, ...]
    auroc: Interval
    auroc_how: str
    patients: int
    events: int
    image_model: str
    command: str = ""
    created: str = ""
    format: str = MODEL_FORMAT
    note: str = RESEARCH_ESTIMATE


def fit_model(
    cohort: Cohort,
    features: Sequence[str],
    evaluation: PrognosisEvaluation,
    *,
    inputs: str = "all",
    refits: int = 200,
    seed: int = 0,
    command: str = "",
) -> PrognosisModel:
    """Fit :func:`make_pipeline` (with the evaluation's penalty) on every patient, and
    ``refits`` times on patients resampled with replacement (for :func:`risk`'s
    interval).

    Args:
        cohort: the patients.
        features: the inputs.
        evaluation: the evaluation whose ``inputs`` AUROC the model carries.
        inputs: the evaluated input set matching ``features``.
        refits: bootstrap refits.
        seed: seeds the resampling.
        command: the command, for provenance.
    """
    x, y = cohort.matrix(features), cohort.events
    rng = np.random.default_rng(seed)
    refitted: list[LinearRisk] = []
    while len(refitted) < refits:
        pick = rng.integers(0, len(y), len(y))
        if 0 < y[pick].sum() < len(pick):
            refitted.append(
                LinearRisk.from_pipeline(
                    make_pipeline(evaluation.c).fit(x[pick], y[pick]), features
                )
            )
    result = evaluation.result(inputs)
    return PrognosisModel(
        outcome=cohort.outcome.name,
        event=cohort.outcome.event,
        model=LinearRisk.from_pipeline(make_pipeline(evaluation.c).fit(x, y), features),
        bootstrap=tuple(refitted),
        auroc=result.auroc,
        auroc_how=(
            f"patient-grouped {evaluation.folds}-fold CV repeated {evaluation.repeats} times "
            f"on {result.patients} patients ({result.events} {cohort.outcome.event}), 95% "
            "patient-bootstrap interval"
        ),
        patients=len(y),
        events=int(y.sum()),
        image_model=evaluation.image_model if set(features) - set(CLINICAL_FEATURES) else "",
        command=command,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    )


@dataclass(frozen=True)
class Risk:
    """One patient's predicted risk.

    Attributes:
        value: the risk from the fit on all patients.
        low: 2.5th percentile over the bootstrap refits.
        high: 97.5th percentile.
        missing: the model's inputs that were not given (imputed).
    """

    value: float
    low: float
    high: float
    missing: tuple[str, ...]


def risk(model: PrognosisModel, values: Mapping[str, float | None]) -> Risk:
    """The risk of ``model``'s event for one patient, with its 95% bootstrap interval."""
    spread = [refit.probability(values) for refit in model.bootstrap]
    low, high = np.percentile(spread, [2.5, 97.5]) if spread else (math.nan, math.nan)
    missing = tuple(f for f in model.model.features if _is_missing(values.get(f)))
    return Risk(model.model.probability(values), float(low), float(high), missing)
