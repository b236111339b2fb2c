"""Outcome risks for one patient from saved prognosis models (the shipped ``prognosis-v1``
or files from ``covidcxr prognosis fit``): research estimates with the models' AUROC."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from covidcxr.errors import MetadataError
from covidcxr.models import prognosis
from covidcxr.models.bundle import SHIPPED_DIR
from covidcxr.models.prognosis_cohort import CLINICAL_FEATURES, OUTCOMES
from covidcxr.models.prognosis_stats import Interval
from covidcxr.models.prognosis_values import check_values, has_clinical
from covidcxr.serialise import from_dict, read_json_object

#: The shipped prognosis models: one ``OUTCOME.json`` per outcome, and a README card.
SHIPPED_PROGNOSIS: Final = SHIPPED_DIR / "prognosis-v1"
#: Record column stem per outcome, named by the event (a "survival" risk would read
#: as the chance of surviving).
EVENT_KEYS: Final = {"survival": "death", "icu": "icu", "intubation": "intubation"}


def load_model(path: str | Path, command: str = "prognosis risk") -> prognosis.PrognosisModel:
    """Read a model file written by ``prognosis fit`` (its id defaults to the file name).

    Raises:
        MetadataError: the file cannot be read or is not a prognosis model.
    """
    data = read_json_object(path, command)
    if data.get("format") != prognosis.MODEL_FORMAT:
        raise MetadataError(
            f"{command}: {str(path)!r} is not a {prognosis.MODEL_FORMAT} file; "
            "make one with `covidcxr prognosis fit --out MODEL.json`"
        )
    model = from_dict(prognosis.PrognosisModel, data)
    return model if model.model_id else dataclasses.replace(model, model_id=Path(path).name)


def shipped_models() -> list[prognosis.PrognosisModel]:
    """The shipped models (death, ICU, intubation), in :data:`OUTCOMES` order.

    Raises:
        MetadataError: the package lacks them (a damaged install).
    """
    files = [SHIPPED_PROGNOSIS / f"{name}.json" for name in OUTCOMES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MetadataError(
            f"prognosis: the shipped models are missing ({', '.join(missing)}); reinstall "
            "covidcxr or give --prognosis MODEL.json"
        )
    return [load_model(f, "prognosis") for f in files]


def shipped_evaluations(image_model: str) -> list[dict[str, Any]]:
    """The evaluations behind the shipped models (``evaluation-OUTCOME.json``, from
    ``prognosis evaluate``), when their image model is ``image_model``; else empty."""
    found = []
    for name in OUTCOMES:
        path = SHIPPED_PROGNOSIS / f"evaluation-{name}.json"
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("image_model") == image_model:
                found.append(data)
    return found


@dataclass(frozen=True)
class OutcomeRisk:
    """One outcome's risk for one patient, or why there is none.

    Attributes:
        model_id: the prognosis model's id.
        outcome: ``survival``, ``icu`` or ``intubation``.
        event: the event the risk is of (``died``).
        value: the risk (``None`` when ``reason`` says why not).
        low: 2.5th percentile over the model's bootstrap refits.
        high: 97.5th percentile.
        auroc: the model's cross-validated AUROC with its 95% interval.
        auroc_how: how that AUROC was measured.
        image_model: the image model whose outputs are inputs (``""``: none).
        missing: the model's inputs not given, replaced by the training median.
        reason: why there is no value (``""`` when there is one).
        note: "research estimate, not a diagnosis".
    """

    model_id: str
    outcome: str
    event: str
    value: float | None
    low: float | None
    high: float | None
    auroc: Interval
    auroc_how: str
    image_model: str
    missing: tuple[str, ...]
    reason: str = ""
    note: str = prognosis.RESEARCH_ESTIMATE

    def text(self) -> str:
        """``0.32 [0.03, 0.81]``, or the reason there is no number."""
        if self.value is None or self.low is None or self.high is None:
            return f"no estimate: {self.reason}"
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def no_estimate(model: prognosis.PrognosisModel, reason: str) -> OutcomeRisk:
    """The model's entry without a number, saying why."""
    return OutcomeRisk(
        model.model_id,
        model.outcome,
        model.event,
        None,
        None,
        None,
        model.auroc,
        model.auroc_how,
        model.image_model,
        model.model.features,
        reason,
    )


def _one(model: prognosis.PrognosisModel, inputs: Mapping[str, float | None]) -> OutcomeRisk:
    features = model.model.features
    if not any(_present(inputs.get(f)) for f in features):
        return no_estimate(model, "none of the model's inputs was given")
    if set(CLINICAL_FEATURES) & set(features) and not has_clinical(inputs):
        return no_estimate(
            model,
            "no clinical value given (age, sex, temperature, SpO2, blood counts); the "
            "model's AUROC was measured with them",
        )
    found = prognosis.risk(model, inputs)
    return OutcomeRisk(
        model.model_id,
        model.outcome,
        model.event,
        found.value,
        found.low,
        found.high,
        model.auroc,
        model.auroc_how,
        model.image_model,
        found.missing,
    )


def _present(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def outcome_risks(
    values: Mapping[str, float | None],
    image_features: Mapping[str, float] | None = None,
    *,
    models: Sequence[prognosis.PrognosisModel] | None = None,
) -> list[OutcomeRisk]:
    """Each model's risk for one patient, with its interval and measured AUROC.

    A model gives no number (``value`` ``None``, ``reason`` says why) when none of
    its inputs is given, or when no clinical value is (its AUROC was measured with
    them). Missing inputs are replaced by the training median and listed.

    Args:
        values: clinical inputs by name (:data:`CLINICAL_FEATURES`: ``age_years``,
            ``sex_male`` 1 for M / 0 for F, ``temperature_c``, ``po2_saturation_pct``,
            the counts in 10^3/uL); ``None`` = not given.
        image_features: the image model's outputs for the patient's frontal X-ray
            (:func:`covidcxr.models.prognosis_cohort.image_inputs` of a prediction row
            of the image model each prognosis model names); ``None`` = no image.
        models: the prognosis models (default: :func:`shipped_models`).

    Raises:
        MetadataError: an unknown input name or a value outside its plausible range.
    """
    checked = check_values(values, "values", "prognosis")
    inputs: dict[str, float | None] = {**(image_features or {}), **checked}
    return [_one(model, inputs) for model in (shipped_models() if models is None else models)]


def risk_columns(outcomes: Sequence[str]) -> list[str]:
    """The record columns of :func:`risk_record` for these outcomes, in order."""
    columns = []
    for outcome in outcomes:
        stem = f"risk_{EVENT_KEYS.get(outcome, outcome)}"
        columns += [stem, f"{stem}_low", f"{stem}_high", f"{stem}_model_auroc"]
        columns += [f"{stem}_model_auroc_low", f"{stem}_model_auroc_high", f"{stem}_model"]
        columns += [f"{stem}_missing_inputs", f"{stem}_reason"]
    return [*columns, "risk_note"]


def risk_record(risks: Sequence[OutcomeRisk] | None) -> dict[str, Any]:
    """The risks as flat columns (see :func:`risk_columns`); empty for ``None``."""
    if risks is None:
        return {}
    out: dict[str, Any] = {}
    for found in risks:
        stem = f"risk_{EVENT_KEYS.get(found.outcome, found.outcome)}"
        out[stem] = _rounded(found.value)
        out[f"{stem}_low"] = _rounded(found.low)
        out[f"{stem}_high"] = _rounded(found.high)
        out[f"{stem}_model_auroc"] = _rounded(found.auroc.value)
        out[f"{stem}_model_auroc_low"] = _rounded(found.auroc.low)
        out[f"{stem}_model_auroc_high"] = _rounded(found.auroc.high)
        out[f"{stem}_model"] = found.model_id
        out[f"{stem}_missing_inputs"] = list(found.missing)
        out[f"{stem}_reason"] = found.reason
    out["risk_note"] = prognosis.RESEARCH_ESTIMATE
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)
