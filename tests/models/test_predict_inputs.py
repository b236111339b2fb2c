"""predict under odd inputs: special files, broken links, memory errors, odd names,
and what the table says about one image and about the model's quality."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidcxr.cli import main
from covidcxr.cli.output import escape_text
from covidcxr.models import coherence, runtime
from covidcxr.models.bundle import ModelBundle, load_bundle
from covidcxr.models.engines import quality_note

torch = pytest.importorskip("torch")

from covidcxr.models.predict import Predictor, random_bundle

FRONTAL = (8.0, 0.0, 0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    folder = tmp_path_factory.mktemp("models") / "frontal"
    random_bundle(folder, model_id="test-frontal", width=8, gate_bias=FRONTAL, onnx=False)
    return load_bundle(folder)


def grey_png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(60, 200, (260, 240), dtype=np.uint8)).save(path)
    return path


def test_special_files_and_broken_links_get_rows_and_the_rest_goes_on(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    grey_png(folder / "a_good.png")
    os.mkfifo(folder / "b_fifo.png")  # opening it would block forever
    (folder / "c_dangling.png").symlink_to(folder / "nowhere.png")
    (folder / "d_loop.png").symlink_to(folder / "d_loop.png")
    (folder / "e_link_to_good.png").symlink_to(folder / "a_good.png")
    rows = Predictor(bundle).predict_files([folder])
    by_name = {Path(row.file).name: row for row in rows}
    assert sorted(by_name) == [
        "a_good.png",
        "b_fifo.png",
        "c_dangling.png",
        "d_loop.png",
        "e_link_to_good.png",
    ]
    assert by_name["a_good.png"].input_check == "pass"
    assert by_name["e_link_to_good.png"].input_check == "pass"
    assert "FIFO" in by_name["b_fifo.png"].reason
    assert "broken or looping symbolic link" in by_name["c_dangling.png"].reason
    assert "broken or looping symbolic link" in by_name["d_loop.png"].reason
    assert all(row.probabilities.get("COVID-19") is None for row in rows[1:4])


def test_a_memory_error_is_that_files_row(
    bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, huge = grey_png(tmp_path / "good.png"), grey_png(tmp_path / "huge.png", 1)
    real = runtime.read_image_file

    def read(path: Path, **kwargs: object) -> object:
        if Path(path).name == "huge.png":
            raise MemoryError
        return real(path)

    monkeypatch.setattr(runtime, "read_image_file", read)
    rows = Predictor(bundle).predict_files([good, huge])
    assert [row.input_check for row in rows] == ["pass", "fail"]
    assert "more memory" in rows[1].reason


def test_no_image_among_the_inputs_exits_1(
    bundle: ModelBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# not an image\n")
    code = main(["predict", str(readme), "--model", str(bundle.path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "none of the 1 input file(s) is a PNG or JPEG" in captured.err
    assert "not a PNG or JPEG" in captured.out  # the row is still printed


def test_one_image_prints_as_a_block_with_the_quality_note(
    bundle: ModelBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = grey_png(tmp_path / "one.png")
    assert main(["predict", str(image), "--model", str(bundle.path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["file", str(image)]
    assert any(line.startswith("p_COVID-19") for line in lines)
    assert "model test-frontal, a research baseline: no stored evaluation" in out


def test_names_with_control_characters_are_escaped_in_the_table(
    bundle: ModelBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = grey_png(tmp_path / "evil\x1b[31m\nfake.png")
    second = grey_png(tmp_path / "plain.png")
    assert main(["predict", str(first), str(second), "--model", str(bundle.path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "evil\\x1b[31m\\nfake.png" in out


def test_escape_text_leaves_printable_text_alone() -> None:
    assert escape_text("Pneumonia/Viral/COVID-19 é") == "Pneumonia/Viral/COVID-19 é"
    assert escape_text("a\tb\rc\x85") == "a\\tb\\rc\\x85"


def test_quality_note_quotes_the_shipped_models_cross_validated_auc() -> None:
    shipped = load_bundle("covidcxr-small-v1")
    kfold = shipped.metrics["evaluation"]["findings"]["kfold"]["labels"]["COVID-19"]["auc"]
    note = quality_note(shipped)
    assert note.startswith(f"model {shipped.model_id}, a research baseline")
    assert f"COVID-19 {kfold['value']:.2f} [{kfold['ci95'][0]:.2f}" in note


def test_quality_note_of_a_lungs_first_model_quotes_its_own_measurements() -> None:
    shipped = load_bundle("covidcxr-small-v2")
    cv = shipped.metrics["lung_model"]["pneumonia_model"]["within_source_cv"]
    note = quality_note(shipped)
    assert note.startswith("model covidcxr-small-v2, a research baseline")
    assert f"pneumonia vs no finding AUC {cv['auc']:.2f} [{cv['low']:.2f}" in note
    v1 = load_bundle("covidcxr-small-v1").metrics["evaluation"]["findings"]["kfold"]
    assert "cross-validated AUC COVID-19" not in note
    assert v1["labels"]["COVID-19"]["auc"]["value"] is not None


@pytest.mark.shared_data
def test_shipped_model_rows_carry_a_coherent_summary_and_prevalence_restates_it(
    covid_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    image = covid_dir / "images" / "000001-2.jpg"
    args = ["predict", str(image), "--engine", "onnx", "--format", "json"]
    assert main(args) == 0
    at_training = json.loads(capsys.readouterr().out)[0]
    assert main([*args, "--prevalence", "0.05"]) == 0
    local = json.loads(capsys.readouterr().out)[0]
    for record in (at_training, local):
        assert (
            record["p_COVID-19_overall"]
            <= record["p_viral_pneumonia"] + 1e-6
            <= record["p_pneumonia"] + 2e-6
        )
    assert local["covid_19_prevalence"] == 0.05
    shipped = coherence.training_prevalence(load_bundle().training)
    assert at_training["covid_19_prevalence"] == pytest.approx(shipped, abs=1e-4)
    assert local["p_COVID-19_overall"] < at_training["p_COVID-19_overall"]
    # The per-label outputs, which the operating points use, do not move.
    assert local["p_COVID-19"] == at_training["p_COVID-19"]


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "x"])
def test_prevalence_outside_zero_one_is_a_usage_error(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path), "--prevalence", bad])
    assert exit_info.value.code == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err


def test_predict_warns_when_the_models_covid_answer_is_no_better_than_chance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    from PIL import Image

    picture = tmp_path / "grey.png"
    Image.fromarray(np.full((300, 300), 128, dtype=np.uint8)).save(picture)
    main(["predict", str(picture), "--engine", "onnx"])
    out = capsys.readouterr().out
    warning = "WARNING: this model's COVID-19 answer is no better than chance (AUC 0.35"
    assert warning in out and "do not use P(COVID-19) to decide anything" in out
