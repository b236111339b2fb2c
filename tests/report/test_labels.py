"""Reading a site's labels and another tool's predictions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from covidcxr.dataset.tasks import SECOND_OPINION_LABELS
from covidcxr.errors import MetadataError
from covidcxr.ingest.mapping import load_mapping
from covidcxr.report.labels import read_labels, read_predictions
from covidcxr.report.validation import match_images

DEFINITIONS = {d.name: {"include": d.include, "exclude": d.exclude} for d in SECOND_OPINION_LABELS}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_headers_found_by_alias_and_labels_from_the_hierarchy(tmp_path: Path) -> None:
    labels = _write(
        tmp_path / "labels.csv",
        "file,finding,patientid,age,sex,view,location,date,geographic_mean\n"
        "a.png,Pneumonia/Viral/COVID-19,p1,54,M,PA,Site A,2020-03-02,4.5\n"
        "b.png,No Finding,p2,7,F,AP,Site B,,\n"
        "c.png,Streptococcus,p3,,,,,,\n"
        "d.png,Pneumonia/Viral,p4,,,,,,\n",
    )
    a, b, c, d = read_labels(labels, DEFINITIONS)
    assert a.labels["COVID-19"] == 1.0 and a.labels["No finding"] == 0.0
    assert (a.patient_id, a.age_years, a.sex, a.view, a.site) == ("p1", 54.0, "M", "PA", "Site A")
    assert a.acquired_on == "2020-03-02" and a.severity == {"geographic_extent": 4.5}
    assert b.labels["No finding"] == 1.0 and b.labels["COVID-19"] == 0.0
    assert c.labels["Bacterial pneumonia"] == 1.0 and c.labels["COVID-19"] == 0.0
    assert math.isnan(d.labels["COVID-19"])  # viral, but which virus?


def test_binary_reference_speaks_about_covid_only(tmp_path: Path) -> None:
    labels = _write(tmp_path / "l.csv", "imagename,covid\nx.png,positive\ny.png,0\n")
    x, y = read_labels(labels, DEFINITIONS)
    assert x.labels["COVID-19"] == 1.0 and y.labels["COVID-19"] == 0.0
    assert math.isnan(x.labels["No finding"])
    assert x.patient_id == "x.png"  # no patient ids: each image its own patient


def test_columns_and_values_from_options_and_a_mapping_file(tmp_path: Path) -> None:
    labels = _write(tmp_path / "l.csv", "Bild,Befund,Geschlecht\nx.png,normal,maennlich\n")
    mapping = load_mapping(
        _write(
            tmp_path / "m.toml",
            '[columns]\nsex = "Geschlecht"\n[values.finding]\nnormal = "No Finding"\n'
            '[values.sex]\nmaennlich = "M"\n',
        )
    )
    (case,) = read_labels(
        labels, DEFINITIONS, mapping=mapping, columns={"filename": "Bild", "finding": "Befund"}
    )
    assert case.filename == "x.png" and case.sex == "M" and case.labels["No finding"] == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na.png,Martian flu\n", "line 2: reference label 'Martian flu'"),
        ("file,label\na.png,COVID-19\na.png,COVID-19\n", "'a.png' is labelled on lines 2 and 3"),
        ("name,label\na.png,COVID-19\n", "no filename column"),
        ("file,label,age\na.png,COVID-19,old\n", "line 2: age_years = 'old' is not a number"),
    ],
)
def test_bad_labels_are_named(tmp_path: Path, text: str, message: str) -> None:
    labels = _write(tmp_path / "labels.csv", text)
    with pytest.raises(MetadataError, match=message):
        read_labels(labels, DEFINITIONS)


def test_labels_and_images_that_do_not_match_are_listed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"x")
    (images / "stray.png").write_bytes(b"x")
    labels = _write(tmp_path / "labels.csv", "file,label\na.png,COVID-19\nghost.png,COVID-19\n")
    cases = read_labels(labels, DEFINITIONS)
    with pytest.raises(MetadataError, match=r"not in .*'ghost.png'.*no row in .*'stray.png'"):
        match_images(cases, images, labels)


def test_predictions_file(tmp_path: Path) -> None:
    given = _write(
        tmp_path / "p.csv", "filename,p_COVID-19,No finding\na.png,0.9,0.05\nb.png,,0.7\n"
    )
    found = read_predictions(given, ["COVID-19", "No finding"])
    assert found == {"a.png": {"COVID-19": 0.9, "No finding": 0.05}, "b.png": {"No finding": 0.7}}
    single = _write(tmp_path / "s.csv", "file,probability\na.png,0.25\n")
    assert read_predictions(single, ["COVID-19"]) == {"a.png": {"COVID-19": 0.25}}
    bad = _write(tmp_path / "b.csv", "file,probability\na.png,1.5\n")
    with pytest.raises(MetadataError, match=r"line 2: probability = 1.5 is not a probability"):
        read_predictions(bad, ["COVID-19"])
    with pytest.raises(MetadataError, match="needs a file column and a probability column"):
        read_predictions(_write(tmp_path / "n.csv", "file,score\na.png,1\n"), ["COVID-19"])
