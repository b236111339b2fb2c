"""The lung-zone pneumonia model: zone features of synthetic chests, the plain-number
logistic regression against scikit-learn, combining P(pneumonia) with the network's
kinds, the stated training prevalence, and loading a model file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covidcxr.errors import MetadataError
from covidcxr.models import abnormality, runtime
from covidcxr.models.abnormality import (
    FEATURE_NAMES,
    FITTED_BEFORE_PINNING,
    FORMAT,
    MIN_LUNG_PIXELS,
    ZONE_MEASURES,
    ZONES,
    LinearRisk,
    PneumoniaModel,
    combine,
    zone_features,
)
from covidcxr.models.bundle import load_bundle
from covidcxr.models.coherence import (
    COVID,
    NO_FINDING,
    OTHER_VIRAL,
    PNEUMONIA_LABELS,
    summarise,
    training_prevalence,
)
from covidcxr.models.lungs import letterbox_box

SIDE = 160
LABELS = (*PNEUMONIA_LABELS, NO_FINDING, "Extra finding")


def feature(values: NDArray[np.float64], name: str) -> float:
    return float(values[FEATURE_NAMES.index(name)])


def lung_mask(side: int = SIDE) -> NDArray[np.bool_]:
    """Two upright ellipses, one each side of the image's middle."""
    ys, xs = np.mgrid[0:side, 0:side]
    mask = np.zeros((side, side), dtype=bool)
    for centre_x in (0.3 * side, 0.7 * side):
        mask |= ((xs - centre_x) / (0.14 * side)) ** 2 + (
            (ys - 0.5 * side) / (0.35 * side)
        ) ** 2 <= 1
    return mask


def chest(seed: int = 0, side: int = SIDE) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """A bright body with two dark, slightly noisy lungs, and the lungs' mask."""
    rng = np.random.default_rng(seed)
    lung = lung_mask(side)
    grey = np.where(lung, 60.0, 190.0) + rng.normal(0.0, 6.0, (side, side))
    return np.clip(grey, 0, 255).astype(np.uint8), lung


def with_opacity(pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """A bright blob low in the image's left lung (the patient's right, zone right_lower)."""
    ys, xs = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
    blob = (xs - 0.3 * SIDE) ** 2 + (ys - 0.75 * SIDE) ** 2 <= (0.08 * SIDE) ** 2
    out = pixels.copy()
    out[blob] = 170
    return out


# --- zone features ------------------------------------------------------------------------


def test_feature_names_are_the_zone_measures_then_four_of_the_whole_lung() -> None:
    assert len(FEATURE_NAMES) == len(ZONES) * len(ZONE_MEASURES) + 4
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    pixels, lung = chest()
    assert zone_features(pixels, lung).shape == (len(FEATURE_NAMES),)


def test_a_synthetic_chest_gives_six_zone_shares_that_add_up_to_one() -> None:
    pixels, lung = chest()
    values = zone_features(pixels, lung)
    shares = [feature(values, f"{zone}_share") for zone in ZONES]
    assert len(shares) == 6
    assert all(share > 0.05 for share in shares)
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    assert np.isfinite(values).all()
    assert feature(values, "lung_fraction") == pytest.approx(lung.mean())
    # Dark lungs in a bright body: the outside is far brighter than the lungs.
    assert feature(values, "outside_minus_lung") > 5


def test_an_opacity_low_in_the_patients_right_lung_raises_that_zones_mean() -> None:
    pixels, lung = chest()
    clean, opaque = zone_features(pixels, lung), zone_features(with_opacity(pixels), lung)
    rise = {
        zone: feature(opaque, f"{zone}_mean") - feature(clean, f"{zone}_mean") for zone in ZONES
    }
    assert rise["right_lower"] > 0.5
    assert rise["right_lower"] == max(rise.values())
    assert feature(opaque, "right_lower_p90") > feature(clean, "right_lower_p90")


def test_a_lung_smaller_than_the_minimum_gives_zeros() -> None:
    pixels, _ = chest()
    lung = np.zeros_like(pixels, dtype=bool)
    lung[80:87, 40:47] = True  # 49 pixels
    assert lung.sum() < MIN_LUNG_PIXELS
    assert not zone_features(pixels, lung).any()
    lung[80:88, 40:47] = True  # 56 pixels: measured
    assert lung.sum() >= MIN_LUNG_PIXELS
    assert zone_features(pixels, lung).any()


@pytest.mark.parametrize(
    ("pixels_shape", "lung_shape"),
    [((SIDE, SIDE), (SIDE, SIDE + 1)), ((SIDE, SIDE, 3), (SIDE, SIDE)), ((4, 4, 4), (4, 4, 4))],
)
def test_shapes_that_differ_or_are_not_2d_are_refused(
    pixels_shape: tuple[int, ...], lung_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="zone_features: pixels"):
        zone_features(np.zeros(pixels_shape, np.uint8), np.ones(lung_shape, bool))


@pytest.mark.parametrize("whole_image_is_lung", [False, True])
def test_a_constant_image_gives_no_nan(whole_image_is_lung: bool) -> None:
    pixels = np.full((SIDE, SIDE), 128, np.uint8)
    lung = np.ones_like(pixels, bool) if whole_image_is_lung else lung_mask()
    values = zone_features(pixels, lung)
    assert np.isfinite(values).all()


# --- the logistic regression in plain numbers ---------------------------------------------


def sklearn_pipeline(seed: int = 0) -> tuple[Any, NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(120, 7)) * np.arange(1, 8)
    y = (x[:, 0] + rng.normal(0.0, 2.0, 120) > 3.0).astype(int)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=0.5)).fit(x, y)
    return pipeline, rng.normal(3.0, 4.0, size=(50, 7)) * np.arange(1, 8)


def test_linear_risk_matches_scikit_learn() -> None:
    pipeline, rows = sklearn_pipeline()
    risk = LinearRisk.from_sklearn(pipeline)
    expected = pipeline.predict_proba(rows)[:, 1]
    np.testing.assert_allclose(risk.probability(rows), expected, rtol=0, atol=1e-10)
    # One row as a 1-D vector gives one probability.
    np.testing.assert_allclose(risk.probability(rows[0]), expected[:1], rtol=0, atol=1e-10)


def test_linear_risk_survives_a_json_round_trip() -> None:
    pipeline, rows = sklearn_pipeline(seed=1)
    risk = LinearRisk.from_sklearn(pipeline)
    again = LinearRisk.from_dict(json.loads(json.dumps(risk.as_dict())))
    for name in ("mean", "scale", "coef"):
        np.testing.assert_array_equal(getattr(again, name), getattr(risk, name))
    assert again.intercept == risk.intercept
    np.testing.assert_array_equal(again.probability(rows), risk.probability(rows))


# --- combining P(pneumonia) with the network's kinds --------------------------------------

network_value = st.none() | st.floats(min_value=0.0, max_value=1.0)
networks = st.fixed_dictionaries({name: network_value for name in LABELS})
model_prevalence = st.floats(min_value=1e-3, max_value=1 - 1e-3)


def kinds(out: dict[str, float | None]) -> list[float]:
    return [float(out[name] or 0.0) for name in PNEUMONIA_LABELS]


@given(networks, st.floats(min_value=0.0, max_value=1.0))
def test_combine_keeps_the_hierarchy_and_the_total(
    network: dict[str, float | None], pneumonia: float
) -> None:
    out = combine(network, pneumonia, LABELS)
    assert out[NO_FINDING] == 1.0 - pneumonia
    assert sum(kinds(out)) == pytest.approx(pneumonia, rel=1e-12, abs=1e-15)
    covid, viral = (
        float(out[COVID] or 0.0),
        float(out[COVID] or 0.0) + float(out[OTHER_VIRAL] or 0.0),
    )
    assert 0.0 <= covid <= viral <= pneumonia * (1 + 1e-12)
    assert out["Extra finding"] == network["Extra finding"]


@given(
    st.fixed_dictionaries({name: st.floats(min_value=1e-6, max_value=1.0) for name in LABELS}),
    st.floats(min_value=1e-6, max_value=1.0),
)
def test_combine_keeps_the_networks_proportions(
    network: dict[str, float], pneumonia: float
) -> None:
    out = combine(network, pneumonia, LABELS)
    total = sum(network[name] for name in PNEUMONIA_LABELS)
    for name in PNEUMONIA_LABELS:
        share = float(out[name] or 0.0) / pneumonia
        assert share == pytest.approx(network[name] / total, rel=1e-9)


def test_a_chest_the_model_calls_normal_gets_a_low_covid_probability() -> None:
    network = {COVID: 0.9, OTHER_VIRAL: 0.05, "Bacterial pneumonia": 0.03}
    network |= {"Fungal pneumonia": 0.02, NO_FINDING: 0.01}
    out = combine(network, 0.05, LABELS)
    assert float(out[COVID] or 0.0) < 0.05
    assert out[NO_FINDING] == pytest.approx(0.95)


@given(
    st.fixed_dictionaries({name: st.floats(min_value=1e-3, max_value=1.0) for name in LABELS}),
    st.floats(min_value=1e-3, max_value=1 - 1e-3),
    model_prevalence,
)
def test_the_coherent_summary_agrees_with_the_combined_probabilities(
    network: dict[str, float], pneumonia: float, prevalence: float
) -> None:
    for local in (None, prevalence):
        summary = summarise(combine(network, pneumonia, LABELS), prevalence, local)
        assert summary is not None
        assert summary.pneumonia == pytest.approx(pneumonia, rel=0, abs=1e-9)


@given(networks, st.floats(min_value=0.0, max_value=1.0), model_prevalence)
def test_the_summary_agrees_within_the_floors_at_the_extremes(
    network: dict[str, float | None], pneumonia: float, prevalence: float
) -> None:
    # combine and summarise both floor a probability at 1e-9, so a kind near zero (or a
    # P(pneumonia) within 1e-9 of 0 or 1) can move the summary by a few 1e-9 at most.
    summary = summarise(combine(network, pneumonia, LABELS), prevalence)
    assert summary is not None
    assert summary.pneumonia == pytest.approx(pneumonia, rel=0, abs=5e-9)


@pytest.mark.parametrize("pneumonia", [-0.01, 1.01, math.nan, math.inf])
def test_combine_refuses_a_probability_outside_0_1(pneumonia: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        combine({COVID: 0.5}, pneumonia, LABELS)


@pytest.mark.parametrize("dropped", [NO_FINDING, COVID, "Fungal pneumonia"])
def test_combine_refuses_labels_without_the_second_opinion_set(dropped: str) -> None:
    labels = [name for name in LABELS if name != dropped]
    with pytest.raises(ValueError, match=f"lacks the labels.*{dropped}"):
        combine({COVID: 0.5}, 0.5, labels)


# --- the prevalence a bundle states -------------------------------------------------------


def training_record(covid_prevalence: object = None) -> dict[str, Any]:
    counts = {COVID: {"positive": 30, "negative": 70}}
    record: dict[str, Any] = {"data": {"findings_train": {"labels": counts}}}
    if covid_prevalence is not None:
        record["covid_prevalence"] = covid_prevalence
    return record


def test_a_stated_covid_prevalence_wins_over_the_label_counts() -> None:
    assert training_prevalence(training_record(0.12)) == 0.12
    assert training_prevalence({"covid_prevalence": 0.12}) == 0.12


@pytest.mark.parametrize("stated", [None, 1.5, 0.0, 1.0, -0.2, math.nan, "0.12", [0.12]])
def test_an_invalid_stated_prevalence_falls_back_to_the_label_counts(stated: object) -> None:
    assert training_prevalence(training_record(stated)) == pytest.approx(0.3)


@pytest.mark.parametrize("stated", [1.5, "0.12"])
def test_an_invalid_stated_prevalence_without_counts_says_nothing(stated: object) -> None:
    assert training_prevalence({"covid_prevalence": stated}) is None


# --- loading a model file -----------------------------------------------------------------


def model_file(folder: Path, **changes: Any) -> Path:
    """A well-formed model file whose risk rises with the lungs' grey level."""
    n = len(FEATURE_NAMES)
    coef = np.zeros(n)
    coef[FEATURE_NAMES.index("right_lower_mean")] = 1.0
    risk = LinearRisk(np.zeros(n), np.ones(n), coef, -0.5)
    card = {"format": FORMAT, "features": list(FEATURE_NAMES), "model": risk.as_dict()}
    card |= {"train_source": "synthetic"} | changes
    path = folder / "abnormality.json"
    path.write_text(json.dumps(card), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),
        ("{not json", "cannot read"),
        (json.dumps({"format": "covidcxr-lung-gate/1"}), "not a covidcxr-lung-pneumonia/1"),
        (json.dumps({"format": FORMAT}), "not a covidcxr-lung-pneumonia/1"),
    ],
)
def test_a_missing_unreadable_or_foreign_file_is_refused(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    path = tmp_path / "abnormality.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(MetadataError, match=f"abnormality.json.*{reason}|{reason}.*abnormality"):
        PneumoniaModel.load(path)


@pytest.mark.parametrize(
    "features",
    [list(FEATURE_NAMES[:-1]), [*FEATURE_NAMES, "extra"], list(reversed(FEATURE_NAMES))],
)
def test_a_file_with_other_features_is_refused(tmp_path: Path, features: list[str]) -> None:
    path = model_file(tmp_path, features=features)
    with pytest.raises(MetadataError, match=r"abnormality\.json.*refit"):
        PneumoniaModel.load(path)


def test_a_json_file_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "abnormality.json"
    path.write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(MetadataError, match=r"abnormality\.json"):
        PneumoniaModel.load(path)


@pytest.mark.parametrize("model", [None, {"mean": [0.0]}])
def test_a_file_without_a_usable_model_entry_is_refused(tmp_path: Path, model: object) -> None:
    path = model_file(tmp_path, model=model)
    if model is None:
        card = json.loads(path.read_text(encoding="utf-8"))
        del card["model"]
        path.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(MetadataError, match=r"abnormality\.json"):
        PneumoniaModel.load(path)


def test_a_file_loads_the_segmenter_it_was_fitted_on(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from covidcxr.models import lungs

    older = PneumoniaModel.load(model_file(tmp_path))  # names none: fitted before pinning
    assert lungs.segmenter_record(older.segmenter) == FITTED_BEFORE_PINNING
    shipped = lungs.LungSegmenter.load(backend="onnx")
    named = model_file(tmp_path, segmenter=lungs.segmenter_record(shipped))
    assert PneumoniaModel.load(named).segmenter.card["model_id"] == lungs.MODEL_ID
    assert PneumoniaModel.load(named, shipped).segmenter is shipped


def test_a_file_refuses_a_segmenter_it_was_not_fitted_on(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from covidcxr.models import lungs

    shipped = lungs.LungSegmenter.load(backend="onnx")
    assert lungs.segmenter_record(shipped) != FITTED_BEFORE_PINNING
    with pytest.raises(MetadataError, match=r"abnormality\.json.* was fitted on lung segmenter"):
        PneumoniaModel.load(model_file(tmp_path), shipped)
    unknown = {"model_id": "lungs-unet-v9", "weights_sha256": "ab" * 32}
    with pytest.raises(MetadataError, match="'lungs-unet-v9', not shipped"):
        PneumoniaModel.load(model_file(tmp_path, segmenter=unknown))


def test_a_good_file_loads_and_gives_a_probability(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    path = model_file(tmp_path)
    model = PneumoniaModel.load(path)
    assert model.card["train_source"] == "synthetic"
    assert model.risk.intercept == -0.5
    pixels, _ = chest(side=256)
    for picture in (Image.fromarray(pixels), Image.fromarray(pixels).convert("RGB")):
        p = model.probability(picture)
        assert isinstance(p, float)
        assert 0.0 <= p <= 1.0


def test_a_bundle_without_a_pneumonia_model_loads_none() -> None:
    bundle = load_bundle("covidcxr-small-v1")
    assert "abnormality" not in bundle.extra
    assert runtime.load_pneumonia_model(bundle, None) is None


def test_a_bundle_naming_a_missing_pneumonia_model_is_refused(tmp_path: Path) -> None:
    bundle = dataclasses.replace(
        load_bundle("covidcxr-small-v1"),
        path=tmp_path,
        extra={"abnormality": {"file": "abnormality.json"}},
    )
    with pytest.raises(MetadataError, match=r"abnormality\.json"):
        runtime.load_pneumonia_model(bundle, None)


def test_features_reuse_the_lung_gates_segmentation_unchanged() -> None:
    pytest.importorskip("onnxruntime")
    from covidcxr.models import lung_gate
    from covidcxr.models.lungs import LungSegmenter

    segmenter = LungSegmenter.load(backend="onnx")
    grey = np.full((180, 300), 200, dtype=np.uint8)
    grey[40:150, 40:130] = 60  # two dark fields in a bright body
    grey[40:150, 170:260] = 60
    image = Image.fromarray(grey)
    _, lungs = lung_gate.measure(segmenter, image)
    assert lungs.shape == (segmenter.input_size, segmenter.input_size)
    reused = abnormality.features(segmenter, image, lungs)
    assert np.array_equal(reused, abnormality.features(segmenter, image))


# --- where in the lungs: zone shares of the log-odds and the zone map ----------------------


def random_risk(seed: int = 0) -> LinearRisk:
    rng = np.random.default_rng(seed)
    n = len(FEATURE_NAMES)
    return LinearRisk(rng.normal(size=n), rng.uniform(0.5, 2, n), rng.normal(size=n), -0.3)


def test_zone_shares_and_whole_lung_terms_give_the_models_log_odds_exactly() -> None:
    risk = random_risk()
    x = np.random.default_rng(1).normal(size=len(FEATURE_NAMES))
    shares = abnormality.zone_logits(risk, x)
    assert shares.shape == (len(ZONES),)
    whole_lung = slice(len(ZONES) * len(ZONE_MEASURES), None)
    rest = float((risk.coef * (x - risk.mean) / risk.scale)[whole_lung].sum()) + risk.intercept
    p = float(risk.probability(x)[0])
    assert shares.sum() + rest == pytest.approx(math.log(p / (1 - p)))


def test_zone_shares_refuse_a_row_of_other_features() -> None:
    with pytest.raises(ValueError, match="expected 64 features"):
        abnormality.zone_logits(random_risk(), np.zeros(len(FEATURE_NAMES) - 1))


class _Segmenter:
    """Only what the zone map reads when the lung probability is given."""

    input_size = 128


def model_raising(image: Image.Image, lungs: NDArray[np.float32], zone: str, logit: float) -> Any:
    """A model for which this image's ``zone`` adds ``logit`` to the log-odds, and every
    other feature sits at the training mean."""
    x = abnormality.features(_Segmenter(), image, lungs)  # type: ignore[arg-type]
    coef = np.zeros(len(FEATURE_NAMES))
    index = FEATURE_NAMES.index(f"{zone}_mean")
    coef[index] = logit
    mean = x.copy()
    mean[index] -= 1.0
    risk = LinearRisk(mean, np.ones(len(FEATURE_NAMES)), coef, 0.0)
    return PneumoniaModel(_Segmenter(), risk)  # type: ignore[arg-type]


def lungs_and_image(width: int = 300, height: int = 200) -> tuple[Image.Image, Any]:
    """A chest of any proportions and its lung probability, letterboxed at 128 px."""
    pixels, lung = chest(side=256)
    picture = Image.fromarray(pixels).resize((width, height))
    probability = np.zeros((128, 128), dtype=np.float32)
    left, top, w, h = letterbox_box(width, height, 128)
    small = Image.fromarray(lung.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    probability[top : top + h, left : left + w] = np.asarray(small) / 255.0
    return picture, probability


def test_the_zone_map_paints_only_the_zone_that_raised_pneumonia() -> None:
    image, lungs = lungs_and_image()
    heat = model_raising(image, lungs, "right_lower", 1.0).zone_map(image, lungs)
    assert heat.shape == (200, 300)  # the whole image, in its proportions
    assert heat.max() == pytest.approx(1.0 / abnormality.ZONE_MAP_FULL_LOGIT)
    ys, xs = np.nonzero(heat)
    assert xs.max() < 150  # the patient's right lung is on the image's left
    assert ys.min() > 100  # its lower third
    unrelated = model_raising(image, lungs, "left_upper", 1.0).zone_map(image, lungs)
    assert not np.any((heat > 0) & (unrelated > 0))  # zones do not overlap


def test_the_zone_map_is_clipped_to_full_heat_and_ignores_zones_that_lower_it() -> None:
    image, lungs = lungs_and_image(256, 256)
    strong = model_raising(image, lungs, "left_middle", 10.0).zone_map(image, lungs)
    assert strong.max() == 1.0
    lowering = model_raising(image, lungs, "left_middle", -3.0).zone_map(image, lungs)
    assert not lowering.any()


def test_the_zone_map_of_an_image_without_lungs_is_empty() -> None:
    image, _ = lungs_and_image(256, 256)
    model = model_raising(image, lungs_and_image(256, 256)[1], "left_middle", 3.0)
    heat = model.zone_map(image, np.zeros((128, 128), dtype=np.float32))
    assert heat.shape == (256, 256)
    assert not heat.any()
