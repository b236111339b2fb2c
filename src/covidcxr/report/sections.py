"""The numbers of each section of the validation report, from labels and scores."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Final

import numpy as np

from covidcxr.report import stats
from covidcxr.report.labels import Case
from covidcxr.report.stats import Estimate, Floats
from covidcxr.serialise import to_dict

#: A subgroup smaller than this (cases, or positives or negatives) gets a warning.
SMALL_GROUP: Final = 30
SMALL_CLASS: Final = 10
AGE_BANDS: Final = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"))
#: Metadata fields the shortcut check tries alone.
METADATA_FIELDS: Final = ("view", "age_years", "sex", "site", "acquired_on")


def discrimination(
    y: Floats, p: Floats, groups: Sequence[Hashable], *, n_resamples: int, seed: int
) -> dict[str, Any]:
    """AUC with its patient-bootstrap interval and the ROC curve."""
    estimate = stats.patient_bootstrap(["auc"], y, p, groups, n_resamples=n_resamples, seed=seed)[
        "auc"
    ]
    return {"auc": to_dict(estimate), "roc": stats.roc_points(y, p)}


def operating_point(
    y: Floats,
    p: Floats,
    groups: Sequence[Hashable],
    threshold: float,
    *,
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV at a threshold, with intervals."""
    found = stats.patient_bootstrap(
        ["sensitivity", "specificity", "ppv", "npv"],
        y,
        p,
        groups,
        threshold=threshold,
        n_resamples=n_resamples,
        seed=seed,
    )
    called = p >= threshold
    return {
        "threshold": threshold,
        "tp": int((called & (y == 1)).sum()),
        "fp": int((called & (y == 0)).sum()),
        "tn": int((~called & (y == 0)).sum()),
        "fn": int((~called & (y == 1)).sum()),
        **{name: to_dict(estimate) for name, estimate in found.items()},
    }


def calibration_section(y: Floats, p: Floats, auc_low: float | None) -> dict[str, Any]:
    """Calibration as the model gives it, and after a Platt fit on these cases.

    The recalibrated numbers are in-sample (fit and measured on the same cases), so
    they are optimistic; the fit is what ``predict --recalibration`` applies. It is
    ``usable`` only with a positive slope and an AUC whose lower bound ``auc_low`` is
    above 0.5: a model that does not separate the classes here would be flattened to
    the prevalence, and saving that as a recalibration would hide the failure.
    """
    section: dict[str, Any] = {"as_given": stats.calibration(y, p)}
    if len(np.unique(y)) < 2:
        section["platt"] = None
        return section
    a, b = stats.fit_platt(y, p)
    section["platt"] = {
        "a": a,
        "b": b,
        "usable": bool(a > 0 and auc_low is not None and auc_low > 0.5),
        "in_sample": stats.calibration(y, stats.apply_platt(p, a, b)),
    }
    return section


def age_band(age: float | None) -> str | None:
    """The report's age band of an age in years."""
    if age is None:
        return None
    return next((name for low, high, name in AGE_BANDS if low <= age < high), "80+")


def _group_value(case: Case, field: str) -> str | None:
    if field == "age_band":
        return age_band(case.age_years)
    value = getattr(case, field)
    return None if value is None else str(value)


def subgroups(
    cases: Sequence[Case],
    y: Floats,
    p: Floats,
    threshold: float,
    *,
    n_resamples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Per sex, age band, view and site: size, AUC and sensitivity/specificity at
    the threshold with intervals, and a warning when the group is small."""
    groups = [c.patient_id for c in cases]
    rows: list[dict[str, Any]] = []
    for field in ("sex", "age_band", "view", "site"):
        values = [_group_value(c, field) for c in cases]
        for value in sorted({v for v in values if v is not None}):
            inside = np.asarray([v == value for v in values])
            keys = [g for g, keep in zip(groups, inside, strict=True) if keep]
            found = stats.patient_bootstrap(
                ["auc", "sensitivity", "specificity"],
                y[inside],
                p[inside],
                keys,
                threshold=threshold,
                n_resamples=n_resamples,
                seed=seed,
            )
            positives = int(y[inside].sum())
            negatives = int(inside.sum()) - positives
            size = f"{int(inside.sum())} case(s), {positives} positive, {negatives} negative"
            warning = ""
            if min(positives, negatives) == 0:
                warning = f"one class only ({size}): no AUC; the group alone decides the label"
            elif inside.sum() < SMALL_GROUP or min(positives, negatives) < SMALL_CLASS:
                warning = f"small group ({size}): intervals are wide, read as anecdote"
            rows.append(
                {
                    "field": field,
                    "value": value,
                    "n": int(inside.sum()),
                    "positives": positives,
                    "negatives": negatives,
                    **{name: to_dict(e) for name, e in found.items()},
                    "warning": warning,
                }
            )
    return rows


def _feature(cases: Sequence[Case], field: str) -> np.ndarray[Any, Any] | None:
    """One metadata field as a design matrix (numbers + missing flag, or one-hot)."""
    if field in ("age_years", "acquired_on"):
        numbers = [
            c.age_years
            if field == "age_years"
            else (
                float(np.datetime64(c.acquired_on[:10], "D").astype(int)) if c.acquired_on else None
            )
            for c in cases
        ]
        known = [v for v in numbers if v is not None]
        if len(set(known)) < 2:
            return None
        centre, scale = float(np.mean(known)), float(np.std(known)) or 1.0
        return np.asarray(
            [[0.0 if v is None else (v - centre) / scale, float(v is None)] for v in numbers]
        )
    values = [str(getattr(c, field) or "unknown") for c in cases]
    levels = sorted(set(values))
    if len(levels) < 2:
        return None
    return np.asarray([[float(v == level) for level in levels] for v in values])


def metadata_shortcut(
    cases: Sequence[Case], y: Floats, *, n_resamples: int, seed: int
) -> list[dict[str, Any]]:
    """How well each metadata field alone predicts the label: the out-of-fold AUC of a
    logistic regression on that field (patient-grouped folds), with its interval."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict

    groups = [c.patient_id for c in cases]
    folds = min(5, len(set(groups)), int(y.sum()), int(len(y) - y.sum()))
    rows: list[dict[str, Any]] = []
    for field in METADATA_FIELDS:
        x = _feature(cases, field)
        if x is None or folds < 2:
            rows.append({"field": field, "auc": None, "note": "not computable: one value only"})
            continue
        scores = cross_val_predict(
            LogisticRegression(max_iter=1000),
            x,
            y.astype(int),
            groups=groups,
            cv=GroupKFold(n_splits=folds),
            method="predict_proba",
        )[:, 1]
        found = stats.patient_bootstrap(
            ["auc"], y, scores, groups, n_resamples=n_resamples, seed=seed
        )["auc"]
        rows.append({"field": field, "auc": to_dict(found), "note": _shortcut_note(found)})
    return rows


def _shortcut_note(found: Estimate) -> str:
    if math.isfinite(found.low) and found.low > 0.6:
        return "WARNING: this field alone predicts the label; a model may learn it instead"
    if found.value < 0.5:
        return "no stable signal (below 0.5: what one fold learns does not hold in the others)"
    return "no clear signal from this field alone"


def severity_section(
    cases: Sequence[Case], predicted: Mapping[str, Sequence[float | None]]
) -> dict[str, Any]:
    """Per severity output with reference scores: MAE, R^2 and Bland-Altman."""
    section: dict[str, Any] = {}
    for name, values in predicted.items():
        pairs = [
            (c.severity[name], v)
            for c, v in zip(cases, values, strict=True)
            if c.severity and name in c.severity and v is not None
        ]
        if len(pairs) >= 3:
            truth, guess = (np.asarray(x, dtype=np.float64) for x in zip(*pairs, strict=True))
            section[name] = {
                **stats.severity_agreement(truth, guess),
                "truth": truth.tolist(),
                "predicted": guess.tolist(),
            }
    return section


def sample_size(y: Floats, auc: float, sensitivity: float, specificity: float) -> dict[str, Any]:
    """How many cases would narrow the AUC, sensitivity and specificity intervals to
    +/- 0.05 (normal approximations), at this data's proportion of positives."""
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    auc_pos, auc_neg = stats.auc_cases(auc, positives, negatives)
    return {
        "positives": positives,
        "negatives": negatives,
        "target_half_width": stats.TARGET_HALF_WIDTH,
        "auc_cases": {"positives": auc_pos, "negatives": auc_neg},
        "sensitivity_positives": stats.proportion_cases(sensitivity),
        "specificity_negatives": stats.proportion_cases(specificity),
    }
