"""The validation report shows the model card's Markdown as HTML (raw HTML escaped)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")
pytest.importorskip("markdown_it")
from report_site import SITE_COLUMNS, Site, build_site

from conftest import COVID_DIR
from covidcxr.cli import main

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

CARD = """# Vendor model card

**Research use only, not a diagnosis.** <script>alert('card')</script>

| label | AUC [95% CI] |
|---|---|
| COVID-19 | 0.81 [0.72, 0.90] |
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The labelled folder (skips without the shared data)."""
    if not (COVID_DIR / "metadata.csv").is_file():
        pytest.skip(f"shared data not found at {COVID_DIR}")
    return build_site(COVID_DIR, tmp_path_factory.mktemp("site"))


def test_the_report_renders_the_model_card_as_html(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions = tmp_path / "preds.csv"
    with predictions.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "p_COVID-19"])
        for index, row in enumerate(site.rows):
            writer.writerow([row["Image Name"], (index % 10) / 10])
    card = tmp_path / "card.md"
    card.write_text(CARD, encoding="utf-8")
    out = tmp_path / "out"
    arguments = ["--images", str(site.images), "--labels", str(site.labels), *SITE_COLUMNS]
    arguments += ["--predictions", str(predictions), "--model-card", str(card)]
    code = main(["validate-model", *arguments, "--out", str(out), "--resamples", "100"])
    assert code == 0, capsys.readouterr().err
    page = (out / "report.html").read_text(encoding="utf-8")
    shown = page[page.index('<h2 id="card">') : page.index('<h2 id="evidence">')]
    assert "<strong>Research use only, not a diagnosis.</strong>" in shown
    assert "<table>" in shown and "<td>0.81 [0.72, 0.90]</td>" in shown
    assert "**" not in shown
    assert "&lt;script&gt;alert('card')&lt;/script&gt;" in shown
    assert "<script" not in page
