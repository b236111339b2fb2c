"""The torch prediction path: rows, preprocessing, calibration, heatmaps, Grad-CAM, CLI.

Bundles hold randomly initialised networks (:func:`random_bundle`); the gate head is
pinned (zero weights, chosen bias) so that every image passes, or fails as a lateral
view, whatever its pixels.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from numpy.typing import NDArray
from PIL import Image

from covidcxr import RESEARCH_USE_ONLY
from covidcxr.cli import main
from covidcxr.dataset.loading import load_image, normalise
from covidcxr.errors import MetadataError
from covidcxr.models import saliency
from covidcxr.models.bundle import ModelBundle, load_bundle
from covidcxr.models.predict import Predictor, random_bundle
from covidcxr.models.rows import (
    NetworkOutputs,
    calibrated_probabilities,
    record_columns,
    severity_scores,
)

FRONTAL = (8.0, 0.0, 0.0, 0.0, 0.0)
LATERAL = (0.0, 8.0, 0.0, 0.0, 0.0)
WIDTH = 8  # a narrow backbone: fast, same code


def xray(height: int, width: int, seed: int = 0) -> NDArray[np.uint8]:
    """A smooth grey picture (structure for the network, no colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = 128 + 60 * np.sin(6 * x + seed) * np.cos(4 * y) + rng.normal(0, 8, (height, width))
    pixels: NDArray[np.uint8] = np.clip(base, 0, 255).astype(np.uint8)
    return pixels


def photo(height: int, width: int) -> NDArray[np.uint8]:
    """Sky over grass, with a little noise: a real photograph is never perfectly flat
    (a flat run of rows at the end of a JPEG is what the truncation check refuses)."""
    rgb = np.zeros((height, width, 3), dtype=np.int16)
    rgb[: height // 2] = (90, 150, 230)
    rgb[height // 2 :] = (60, 170, 60)
    rgb += np.random.default_rng(0).integers(-6, 7, rgb.shape, dtype=np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_inputs(folder: Path) -> dict[str, Path]:
    """One file of each kind the predictor meets."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "grey": folder / "grey.png",
        "rgb_jpeg": folder / "rgb.jpg",
        "deep": folder / "deep.png",
        "palette": folder / "palette.png",
        "tiny": folder / "tiny.png",
        "photo": folder / "photo.jpg",
        "text": folder / "notes.txt",
        "truncated": folder / "truncated.png",
    }
    Image.fromarray(xray(300, 260, 1)).save(paths["grey"])
    Image.fromarray(xray(320, 400, 2)).convert("RGB").save(paths["rgb_jpeg"], quality=90)
    deep = (xray(280, 300, 3).astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(paths["deep"])
    Image.fromarray(xray(260, 260, 4)).convert("P").save(paths["palette"])
    Image.fromarray(xray(100, 90, 5)).save(paths["tiny"])
    Image.fromarray(photo(300, 400)).save(paths["photo"])
    paths["text"].write_text("not an image\n", encoding="utf-8")
    paths["empty"] = folder / "empty.png"
    paths["empty"].write_bytes(b"")
    whole = paths["grey"].read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    return paths


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    folder = tmp_path_factory.mktemp("models") / "frontal"
    random_bundle(folder, model_id="test-frontal", width=WIDTH, gate_bias=FRONTAL, onnx=False)
    return load_bundle(folder)


@pytest.fixture(scope="module")
def predictor(bundle: ModelBundle) -> Predictor:
    return Predictor(bundle)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"))


# --------------------------------------------------------------------------- rows


def test_rows_carry_probabilities_severity_and_provenance(
    predictor: Predictor, bundle: ModelBundle, inputs: dict[str, Path]
) -> None:
    usable = ["grey", "rgb_jpeg", "deep", "palette"]
    rows = predictor.predict_files([inputs[k] for k in usable], batch_size=3)
    assert [row.file for row in rows] == [str(inputs[k]) for k in usable]
    for row in rows:
        assert row.input_check == "pass", row.reason
        assert row.gate.checks_passed == ("decodable", "size", "greyscale", "frontal_view")
        assert set(row.probabilities) == set(bundle.findings)
        assert all(p is not None and 0.0 <= p <= 1.0 for p in row.probabilities.values())
        assert row.positive is not None
        assert set(row.positive) <= set(bundle.findings)
        for name, (low, high) in zip(bundle.severity, bundle.severity_ranges, strict=True):
            score = row.severity[name]
            assert score is not None
            assert low <= score.low <= score.mean <= score.high <= high
        assert row.model_id == "test-frontal"
        assert row.weights_sha256 == bundle.files["weights.pt"]
        assert len(row.weights_sha256) == 64
        assert row.engine == "torch"
        assert row.note == RESEARCH_USE_ONLY
        assert row.image_sha256 is not None
        record = row.record()
        assert list(record) == record_columns(bundle)
        assert record["note"] == "research use only, not a diagnosis"


def test_failing_images_get_a_row_without_findings(
    predictor: Predictor, inputs: dict[str, Path]
) -> None:
    names = ["tiny", "photo", "text", "truncated", "empty", "grey"]
    rows = predictor.predict_files([inputs[k] for k in names])
    by_name = dict(zip(names, rows, strict=True))
    expected = {
        "tiny": "tiny",
        "photo": "colourful",
        "text": "unsupported_format",
        "empty": "empty_file",
    }
    for name, code in expected.items():
        assert by_name[name].gate.code == code
    assert by_name["truncated"].gate.code == "truncated"
    assert "truncated" in by_name["truncated"].reason
    assert "TEXT bytes" in by_name["text"].reason
    for name in ["tiny", "photo", "text", "truncated", "empty"]:
        row = by_name[name]
        assert row.input_check == "fail"
        assert all(p is None for p in row.probabilities.values())
        assert row.positive is None
        assert all(score is None for score in row.severity.values())
        assert row.model_id == "test-frontal"  # provenance still there
        assert row.note == RESEARCH_USE_ONLY
    assert by_name["grey"].input_check == "pass"


def test_gate_head_failures_name_the_class(
    tmp_path: Path, inputs: dict[str, Path], bundle: ModelBundle
) -> None:
    lateral = random_bundle(tmp_path / "lateral", width=WIDTH, gate_bias=LATERAL, onnx=False)
    rows = Predictor(lateral).predict_files([inputs["grey"], inputs["tiny"]])
    assert rows[0].input_check == "fail"
    assert rows[0].gate.code == "lateral_xray"
    assert "most likely a lateral view" in rows[0].reason
    assert rows[0].gate.checks_failed == ("frontal_view",)
    assert all(p is None for p in rows[0].probabilities.values())
    # The pixel rules come first: the tiny image never reaches the network.
    assert rows[1].gate.code == "tiny"
    assert rows[1].gate.frontal_probability is None


def test_a_directory_is_expanded_and_non_images_reported(
    predictor: Predictor, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(xray(256, 256, 7)).save(folder / "b.png")
    Image.fromarray(xray(256, 300, 8)).save(folder / "sub" / "a.jpeg")
    # An image named .dat is found by content; a CSV is reported; hidden files skipped.
    Image.fromarray(xray(256, 256, 9)).save(folder / "c.dat", format="PNG")
    (folder / "metadata.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    rows = predictor.predict_files([folder])
    names = [Path(row.file).relative_to(folder).as_posix() for row in rows]
    assert names == ["b.png", "c.dat", "metadata.csv", "sub/a.jpeg"]
    verdicts = {name: row.input_check for name, row in zip(names, rows, strict=True)}
    assert verdicts == {
        "b.png": "pass",
        "c.dat": "pass",
        "metadata.csv": "fail",
        "sub/a.jpeg": "pass",
    }


def test_missing_path_is_an_error(predictor: Predictor, tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="does not exist"):
        predictor.predict_files([tmp_path / "nope.png"])


def test_predict_arrays_takes_grey_and_rgb_arrays(predictor: Predictor) -> None:
    images: list[Any] = [xray(224, 224), np.repeat(xray(240, 260)[:, :, None], 3, axis=2)]
    images.append(photo(224, 224))
    rows = predictor.predict_arrays(images, names=["a", "b", "c"], heatmaps=True)
    assert [row.file for row in rows] == ["a", "b", "c"]
    assert [row.input_check for row in rows] == ["pass", "pass", "fail"]
    for row, image in zip(rows[:2], images[:2], strict=True):
        assert row.heatmaps
        for heat in row.heatmaps.values():
            assert heat.shape == image.shape[:2]
            assert heat.dtype == np.float32
            assert float(heat.min()) >= 0.0
            assert float(heat.max()) <= 1.0
    assert rows[2].heatmaps == {}
    with pytest.raises(ValueError, match="2 names"):
        predictor.predict_arrays(images, names=["a", "b"])
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict_arrays(images, batch_size=0)


# --------------------------------------------------------------------------- preprocessing


def test_network_input_is_the_training_preprocessing(
    predictor: Predictor, inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[NDArray[np.float32]] = []
    forward = predictor.forward

    def spy(batch: NDArray[np.float32]) -> NetworkOutputs:
        seen.append(batch.copy())
        return forward(batch)

    monkeypatch.setattr(predictor, "forward", spy)
    usable = ["grey", "rgb_jpeg", "deep", "palette"]
    predictor.predict_files([inputs[k] for k in usable])
    batch = np.concatenate(seen)
    assert batch.shape == (4, 1, 224, 224)
    for i, key in enumerate(usable):
        expected = normalise(load_image(inputs[key], 224, crop="center"))
        np.testing.assert_array_equal(batch[i, 0], expected, err_msg=key)


# --------------------------------------------------------------------------- calibration


def test_probabilities_use_temperatures_and_thresholds(
    bundle: ModelBundle, inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    k = len(bundle.findings)
    hot = dataclasses.replace(bundle, temperatures=(2.0,) * k, thresholds=(0.0,) * k)
    engine = Predictor(hot)
    logits: list[NDArray[np.float32]] = []
    forward = engine.forward

    def spy(batch: NDArray[np.float32]) -> NetworkOutputs:
        outputs = forward(batch)
        logits.append(outputs.findings)
        return outputs

    monkeypatch.setattr(engine, "forward", spy)
    row = engine.predict_files([inputs["grey"]])[0]
    expected = 1.0 / (1.0 + np.exp(-logits[0][0].astype(np.float64) / 2.0))
    got = [row.probabilities[label] for label in bundle.findings]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert row.positive == bundle.findings  # threshold 0: everything positive
    cold = Predictor(dataclasses.replace(bundle, thresholds=(1.0,) * k))
    assert cold.predict_files([inputs["grey"]])[0].positive == ()


def _with_support(bundle: ModelBundle, positives: list[int], negatives: list[int]) -> ModelBundle:
    validation = {
        "positives": dict(zip(bundle.findings, positives, strict=True)),
        "negatives": dict(zip(bundle.findings, negatives, strict=True)),
    }
    k = len(bundle.findings)
    return dataclasses.replace(
        bundle, thresholds=(0.0,) * k, training={**bundle.training, "validation": validation}
    )


def test_labels_with_thin_validation_support_get_no_call(
    bundle: ModelBundle, inputs: dict[str, Path]
) -> None:
    k = len(bundle.findings)
    # Threshold 0 calls everything; the second label's threshold came from 3 positives
    # and the third's from 9 negatives: those two are reported without a call.
    thin = _with_support(bundle, [20, 3, 50] + [10] * (k - 3), [30, 40, 9] + [10] * (k - 3))
    assert thin.uncalled_findings == bundle.findings[1:3]
    row = Predictor(thin).predict_files([inputs["grey"]])[0]
    assert row.positive == (bundle.findings[0], *bundle.findings[3:])
    assert row.no_call == bundle.findings[1:3]
    assert all(row.probabilities[label] is not None for label in row.no_call)
    assert row.record()["no_call_findings"] == list(bundle.findings[1:3])
    # A bundle without validation counts (made by hand) is taken at its word.
    assert dataclasses.replace(bundle, training={}).uncalled_findings == ()


def test_cli_table_says_which_labels_get_no_call(
    capsys: pytest.CaptureFixture[str],
    bundle: ModelBundle,
    inputs: dict[str, Path],
    tmp_path: Path,
) -> None:
    import shutil

    folder = tmp_path / "thin"
    shutil.copytree(bundle.path, folder)
    doc = json.loads((folder / "model.json").read_text())
    k = len(bundle.findings)
    doc["training"]["validation"] = {
        "positives": dict(zip(bundle.findings, [20, 3] + [12] * (k - 2), strict=True)),
        "negatives": dict(zip(bundle.findings, [30, 40] + [12] * (k - 2), strict=True)),
    }
    (folder / "model.json").write_text(json.dumps(doc))
    code, out, _ = run_cli(capsys, str(inputs["grey"]), "--model", str(folder), "--engine", "torch")
    assert code == 0
    assert (
        f"No call (probability only) for {bundle.findings[1]} (3 validation positives, "
        "40 negatives): an operating point needs at least 10 of each" in out
    )


def test_calibrated_probabilities_are_stable() -> None:
    p = calibrated_probabilities(np.array([-1000.0, 0.0, 1000.0]), [1.0, 1.0, 0.5])
    np.testing.assert_allclose(p, [0.0, 0.5, 1.0])


def test_severity_interval_fixed_half_width_and_clipping(bundle: ModelBundle) -> None:
    raw = np.array([7.5, -1.0, 0.0, 0.0])  # means (extent 0-8, opacity 0-6), log-variances
    fixed = dataclasses.replace(bundle, severity_interval={"level": 0.9, "half_width": [1.0, 2.0]})
    scores = severity_scores(raw, fixed)
    extent, opacity = scores["geographic_extent"], scores["opacity"]
    assert (extent.mean, extent.low, extent.high, extent.level) == (7.5, 6.5, 8.0, 0.9)
    assert (opacity.mean, opacity.low, opacity.high) == (0.0, 0.0, 2.0)


def test_severity_interval_from_predicted_variance_when_no_half_width(
    bundle: ModelBundle,
) -> None:
    gaussian = dataclasses.replace(bundle, severity_interval={"level": 0.95})
    raw = np.array([4.0, 3.0, 0.0, np.log(0.25)])  # sd 1 and 0.5
    scores = severity_scores(raw, gaussian)
    assert scores["geographic_extent"].low == pytest.approx(4.0 - 1.959964, abs=1e-5)
    assert scores["opacity"].high == pytest.approx(3.0 + 0.5 * 1.959964, abs=1e-5)


def test_weights_that_do_not_fit_are_refused(bundle: ModelBundle) -> None:
    three = dataclasses.replace(
        bundle, findings=("a", "b", "c"), temperatures=(1.0,) * 3, thresholds=(0.5,) * 3
    )
    with pytest.raises(MetadataError, match="does not fit"):
        Predictor(three)
    with pytest.raises(MetadataError, match=r"no weights\.pt"):
        Predictor(dataclasses.replace(bundle, path=bundle.path / "elsewhere"))
    with pytest.raises(ValueError, match="saliency_method"):
        Predictor(bundle, saliency_method="lime")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- heatmaps


def test_heatmap_files_have_the_image_size(
    predictor: Predictor, bundle: ModelBundle, inputs: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    twin = other / "grey.png"  # same stem as inputs["grey"], another image
    Image.fromarray(xray(400, 300, 11)).save(twin)
    out = tmp_path / "heatmaps"
    rows = predictor.predict_files(
        [inputs["grey"], twin, inputs["rgb_jpeg"], inputs["tiny"]], heatmaps_dir=out, raw_maps=True
    )
    sizes = [(260, 300), (300, 400), (400, 320)]
    for row, size in zip(rows[:3], sizes, strict=True):
        pngs = [Path(f) for f in row.heatmap_files if f.endswith(".png")]
        npys = [Path(f) for f in row.heatmap_files if f.endswith(".npy")]
        assert pngs
        assert len(npys) == len(pngs)
        expected = set(row.positive or ()) or {
            max(row.probabilities, key=lambda k: row.probabilities[k] or 0.0)
        }
        assert len(pngs) == len(expected)
        for png in pngs:
            assert png.parent == out
            with Image.open(png) as image:
                assert image.size == size
                assert image.mode == "RGB"
        for npy in npys:
            assert np.load(npy).shape == (7, 7)  # 224 px / 32
        assert row.record()["heatmaps"] == list(row.heatmap_files)
    first = {Path(f).name for f in rows[0].heatmap_files}
    second = {Path(f).name for f in rows[1].heatmap_files}
    assert not first & second  # same stem, different files
    assert rows[3].heatmap_files == ()
    leftovers = [p for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_heatmaps_in_memory_from_files(predictor: Predictor, inputs: dict[str, Path]) -> None:
    rows = predictor.predict_files([inputs["rgb_jpeg"], inputs["tiny"]], heatmaps=True)
    assert rows[0].heatmaps
    assert rows[0].heatmap_files == ()  # nothing written without a folder
    for heat in rows[0].heatmaps.values():
        assert heat.shape == (320, 400)
        assert 0.9 < float(heat.max()) <= 1.0
    assert rows[1].heatmaps == {}


def test_cam_agrees_with_captum_grad_cam(predictor: Predictor, bundle: ModelBundle) -> None:
    pixels = [load_image_array(xray(260, 300, seed)) for seed in range(3)]
    batch = np.stack([normalise(p) for p in pixels])[:, None]
    outputs = predictor.forward(batch)
    cams = saliency.class_activation_maps(outputs.features, predictor.findings_weights())
    for k in range(len(bundle.findings)):
        grad = saliency.grad_cam(predictor.model, torch.from_numpy(batch), [k] * 3)
        for i in range(3):
            correlation = np.corrcoef(cams[i, k].ravel(), grad[i].ravel())[0, 1]
            assert correlation > 0.9999
            np.testing.assert_allclose(
                saliency.normalise_map(cams[i, k]), saliency.normalise_map(grad[i]), atol=1e-4
            )
            # Grad-CAM = CAM / (h * w): the average pool's gradient.
            np.testing.assert_allclose(grad[i] * 49, cams[i, k], rtol=1e-3, atol=1e-4)


def test_gradcam_and_cam_engines_give_the_same_heatmaps(
    predictor: Predictor, bundle: ModelBundle
) -> None:
    images = [xray(256, 300, 21), xray(300, 256, 22)]
    cam = Predictor(bundle, saliency_method="cam")
    by_gradcam = predictor.predict_arrays(images, heatmaps=True)
    by_cam = cam.predict_arrays(images, heatmaps=True)
    for a, b in zip(by_gradcam, by_cam, strict=True):
        assert a.heatmaps.keys() == b.heatmaps.keys()
        for label in a.heatmaps:
            np.testing.assert_allclose(a.heatmaps[label], b.heatmaps[label], atol=1e-4)


def load_image_array(pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """The centre square resized to 224 px (the network's input pixels)."""
    from covidcxr.models.inputs import preprocess

    return preprocess(Image.fromarray(pixels), 224)


def test_preprocess_of_decoded_images_matches_load_image(tmp_path: Path) -> None:
    from covidcxr.models.inputs import preprocess

    cases = {
        "l.png": Image.fromarray(xray(333, 517, 1)),
        "rgba.png": Image.fromarray(xray(401, 299, 2)).convert("RGBA"),
        "la.png": Image.fromarray(xray(300, 300, 3)).convert("LA"),
        "deep.png": Image.fromarray(xray(250, 270, 4).astype(np.uint16) * 257),
        "p.png": Image.fromarray(xray(300, 280, 5)).convert("P"),
    }
    for name, image in cases.items():
        path = tmp_path / name
        image.save(path)
        with Image.open(path) as reopened:
            reopened.load()
            np.testing.assert_array_equal(
                preprocess(reopened, 224), load_image(path, 224), err_msg=name
            )


def test_overlay_colour_map_and_blend() -> None:
    assert saliency.COLOUR_MAP.shape == (256, 3)
    assert saliency.COLOUR_MAP.dtype == np.uint8
    gray = np.full((4, 4), 100, dtype=np.uint8)
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    blended = saliency.overlay(gray, heat)
    assert blended.shape == (4, 4, 3)
    assert (blended[1:, 1:] == 100).all()  # cold: the radiograph untouched
    assert tuple(blended[0, 0]) != (100, 100, 100)
    with pytest.raises(ValueError, match="differ"):
        saliency.overlay(gray, heat[:2])


def test_upsample_covers_the_centre_square_only() -> None:
    heat = np.ones((7, 7), dtype=np.float32)
    full = saliency.upsample_to_image(heat, width=300, height=200)
    assert full.shape == (200, 300)
    assert full[:, :50].max() == 0.0
    assert full[:, 250:].max() == 0.0
    np.testing.assert_allclose(full[:, 50:250], 1.0, atol=1e-6)


# --------------------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_and_csv(
    capsys: pytest.CaptureFixture[str], bundle: ModelBundle, inputs: dict[str, Path]
) -> None:
    files = [str(inputs[k]) for k in ("grey", "tiny", "text")]
    code, out, _ = run_cli(
        capsys, *files, "--model", str(bundle.path), "--engine", "torch", "--format", "json"
    )
    assert code == 0
    rows = json.loads(out)
    assert [row["input_check"] for row in rows] == ["pass", "fail", "fail"]
    assert all(row["note"] == RESEARCH_USE_ONLY for row in rows)
    assert all(row["model_id"] == "test-frontal" for row in rows)
    assert all(row["weights_sha256"] == bundle.weights_sha256 for row in rows)
    assert rows[0]["p_COVID-19"] is not None
    assert rows[1]["p_COVID-19"] is None
    assert "shorter side" in rows[1]["reason"]
    assert list(rows[0]) == record_columns(bundle)

    code, out, _ = run_cli(
        capsys, *files, "--model", str(bundle.path), "--engine", "torch", "--format", "csv"
    )
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert list(table[0]) == record_columns(bundle)
    assert len(table) == 3
    assert all(row["note"] == RESEARCH_USE_ONLY for row in table)
    assert [row["input_check"] for row in table] == ["pass", "fail", "fail"]
    assert table[1]["p_COVID-19"] == ""
    assert 0.0 <= float(table[0]["p_COVID-19"]) <= 1.0
    assert table[0]["checks_passed"] == "decodable;size;greyscale;frontal_view"


def test_cli_table_has_the_note_once(
    capsys: pytest.CaptureFixture[str], bundle: ModelBundle, inputs: dict[str, Path], tmp_path: Path
) -> None:
    heatmaps = tmp_path / "maps"
    code, out, _ = run_cli(
        capsys,
        str(inputs["grey"]),
        str(inputs["photo"]),
        "--model",
        str(bundle.path),
        "--heatmaps",
        str(heatmaps),
        "--saliency",
        "cam",
    )
    assert code == 0
    assert out.lower().count("research use only, not a diagnosis") == 1
    assert "geographic_extent" in out
    assert "test-frontal" in out
    assert bundle.weights_sha256 in out
    assert "1 passed the input check, 1 failed" in out
    assert any(heatmaps.glob("grey.*.png"))
    assert not any(heatmaps.glob("photo.*"))


def test_cli_exit_codes(
    capsys: pytest.CaptureFixture[str], bundle: ModelBundle, inputs: dict[str, Path], tmp_path: Path
) -> None:
    code, _, err = run_cli(capsys, str(inputs["grey"]), "--model", "no-such-model")
    assert code == 2
    assert "no model 'no-such-model'" in err
    code, _, err = run_cli(capsys, str(tmp_path / "missing.png"), "--model", str(bundle.path))
    assert code == 2
    assert "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, str(empty), "--model", str(bundle.path))
    assert code == 2
    assert "no files" in err
    # Images that all fail the input check are reported: exit 0.
    code, out, _ = run_cli(
        capsys, str(inputs["tiny"]), str(inputs["photo"]), "--model", str(bundle.path)
    )
    assert code == 0
    assert "0 passed the input check, 2 failed" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(inputs["grey"]), "--batch-size", "0"])
    assert exit_info.value.code == 2
    capsys.readouterr()
