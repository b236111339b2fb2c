"""Outcome risk on the service: clinical values through the API and the upload form."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from serve_helpers import (  # noqa: F401  (fixtures)
    client,
    csrf,
    engine,
    make_client,
    store_url,
    xray_png,
)

from covidcxr.cli import main
from covidcxr.errors import MetadataError
from covidcxr.models import prognosis_risk
from covidcxr.serve import outcomes
from covidcxr.serve.app import ACCESS_FILTER

VALUES = {"age": "64", "sex": "M", "spo2": "91"}
OPTIONS = ["--age", "64", "--sex", "M", "--spo2", "91"]


def _cli(
    image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
) -> str:
    """What ``covidcxr predict IMAGE --age 64 --sex M --spo2 91 --format FMT`` prints."""
    (tmp_path / image.name).write_bytes(image.read_bytes())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["predict", image.name, *OPTIONS, "--format", fmt]) == 0
    return capsys.readouterr().out


def _files(image: Path, copies: int = 1) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (image.name, image.read_bytes(), "image/png"))] * copies


def _card(page: str) -> str:
    """The first result card, its whitespace runs made single spaces."""
    start = page.index('id="result-1"')
    return " ".join(page[start : page.index("</section>", start)].split())


@pytest.mark.shared_data
def test_api_risk_columns_equal_the_cli(
    client: TestClient,
    covid_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = covid_dir / "images" / "000001-3.png"
    expected = json.loads(_cli(image, tmp_path, monkeypatch, capsys, "json"))

    response = client.post("/api/v1/predict", params=VALUES, files=_files(image))

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results == expected
    risk_keys = [key for key in results[0] if key.startswith("risk_")]
    assert set(risk_keys) == set(prognosis_risk.risk_columns(["survival", "icu", "intubation"]))
    assert 0.0 <= results[0]["risk_death_low"] <= results[0]["risk_death"] <= 1.0
    assert results[0]["risk_note"] == "research estimate, not a diagnosis"


def test_api_without_values_has_no_risk_columns(client: TestClient) -> None:
    response = client.post("/api/v1/predict", files=[("file", ("a.png", xray_png(4), "image/png"))])
    assert response.status_code == 200
    assert [key for key in response.json()["results"][0] if key.startswith("risk")] == []


@pytest.mark.parametrize(
    ("params", "field", "why"),
    [
        ({"age": "200"}, "age", "outside 0..120 years"),
        ({"spo2": "130", "age": "50"}, "spo2", "outside 0..100 %"),
        ({"temperature": "nan"}, "temperature", "outside 25..45"),
        ({"sex": "X"}, "sex", "give M or F"),
    ],
)
def test_api_bad_value_is_422_naming_the_field(
    client: TestClient, params: dict[str, str], field: str, why: str
) -> None:
    files = [("file", ("a.png", xray_png(3), "image/png"))]
    response = client.post("/api/v1/predict", params=params, files=files)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith(f"predict: {field}:")
    assert why in detail


def test_api_value_that_is_not_a_number_is_422_naming_the_field(client: TestClient) -> None:
    files = [("file", ("a.png", xray_png(3), "image/png"))]
    response = client.post("/api/v1/predict", params={"wbc": "many"}, files=files)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "wbc"]


def test_api_values_with_several_images_are_refused(client: TestClient) -> None:
    files = [("file", (f"{i}.png", xray_png(i), "image/png")) for i in (1, 2)]
    response = client.post("/api/v1/predict", params=VALUES, files=files)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "describe one patient, but 2 images were sent" in detail
    assert "send one image with them" in detail


def test_upload_form_offers_the_values_collapsed(client: TestClient) -> None:
    page = client.get("/").text
    assert '<details class="clinical">' in page  # collapsed: no "open"
    assert "Clinical values (optional, for outcome risk)" in page
    for name in outcomes.FIELDS:
        assert f'name="{name}"' in page
    assert 'name="spo2" step="any" min="0" max="100"' in page
    assert "×10⁹/L (= 10³/µL)" in page


@pytest.mark.shared_data
def test_form_card_shows_the_risks_with_the_models_auroc(
    client: TestClient,
    covid_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = covid_dir / "images" / "000001-3.png"
    page = client.post(
        "/predict", data={"csrf_token": csrf(client), **VALUES}, files=_files(image)
    ).text

    card = _card(page)
    assert "Outcome risk" in card and "research estimate, not a diagnosis" in card
    assert "Inputs: age 64 years, sex M, SpO2 91%, and this X-ray's findings" in card
    assert "do not read it as this patient's absolute risk" in card
    for model in outcomes.prognosis_models():
        auroc = model.auroc
        assert f"{auroc.value:.2f} [{auroc.low:.2f}–{auroc.high:.2f}]" in card
        assert model.model_id in card
        assert f"<b>{outcomes.EVENT_TEXT[model.outcome]}</b>" in card
    assert "median used instead): temperature, leukocytes, neutrophils, lymphocytes." in card
    for model in outcomes.prognosis_models():
        rate = f'{100 * model.events / model.patients:.0f}% <span class="small">of {model.patients}'
        assert rate in card  # the training rate beside the risk
    assert card.index("Outcome risk") < card.index('class="provenance"')

    expected = _cli(image, tmp_path, monkeypatch, capsys, "csv")
    found = re.search(r'href="data:text/csv;base64,([^"]+)"', page)
    assert found
    assert base64.b64decode(found.group(1)).decode("utf-8") == expected


def test_form_without_values_shows_no_risk(client: TestClient) -> None:
    page = client.post(
        "/predict",
        data={"csrf_token": csrf(client), "age": "", "sex": ""},
        files=[("file", ("a.png", xray_png(5), "image/png"))],
    ).text
    assert "Results for 1 image(s)" in page
    assert "Outcome risk" not in page and "risk_death" not in page


def test_form_values_with_several_images_are_explained(client: TestClient) -> None:
    response = client.post(
        "/predict",
        data={"csrf_token": csrf(client), "age": "70"},
        files=[("file", (f"{i}.png", xray_png(i), "image/png")) for i in (1, 2)],
        headers={"accept": "text/html"},
    )
    assert response.status_code == 422
    assert "describe one patient, but 2 images were sent" in response.text


def test_form_value_that_is_not_a_number_is_explained(client: TestClient) -> None:
    response = client.post(
        "/predict",
        data={"csrf_token": csrf(client), "temperature": "feverish"},
        files=[("file", ("a.png", xray_png(3), "image/png"))],
        headers={"accept": "text/html"},
    )
    assert response.status_code == 422
    assert "predict: temperature: &#39;feverish&#39; is not a number" in response.text


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, None),
        ({"age": " ", "sex": ""}, None),
        ({"temperature": "38,2"}, {"temperature_c": 38.2, "sex_male": None}),
        ({"sex": "f", "age": 40.0}, {"age_years": 40.0, "sex_male": 0.0}),
    ],
)
def test_clinical_values_blank_is_none(
    given: dict[str, str | float], expected: dict[str, float | None] | None
) -> None:
    found = outcomes.clinical_values(given)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        assert {k: v for k, v in found.items() if k in expected} == expected
        assert all(v is None for k, v in found.items() if k not in expected)


def test_clinical_values_refuse_a_negative_count() -> None:
    with pytest.raises(MetadataError, match=r"predict: lymphocytes: .* is outside 0\.\.1000"):
        outcomes.clinical_values({"lymphocytes": "-1"})


def test_clinical_values_never_reach_the_logs(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    files = [("file", ("a.png", xray_png(6), "image/png"))]
    given = {"age": "63.25", "spo2": "87.75", "wbc": "12.125"}
    assert client.post("/api/v1/predict", params=given, files=files).status_code == 200
    bad = client.post("/api/v1/predict", params={"age": "187.5"}, files=files)
    assert bad.status_code == 422 and "187.5" in bad.json()["detail"]  # told to the caller
    form = {"csrf_token": csrf(client), "temperature": "39.625", "neutrophils": "9.875"}
    assert client.post("/predict", data=form, files=files).status_code == 200

    # The test client's own request log (httpx) is the caller's, not the service's.
    messages = [r.getMessage() for r in caplog.records if not r.name.startswith("httpx")]
    assert any("predicted 1 image(s)" in m for m in messages)  # logging was captured
    for value in ("63.25", "87.75", "12.125", "187.5", "39.625", "9.875"):
        assert not any(value in m for m in messages), value


def test_access_log_lines_lose_the_query_string(client: TestClient) -> None:
    access = logging.getLogger("uvicorn.access")
    assert ACCESS_FILTER in access.filters  # installed by create_app
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/api/v1/predict?age=64&sex=M", "1.1", 200),
        None,
    )
    assert access.filter(record)
    assert record.getMessage() == (
        '127.0.0.1:5000 - "POST /api/v1/predict?[query not logged] HTTP/1.1" 200'
    )


class _FakeEngine:
    """Predicts a fixed COVID-19 probability and records the files asked for."""

    def __init__(self, probability: float) -> None:
        self.calls: list[list[Path]] = []
        self.probability = probability

    def predict_files(self, paths: list[Path]) -> list[SimpleNamespace]:
        self.calls.append(list(paths))
        return [SimpleNamespace(severity={}, probabilities={"COVID-19": self.probability})]


class _FakeState:
    """A service whose own model is ``model_id``; other image models come from ``other``."""

    def __init__(self, model_id: str, other: _FakeEngine) -> None:
        self.model_id, self.other = model_id, other
        self.asked: list[str] = []

    def bundle(self) -> SimpleNamespace:
        return SimpleNamespace(model_id=self.model_id)

    def engine_for(self, model_id: str) -> _FakeEngine:
        self.asked.append(model_id)
        return self.other


@pytest.mark.parametrize("own_model", [True, False])
def test_risks_use_the_image_model_the_prognosis_models_were_fitted_on(
    own_model: bool, tmp_path: Path
) -> None:
    image_models = {m.image_model for m in outcomes.prognosis_models()}
    assert len(image_models) == 1
    fitted_on = image_models.pop()
    other = _FakeEngine(0.9)
    state = _FakeState(fitted_on if own_model else "another-model", other)
    row = SimpleNamespace(severity={}, probabilities={"COVID-19": 0.1})
    values = outcomes.clinical_values({"age": "64"})
    assert values is not None

    found = outcomes.risks(state, tmp_path / "upload-000", row, values)  # type: ignore[arg-type]

    expected = prognosis_risk.outcome_risks(
        values, {"p_covid_19": 0.1 if own_model else 0.9}, models=outcomes.prognosis_models()
    )
    assert found == expected
    assert state.asked == ([] if own_model else [fitted_on])  # one prediction for all models
    assert other.calls == ([] if own_model else [[tmp_path / "upload-000"]])
