"""Open a report in headless Chromium (Debian's package, driven by Playwright): every
image must load, nothing may be fetched from the network; a full-page screenshot is kept
as a test artefact in the test's folder and in /tmp/covidcxr-shots/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/covidcxr-shots")


def open_in_chromium(html: Path, screenshot: Path) -> dict[str, int]:
    """Load ``html``; returns image counts; skips without chromium or playwright."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    requests: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(html.resolve().as_uri(), wait_until="load")
            counts = page.evaluate(
                "() => ({images: document.images.length, broken: Array.from(document.images)"
                ".filter(i => !(i.complete && i.naturalWidth > 0)).length})"
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    SHOTS.mkdir(exist_ok=True)
    shutil.copyfile(screenshot, SHOTS / screenshot.name)
    outside = [url for url in requests if not url.startswith(("file:", "data:"))]
    assert outside == [], f"the report fetched {outside}"
    return dict(counts)
