"""Coherent summaries: the hierarchy always holds, and prevalence follows Bayes' rule."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from covidcxr.errors import MetadataError
from covidcxr.models.coherence import summarise, training_prevalence

LABELS = ("COVID-19", "Other viral pneumonia", "Bacterial pneumonia", "Fungal pneumonia")
probability = st.floats(min_value=0.0, max_value=1.0)


def row(covid: float, viral: float, bacterial: float, fungal: float, normal: float) -> dict:
    return dict(
        zip((*LABELS, "No finding"), (covid, viral, bacterial, fungal, normal), strict=True)
    )


@given(probability, probability, probability, probability, probability, st.none() | probability)
def test_covid_never_exceeds_viral_never_exceeds_pneumonia(
    c: float, v: float, b: float, f: float, n: float, prevalence: float | None
) -> None:
    if prevalence is not None and not 0 < prevalence < 1:
        return
    summary = summarise(row(c, v, b, f, n), 0.78, prevalence)
    assert summary is not None
    assert 0 <= summary.covid <= summary.viral + 1e-12 <= summary.pneumonia + 2e-12 <= 1 + 1e-9
    assert 0 <= summary.covid_if_pneumonia <= 1 + 1e-12


def test_a_confident_normal_gets_a_low_covid_probability() -> None:
    # The raw sigmoid says 0.7 for COVID-19; the model is far surer the chest is normal.
    summary = summarise(row(0.7, 0.05, 0.05, 0.02, 0.95), 0.78)
    assert summary is not None
    assert summary.covid < 0.45
    assert summary.pneumonia < 0.55


def test_prevalence_shift_is_bayes_rule_on_the_odds() -> None:
    probabilities = row(0.6, 0.1, 0.1, 0.05, 0.15)
    at_model = summarise(probabilities, 0.8)
    local = summarise(probabilities, 0.8, prevalence=0.1)
    assert at_model is not None and local is not None
    odds = at_model.covid / (1 - at_model.covid) * (0.1 / 0.9) / (0.8 / 0.2)
    assert local.covid == pytest.approx(odds / (1 + odds))
    assert local.prevalence == 0.1
    # The other labels keep their shares of what is not COVID-19.
    normal_share_before = (1 - at_model.pneumonia) / (1 - at_model.covid)
    normal_share_after = (1 - local.pneumonia) / (1 - local.covid)
    assert normal_share_after == pytest.approx(normal_share_before)


def test_same_prevalence_changes_nothing_and_missing_labels_give_none() -> None:
    probabilities = row(0.3, 0.2, 0.1, 0.1, 0.4)
    assert summarise(probabilities, 0.5, prevalence=0.5) == summarise(probabilities, 0.5)
    assert summarise({"COVID-19": 0.5}, 0.5) is None
    assert summarise({**probabilities, "No finding": None}, 0.5) is None
    assert summarise({**probabilities, "No finding": math.nan}, 0.5) is None


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_prevalence_outside_zero_one_is_refused(bad: float) -> None:
    with pytest.raises(MetadataError, match="strictly between 0 and 1"):
        summarise(row(0.3, 0.2, 0.1, 0.1, 0.4), 0.5, prevalence=bad)


def test_training_prevalence_from_a_bundle_record() -> None:
    training = {
        "data": {"findings_train": {"labels": {"COVID-19": {"positive": 3, "negative": 1}}}}
    }
    assert training_prevalence(training) == 0.75
    assert training_prevalence({}) is None
    assert training_prevalence({"data": {"findings_train": {"labels": {}}}}) is None
