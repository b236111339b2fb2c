"""The lung gate: the plain-array boosted trees against scikit-learn, the view features
of synthetic pictures, the feature names, and loading a gate folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import GradientBoostingClassifier

from covidcxr.errors import MetadataError
from covidcxr.models import lung_gate, lungs
from covidcxr.models.abnormality import FITTED_BEFORE_PINNING
from covidcxr.models.lung_gate import (
    CLASSES,
    FEATURE_NAMES,
    FORMAT,
    VIEW_FEATURES,
    BoostedTrees,
    LungGate,
    Tree,
    view_features,
)


def fitted(
    classes: int, *, subsample: float = 1.0, max_depth: int = 2, features: int = 6, seed: int = 0
) -> tuple[GradientBoostingClassifier, np.ndarray]:
    """A small ``init="zero"`` classifier fitted on random rows, and fresh rows to score."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40 * classes, features))
    y = np.arange(len(x)) % classes
    x[:, 0] += y  # some signal, so that the trees differ between classes
    model = GradientBoostingClassifier(
        init="zero",
        n_estimators=12,
        learning_rate=0.3,
        subsample=subsample,
        max_depth=max_depth,
        random_state=seed,
    ).fit(x, y)
    return model, rng.normal(size=(300, features)) * 1.5


def split_nodes(model: GradientBoostingClassifier) -> list[tuple[int, float]]:
    """(feature, threshold) of every split node of every tree."""
    return [
        (int(est.tree_.feature[node]), float(est.tree_.threshold[node]))
        for round_estimators in model.estimators_
        for est in round_estimators
        for node in np.flatnonzero(est.tree_.children_left >= 0)
    ]


# --- trees: scikit-learn's rule, in plain arrays -----------------------------------------


@pytest.mark.parametrize("classes", [3, 4, 5])
@pytest.mark.parametrize("subsample", [1.0, 0.6])
@pytest.mark.parametrize("max_depth", [1, 4])
def test_from_sklearn_reproduces_predict_proba(
    classes: int, subsample: float, max_depth: int
) -> None:
    model, rows = fitted(classes, subsample=subsample, max_depth=max_depth, seed=classes)
    trees = BoostedTrees.from_sklearn(model)
    assert len(trees.trees) == model.n_estimators_
    assert {len(r) for r in trees.trees} == {classes}
    got = trees.predict_proba(rows)
    assert got.shape == (len(rows), classes)
    np.testing.assert_allclose(got, model.predict_proba(rows), rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_one_row_is_scored_as_a_row() -> None:
    model, rows = fitted(3)
    trees = BoostedTrees.from_sklearn(model)
    one = trees.predict_proba(rows[0])
    assert one.shape == (1, 3)
    np.testing.assert_array_equal(one[0], trees.predict_proba(rows)[0])


@pytest.mark.parametrize("classes", [3, 5])
def test_json_round_trip_gives_identical_probabilities(classes: int) -> None:
    model, rows = fitted(classes, subsample=0.7, max_depth=3)
    trees = BoostedTrees.from_sklearn(model)
    again = BoostedTrees.from_dict(json.loads(json.dumps(trees.as_dict())))
    assert again.learning_rate == trees.learning_rate
    np.testing.assert_array_equal(again.predict_proba(rows), trees.predict_proba(rows))


def test_from_sklearn_refuses_the_default_initial_estimator() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 3)), np.arange(60) % 3
    model = GradientBoostingClassifier(n_estimators=3, random_state=0).fit(x, y)
    with pytest.raises(ValueError, match="init='zero'"):
        BoostedTrees.from_sklearn(model)


def test_from_sklearn_refuses_an_estimator_as_init() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 3)), np.arange(60) % 3
    model = GradientBoostingClassifier(
        init=DummyClassifier(strategy="prior"), n_estimators=3, random_state=0
    ).fit(x, y)
    with pytest.raises(ValueError, match="init='zero'"):
        BoostedTrees.from_sklearn(model)


def test_from_sklearn_refuses_two_classes() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 3)), np.arange(60) % 2
    model = GradientBoostingClassifier(init="zero", n_estimators=3, random_state=0).fit(x, y)
    with pytest.raises(ValueError, match="three or more classes"):
        BoostedTrees.from_sklearn(model)


def stump(threshold: float) -> Tree:
    """Root splits feature 1 at ``threshold``: left leaf -1, right leaf +1."""
    return Tree(
        left=np.array([1, -1, -1]),
        right=np.array([2, -1, -1]),
        feature=np.array([1, -2, -2]),
        threshold=np.array([threshold, -2.0, -2.0]),
        value=np.array([0.0, -1.0, 1.0]),
    )


def test_a_row_exactly_on_the_threshold_goes_left() -> None:
    tree = stump(0.25)
    x = np.array([[9.0, 0.25], [9.0, np.nextafter(0.25, 1.0)], [9.0, -5.0]])
    np.testing.assert_array_equal(tree.predict(x), [-1.0, 1.0, -1.0])


def test_a_leaf_root_gives_its_value_to_every_row() -> None:
    leaf = Tree(np.array([-1]), np.array([-1]), np.array([-2]), np.array([-2.0]), np.array([0.75]))
    np.testing.assert_array_equal(leaf.predict(np.zeros((4, 2))), [0.75] * 4)
    assert leaf.predict(np.zeros((0, 2))).shape == (0,)


def test_rows_on_sklearn_thresholds_of_whole_numbers_go_left_as_in_sklearn() -> None:
    """Whole-number features give thresholds at x.5, which float32 holds exactly."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, size=(150, 3)).astype(np.float64)
    y = (x[:, 0] + rng.integers(0, 2, size=150)).astype(np.int64) % 3
    model = GradientBoostingClassifier(
        init="zero", n_estimators=6, max_depth=2, random_state=0
    ).fit(x, y)
    trees = BoostedTrees.from_sklearn(model)
    nodes = split_nodes(model)
    assert {t % 1 for _, t in nodes} == {0.5}
    rows = np.repeat(x[:1], len(nodes), axis=0)
    for i, (feature, threshold) in enumerate(nodes):
        rows[i, feature] = threshold
    np.testing.assert_allclose(trees.predict_proba(rows), model.predict_proba(rows), atol=1e-12)


def test_rows_on_any_sklearn_threshold_go_the_same_way_as_in_sklearn() -> None:
    model, rows = fitted(3, max_depth=2)
    trees = BoostedTrees.from_sklearn(model)
    nodes = split_nodes(model)
    on = np.repeat(rows[:1], len(nodes), axis=0)
    for i, (feature, threshold) in enumerate(nodes):
        on[i, feature] = threshold
    np.testing.assert_allclose(trees.predict_proba(on), model.predict_proba(on), atol=1e-10)


# --- view features -----------------------------------------------------------------------


def frontal_chest(height: int = 160, width: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A bright body with two dark lung ellipses side by side, and the lungs as the
    probability map."""
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
    pixels = np.clip(picture, 0, 255).astype(np.uint8)
    return np.where(lungs, 0.95, 0.02).astype(np.float32), pixels


def named(values: np.ndarray) -> dict[str, float]:
    assert values.shape == (len(VIEW_FEATURES),)
    return dict(zip(VIEW_FEATURES, values.tolist(), strict=True))


def test_a_frontal_chest_has_two_balanced_dark_lungs() -> None:
    probability, pixels = frontal_chest()
    got = named(view_features(probability, pixels))
    assert np.isfinite(list(got.values())).all()
    assert got["lung_components"] == 2
    assert got["left_right_balance"] == pytest.approx(1.0, abs=0.05)
    assert got["lung_darkness"] > 0
    assert 0.1 < got["lung_fraction"] < 0.5
    assert got["lung_probability_in_lung"] == pytest.approx(0.95)
    assert got["lung_centre_x"] == pytest.approx(0.5, abs=0.02)
    assert got["lung_centre_y"] == pytest.approx(0.5, abs=0.02)
    assert got["lung_height"] == pytest.approx(0.6, abs=0.03)
    assert got["lung_width"] == pytest.approx(0.68, abs=0.03)
    assert got["lung_tall"] == pytest.approx(got["lung_height"] / got["lung_width"])
    assert got["aspect"] == pytest.approx(200 / 160)
    assert got["mirror_correlation"] > 0.9


def test_the_negative_of_a_frontal_chest_has_bright_lungs() -> None:
    probability, pixels = frontal_chest()
    image = named(view_features(probability, pixels))
    negative = named(view_features(probability, 255 - pixels))
    assert negative["lung_darkness"] < 0
    assert negative["lung_darkness"] == pytest.approx(-image["lung_darkness"])
    assert negative["grey_p50"] == pytest.approx(1 - image["grey_p50"], abs=1 / 255)
    # the lung measures depend on the probability only
    for name in ("lung_fraction", "lung_components", "left_right_balance", "lung_tall"):
        assert negative[name] == image[name]


def test_one_lung_is_one_component_with_no_balance() -> None:
    probability, pixels = frontal_chest()
    probability[:, probability.shape[1] // 2 :] = 0.0
    got = named(view_features(probability, pixels))
    assert got["lung_components"] == 1
    assert got["left_right_balance"] == 0.0


def test_an_empty_probability_map_gives_no_lung_and_no_nan() -> None:
    _, pixels = frontal_chest()
    got = named(view_features(np.zeros(pixels.shape, dtype=np.float32), pixels))
    assert np.isfinite(list(got.values())).all()
    assert got["lung_fraction"] == 0.0
    assert got["lung_components"] == 0.0
    assert got["lung_probability_in_lung"] == 0.0
    assert got["lung_darkness"] == 0.0
    assert got["lung_confidence"] == 1.0


@pytest.mark.parametrize("grey", [0, 128, 255])
@pytest.mark.parametrize("lung_probability", [0.0, 1.0])
def test_a_constant_image_gives_no_nan(grey: int, lung_probability: float) -> None:
    pixels = np.full((64, 48), grey, dtype=np.uint8)
    got = view_features(np.full(pixels.shape, lung_probability), pixels)
    assert got.shape == (len(VIEW_FEATURES),)
    assert np.isfinite(got).all()
    assert named(got)["mirror_correlation"] == 1.0
    assert named(got)["lung_fraction"] == lung_probability


@pytest.mark.parametrize(
    ("probability_shape", "pixels_shape"),
    [((10, 12), (12, 10)), ((10, 12), (10, 13)), ((0, 0), (0, 0)), ((0, 5), (0, 5)), ((7,), (7,))],
)
def test_view_features_refuses_mismatched_empty_or_flat_arrays(
    probability_shape: tuple[int, ...], pixels_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="must be the same non-empty 2-D shape"):
        view_features(np.zeros(probability_shape), np.zeros(pixels_shape, dtype=np.uint8))


def test_a_view_one_pixel_high_gives_finite_features() -> None:
    pixels = np.arange(50, dtype=np.uint8)[None]
    got = view_features(np.zeros(pixels.shape), pixels)
    assert np.isfinite(got).all()


def test_feature_names_are_the_image_then_the_negative_view() -> None:
    n = len(VIEW_FEATURES)
    assert len(FEATURE_NAMES) == 2 * n
    assert FEATURE_NAMES[:n] == tuple(f"image_{v}" for v in VIEW_FEATURES)
    assert FEATURE_NAMES[n:] == tuple(f"negative_{v}" for v in VIEW_FEATURES)
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert len(set(VIEW_FEATURES)) == len(VIEW_FEATURES)


# --- with the segmenter ------------------------------------------------------------------


def odd_aspect_chest() -> Image.Image:
    """A 300 x 180 (width x height) synthetic chest."""
    _, pixels = frontal_chest(height=180, width=300)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def segmenter() -> Any:
    pytest.importorskip("torch")
    from covidcxr.models.lungs import LungSegmenter

    return LungSegmenter.load()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_features_of_an_odd_aspect_image_are_finite(segmenter: Any, mode: str) -> None:
    values = lung_gate.features(segmenter, odd_aspect_chest().convert(mode))
    assert values.shape == (len(FEATURE_NAMES),)
    assert values.dtype == np.float64
    assert np.isfinite(values).all()
    got = dict(zip(FEATURE_NAMES, values.tolist(), strict=True))
    assert got["image_aspect"] == pytest.approx(300 / 180, abs=0.02)
    assert got["negative_aspect"] == got["image_aspect"]


def test_features_of_a_thin_strip_are_finite(segmenter: Any) -> None:
    strip = Image.fromarray(np.tile(np.arange(250, dtype=np.uint8), (5, 4)))
    assert strip.size == (1000, 5)
    assert np.isfinite(lung_gate.features(segmenter, strip)).all()


# --- loading a gate folder ---------------------------------------------------------------


def write_gate(folder: Path, **card_changes: Any) -> Path:
    """A gate folder with a tiny 5-class classifier on random 56-feature rows."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(100, len(FEATURE_NAMES)))
    y = np.arange(100) % len(CLASSES)
    model = GradientBoostingClassifier(
        init="zero", n_estimators=4, max_depth=2, random_state=0
    ).fit(x, y)
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps(BoostedTrees.from_sklearn(model).as_dict()).encode()
    (folder / "trees.json").write_bytes(data)
    card = {
        "format": FORMAT,
        "gate_id": "gate-test",
        "threshold": 0.5,
        "trees_sha256": hashlib.sha256(data).hexdigest(),
        "segmenter": dict(FITTED_BEFORE_PINNING),
        **card_changes,
    }
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


@pytest.mark.parametrize("missing", ["model.json", "trees.json"])
def test_load_names_a_missing_file(tmp_path: Path, missing: str) -> None:
    folder = write_gate(tmp_path / "gate")
    (folder / missing).unlink()
    with pytest.raises(MetadataError, match=rf"{missing}'? is missing"):
        LungGate.load(folder)


def test_load_of_an_empty_folder_names_model_json(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=r"model\.json'? is missing"):
        LungGate.load(tmp_path)


@pytest.mark.parametrize("fmt", ["covidcxr-lung-gate/2", None])
def test_load_refuses_another_format(tmp_path: Path, fmt: str | None) -> None:
    folder = write_gate(tmp_path / "gate", format=fmt)
    with pytest.raises(MetadataError, match=f"has format {fmt!r}"):
        LungGate.load(folder)


def test_load_refuses_tampered_trees(tmp_path: Path) -> None:
    folder = write_gate(tmp_path / "gate")
    trees = json.loads((folder / "trees.json").read_text(encoding="utf-8"))
    trees["learning_rate"] = 5.0
    (folder / "trees.json").write_text(json.dumps(trees), encoding="utf-8")
    with pytest.raises(MetadataError, match=r"trees\.json'? has sha256 .* but model\.json"):
        LungGate.load(folder)


def test_load_refuses_a_card_without_a_digest(tmp_path: Path) -> None:
    folder = write_gate(tmp_path / "gate", trees_sha256=None)
    with pytest.raises(MetadataError, match="sha256"):
        LungGate.load(folder)


def test_load_names_a_model_json_that_is_not_json(tmp_path: Path) -> None:
    folder = write_gate(tmp_path / "gate")
    (folder / "model.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(MetadataError, match=r"model\.json"):
        LungGate.load(folder)


@pytest.mark.parametrize(
    ("segmenter", "reason"),
    [
        (None, "must name the lung segmenter it was fitted on"),
        ({"model_id": "lungs-unet-v1"}, "must name the lung segmenter it was fitted on"),
        (
            {"model_id": "lungs-unet-v9", "weights_sha256": "ab" * 32},
            "'lungs-unet-v9', not shipped",
        ),
        ({"model_id": "../lungs-unet-v1", "weights_sha256": "ab" * 32}, "not shipped"),
        (
            {"model_id": "lungs-unet-v1", "weights_sha256": "ab" * 32},
            r"fitted on lungs-unet-v1 with weights sha256 abababababab\.\.\., but the shipped",
        ),
    ],
)
def test_load_refuses_a_gate_without_its_own_segmenter(
    tmp_path: Path, segmenter: Any, reason: str
) -> None:
    pytest.importorskip("onnxruntime")
    folder = write_gate(tmp_path / "gate", segmenter=segmenter)
    with pytest.raises(MetadataError, match=rf"LungGate.load: .*gate: .*{reason}"):
        LungGate.load(folder, backend="onnx")


def test_a_gate_runs_on_the_segmenter_it_names_not_the_default(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    gate = LungGate.load(write_gate(tmp_path / "gate"), backend="onnx")
    assert gate.segmenter.card["model_id"] == FITTED_BEFORE_PINNING["model_id"]
    assert gate.segmenter.card["model_id"] != lungs.MODEL_ID


def test_a_good_folder_loads_and_scores_an_image(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    gate = LungGate.load(write_gate(tmp_path / "gate"))
    assert gate.gate_id == "gate-test"
    assert gate.threshold == 0.5
    assert gate.card["format"] == FORMAT
    probabilities = gate.probabilities(odd_aspect_chest())
    assert probabilities.shape == (len(CLASSES),)
    assert np.isfinite(probabilities).all()
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12)
