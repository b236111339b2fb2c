"""The shipped prognosis models, ``outcome_risks`` (the function the service calls), the
clinical-value checks, and the model card's outcome section."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from covidcxr.errors import MetadataError
from covidcxr.models import prognosis_risk, prognosis_values
from covidcxr.models.bundle import file_sha256, load_bundle
from covidcxr.models.card import render_card
from covidcxr.models.prognosis_cohort import OUTCOMES

VALUES = {"age_years": 64.0, "sex_male": 1.0, "po2_saturation_pct": 91.0}


def test_shipped_models_carry_their_measured_auroc_and_provenance() -> None:
    models = prognosis_risk.shipped_models()
    assert [m.outcome for m in models] == list(OUTCOMES)
    for model in models:
        assert model.model_id == f"prognosis-v1/{model.outcome}"
        assert 0.5 < model.auroc.low < model.auroc.value < model.auroc.high < 1
        assert model.command.startswith(f"covidcxr prognosis fit --outcome {model.outcome}")
        assert model.image_model == "covidcxr-small-v1"  # the network v2 shares
        assert load_bundle(model.image_model).model_id == model.image_model
        assert len(model.bootstrap) == 200
        evaluation = prognosis_risk.shipped_evaluations(model.image_model)[models.index(model)]
        all_inputs = next(r for r in evaluation["results"] if r["inputs"] == "all")
        assert all_inputs["auroc"]["value"] == pytest.approx(model.auroc.value)


def test_outcome_risks_for_one_patient() -> None:
    risks = prognosis_risk.outcome_risks(VALUES)
    assert [r.outcome for r in risks] == list(OUTCOMES)
    for found in risks:
        assert found.value is not None and found.low is not None and found.high is not None
        assert 0 <= found.low <= found.value <= found.high <= 1
        assert found.reason == "" and found.note == "research estimate, not a diagnosis"
        assert "age_years" not in found.missing and "temperature_c" in found.missing
        assert "opacity" in found.missing  # no image given
    older = prognosis_risk.outcome_risks({**VALUES, "age_years": 90.0})
    assert older[0].value is not None and risks[0].value is not None
    assert older[0].value > risks[0].value  # death risk rises with age in this model


def test_image_features_are_used_when_given() -> None:
    image = {"geographic_extent": 7.0, "opacity": 5.0, "p_covid_19": 0.9}
    plain = prognosis_risk.outcome_risks(VALUES)[1]
    with_image = prognosis_risk.outcome_risks(VALUES, image)[1]
    assert "opacity" not in with_image.missing and with_image.value != plain.value


def test_no_number_without_inputs_or_clinical_values() -> None:
    nothing = prognosis_risk.outcome_risks({})
    assert all(r.value is None and "none of the model's inputs" in r.reason for r in nothing)
    image_only = prognosis_risk.outcome_risks({}, {"opacity": 3.0, "geographic_extent": 4.0})
    assert all(r.value is None and "no clinical value given" in r.reason for r in image_only)
    assert image_only[0].text().startswith("no estimate: ")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"po2_saturation_pct": 140.0}, "po2_saturation_pct 140 is outside 0..100"),
        ({"temperature_c": 20.0}, "temperature_c 20 is outside 25..45"),
        ({"sex_male": 0.5}, "sex_male 0.5: give 1 (M) or 0 (F)"),
        ({"spo2": 90.0}, "unknown input(s) ['spo2']"),
        ({"age_years": math.nan}, "age_years nan is outside"),
    ],
)
def test_outcome_risks_refuses_implausible_values(values: dict[str, float], message: str) -> None:
    with pytest.raises(MetadataError, match=re.escape(message)):
        prognosis_risk.outcome_risks(values)


def test_risk_record_and_columns_agree() -> None:
    risks = prognosis_risk.outcome_risks(VALUES)
    record = prognosis_risk.risk_record(risks)
    assert list(record) == prognosis_risk.risk_columns([r.outcome for r in risks])
    assert record["risk_death"] == round(risks[0].value or 0, 4)
    assert prognosis_risk.risk_record(None) == {}


def test_a_model_file_is_checked_and_named(tmp_path: pytest.TempPathFactory) -> None:
    other = tmp_path / "other.json"  # type: ignore[operator]
    other.write_text('{"format": "x"}', encoding="utf-8")
    with pytest.raises(MetadataError, match="is not a covidcxr-prognosis/1 file"):
        prognosis_risk.load_model(other)


def test_outcome_events_read_yes_no() -> None:
    columns = prognosis_values.outcome_columns(["file", "survival", "went_icu", "notes"])
    assert columns == {"survival": "survival", "icu": "went_icu"}
    events = prognosis_values.outcome_events({"survival": "N", "went_icu": ""}, columns, "x:")
    assert events == {"survival": 1, "icu": None}  # death is the event of survival
    with pytest.raises(MetadataError, match="x: survival 'maybe' is not Y/N"):
        prognosis_values.outcome_events({"survival": "maybe"}, columns, "x:")


# ---------------------------------------------------------------- the model card


def test_card_renders_the_outcome_section_from_a_given_evaluation() -> None:
    bundle = load_bundle("covidcxr-small-v1")
    evaluations = prognosis_risk.shipped_evaluations(bundle.model_id)
    other = dataclasses.replace(bundle, model_id="new-model", metrics={})
    without = render_card(other)
    assert "## Outcomes (prognosis)" in without and "Not evaluated" in without
    given = [{**e, "image_model": "new-model"} for e in evaluations]
    card = render_card(other, prognosis=given)
    section = card.split("## Outcomes (prognosis)", 1)[1].split("\n## ", 1)[0]
    assert "Research use only, not a diagnosis" in section
    assert "covidcxr prognosis evaluate --outcome all" in section
    for name in OUTCOMES:
        assert f"### {name} (event: " in section
    assert "| all | 109 | 23 | 0.77 [0.64, 0.89]" in section
    assert "prognosis-v1" not in section  # the shipped note is for the shipped card only
    in_metrics = dataclasses.replace(other, metrics={"prognosis": given})
    assert render_card(in_metrics) == card


def test_shipped_card_is_the_rendered_card_and_its_hash_is_listed() -> None:
    bundle = load_bundle()  # verifies every listed hash, the card's included
    card = bundle.path / "MODEL_CARD.md"
    text = card.read_text(encoding="utf-8")
    assert render_card(bundle) == text
    assert "## Outcomes (prognosis)" in text and "prognosis-v1" in text
    assert bundle.files["MODEL_CARD.md"] == file_sha256(card)
    doc = json.loads((bundle.path / "model.json").read_text(encoding="utf-8"))
    assert doc["files"]["MODEL_CARD.md"] == file_sha256(card)
