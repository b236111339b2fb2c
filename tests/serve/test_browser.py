"""The pages in headless Chromium (Debian's, driven by Playwright; nothing downloaded).

Screenshots go to /tmp/covidcxr-shots/serve-*.png.
"""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from serve_helpers import (  # noqa: F401  (fixtures)
    add_user,
    client,
    engine,
    live_server,
    make_client,
    store_url,
    xray_png,
)

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path("/tmp/covidcxr-shots")

pytestmark = [pytest.mark.browser]


@pytest.fixture
def page(live_server: str) -> Iterator[Any]:
    """A Chromium page on the live server (skips without chromium or playwright)."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium")
    playwright_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = browser.new_page(base_url=live_server, viewport={"width": 1280, "height": 900})
        yield tab
        browser.close()


@pytest.mark.shared_data
def test_upload_a_collection_image_shows_verdict_and_heatmap(
    page: Any, covid_dir: Path, tmp_path: Path
) -> None:
    images = [covid_dir / "images" / "000001-3.png", tmp_path / "small.png"]
    images[1].write_bytes(xray_png(2, (64, 64)))
    page.goto("/")
    page.screenshot(path=str(SHOTS / "serve-upload.png"))
    page.set_input_files("input[type=file]", [str(p) for p in images])
    page.click("button[type=submit]")
    page.wait_for_selector("section.result")
    assert "Input check passed" in page.inner_text("#result-1 .verdict")
    assert "Model calls:" in page.inner_text("#result-1 .headline")
    assert "Not analysed" in page.inner_text("#result-2 .verdict")
    heat = page.locator("#result-1 img.heat").first
    assert heat.is_visible()
    assert heat.get_attribute("data-label") == "Pneumonia (lung zones)"  # the first question
    assert "raised P(pneumonia)" in page.inner_text("#result-1 .legend")
    square = page.locator("#result-1 img.square")
    if square.count():  # a non-square image: the network saw its centre square
        assert not square.is_visible()  # not drawn over the lung-zone map
        page.locator("#result-1 .heat-label").select_option(index=1)
        assert square.is_visible()  # drawn over the network's map
        page.locator("#result-1 .heat-label").select_option(index=0)
    page.screenshot(path=str(SHOTS / "serve-results.png"), full_page=True)
    page.locator("#result-1 .heat-opacity").fill("20")
    assert heat.evaluate("img => img.style.opacity") == "0.2"
    page.locator("#result-1 .heat-toggle").uncheck()
    assert not heat.is_visible()


@pytest.mark.shared_data
def test_a_chest_without_two_lung_fields_is_not_analysed_and_says_read_it(
    page: Any, nih_dir: Path
) -> None:
    # NIH 00001986_005: the right hemithorax is whited out; NIH labels it No Finding
    page.goto("/")
    page.set_input_files("input[type=file]", str(nih_dir / "images" / "00001986_005.jpg"))
    page.click("button[type=submit]")
    page.wait_for_selector("section.result")
    verdict = page.inner_text("#result-1")
    assert "Not analysed" in verdict and "did not find two lung fields" in verdict
    assert "Read this image yourself" in verdict
    assert "No finding" not in verdict
    page.screenshot(path=str(SHOTS / "serve-not-two-lungs.png"), full_page=True)


@pytest.mark.shared_data
def test_a_dicom_upload_shows_the_answer_and_the_lung_outline(
    page: Any, covid_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("pydicom")
    from PIL import Image

    from covidcxr.models.inputs import grey_levels
    from dicom_files import IDENTITY, make_dataset, to_bytes

    with Image.open(covid_dir / "images" / "000001-3.png") as image:
        grey = grey_levels(image)
    study = tmp_path / "study.dcm"
    study.write_bytes(to_bytes(make_dataset(grey, bits_stored=8)))
    page.goto("/")
    page.set_input_files("input[type=file]", str(study))
    page.fill("input[name=prevalence]", "5%")
    page.click("button[type=submit]")
    page.wait_for_selector("section.result")
    answer = page.inner_text("#result-1 .answer")
    assert "Abnormal / pneumonia?" in answer and "prevalence of 5% (yours, as given)" in answer
    assert IDENTITY["PatientName"] not in page.content()
    outline = page.locator("#result-1 img.lines:not(.square)")
    assert outline.is_visible()
    page.screenshot(path=str(SHOTS / "serve-results-dicom.png"), full_page=True)
    page.locator("#result-1 .lines-toggle").uncheck()
    assert not outline.is_visible()
    assert page.locator("#result-1 img.heat").first.is_visible()


def test_browse_filter_and_open_a_case(page: Any) -> None:
    page.goto("/browse")
    page.select_option("select[name=sex]", "F")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**sex=F**")
    assert "1 record(s)" in page.inner_text("main")
    page.screenshot(path=str(SHOTS / "serve-browse.png"), full_page=True)
    page.click("a.tile")
    page.wait_for_selector("h1")
    assert "Patient 2" in page.inner_text("h1")
    page.goto("/patients/tiny/1")
    page.screenshot(path=str(SHOTS / "serve-case.png"), full_page=True)
    page.goto("/stats")
    page.screenshot(path=str(SHOTS / "serve-stats.png"), full_page=True)


def test_contribute_then_accept_as_curator(page: Any, client: TestClient, tmp_path: Path) -> None:
    add_user(client, "carl", "contributor", password="carl-password")
    add_user(client, "cora", "curator", password="cora-password")
    image = tmp_path / "case.png"
    image.write_bytes(xray_png(8))

    def sign_in(name: str, password: str) -> None:
        page.goto("/login")
        page.fill("input[name=username]", name)
        page.fill("input[name=password]", password)
        page.click("form.card button[type=submit]")
        page.wait_for_url("**/")

    sign_in("carl", "carl-password")
    page.goto("/contribute")
    page.set_input_files("input[type=file]", str(image))
    for name, value in {
        "patientid": "b-1",
        "finding": "COVID-19",
        "license": "CC BY 4.0",
        "view": "PA",
        "modality": "X-ray",
    }.items():
        page.fill(f"input[name={name}]", value)
    page.click("form.card button[type=submit]")
    assert "pending review" in page.inner_text("h1")
    page.click("button.link")  # sign out
    sign_in("cora", "cora-password")
    page.goto("/review")
    page.fill("input[name=reason]", "complete and licensed")
    page.screenshot(path=str(SHOTS / "serve-review.png"), full_page=True)
    page.click("button[value=accept]")
    page.wait_for_url("**/review")
    assert "accepted" in page.inner_text("table.review")
    page.goto("/patients/contributed-1/b-1")
    assert "Patient b-1" in page.inner_text("h1")


@pytest.mark.shared_data
def test_clinical_values_give_the_outcome_risk_for_one_image(
    page: Any, covid_dir: Path, tmp_path: Path
) -> None:
    image = covid_dir / "images" / "000001-3.png"
    other = tmp_path / "other.png"
    other.write_bytes(xray_png(2))
    page.goto("/")
    assert not page.locator("input[name=age]").is_visible()  # collapsed
    page.click("details.clinical summary")
    page.fill("input[name=age]", "64")
    page.select_option("select[name=sex]", "M")
    page.fill("input[name=spo2]", "91")
    page.set_input_files("input[type=file]", [str(image), str(other)])
    page.click("button[type=submit]")
    assert page.locator("#clinical-one-image").is_visible()  # refused before uploading
    page.set_input_files("input[type=file]", [str(image)])
    page.click("button[type=submit]")
    page.wait_for_selector("section.result")
    block = page.locator("#result-1 .outcome")
    assert "research estimate, not a diagnosis" in block.inner_text()
    assert "Model AUROC" in block.inner_text()
    block.screenshot(path=str(SHOTS / "serve-outcome-risk.png"))
