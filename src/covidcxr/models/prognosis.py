"""Outcome prognosis (death, ICU, intubation) from clinical values and image-model outputs:
penalised logistic regression under patient-grouped repeated CV; research estimates."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from covidcxr.errors import MetadataError
from covidcxr.models.prognosis_cohort import AGGREGATION, CLINICAL_FEATURES, Cohort
from covidcxr.models.prognosis_stats import Array, Interval, bootstrap_metrics, net_benefit

RESEARCH_ESTIMATE: Final = "research estimate, not a diagnosis"
MODEL_FORMAT: Final = "covidcxr-prognosis/1"
DEFAULT_THRESHOLDS: Final = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


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
        model_id: the model's id (a shipped model's ``prognosis-v1/survival``; a
            model file's name when blank).
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
    model_id: str = ""


def fit_model(
    cohort: Cohort,
    features: Sequence[str],
    evaluation: PrognosisEvaluation,
    *,
    inputs: str = "all",
    refits: int = 200,
    seed: int = 0,
    command: str = "",
    model_id: str = "",
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
        model_id: the model's id.
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
        model_id=model_id,
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
