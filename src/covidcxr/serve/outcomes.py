"""Outcome risks on the service: a request's clinical values, the prognosis models'
research estimates for its one image, and how the results page shows them.

Clinical values are patient data: they are checked and used for the answer only, never
logged or kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from covidcxr.errors import MetadataError
from covidcxr.models import prognosis, prognosis_cohort, prognosis_risk, prognosis_values
from covidcxr.models.bundle import ModelBundle
from covidcxr.models.prognosis_risk import OutcomeRisk
from covidcxr.models.rows import PredictionRow
from covidcxr.schema.columns import BY_NAME
from covidcxr.serve.deps import ServiceState

COMMAND: Final = "predict"
#: The field names (as ``covidcxr predict``'s options) in the form's order.
FIELDS: Final = ("age", "sex", "temperature", "spo2", "wbc", "neutrophils", "lymphocytes")
#: Per outcome, what the page calls the event.
EVENT_TEXT: Final = {"survival": "Death", "icu": "ICU admission", "intubation": "Intubation"}
#: Per input, what the page calls it.
INPUT_TEXT: Final = {
    "age_years": "age",
    "sex_male": "sex",
    "temperature_c": "temperature",
    "po2_saturation_pct": "SpO2",
    "leukocyte_count_k_per_ul": "leukocytes",
    "neutrophil_count_k_per_ul": "neutrophils",
    "lymphocyte_count_k_per_ul": "lymphocytes",
}
#: The form's example values and typical adult ranges (placeholders only).
EXAMPLES: Final = {
    "age": ("64", "years"),
    "temperature": ("38.2", "°C, normal 36.1–37.2"),
    "spo2": ("91", "%, normal ≥ 95"),
    "wbc": ("7.5", "×10⁹/L (= 10³/µL), normal 4–11"),
    "neutrophils": ("5.0", "×10⁹/L, normal 2–7.5"),
    "lymphocytes": ("1.2", "×10⁹/L, normal 1–4"),
}


@dataclass(frozen=True)
class FormField:
    """One input of the upload form's clinical values."""

    name: str
    label: str
    unit: str
    minimum: float | None
    maximum: float | None
    placeholder: str


def form_fields() -> list[FormField]:
    """The upload form's numeric clinical inputs (sex is a choice of M/F)."""
    fields = []
    for option, name in prognosis_values.CLINICAL_OPTIONS.items():
        column = BY_NAME[name]
        example, typical = EXAMPLES[option]
        label = INPUT_TEXT[name]
        fields.append(
            FormField(
                option,
                label[0].upper() + label[1:],
                typical,
                column.minimum,
                column.maximum,
                f"e.g. {example}",
            )
        )
    return fields


def clinical_values(given: Mapping[str, str | float | None]) -> prognosis_values.Values | None:
    """The checked clinical values of a request by field name (:data:`FIELDS`; blank or
    ``None`` = not given), or ``None`` when none is given (no risk asked for).

    Raises:
        MetadataError: naming the field: not a number, outside its plausible range, or
            a sex other than M/F.
    """
    if all(_blank(given.get(name)) for name in FIELDS):
        return None
    values: prognosis_values.Values = {}
    for option, name in prognosis_values.CLINICAL_OPTIONS.items():
        number = _number(option, given.get(option))
        values[name] = prognosis_values.checked(name, number, f"{option}:", COMMAND)
    sex = given.get("sex")
    values["sex_male"] = prognosis_values.sex_male(
        None if sex is None else str(sex), "sex:", COMMAND
    )
    return values


def _blank(value: str | float | None) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(option: str, value: str | float | None) -> float | None:
    if value is None or isinstance(value, float):
        return value
    text = value.strip().replace(",", ".")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise MetadataError(
            f"{COMMAND}: {option}: {text!r} is not a number; write a number or leave it blank"
        ) from None


def require_one_image(values: prognosis_values.Values | None, images: int) -> None:
    """Refuse clinical values with several images (they describe one patient).

    Raises:
        MetadataError: values were given with more or fewer than one image.
    """
    if values is not None and images != 1:
        raise MetadataError(
            f"{COMMAND}: the clinical values (age, sex, SpO2...) describe one patient, but "
            f"{images} images were sent; send one image with them, or none to get "
            "findings only"
        )


@functools.cache
def prognosis_models() -> tuple[prognosis.PrognosisModel, ...]:
    """The shipped prognosis models, read once."""
    return tuple(prognosis_risk.shipped_models())


def risks(
    state: ServiceState,
    path: Path,
    row: PredictionRow,
    values: prognosis_values.Values,
) -> list[OutcomeRisk]:
    """Each shipped prognosis model's risk for one image and its clinical values (in
    the inference thread, while the upload ``path`` exists).

    Each model gets the outputs of the image model it was fitted on: ``row``'s when
    that is the service's model, else that model's prediction on ``path``.
    """
    bundle = state.bundle()
    found: list[OutcomeRisk] = []
    features: dict[str, dict[str, float]] = {}
    for model in prognosis_models():
        if model.image_model and model.image_model not in features:
            features[model.image_model] = _image_inputs(state, bundle, model.image_model, path, row)
        found += prognosis_risk.outcome_risks(
            values, features.get(model.image_model), models=[model]
        )
    return found


def _image_inputs(
    state: ServiceState, bundle: ModelBundle, image_model: str, path: Path, row: PredictionRow
) -> dict[str, float]:
    if image_model != bundle.model_id:
        row = state.engine_for(image_model).predict_files([path])[0]
    return prognosis_cohort.image_inputs(row)


def view(found: Sequence[OutcomeRisk], values: prognosis_values.Values) -> dict[str, Any]:
    """What the results card shows: the values given, the inputs not given (``missing``
    when the same for every outcome), and per outcome the risk and its interval, the
    training patients' event rate, the model's AUROC and the inputs not given."""
    by_id = {model.model_id: model for model in prognosis_models()}
    outcomes: list[dict[str, Any]] = []
    for risk in found:
        model = by_id.get(risk.model_id)
        outcomes.append(
            {
                "event": EVENT_TEXT.get(risk.outcome, risk.event),
                "risk": risk,
                "auroc": _interval(risk.auroc),
                "patients": model.patients if model else None,
                "base_rate": model.events / model.patients if model and model.patients else None,
                "missing": _missing_text(risk.missing),
            }
        )
    missing = {tuple(_missing_text(risk.missing)) for risk in found if risk.value is not None}
    return {
        "outcomes": outcomes,
        "given": given_text(values),
        "missing": list(next(iter(missing))) if len(missing) == 1 else None,
        "image_models": sorted({risk.image_model for risk in found if risk.image_model}),
        "note": prognosis.RESEARCH_ESTIMATE,
    }


def given_text(values: prognosis_values.Values) -> list[str]:
    """The values given, in words with units (``age 64 years``, ``sex M``)."""
    given = []
    for name in prognosis_cohort.CLINICAL_FEATURES:
        value = values.get(name)
        if value is None:
            continue
        if name == "sex_male":
            given.append(f"sex {'M' if value == 1.0 else 'F'}")
        else:
            unit = BY_NAME[name].unit or ""
            given.append(f"{INPUT_TEXT[name]} {value:g}{'' if unit == '%' else ' '}{unit}")
    return given


def _missing_text(names: Sequence[str]) -> list[str]:
    """The inputs not given, in words; the image's outputs (missing when the image was
    refused) as one item."""
    clinical = [INPUT_TEXT[name] for name in names if name in INPUT_TEXT]
    return clinical + (["the image's outputs"] if len(clinical) < len(names) else [])


def _interval(interval: Any) -> dict[str, float | None]:
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "value": finite(interval.value),
        "low": finite(interval.low),
        "high": finite(interval.high),
    }
