"""The clinician's questions in order: pneumonia at all? If so, COVID-19? At what prevalence?

The network's finding outputs are separate calibrated sigmoids, so nothing ties them
together: a normal chest can get ``p_COVID-19`` 0.7 while ``p_No finding`` is 0.9. Here
the second-opinion labels (no finding and the four pneumonia kinds, which the
collection files as alternatives) are normalised into one distribution ``q``, so that

* ``P(pneumonia) = 1 - q[No finding]``,
* ``P(viral pneumonia) = q[COVID-19] + q[Other viral pneumonia]``,
* ``P(COVID-19) = q[COVID-19]``, and ``P(COVID-19 | pneumonia) = q[COVID-19] / P(pneumonia)``,

which always satisfies ``P(COVID-19) <= P(viral pneumonia) <= P(pneumonia)``.

``prevalence`` re-states ``P(COVID-19)`` for a local prevalence by Bayes' rule on the
odds (prior shift from the training prevalence, stored in the bundle) and rescales the
other labels so that they keep their shares of the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from covidcxr.errors import MetadataError

COVID = "COVID-19"
OTHER_VIRAL = "Other viral pneumonia"
NO_FINDING = "No finding"
PNEUMONIA_LABELS = (COVID, OTHER_VIRAL, "Bacterial pneumonia", "Fungal pneumonia")

__all__ = ["Summary", "summarise", "training_prevalence"]


@dataclass(frozen=True)
class Summary:
    """One image's coherent answer (``None`` throughout when the model lacks the labels).

    Attributes:
        pneumonia: probability of any pneumonia (1 - no finding).
        viral: probability of viral pneumonia (COVID-19 or other viral).
        covid: probability of COVID-19.
        covid_if_pneumonia: probability of COVID-19 given pneumonia.
        prevalence: the COVID-19 prevalence these numbers assume.
    """

    pneumonia: float
    viral: float
    covid: float
    covid_if_pneumonia: float
    prevalence: float


def training_prevalence(training: Mapping[str, object]) -> float | None:
    """The COVID-19 prevalence a bundle's probabilities carry: its ``training`` record's
    ``covid_prevalence`` when it states one (a bundle combining models fitted on
    different images), else the share among the findings-training images with a known
    label; ``None`` when it does not say."""
    stated = training.get("covid_prevalence")
    if isinstance(stated, float) and 0.0 < stated < 1.0:
        return stated
    data = training.get("data")
    train = data.get("findings_train") if isinstance(data, Mapping) else None
    labels = train.get("labels") if isinstance(train, Mapping) else None
    counts = labels.get(COVID) if isinstance(labels, Mapping) else None
    if not isinstance(counts, Mapping):
        return None
    positive, negative = counts.get("positive"), counts.get("negative")
    if not isinstance(positive, int) or not isinstance(negative, int) or positive + negative == 0:
        return None
    return positive / (positive + negative)


def summarise(
    probabilities: Mapping[str, float | None],
    model_prevalence: float,
    prevalence: float | None = None,
) -> Summary | None:
    """The coherent summary of one image's calibrated finding probabilities.

    Args:
        probabilities: label -> calibrated probability (as in a prediction row).
        model_prevalence: the COVID-19 prevalence the model was trained at.
        prevalence: the local COVID-19 prevalence to re-state for; ``None`` keeps the
            model's.

    Returns:
        The summary, or ``None`` when a label it needs is missing or unknown.

    Raises:
        MetadataError: a prevalence outside (0, 1).
    """
    for name, value in (("model prevalence", model_prevalence), ("prevalence", prevalence)):
        if value is not None and not 0.0 < value < 1.0:
            raise MetadataError(f"predict: {name} {value} must lie strictly between 0 and 1")
    needed = (NO_FINDING, *PNEUMONIA_LABELS)
    values = [probabilities.get(label) for label in needed]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    raw = dict(zip(needed, (max(float(v), 1e-9) for v in values if v is not None), strict=True))
    total = sum(raw.values())
    q = {label: p / total for label, p in raw.items()}
    if prevalence is not None and prevalence != model_prevalence:
        q = _shift_prior(q, model_prevalence, prevalence)
    pneumonia = 1.0 - q[NO_FINDING]
    return Summary(
        pneumonia=pneumonia,
        viral=q[COVID] + q[OTHER_VIRAL],
        covid=q[COVID],
        covid_if_pneumonia=q[COVID] / pneumonia if pneumonia > 0 else 0.0,
        prevalence=model_prevalence if prevalence is None else prevalence,
    )


def _shift_prior(q: Mapping[str, float], old: float, new: float) -> dict[str, float]:
    """``q`` with COVID-19's odds multiplied by the prior odds ratio, the rest rescaled."""
    covid = min(max(q[COVID], 1e-9), 1 - 1e-9)
    odds = covid / (1 - covid) * (new / (1 - new)) / (old / (1 - old))
    shifted = odds / (1 + odds)
    scale = (1 - shifted) / (1 - covid)
    return {label: shifted if label == COVID else p * scale for label, p in q.items()}
