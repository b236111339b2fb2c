"""``covidcxr validate-model`` on a small labelled folder built from the shared collection,
its numbers checked against scikit-learn on the same cases."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Our model's predictions run on onnxruntime (the runtime extra).
pytest.importorskip("onnxruntime")
from report_browser import open_in_chromium
from report_site import SITE_COLUMNS, Site, build_site
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

from conftest import COVID_DIR
from covidcxr.cli import main
from covidcxr.models.bundle import load_bundle

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def _run(site: Site, out: Path, *extra: str) -> int:
    return main(
        [
            "validate-model",
            "--images",
            str(site.images),
            "--labels",
            str(site.labels),
            *SITE_COLUMNS,
            "--out",
            str(out),
            "--resamples",
            "300",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The labelled folder (skips without the shared data)."""
    if not (COVID_DIR / "metadata.csv").is_file():
        pytest.skip(f"shared data not found at {COVID_DIR}")
    return build_site(COVID_DIR, tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def ours(site: Site, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ours")
    assert _run(site, out, "--engine", "onnx", "--masks", str(site.masks)) == 0
    return out, json.loads((out / "report.json").read_text())


def _known(report: dict[str, Any], label: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [
        (c["labels"][label], c["probabilities"][label])
        for c in report["cases"]
        if c["labels"][label] is not None and label in c["probabilities"]
    ]
    y, p = (np.asarray(v, dtype=float) for v in zip(*rows, strict=True))
    return y, p


def test_numbers_match_an_independent_computation(ours: tuple[Path, dict[str, Any]]) -> None:
    _, report = ours
    bundle = load_bundle()  # the default model, which the report used
    assert report["primary_label"] == "COVID-19"
    assert "COVID-19" in report["labels"]
    for label, section in report["labels"].items():
        y, p = _known(report, label)
        threshold = bundle.thresholds[bundle.findings.index(label)]
        tn, fp, fn, tp = confusion_matrix(y, p >= threshold, labels=[0, 1]).ravel()
        stored = section["stored_operating_point"]
        assert section["discrimination"]["auc"]["value"] == pytest.approx(roc_auc_score(y, p))
        assert section["calibration"]["as_given"]["brier"] == pytest.approx(brier_score_loss(y, p))
        assert stored["threshold"] == pytest.approx(threshold)
        assert (stored["tp"], stored["fp"], stored["tn"], stored["fn"]) == (tp, fp, tn, fn)
        assert stored["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
        assert section["rechosen_operating_point"]["optimistic"] is True
        auc = section["discrimination"]["auc"]
        assert auc["low"] <= auc["value"] <= auc["high"]


def test_probabilities_are_the_models(site: Site, ours: tuple[Path, dict[str, Any]]) -> None:
    from covidcxr import predict

    _, report = ours
    first = report["cases"][:3]
    rows = predict([site.images / c["file"] for c in first], engine="onnx")
    for case, row in zip(first, rows, strict=True):
        assert case["probabilities"] == pytest.approx(dict(row.probabilities))


def test_input_checks_duplicates_and_rejections(
    site: Site, ours: tuple[Path, dict[str, Any]]
) -> None:
    _, report = ours
    checks = report["input_checks"]
    assert checks["labelled_images"] == len(site.rows)
    assert checks["distinct_images"] == len(site.rows) - 1
    (group,) = checks["duplicates"]
    assert group["files"] == list(site.duplicate) and group["kind"] == "exact"
    assert checks["accepted"] + len(checks["rejected"]) == checks["distinct_images"]
    assert all(row["reason"] for row in checks["rejected"])
    assert report["cohort"]["images"] == checks["accepted"] == len(report["cases"])
    assert site.duplicate[1] not in {c["file"] for c in report["cases"]}


def test_every_section_is_there(site: Site, ours: tuple[Path, dict[str, Any]]) -> None:
    out, report = ours
    scored = {r["Image Name"] for r in site.rows if r["geographic_mean"]}
    kept = {c["file"] for c in report["cases"]}
    severity = report["severity"]["geographic_extent"]
    assert severity["n"] == len(scored & kept)
    assert severity["mae"] == pytest.approx(
        np.mean(np.abs(np.subtract(severity["predicted"], severity["truth"])))
    )
    primary = report["labels"]["COVID-19"]
    fields = {g["field"] for g in primary["subgroups"]}
    assert {"sex", "age_band", "view", "site"} <= fields
    assert any(
        g["warning"].startswith(("small group", "one class only")) for g in primary["subgroups"]
    )
    assert [m["field"] for m in primary["metadata_shortcut"]] == [
        "view",
        "age_years",
        "sex",
        "site",
        "acquired_on",
    ]
    assert report["shortcut_audit"]["status"] == "run"
    assert report["shortcut_audit"]["n_images"] > 0
    for entry in primary["gallery"]:
        assert entry["error"] in ("false positive", "false negative")
        assert Path(entry["heatmap"]).is_file()
    assert "need about" in primary["sample_size_text"]
    items = {e["item"]: e["status"] for e in report["evidence"]}
    assert items["Sample size"] == "reported"
    assert report["model"]["card"].startswith("# Model card")
    assert (out / "report.html").stat().st_size > 10_000


def test_recalibration_file_is_applied_by_predict(
    site: Site, ours: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = ours
    fits = json.loads((out / "recalibration.json").read_text())
    assert fits["model_id"] == load_bundle().model_id
    usable = {k for k, s in report["labels"].items() if s["calibration"]["platt"]["usable"]}
    assert fits["labels"] and set(fits["labels"]) == usable
    image = str(site.images / report["cases"][0]["file"])
    capsys.readouterr()
    assert main(["predict", image, "--engine", "onnx", "--format", "json"]) == 0
    (plain,) = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "predict",
                image,
                "--engine",
                "onnx",
                "--format",
                "json",
                "--recalibration",
                str(out / "recalibration.json"),
            ]
        )
        == 0
    )
    (fixed,) = json.loads(capsys.readouterr().out)
    for label, fit in fits["labels"].items():
        p = plain[f"p_{label}"]
        expected = 1 / (1 + math.exp(-(fit["a"] * math.log(p / (1 - p)) + fit["b"])))
        assert fixed[f"p_{label}"] == pytest.approx(expected, abs=1e-5)
    assert fixed["positive_findings"] == plain["positive_findings"]


def test_recalibration_for_another_model_is_refused(tmp_path: Path, site: Site) -> None:
    other = tmp_path / "r.json"
    other.write_text(
        json.dumps({"format": "covidcxr-recalibration/1", "model_id": "x", "labels": {}})
    )
    image = str(next(site.images.iterdir()))
    assert main(["predict", image, "--engine", "onnx", "--recalibration", str(other)]) == 2


def test_predictions_of_a_model_that_is_not_ours(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(7)
    made_up = {}
    for row in site.rows:
        covid = row["Result"] == "COVID-19"
        made_up[row["Image Name"]] = float(1 / (1 + np.exp(-(1.5 * covid + rng.normal()))))
    predictions = tmp_path / "preds.csv"
    with predictions.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "p_COVID-19"])
        writer.writerows(made_up.items())
    card = tmp_path / "card.md"
    card.write_text("# Vendor model card\n", encoding="utf-8")
    out = tmp_path / "out"
    code = _run(
        site,
        out,
        "--predictions",
        str(predictions),
        "--threshold",
        "COVID-19=0.6",
        "--model-card",
        str(card),
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    kept = [r for r in site.rows if r["Image Name"] != site.duplicate[1]]
    y = np.asarray([r["Result"] == "COVID-19" for r in kept], dtype=float)
    p = np.asarray([made_up[r["Image Name"]] for r in kept])
    section = report["labels"]["COVID-19"]
    assert list(report["labels"]) == ["COVID-19"]
    assert section["discrimination"]["auc"]["value"] == pytest.approx(roc_auc_score(y, p))
    tn, fp, _, _ = confusion_matrix(y, p >= 0.6).ravel()
    specificity = section["stored_operating_point"]["specificity"]["value"]
    assert specificity == pytest.approx(tn / (tn + fp))
    assert report["input_checks"]["rejected"] == []
    assert report["model"]["source"] == "external"
    assert report["model"]["card"] == "# Vendor model card\n"
    assert report["shortcut_audit"]["status"] == "not run"
    assert not (out / "recalibration.json").exists()


def test_labels_and_images_that_do_not_match_fail(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    text = site.labels.read_text()
    labels.write_text(text + "ghost.png,COVID-19,,,,,,,\n")
    code = main(
        [
            "validate-model",
            "--images",
            str(site.images),
            "--labels",
            str(labels),
            *SITE_COLUMNS,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "1 labelled image(s) not in" in capsys.readouterr().err


@pytest.mark.browser
def test_every_plot_loads_in_chromium(ours: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, report = ours
    counts = open_in_chromium(out / "report.html", tmp_path / "validation-report.png")
    html = (out / "report.html").read_text()
    assert counts["broken"] == 0
    assert counts["images"] == html.count("<img ") >= 2 * len(report["labels"]) + 3
