"""The lungs-first bundle: the shipped covidcxr-small-v2 against covidcxr-small-v1, its
card, predictions through the lung gate and the pneumonia model on both engines, the
command lines, and the out-of-fold answers of :mod:`covidcxr.models.lung_model`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from covidcxr.cli import main
from covidcxr.models import abnormality, coherence, engines, gate, lung_model, saliency
from covidcxr.models.abnormality_train import ZoneData, summary_lines
from covidcxr.models.bundle import SHIPPED_DIR, ModelBundle, load_bundle
from covidcxr.models.card import lung_dice_line, render_card
from covidcxr.models.coherence import COVID, NO_FINDING, PNEUMONIA_LABELS
from covidcxr.models.rows import PredictionRow, calibrated_probabilities

V1, V2 = "covidcxr-small-v1", "covidcxr-small-v2"
REAL_CHEST = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "datasets"
    / "covid-chestxray"
    / "images"
    / "000001-3.png"
)


def model_json(model_id: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (SHIPPED_DIR / model_id / "model.json").read_text(encoding="utf-8")
    )
    return loaded


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the shipped bundles ------------------------------------------------------------


def test_the_default_bundle_is_v2_and_verifies() -> None:
    bundle = load_bundle()
    assert bundle.model_id == V2
    assert load_bundle(V2, verify=True).files == bundle.files
    assert "abnormality.json" in bundle.files


@pytest.mark.parametrize("name", ["weights.pt", "model.onnx"])
def test_v2_carries_v1_network_unchanged(name: str) -> None:
    v1, v2 = load_bundle(V1), load_bundle(V2)
    assert v2.files[name] == v1.files[name]
    assert sha256(v2.path / name) == sha256(v1.path / name)
    assert v2.training["base_model"] == {"model_id": V1, "weights_sha256": v1.weights_sha256}


def test_v1_stays_loadable_by_id_without_a_lung_gate() -> None:
    v1 = load_bundle(V1)
    assert v1.model_id == V1
    assert "lung_gate" not in v1.extra
    assert "abnormality" not in v1.extra
    assert "lung_model" not in v1.metrics


def test_v2_model_json_names_the_lung_gate_and_pneumonia_model() -> None:
    doc = model_json(V2)
    assert doc["lung_gate"]["gate_id"] == "gate-lungs-v1"
    assert (SHIPPED_DIR / doc["lung_gate"]["gate_id"] / "model.json").is_file()
    assert doc["abnormality"]["file"] == "abnormality.json"
    assert (SHIPPED_DIR / V2 / doc["abnormality"]["file"]).is_file()


def test_v2_card_is_rendered_from_the_bundle() -> None:
    v2 = load_bundle(V2)
    text = (v2.path / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert text == render_card(v2)
    oof = v2.metrics["lung_model"]["out_of_fold_on_training_source"]
    assert "## What each number means" in text
    assert "### The pneumonia model, measured" in text
    assert "\n".join(summary_lines(v2.metrics["lung_model"]["pneumonia_model"])) in text
    assert f"{oof['source']}, every image scored by a pneumonia model" in text
    assert oof["hierarchy_violations"] == 0
    assert "(P(COVID-19) <= P(viral) <= P(pneumonia)): 0 violations" in text
    # its gate's segmenter (the one its lung features came from), not the default
    assert lung_dice_line("lungs-unet-v1") and lung_dice_line("lungs-unet-v1") in text
    assert "against v7labs masks (drawn by people, 63 images) mean 0.952" in text
    assert "## Input gate: gate-lungs-v1" in text


def test_v2_states_the_prevalence_its_probabilities_carry() -> None:
    v2 = load_bundle(V2)
    stated = v2.training["covid_prevalence"]
    assert 0.0 < stated < 1.0
    assert coherence.training_prevalence(v2.training) == stated
    assert coherence.training_prevalence(load_bundle(V1).training) != stated


def test_quality_note_quotes_the_pneumonia_model_not_v1s_network() -> None:
    v1, v2 = load_bundle(V1), load_bundle(V2)
    cv = v2.metrics["lung_model"]["pneumonia_model"]["within_source_cv"]
    note = engines.quality_note(v2)
    assert V2 in note
    assert f"pneumonia vs no finding AUC {cv['auc']:.2f} [{cv['low']:.2f}, {cv['high']:.2f}]" in (
        note
    )
    old = engines.quality_note(v1)
    assert "cross-validated AUC" in old  # v1's own note, from the metrics v2 copied
    assert "cross-validated AUC" not in note
    assert old.split(": ", 1)[1] not in note


# --- predictions --------------------------------------------------------------------


def chest(height: int = 512, width: int = 480) -> Image.Image:
    """A plausible frontal chest: a bright body with two dark lung ellipses."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    body = ((y - height * 0.55) / (height * 0.5)) ** 2 + ((x - width / 2) / (width * 0.47)) ** 2
    picture = np.where(body < 1, 180.0, 10.0)
    lungs = np.zeros((height, width), dtype=bool)
    for centre in (0.3, 0.7):
        lungs |= ((y - height * 0.5) / (height * 0.3)) ** 2 + (
            (x - width * centre) / (width * 0.14)
        ) ** 2 < 1
    picture = np.where(lungs, 60.0, picture)
    picture += np.random.default_rng(0).normal(0, 4, picture.shape)
    return Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))


def shipped(model_id: str) -> ModelBundle:
    """By folder, so that no bundle in a user's data folder can stand in."""
    return load_bundle(SHIPPED_DIR / model_id)


@pytest.fixture(scope="module")
def torch_v2() -> Any:
    pytest.importorskip("torch")
    return engines.make_engine(shipped(V2), "torch")


@pytest.fixture(scope="module")
def torch_v1() -> Any:
    pytest.importorskip("torch")
    return engines.make_engine(shipped(V1), "torch")


def assert_lungs_first(row: PredictionRow) -> None:
    assert row.gate.passed, row.gate.reason
    probs = row.probabilities
    assert all(probs[n] is not None for n in (NO_FINDING, *PNEUMONIA_LABELS))
    pneumonia = sum(float(probs[n] or 0.0) for n in PNEUMONIA_LABELS)
    assert float(probs[NO_FINDING] or 0.0) == pytest.approx(1.0 - pneumonia, abs=1e-6)
    assert row.summary is not None
    assert row.summary.pneumonia == pytest.approx(pneumonia, abs=1e-6)
    assert row.summary.covid <= row.summary.viral <= row.summary.pneumonia


def test_v2_passes_an_upright_chest_with_coherent_probabilities(torch_v2: Any) -> None:
    image = chest()
    p_frontal = torch_v2.lung_gate.probabilities(image)[0]
    assert p_frontal >= torch_v2.lung_gate.threshold  # the synthetic chest is plausible
    (row,) = torch_v2.predict_arrays([image])
    assert "frontal_view" in row.gate.checks_passed
    assert row.gate.frontal_probability == pytest.approx(p_frontal)
    assert row.model_id == V2
    pneumonia = torch_v2.pneumonia.probability(image)
    assert 1.0 - float(row.probabilities[NO_FINDING]) == pytest.approx(pneumonia, abs=1e-6)
    assert_lungs_first(row)


def test_v2_refuses_an_inverted_chest_naming_it(torch_v2: Any) -> None:
    image = chest()
    (upright, inverted) = torch_v2.predict_arrays([image, ImageOps.invert(image)])
    assert upright.gate.passed
    assert not inverted.gate.passed
    assert inverted.gate.code == "inverted"
    assert "inverted" in inverted.gate.reason
    assert inverted.gate.checks_failed == ("frontal_view",)
    assert all(p is None for p in inverted.probabilities.values())
    assert inverted.summary is None


@pytest.mark.shared_data
def test_v2_on_a_real_chest_and_its_negative(torch_v2: Any) -> None:
    if not REAL_CHEST.is_file():
        pytest.skip(f"shared data not found at {REAL_CHEST}")
    (row,) = torch_v2.predict_files([REAL_CHEST])
    assert_lungs_first(row)
    with Image.open(REAL_CHEST) as image:
        negative = ImageOps.invert(image.convert("L"))
    (refused,) = torch_v2.predict_arrays([negative])
    assert refused.gate.code == "inverted"
    assert "inverted" in refused.gate.reason


def network_answer(engine: Any, image: Image.Image) -> tuple[gate.GateVerdict, np.ndarray]:
    """The network's own gate-head verdict and calibrated findings for one image."""
    from covidcxr.dataset.loading import normalise
    from covidcxr.models.inputs import preprocess

    bundle = engine.bundle
    batch = normalise(preprocess(image, bundle.input_size))[None, None]
    outputs = engine.forward(batch)
    verdict = gate.head_verdict(
        gate.softmax(outputs.gate[0]),
        bundle.gate_classes,
        bundle.gate,
        gate.check_rules(image, bundle.gate),
    )
    return verdict, calibrated_probabilities(outputs.findings[0], bundle.temperatures)


def test_v1_keeps_its_network_gate(torch_v1: Any) -> None:
    assert torch_v1.lung_gate is None and torch_v1.pneumonia is None
    image = chest()
    (row,) = torch_v1.predict_arrays([image])
    assert row.model_id == V1
    assert row.gate == network_answer(torch_v1, image)[0]


@pytest.mark.shared_data
def test_v1_on_a_real_chest_gives_its_network_probabilities(torch_v1: Any) -> None:
    if not REAL_CHEST.is_file():
        pytest.skip(f"shared data not found at {REAL_CHEST}")
    with Image.open(REAL_CHEST) as image:
        image.load()
    (row,) = torch_v1.predict_arrays([image])
    verdict, network = network_answer(torch_v1, image)
    assert row.gate == verdict
    assert row.gate.passed, row.gate.reason
    got = [row.probabilities[n] for n in torch_v1.bundle.findings]
    np.testing.assert_allclose(np.asarray(got, dtype=float), network, rtol=0, atol=1e-6)


def test_onnx_engine_gives_the_torch_probabilities(torch_v2: Any) -> None:
    pytest.importorskip("onnxruntime")
    onnx_v2 = engines.make_engine(shipped(V2), "onnx")
    assert onnx_v2.lung_gate is not None and onnx_v2.pneumonia is not None
    images = [chest(), ImageOps.invert(chest()), chest(400, 520)]
    for a, b in zip(torch_v2.predict_arrays(images), onnx_v2.predict_arrays(images), strict=True):
        assert (a.gate.verdict, a.gate.code) == (b.gate.verdict, b.gate.code)
        assert b.engine == "onnx"
        for name in a.probabilities:
            if a.probabilities[name] is None:
                assert b.probabilities[name] is None
            else:
                assert b.probabilities[name] == pytest.approx(a.probabilities[name], abs=1e-4)


# --- command lines ------------------------------------------------------------------


@pytest.mark.parametrize("threshold", ["1.5", "0", "-0.2"])
def test_train_gate_refuses_a_threshold_outside_0_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], threshold: str
) -> None:
    out = tmp_path / "gate"
    assert main(["train-gate", "--threshold", threshold, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"--threshold {float(threshold)} must lie strictly between 0 and 1" in (
        captured.out + captured.err
    )
    assert not out.exists()


def test_train_gate_usage_error_goes_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train-gate", "--threshold", "1.5", "--out", str(tmp_path / "gate")]) == 2
    captured = capsys.readouterr()
    assert "--threshold" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("command", "needle"),
    [("evaluate", "--lungs"), ("train-lung-model", "train-lung-model"), ("train-gate", "--out")],
)
def test_help_lists_the_lung_options(
    capsys: pytest.CaptureFixture[str], command: str, needle: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert needle in capsys.readouterr().out


# --- lung_model.out_of_fold_answers -------------------------------------------------


def zone_data(pneumonia: list[float]) -> ZoneData:
    n = len(pneumonia)
    return ZoneData(
        x=np.zeros((n, 3)),
        pneumonia=np.asarray(pneumonia, dtype=np.float64),
        covid=np.zeros(n),
        source=np.full(n, "nih-cxr14-subset"),
        group=np.asarray([f"g{i}" for i in range(n)]),
        patient=np.asarray([f"p{i}" for i in range(n)]),
        path=np.asarray([f"/images/{i}.png" for i in range(n)]),
    )


#: Six images: four normal chests, two with pneumonia; the last is refused by the base.
LABELS = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
#: Out-of-fold P(pneumonia) of each.
OOF = np.asarray([0.1, 0.2, 0.5, 0.7, 0.8, 0.9, 0.6])
#: The network's kinds: COVID-19 gets half of the pneumonia probability.
NETWORK = {NO_FINDING: 0.3, COVID: 0.4, "Other viral pneumonia": 0.2}
NETWORK |= {"Bacterial pneumonia": 0.1, "Fungal pneumonia": 0.1}


@pytest.fixture
def fake_network(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def network(base: ModelBundle, paths: list[str]) -> list[dict[str, float]]:
        calls.append(list(paths))
        return [dict(NETWORK) for _ in paths[:-1]] + [{}]

    monkeypatch.setattr(lung_model, "_network_probabilities", network)
    return calls


@pytest.mark.parametrize("covid_threshold", [0.05, 0.2, 0.3, 0.9])
def test_out_of_fold_answers_against_the_given_covid_threshold(
    fake_network: list[list[str]], covid_threshold: float
) -> None:
    base = load_bundle(SHIPPED_DIR / V1)
    thresholds = [0.5] * len(base.findings)
    thresholds[base.findings.index(COVID)] = covid_threshold
    part = zone_data(LABELS)
    got = lung_model.out_of_fold_answers(base, part, OOF, thresholds)
    assert fake_network == [list(part.path)]
    scored = slice(0, len(LABELS) - 1)
    share = NETWORK[COVID] / sum(NETWORK[n] for n in PNEUMONIA_LABELS)
    normal_covid = OOF[scored][np.asarray(LABELS[scored]) == 0] * share
    assert got["images"] == len(LABELS) - 1
    assert got["refused_by_base_gate"] == 1
    assert got["normal_images"] == 4
    assert got["hierarchy_violations"] == 0
    assert got["source"] == "nih-cxr14-subset"
    assert got["normal_called_covid"] == pytest.approx((normal_covid >= covid_threshold).mean())
    assert got["normal_covid_median"] == pytest.approx(float(np.median(normal_covid)), abs=1e-4)
    assert got["pneumonia_auc"]["value"] == 1.0  # every pneumonia above every normal
    # the network alone says the same for every image: no ranking at all
    assert got["base_pneumonia_auc"] == 0.5


def test_out_of_fold_answers_count_hierarchy_violations_as_none_when_coherent(
    fake_network: list[list[str]],
) -> None:
    base = load_bundle(SHIPPED_DIR / V1)
    rng = np.random.default_rng(5)
    labels = [float(v) for v in rng.integers(0, 2, size=30)]
    labels[:2] = [0.0, 1.0]
    got = lung_model.out_of_fold_answers(
        base, zone_data(labels), rng.uniform(size=30), base.thresholds
    )
    assert got["hierarchy_violations"] == 0
    assert got["images"] == 29


def test_a_lungs_first_model_never_explains_no_finding() -> None:
    pytest.importorskip("onnxruntime")
    from covidcxr.models.engines import make_engine

    v2 = load_bundle("covidcxr-small-v2")
    engine = make_engine(v2, "onnx")
    no_finding = v2.findings.index("No finding")
    probs = np.full(len(v2.findings), 0.01)
    probs[no_finding] = 0.99  # called normal: still the network's labels are explained
    targets = engine._targets(probs)
    assert no_finding not in targets and len(targets) == 1
    v1_engine = make_engine(load_bundle("covidcxr-small-v1"), "onnx")
    assert v1_engine._targets(probs) == [no_finding]  # v1's "No finding" is the network's


def test_an_onnx_engine_runs_the_lungs_first_model_without_importing_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from covidcxr.models.bundle import load_bundle\n"
        "from covidcxr.models.engines import make_engine\n"
        "engine = make_engine(load_bundle('covidcxr-small-v2'), 'onnx')\n"
        "rows = list(engine.predict_arrays([np.full((300, 300), 128, np.uint8)]))\n"
        "assert len(rows) == 1, rows\n"
        "print(engine.lung_gate.segmenter.backend, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["onnx", "False"]


def test_v2_heatmaps_lead_with_the_lung_zone_map_drawn_without_the_networks_square(
    torch_v2: Any, tmp_path: Path
) -> None:
    image = chest()
    (row,) = torch_v2.predict_arrays([image], heatmaps=True, heatmaps_dir=tmp_path)
    labels = list(row.heatmaps)
    assert labels[0] == abnormality.ZONE_MAP_LABEL
    assert len(labels) >= 2  # and the network's map of what it called
    zones = row.heatmaps[abnormality.ZONE_MAP_LABEL]
    assert zones.shape == (image.height, image.width)
    expected = torch_v2.pneumonia.zone_map(image.convert("L"))
    np.testing.assert_array_equal(zones, expected)
    zone_file = next(f for f in row.heatmap_files if "lung_zones" in f)
    overlay = np.asarray(Image.open(zone_file).convert("RGB"))
    assert not np.all(overlay == saliency.SEEN_COLOUR, axis=-1).any()  # no dashed square


@pytest.mark.shared_data
def test_v2_refuses_an_equalised_export_of_a_chest_it_passes(torch_v2: Any) -> None:
    if not REAL_CHEST.is_file():
        pytest.skip(f"shared data not found at {REAL_CHEST}")
    with Image.open(REAL_CHEST) as image:
        grey = image.convert("L")
    original, equalised = torch_v2.predict_arrays([grey, ImageOps.equalize(grey)])
    assert original.gate.passed
    assert original.gate.checks_passed[-2:] == ("grey_levels", "two_lungs")
    assert equalised.gate.code == "equalised"
    assert equalised.gate.checks_failed == ("grey_levels",)
    assert all(p is None for p in equalised.probabilities.values())


def test_v1_has_no_grey_level_check(torch_v1: Any) -> None:
    (row,) = torch_v1.predict_arrays([ImageOps.equalize(chest())])
    assert "grey_levels" not in row.gate.checks_passed + row.gate.checks_failed


def test_overlays_of_one_image_share_one_lung_outline_from_the_engines_segmenter(
    torch_v2: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    segmenter = torch_v2.lung_gate.segmenter
    calls: list[tuple[int, ...]] = []
    segment = segmenter.segment

    def counted(image: Any) -> Any:
        calls.append(np.asarray(image).shape)
        return segment(image)

    monkeypatch.setattr(segmenter, "segment", counted)
    image = chest()
    (row,) = torch_v2.predict_arrays([image], heatmaps_dir=tmp_path)
    assert len([f for f in row.heatmap_files if f.endswith(".png")]) >= 2
    assert calls == [(image.height, image.width)]  # one outline for all its overlays


def test_an_outline_that_is_not_two_lungs_is_not_drawn(
    torch_v2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from covidcxr.models import saliency

    gray = np.full((60, 80), 128, dtype=np.uint8)
    one = np.zeros(gray.shape, dtype=np.uint8)
    one[10:50, 10:70] = 1  # one region across the midline: an arm, or both lungs merged
    two = np.zeros(gray.shape, dtype=np.uint8)
    two[10:50, 5:35] = two[10:50, 45:75] = 1
    segmenter = torch_v2.lung_gate.segmenter
    monkeypatch.setattr(segmenter, "segment", lambda image: one)
    assert torch_v2._lung_outline(gray) is None
    monkeypatch.setattr(segmenter, "segment", lambda image: two)
    outline = torch_v2._lung_outline(gray)
    assert outline is not None and np.array_equal(outline, two)
    assert saliency.drawable_lungs(one) is None
    assert saliency.drawable_lungs(two) is two


def test_an_image_without_two_lung_fields_is_refused_before_any_probability(
    torch_v2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    judge = torch_v2.lung_gate.judge
    (passed,) = torch_v2.predict_arrays([chest()])
    assert passed.gate.passed and passed.gate.checks_passed[-1] == "two_lungs"

    def one_lung(image: Any) -> Any:
        probabilities, lungs = judge(image)
        lungs = lungs.copy()
        lungs[:, lungs.shape[1] // 2 :] = 0.0  # the right half of the image: no lung
        return probabilities, lungs

    monkeypatch.setattr(torch_v2.lung_gate, "judge", one_lung)
    (row,) = torch_v2.predict_arrays([chest()])
    assert not row.gate.passed and row.gate.code == "not_two_lungs"
    assert row.gate.checks_failed == ("two_lungs",)
    assert all(p is None for p in row.probabilities.values()) and row.summary is None


def test_a_fitted_pneumonia_file_names_its_segmenter_and_loads_it(tmp_path: Path) -> None:
    import json
    from types import SimpleNamespace

    from covidcxr.models import abnormality, lungs
    from covidcxr.models.lung_model import FittedPneumonia

    shipped = lungs.LungSegmenter.load(backend="onnx")
    n = len(abnormality.FEATURE_NAMES)
    risk = abnormality.LinearRisk(np.zeros(n), np.ones(n), np.zeros(n), 0.0)
    part = SimpleNamespace(x=np.zeros((3, n)))
    record = lungs.segmenter_record(shipped)
    fitted = FittedPneumonia("nih", risk, {}, part, np.zeros(3), 0.5, record)  # type: ignore[arg-type]
    path = tmp_path / "abnormality.json"
    path.write_text(json.dumps(fitted.as_file()), encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8"))["segmenter"]["model_id"] == lungs.MODEL_ID
    loaded = abnormality.PneumoniaModel.load(path)
    assert lungs.segmenter_record(loaded.segmenter) == lungs.segmenter_record(shipped)
    unnamed = dataclasses.replace(fitted, segmenter=None).as_file()
    assert "segmenter" not in unnamed
