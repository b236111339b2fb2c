"""``covidcxr datasheet`` on a small synthetic store: every number against the source
rows it was ingested from."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from report_browser import open_in_chromium

from conftest import upstream_row
from covidcxr.cli import main
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.db import open_store
from synthetic_sources import _copy_of, _picture, write_source


def _rows() -> tuple[list[dict[str, str]], dict[str, bytes]]:
    """Twelve patients: four children with No Finding, a copied picture, gaps."""
    rows, images = [], {}
    original, copy = _copy_of(2012)
    for patient in range(1, 13):
        child = patient <= 4
        name = f"k{patient}.png"
        images[name] = original if patient == 5 else copy if patient == 6 else _picture(patient)
        rows.append(
            upstream_row(
                patientid=str(patient),
                age=str(6 + patient) if child else ("" if patient == 12 else str(40 + patient)),
                sex="F" if patient % 2 else "M",
                finding="No Finding" if child else ("COVID-19" if patient % 3 else "Streptococcus"),
                view="AP" if patient % 4 == 0 else "PA",
                location="Toronto, Canada" if patient % 2 else "Lyon, France",
                license="" if patient == 11 else "CC BY 4.0",
                temperature="38.5" if patient % 3 == 0 else "",
                filename=name,
            )
        )
    return rows, images


@pytest.fixture
def sheet(tmp_path: Path) -> tuple[Path, dict[str, Any], list[dict[str, str]]]:
    rows, images = _rows()
    source = write_source(tmp_path / "kids", rows, images)
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    with open_store(url, tmp_path / "data", create=True) as store:
        ingest_source(source, store, workers=1)
    out = tmp_path / "card"
    code = main(["datasheet", "--db", url, "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert code == 0
    with (source / "metadata.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    return out, json.loads((out / "datasheet.json").read_text()), written


def test_numbers_come_from_the_store(
    sheet: tuple[Path, dict[str, Any], list[dict[str, str]]],
) -> None:
    out, data, rows = sheet
    composition = data["composition"]
    assert composition["records"] == len(rows) == 12
    assert composition["patients"] == len({r["patientid"] for r in rows})
    assert composition["sex"] == dict(Counter(r["sex"] for r in rows).most_common())
    assert composition["view"] == dict(Counter(r["view"] for r in rows).most_common())
    assert sorted(composition["ages_years"]) == sorted(float(r["age"]) for r in rows if r["age"])
    covid = sum(r["finding"] == "COVID-19" for r in rows)
    assert composition["findings_by_level"]["3"]["Pneumonia/Viral/COVID-19"] == covid
    assert composition["findings_by_level"]["1"]["No Finding"] == 4
    assert composition["regions"] == dict(
        Counter(r["location"].split(",")[-1].strip() for r in rows).most_common()
    )
    blank = sum(not r["temperature"] for r in rows)
    assert composition["missing_percent"]["temperature_c"] == round(100 * blank / 12, 1)
    assert data["distribution"]["licenses"] == {"CC BY 4.0": 11, "unknown": 1}
    assert data["pediatric"]["records"] == 4
    assert data["pediatric"]["findings"] == {"No Finding": 4}
    (group,) = data["duplicates"]
    assert sorted(group["filenames"]) == ["k5.png", "k6.png"] and group["crosses_patients"]
    assert any("'No Finding' records are children" in w for w in data["warnings"])
    assert any("several patients" in w for w in data["warnings"])
    html = (out / "datasheet.html").read_text()
    for section in (
        "Motivation",
        "Composition",
        "Collection",
        "Preprocessing",
        "Uses",
        "Distribution",
        "Maintenance",
    ):
        assert f">{section}" in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing fetched


@pytest.mark.browser
def test_every_plot_loads_in_chromium(
    sheet: tuple[Path, dict[str, Any], list[dict[str, str]]], tmp_path: Path
) -> None:
    out, data, _ = sheet
    counts = open_in_chromium(out / "datasheet.html", tmp_path / "datasheet.png")
    levels = len(data["composition"]["findings_by_level"])
    assert counts == {"images": levels + 10, "broken": 0}
