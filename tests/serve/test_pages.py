"""The web pages: upload and results, browse, case, statistics, sign-in, contribute, review."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from serve_helpers import (  # noqa: F401  (fixtures)
    add_user,
    client,
    csrf,
    engine,
    login,
    make_client,
    store_url,
    xray_png,
)

from covidcxr.cli import main
from covidcxr.models.bundle import load_bundle


def _download(page: str, fmt: str) -> str:
    found = re.search(rf'href="data:[^;]+;base64,([^"]+)" download="predictions.{fmt}"', page)
    assert found, f"no {fmt} download link"
    return base64.b64decode(found.group(1)).decode("utf-8")


def test_results_page_explains_each_image_and_downloads_match_the_cli(
    client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = {"good.png": xray_png(4), "tiny.png": xray_png(5, (60, 60))}
    for name, data in names.items():
        (tmp_path / name).write_bytes(data)
    files = [("file", (name, data, "image/png")) for name, data in names.items()]
    response = client.post("/predict", data={"csrf_token": csrf(client)}, files=files)
    assert response.status_code == 200
    page = response.text
    assert page.count("research use only, not a diagnosis") >= 2
    assert "Results for 2 image(s)" in page
    assert "Not analysed: image too small: 60x60 px" in page
    assert "To make it usable:</b> Upload the full-resolution radiograph, not a thumbnail." in page
    assert f'href="/model">{load_bundle().model_id}</a>' in page

    monkeypatch.chdir(tmp_path)
    for fmt in ("csv", "json"):
        assert main(["predict", "good.png", "tiny.png", "--format", fmt]) == 0
        assert _download(page, fmt) == capsys.readouterr().out


def test_usable_image_shows_findings_severity_and_heatmap(
    client: TestClient, covid_dir: Path
) -> None:
    image = covid_dir / "images" / "000001-3.png"
    response = client.post(
        "/predict",
        data={"csrf_token": csrf(client)},
        files=[("file", (image.name, image.read_bytes(), "image/png"))],
    )
    page = response.text
    assert "✔ Input check passed" in page
    assert "usable frontal chest X-ray (gate p=" in page
    # Which labels are called depends on the model; the page says either way.
    assert "<b>called</b>" in page or "neither normal nor any finding reached" in page
    assert "no call: too few validation cases" in page
    assert "Geographic extent: <b>" in page and "on 0–8" in page
    assert "Opacity: <b>" in page and "on 0–6" in page
    assert 'class="heat"' in page and "heat-opacity" in page and 'class="legend"' in page


def test_browse_filters_and_pages(client: TestClient) -> None:
    page = client.get("/browse", params={"sex": "F"}).text
    assert "1 record(s) · page 1 of 1" in page
    assert 'href="/patients/tiny/2"' in page
    assert "/thumbnail" in page
    everything = client.get("/browse").text
    assert "4 record(s)" in everything
    bad = client.get("/browse", params={"view": "sideways"}, headers={"accept": "text/html"})
    assert bad.status_code == 422
    assert "sideways" in bad.text


def test_thumbnails_are_small_pngs(client: TestClient) -> None:
    sha = client.get("/api/v1/images").json()["items"][0]["image_sha256"]
    response = client.get(f"/images/{sha}/thumbnail")
    assert response.status_code == 200
    assert response.content.startswith(b"\x89PNG")


def test_case_page_in_day_order_with_provenance(client: TestClient) -> None:
    page = client.get("/patients/tiny/1").text
    assert page.index("Day 0") < page.index("Day 3")
    assert "CC BY 4.0" in page
    assert "geographic extent 4.5 / 8, opacity 3.0 / 6" in page
    assert 'class="box"' in page


def test_stats_page_has_charts(client: TestClient) -> None:
    page = client.get("/stats").text
    assert "4 records · 3 patients" in page
    assert page.count('class="hbar"') > 10


def test_sign_in_contribute_and_review(client: TestClient) -> None:
    add_user(client, "carl", "contributor", password="carl-password")
    login(client, "carl", "carl-password")
    form = {
        "csrf_token": csrf(client, "/contribute"),
        "patientid": "web-1",
        "finding": "COVID-19",
        "view": "PA",
        "modality": "X-ray",
        "license": "CC BY 4.0",
    }
    files = [("file", ("c.png", xray_png(9), "image/png"))]
    response = client.post("/contribute", data=form, files=files)
    assert response.status_code == 201
    assert "Case 1 is pending review" in response.text
    assert client.get("/review").status_code == 403

    client.post("/logout", data={"csrf_token": csrf(client)})
    add_user(client, "cora", "curator", password="cora-password")
    login(client, "cora", "cora-password")
    assert "web-1" in client.get("/review").text
    decided = client.post(
        "/review/1",
        data={"csrf_token": csrf(client, "/review"), "decision": "accept", "reason": "ok"},
        follow_redirects=False,
    )
    assert decided.status_code == 303
    assert "Day ?" in client.get("/patients/contributed-1/web-1").text
    audit = client.get("/audit").text
    assert "case.accept" in audit and "case.submit" in audit


def test_wrong_password_is_401(client: TestClient) -> None:
    add_user(client, "cora", "curator", password="cora-password")
    response = client.post(
        "/login",
        data={"username": "cora", "password": "nope", "csrf_token": csrf(client, "/login")},
    )
    assert response.status_code == 401
    assert "wrong user name or password" in response.text


def test_pages_that_need_an_account_send_browsers_to_sign_in(client: TestClient) -> None:
    response = client.get("/contribute", headers={"accept": "text/html"}, follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/login")
