"""The validation report's outcome section: the shipped prognosis models evaluated on a
site's patients (one row per patient), beside their development AUROC."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from covidcxr.models import prognosis, prognosis_risk, prognosis_values
from covidcxr.models.prognosis_cohort import CLINICAL_FEATURES, OUTCOMES, finding_feature
from covidcxr.models.prognosis_stats import bootstrap_metrics
from covidcxr.report.labels import Case, find_columns
from covidcxr.serialise import to_dict

#: Fewer patients with (or without) the event than this: no metrics, only counts.
MIN_CLASS: Final = 2
ENABLING: Final = (
    "outcome columns survival, went_icu or intubated (Y/N per patient; upstream names "
    "accepted) and clinical columns age_years, sex, temperature_c, po2_saturation_pct, "
    "leukocyte_count_k_per_ul, neutrophil_count_k_per_ul, lymphocyte_count_k_per_ul"
)
AGGREGATION: Final = (
    "one row per patient: the outcome is the event if any of the patient's rows states "
    "it; each clinical value is the first one given (labels file order); the image "
    "inputs come from the patient's first image that passed the input check"
)


def read_site_table(
    path: Path, columns: Mapping[str, str], delimiter: str = ","
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The outcome headers found, and per labelled file its clinical values and events.

    Raises:
        MetadataError: a bad clinical value or outcome (file, line, field and why).
    """
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        headers = list(reader.fieldnames or [])
        name = find_columns(headers, path, columns)["filename"]
        outcomes = prognosis_values.outcome_columns(headers)
        value_headers = prognosis_values.value_headers(headers)
        rows: dict[str, dict[str, Any]] = {}
        for line, row in enumerate(reader, start=2):
            where = f"{path} line {line}:"
            values = prognosis_values.row_values(
                {h: row.get(h) for h in value_headers}, where, "validate-model"
            )
            events = prognosis_values.outcome_events(row, outcomes, where)
            rows[(row.get(name) or "").strip()] = {"values": values, "events": events}
    return outcomes, rows


def _patients(
    cases: Sequence[Case],
    table: Mapping[str, Mapping[str, Any]],
    image_inputs: Sequence[Mapping[str, float]],
) -> list[dict[str, Any]]:
    """One entry per patient (see :data:`AGGREGATION`)."""
    patients: dict[str, dict[str, Any]] = {}
    for case, image in zip(cases, image_inputs, strict=True):
        row = table.get(case.filename, {"values": {}, "events": {}})
        entry = patients.setdefault(case.patient_id, {"values": {}, "events": {}, "image": image})
        for name, value in row["values"].items():
            if value is not None and entry["values"].get(name) is None:
                entry["values"][name] = value
        for name, event in row["events"].items():
            if event is not None:
                entry["events"][name] = max(event, entry["events"].get(name, 0))
    return list(patients.values())


def image_inputs_of(
    probabilities: Mapping[str, float], severity: Mapping[str, float | None]
) -> dict[str, float]:
    """A scored image's inputs for the prognosis models (names as in training)."""
    found = {name: math.nan if v is None else float(v) for name, v in severity.items()}
    found.update({finding_feature(label): float(p) for label, p in probabilities.items()})
    return found


def _evaluate_model(
    model: prognosis.PrognosisModel,
    patients: Sequence[Mapping[str, Any]],
    *,
    use_image: bool,
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    y, p, no_estimate = [], [], 0
    for patient in patients:
        event = patient["events"].get(model.outcome)
        if event is None:
            continue
        image = patient["image"] if use_image else None
        found = prognosis_risk.outcome_risks(patient["values"], image, models=[model])[0]
        if found.value is None:
            no_estimate += 1
            continue
        y.append(float(event))
        p.append(found.value)
    result: dict[str, Any] = {
        "model_id": model.model_id,
        "outcome": model.outcome,
        "event": model.event,
        "patients": len(y),
        "events": int(sum(y)),
        "no_estimate": no_estimate,
        "development_auroc": to_dict(model.auroc),
        "development_how": model.auroc_how,
    }
    if min(sum(y), len(y) - sum(y)) < MIN_CLASS:
        result["reason"] = (
            f"{len(y)} patients with a risk, {int(sum(y))} {model.event}: metrics need at "
            f"least {MIN_CLASS} patients with and without the event"
        )
        return result
    metrics = bootstrap_metrics(np.asarray(y), np.asarray([p]), resamples=n_resamples, seed=seed)
    result.update({name: to_dict(interval) for name, interval in metrics.items()})
    return result


def outcome_section(
    labels: Path,
    columns: Mapping[str, str],
    delimiter: str,
    cases: Sequence[Case],
    image_inputs: Sequence[Mapping[str, float]],
    model_id: str,
    *,
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The shipped prognosis models on the site's patients: AUROC with a patient
    bootstrap interval, Brier, calibration slope and intercept, beside each model's
    development AUROC; ``status`` ``not run`` with the columns that would enable it.

    Args:
        labels: the labels CSV (outcome and clinical columns are read from it).
        columns: its ``--column`` choices (for the file column).
        delimiter: its delimiter.
        cases: the cases that passed the input check.
        image_inputs: per case, the image inputs (see :func:`image_inputs_of`).
        model_id: the image model that scored them.
        n_resamples: bootstrap resamples.
        seed: the bootstrap's seed.
    """
    outcomes, table = read_site_table(labels, columns, delimiter)
    has_values = any(prognosis_values.has_clinical(row["values"]) for row in table.values())
    if not outcomes or not has_values:
        missing = "outcome" if not outcomes else "clinical value"
        return {
            "status": "not run",
            "reason": f"the labels file has no {missing} column; add {ENABLING}",
            "note": prognosis.RESEARCH_ESTIMATE,
        }
    models = [m for m in prognosis_risk.shipped_models() if m.outcome in outcomes]
    patients = _patients(cases, table, image_inputs)
    results = []
    for model in models:
        use_image = model.image_model == model_id
        found = _evaluate_model(
            model, patients, use_image=use_image, n_resamples=n_resamples, seed=seed
        )
        found["image_inputs"] = (
            f"from {model_id}"
            if use_image
            else f"not used (the report's model is {model_id}, this model's is "
            f"{model.image_model}): replaced by the training median"
        )
        results.append(found)
    return {
        "status": "run",
        "aggregation": AGGREGATION,
        "outcome_columns": dict(outcomes),
        "clinical_inputs": list(CLINICAL_FEATURES),
        "models": results,
        "note": prognosis.RESEARCH_ESTIMATE,
    }


__all__ = ["ENABLING", "OUTCOMES", "image_inputs_of", "outcome_section", "read_site_table"]
