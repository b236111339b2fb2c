"""The results page and API: the coherent summary (with a local prevalence), and the
heatmap viewer's layers (lung outline, border of what the network saw, legend)."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.exceptions import HTTPException
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import (  # noqa: F401  (fixtures)
    client,
    csrf,
    engine,
    make_client,
    store_url,
    xray_png,
)

from covidcxr.cli import main
from covidcxr.models import coherence, saliency
from covidcxr.models.bundle import load_bundle
from covidcxr.serve import predicting

SUMMARY = ("p_pneumonia", "p_viral_pneumonia", "p_COVID-19_if_pneumonia", "p_COVID-19_overall")


def _png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_api_prevalence_restates_the_summary_like_the_cli(
    client: TestClient,
    covid_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = covid_dir / "images" / "000001-3.png"
    (tmp_path / image.name).write_bytes(image.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["predict", image.name, "--prevalence", "0.05", "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    files = [("file", (image.name, image.read_bytes(), "image/png"))]

    local = client.post("/api/v1/predict?prevalence=0.05", files=files).json()["results"]
    default = client.post("/api/v1/predict", files=files).json()["results"]

    assert local == expected
    assert local[0]["covid_19_prevalence"] == 0.05
    shipped = coherence.training_prevalence(load_bundle().training)
    assert default[0]["covid_19_prevalence"] == pytest.approx(shipped, abs=1e-4)
    assert local[0]["p_COVID-19_overall"] < default[0]["p_COVID-19_overall"]
    for row in (local[0], default[0]):
        values = [row[c] for c in SUMMARY]
        assert values[0] >= values[1] >= values[3]  # pneumonia >= viral >= COVID-19


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "many"])
def test_api_prevalence_outside_zero_one_is_422(client: TestClient, value: str) -> None:
    files = [("file", ("a.png", xray_png(3), "image/png"))]
    response = client.post(f"/api/v1/predict?prevalence={value}", files=files)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "prevalence"]


@pytest.mark.parametrize(("text", "value"), [("", None), (" 0.05 ", 0.05), ("5%", 0.05)])
def test_form_prevalence_is_a_fraction_or_a_percentage(text: str, value: float | None) -> None:
    assert predicting.parse_prevalence(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "100%", "1", "abc", "-2"])
def test_form_prevalence_outside_zero_one_is_refused(text: str) -> None:
    with pytest.raises(HTTPException, match="strictly between 0 and 1") as caught:
        predicting.parse_prevalence(text)
    assert caught.value.status_code == 422


def _card(page: str) -> str:
    """The first result card, its whitespace runs made single spaces."""
    start = page.index('id="result-1"')
    return " ".join(page[start : page.index("</section>", start)].split())


def test_results_card_answers_in_order_at_the_given_prevalence(
    client: TestClient,
    covid_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = covid_dir / "images" / "000001-3.png"
    files = [("file", (image.name, image.read_bytes(), "image/png"))]
    default = _card(client.post("/predict", data={"csrf_token": csrf(client)}, files=files).text)
    local = client.post(
        "/predict", data={"csrf_token": csrf(client), "prevalence": "5%"}, files=files
    ).text

    card = _card(local)
    steps = [
        "Abnormal / pneumonia? <b>",
        "viral? <b>",
        "COVID-19 (of pneumonias)? <b>",
        "Model calls:",
    ]
    positions = [card.index(step) for step in steps]
    assert positions == sorted(positions)  # the answer first, in the order asked
    assert "at a COVID-19 prevalence of 5% (yours, as given)" in card
    shipped = coherence.training_prevalence(load_bundle().training) or 0.0
    assert f"at a COVID-19 prevalence of {100 * shipped:.0f}% (the model's training" in default
    assert "research use only, not a diagnosis" in card
    assert "AUC" in card and f'href="/model">{load_bundle().model_id}</a>' in card

    (tmp_path / image.name).write_bytes(image.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["predict", image.name, "--prevalence", "0.05", "--format", "csv"]) == 0
    found = re.search(r'href="data:text/csv;base64,([^"]+)"', local)
    assert found
    assert base64.b64decode(found.group(1)).decode("utf-8") == capsys.readouterr().out


def test_a_bad_form_prevalence_is_explained(client: TestClient) -> None:
    response = client.post(
        "/predict",
        data={"csrf_token": csrf(client), "prevalence": "often"},
        files=[("file", ("a.png", xray_png(3), "image/png"))],
        headers={"accept": "text/html"},
    )
    assert response.status_code == 422
    assert "prevalence &#39;often&#39;: give the share of your patients" in response.text


def test_upload_form_offers_a_local_prevalence(client: TestClient) -> None:
    page = client.get("/").text
    assert 'name="prevalence"' in page
    shipped = coherence.training_prevalence(load_bundle().training) or 0.0
    assert f"model's training prevalence ({100 * shipped:.0f}%)" in page
    assert "PNG, JPEG or DICOM" in page


def test_heatmap_viewer_has_the_lung_outline_and_legend(
    client: TestClient, covid_dir: Path
) -> None:
    pytest.importorskip("torch")
    image = covid_dir / "images" / "000001-3.png"
    response = client.post(
        "/predict",
        data={"csrf_token": csrf(client)},
        files=[("file", (image.name, image.read_bytes(), "image/png"))],
    )
    card = _card(response.text)
    lines_url = re.search(r'<img class="lines" src="([^"]+)"', card)
    preview_url = re.search(r'<img src="([^"]+)" alt="uploaded image"', card)
    assert lines_url and preview_url
    lines, preview = _png(lines_url.group(1)), _png(preview_url.group(1))
    assert lines.size == preview.size == (512, 443)  # the whole image, in proportion
    pixels = np.asarray(lines)
    green = np.all(pixels == (0, 255, 0, 255), axis=-1)
    assert green.sum() > 200  # a lung outline is drawn
    assert pixels[..., 3][~green].max() == 0  # only the outline: the square has its layer
    square_url = re.search(r'<img class="lines square" src="([^"]+)"', card)
    assert square_url
    square = np.asarray(_png(square_url.group(1)))
    assert np.all(square == (255, 255, 255, 255), axis=-1).any()
    assert not np.all(square == (0, 255, 0, 255), axis=-1).any()
    assert 'data-own-map="Pneumonia (lung zones)"' in card  # the map the square is hidden for
    for text in ("heat-toggle", "heat-opacity", "lines-toggle", "lungs (segmented", "the square"):
        assert text in card
    assert "linear-gradient(to right, rgba(0, 0, 128, 0.00) 0%" in card


def test_line_layer_outlines_lungs_over_the_whole_image() -> None:
    lungs = np.zeros((100, 160), dtype=np.uint8)
    lungs[20:80, 5:75] = 1  # reaches left of the centre square (columns 30-129)
    lungs[20:80, 90:155] = 1  # and right of it
    layer = saliency.line_layer(100, 160, lungs)
    green = np.all(layer == (0, 255, 0, 255), axis=-1)
    white = np.all(layer == (255, 255, 255, 255), axis=-1)
    assert green[:, :30].any() and green[:, 130:].any()  # outside the square too
    assert not green[50, 40] and green[20, 40]  # the border of a lung, not its inside
    assert white.any()  # the dashed square the network saw
    assert (layer[..., 3] == 0).sum() > 0.8 * layer[..., 0].size
    assert not saliency.line_layer(100, 100, None).any()  # square, no lungs: nothing to draw
    outline_only = saliency.line_layer(100, 160, lungs, seen_box=False)
    assert np.array_equal(outline_only[green], layer[green])
    assert not np.all(outline_only == (255, 255, 255, 255), axis=-1).any()


def test_line_layer_refuses_a_mask_of_another_size() -> None:
    with pytest.raises(ValueError, match=r"line_layer: lungs \(10, 10\) is not \(20, 20\)"):
        saliency.line_layer(20, 20, np.zeros((10, 10), dtype=np.uint8))


def test_legend_matches_the_heatmap_layer() -> None:
    heat = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(4, axis=0)
    layer = np.asarray(_png(predicting.heatmap_png(heat, (256, 4))))
    gradient = predicting.legend_gradient(stops=3)
    stops = re.findall(r"rgba\((\d+), (\d+), (\d+), ([\d.]+)\) (\d+)%", gradient)
    assert [s[4] for s in stops] == ["0", "50", "100"]
    for red, green, blue, alpha, percent in stops:
        column = min(255, round(int(percent) * 255 / 100))
        assert tuple(layer[0, column, :3]) == pytest.approx(
            (int(red), int(green), int(blue)), abs=3
        )
        assert layer[0, column, 3] / 255 == pytest.approx(float(alpha), abs=0.02)


def test_the_service_does_not_import_the_cli() -> None:
    import subprocess
    import sys

    code = (
        "import sys, covidcxr.serve.app, covidcxr.serve.predicting; "
        "print(sorted(m for m in sys.modules if m.startswith('covidcxr.cli')))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


def test_covid_at_chance_names_a_model_whose_covid_answer_is_no_better_than_chance() -> None:
    from covidcxr.models.engines import covid_at_chance

    v2 = load_bundle("covidcxr-small-v2")
    row = v2.metrics["lung_model"]["holdout_test_combined"]["COVID-19"]
    assert covid_at_chance(v2) == (
        f"AUC {row['auc']:.2f} [{row['low']:.2f}, {row['high']:.2f}] in held-out patients"
    )
    better = {**row, "auc": 0.8, "low": 0.7, "high": 0.9}
    metrics = {**v2.metrics, "lung_model": {"holdout_test_combined": {"COVID-19": better}}}
    assert covid_at_chance(dataclasses.replace(v2, metrics=metrics)) is None
    v1 = load_bundle("covidcxr-small-v1")  # cross-validated 0.56 [0.50, 0.63]: reaches 0.5
    assert (covid_at_chance(v1) or "").endswith("in cross-validation")
    assert covid_at_chance(dataclasses.replace(v1, metrics={})) is None  # unmeasured


def test_every_refusal_the_gates_make_says_how_to_make_the_image_usable() -> None:
    from covidcxr.models import gate, lung_gate

    refusals = {name for name in lung_gate.CLASSES if name != gate.FRONTAL_CLASS}
    refusals |= {"tiny", "colourful"}
    refusals.add(gate.grey_level_verdict(0.0, gate.GateVerdict("pass", "", "ok")).code)
    refusals.add(gate.lung_fields_verdict(False, gate.GateVerdict("pass", "", "ok")).code)
    assert refusals - set(predicting.USABLE_IF) == set()
    assert "a lung may be whited out" in predicting.USABLE_IF["not_two_lungs"]
    assert "without histogram equalisation" in predicting.USABLE_IF["equalised"]
