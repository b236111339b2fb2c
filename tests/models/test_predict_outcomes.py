"""``covidcxr predict`` with clinical values: outcome risks from the shipped prognosis
models (or given ones), joined by file name, with clear refusals of bad values."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")  # the shipped model's images run on onnxruntime
from PIL import Image

from covidcxr.cli import main
from covidcxr.models.bundle import load_bundle
from covidcxr.models.prognosis_risk import risk_columns, shipped_models
from covidcxr.models.rows import record_columns


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("cxr")
    paths = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:256, 0:256] / 256
        pixels = 120 + 60 * np.sin(6 * x + seed) * np.cos(4 * y) + rng.normal(0, 6, (256, 256))
        path = folder / f"patient{seed}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _predict(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["predict", "--engine", "onnx", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_without_clinical_values_the_output_is_unchanged(
    images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _predict(capsys, str(images[0]), "--format", "csv")
    assert code == 0
    assert list(_csv(out)[0]) == record_columns(load_bundle())
    code, table, _ = _predict(capsys, str(images[0]))
    assert code == 0 and "Outcome risk" not in table and "prognosis-v1" not in table


def test_risk_columns_in_csv_and_json(
    images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(images[0]), "--age", "64", "--sex", "M", "--spo2", "91"]
    code, out, _ = _predict(capsys, *argv, "--format", "csv")
    assert code == 0
    row = _csv(out)[0]
    models = shipped_models()
    outcomes = [m.outcome for m in models]
    assert list(row) == record_columns(load_bundle()) + risk_columns(outcomes)
    for model, stem in zip(models, ("death", "icu", "intubation"), strict=True):
        low, value, high = (float(row[f"risk_{stem}{s}"]) for s in ("_low", "", "_high"))
        assert 0 <= low <= value <= high <= 1
        assert float(row[f"risk_{stem}_model_auroc"]) == round(model.auroc.value, 4)
        assert row[f"risk_{stem}_model"] == f"prognosis-v1/{model.outcome}"
    assert row["risk_note"] == "research estimate, not a diagnosis"
    code, out, _ = _predict(capsys, *argv, "--format", "json")
    record = json.loads(out)[0]
    assert "temperature_c" in record["risk_death_missing_inputs"]
    assert "age_years" not in record["risk_death_missing_inputs"]


def test_risk_table_names_the_model_and_its_auroc(
    images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _predict(capsys, str(images[0]), "--age", "80")
    assert code == 0
    section = out.split("Outcome risk (research estimate, not a diagnosis):", 1)[1]
    survival = shipped_models()[0]
    assert "prognosis-v1/survival" in section and survival.auroc.text() in section
    assert "died" in section and "validate-model" in section


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--spo2", "130"], "predict: --spo2 po2_saturation_pct 130 is outside 0..100"),
        (["--age", "-3"], "predict: --age age_years -3 is outside"),
        (["--sex", "X"], "predict: --sex sex 'X': give M or F"),
    ],
)
def test_implausible_values_are_refused_not_scored(
    images: list[Path], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _predict(capsys, str(images[0]), *extra)
    assert code == 2 and message in err and out == ""


def test_values_for_one_patient_need_one_image(
    images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _predict(capsys, *map(str, images), "--age", "50")
    assert code == 2 and "describe one patient, but 2 images" in err


def test_clinical_file_joins_by_file_name(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tmp_path / "values.csv"
    values.write_text("file,age,sex,pO2_saturation\npatient1.png,70,F,88\n", encoding="utf-8")
    argv = [*map(str, images), "--clinical", str(values), "--format", "csv"]
    code, out, _ = _predict(capsys, *argv)
    assert code == 0
    by_file = {Path(r["file"]).name: r for r in _csv(out)}
    assert float(by_file["patient1.png"]["risk_death"]) > 0
    assert by_file["patient0.png"]["risk_death"] == ""
    assert "no row for this image" in by_file["patient0.png"]["risk_death_reason"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("file,age\nother.png,50\n", "values.csv line 2: file 'other.png' matches none of"),
        ("file,age,spo2\npatient0.png,50,\npatient1.png,50,abc\n", "values.csv line 3:"),
        ("file,age\npatient0.png,50\npatient0.png,60\n", "line 3: 'patient0.png' is also on"),
        ("file,notes\npatient0.png,x\n", "needs a file column"),
    ],
)
def test_clinical_file_errors_name_the_row(
    images: list[Path],
    tmp_path: Path,
    table: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = tmp_path / "values.csv"
    values.write_text(table, encoding="utf-8")
    code, _, err = _predict(capsys, *map(str, images), "--clinical", str(values))
    assert code == 2 and message in err


def test_a_row_without_values_gets_no_number(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tmp_path / "values.csv"
    values.write_text("file,age,sex\npatient0.png,,\n", encoding="utf-8")
    argv = [str(images[0]), "--clinical", str(values), "--format", "csv"]
    code, out, _ = _predict(capsys, *argv)
    row = _csv(out)[0]
    assert code == 0 and row["risk_death"] == ""
    # This synthetic picture fails the input check, so no input at all is given.
    assert row["risk_death_reason"] in (
        "none of the model's inputs was given",
        "no clinical value given (age, sex, temperature, SpO2, blood counts); the model's "
        "AUROC was measured with them",
    )


def test_prognosis_option_overrides_the_shipped_models(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = shipped_models()[0]
    data = json.loads(
        (
            Path(__file__).parents[2] / "src/covidcxr/models/weights/prognosis-v1/survival.json"
        ).read_text(encoding="utf-8")
    )
    data["model_id"] = ""
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(data), encoding="utf-8")
    argv = [str(images[0]), "--age", "60", "--prognosis", str(mine), "--format", "csv"]
    code, out, _ = _predict(capsys, *argv)
    row = _csv(out)[0]
    assert code == 0 and row["risk_death_model"] == "mine.json"
    assert "risk_icu" not in row and float(row["risk_death_model_auroc"]) == round(
        shipped.auroc.value, 4
    )
    code, _, err = _predict(capsys, str(images[0]), "--prognosis", str(mine))
    assert code == 2 and "--prognosis needs clinical values" in err
