"""Bundles written by training: files hashed and verified, the card rendered, the
network loaded back exactly."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from covidcxr.dataset.splits import Split
from covidcxr.errors import MetadataError
from covidcxr.models.bundle import load_bundle
from covidcxr.models.card import data_membership_sha256, render_card

torch = pytest.importorskip("torch")

from covidcxr.models.config import TrainConfig
from covidcxr.models.train import canonical_command
from covidcxr.models.trained import TrainedModel, build_network

CONFIG = TrainConfig(size=32, width=8, epochs=1)
LABELS = (
    "COVID-19",
    "Other viral pneumonia",
    "Bacterial pneumonia",
    "Fungal pneumonia",
    "No finding",
)


def _model(split: Split | None = None) -> TrainedModel:
    network = build_network(CONFIG, len(LABELS)).eval()
    return TrainedModel(
        network=network,
        config=CONFIG,
        findings=LABELS,
        finding_definitions={name: {"include": [name], "exclude": []} for name in LABELS},
        temperatures=(1.5, 1.0, 0.8, 1.0, 2.0),
        thresholds=(0.5, 0.2, 0.3, 0.1, 0.4),
        operating_point="Youden's J on the validation fold",
        severity_labels=("geographic_extent", "opacity"),
        severity_ranges=((0.0, 8.0), (0.0, 6.0)),
        severity_interval={"level": 0.9, "half_width": [1.5, 1.0], "method": "test"},
        provenance={"data": {"membership_sha256": "ab" * 32}, "seed": 0},
        split=split,
    )


def _split() -> Split:
    return Split(
        scheme="holdout",
        folds=("train", "val", "test"),
        seed=0,
        task={"name": "second-opinion", "kind": "multilabel", "labels": list(LABELS)},
        selection={"views": ["frontal"]},
        assignment={"s:1": "train", "s:2": "val", "s:3": "test"},
        excluded={},
        membership_sha256="cd" * 32,
        fractions=(0.7, 0.15, 0.15),
    )


def test_saved_bundle_loads_verifies_and_predicts_the_same(tmp_path: Path) -> None:
    model = _model(_split())
    command = canonical_command(CONFIG, model_id="tiny")
    bundle = model.save(tmp_path / "tiny", "tiny", {"command": command}, onnx=False)
    assert set(bundle.files) == {"weights.pt", "MODEL_CARD.md", "split.csv"}
    loaded = load_bundle(tmp_path / "tiny")
    assert loaded.files == bundle.files
    assert loaded.training["command"] == command
    assert loaded.training["split"]["file"] == "split.csv"
    assert loaded.thresholds == model.thresholds and loaded.temperatures == model.temperatures
    assert loaded.backbone == {"spec": "small", "width": 8, "channels": 64}
    assert loaded.gate.max_colourfulness == 0.2
    assert loaded.metrics == {}
    again = TrainedModel.from_bundle(loaded)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32), dtype=np.uint8)
    for key in ("findings", "severity", "severity_lower", "gate", "pooled"):
        np.testing.assert_allclose(again.predict(images)[key], model.predict(images)[key])
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging folder left


@pytest.mark.parametrize("name", ["weights.pt", "split.csv", "MODEL_CARD.md"])
def test_a_tampered_file_is_refused(tmp_path: Path, name: str) -> None:
    bundle = _model(_split()).save(tmp_path / "m", "m", onnx=False)
    file = bundle.path / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(MetadataError, match=f"{name} has sha256 .* damaged or altered"):
        load_bundle(bundle.path)
    load_bundle(bundle.path, verify=False)  # readable when asked not to check


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    bundle = _model().save(tmp_path / "m", "m", onnx=False)
    (bundle.path / "weights.pt").unlink()
    with pytest.raises(MetadataError, match=r"weights\.pt is missing"):
        load_bundle(bundle.path)


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    bundle = _model().save(tmp_path / "m", "m", onnx=False)
    doc = json.loads((bundle.path / "model.json").read_text())
    doc["backbone"]["width"] = 16
    (bundle.path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match="does not fit the network"):
        TrainedModel.from_bundle(load_bundle(bundle.path))


def test_saving_again_replaces_the_bundle(tmp_path: Path) -> None:
    first = _model().save(tmp_path / "m", "m", {"note": "first"}, onnx=False)
    second = _model().save(tmp_path / "m", "m", {"note": "second"}, onnx=False)
    assert load_bundle(tmp_path / "m").training["note"] == "second"
    assert first.path == second.path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_card_says_what_the_model_is_and_is_not(tmp_path: Path) -> None:
    bundle = _model(_split()).save(
        tmp_path / "m", "m", {"command": "covidcxr train --seed 0"}, onnx=False
    )
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: m")
    assert "Research use only, not a diagnosis" in card
    assert "Not evaluated" in card
    assert "ab" * 32 in card  # data version
    assert "covidcxr train --seed 0" in card
    for heading in ("Intended use", "Known failure modes", "How to reproduce", "Severity"):
        assert f"## {heading}" in card
    assert "Shortcuts" in card and "Children" in card and "external validation" in card
    with_metrics = bundle.__class__(**{**bundle.__dict__, "metrics": {"kfold": {"auroc": 0.8}}})
    assert '"auroc": 0.8' in render_card(with_metrics)
    assert "`predict` calls them all" in card  # no validation counts: taken at its word
    labels = bundle.findings
    thin = dataclasses.replace(
        bundle,
        training={
            "validation": {
                "positives": {label: 3 if label == labels[0] else 50 for label in labels},
                "negatives": dict.fromkeys(labels, 50),
            }
        },
    )
    assert (
        f"`predict` gives a probability but no call for {labels[0]} (3 validation positives, "
        "50 negatives)" in render_card(thin)
    )


def test_data_membership_hash_ignores_order_and_sees_labels() -> None:
    a = [("x" * 64, (1.0, math.nan)), ("y" * 64, "lateral_xray")]
    assert data_membership_sha256(a) == data_membership_sha256(list(reversed(a)))
    changed = [("x" * 64, (0.0, math.nan)), ("y" * 64, "lateral_xray")]
    assert data_membership_sha256(a) != data_membership_sha256(changed)


def test_the_shipped_default_model_loads_verifies_and_predicts() -> None:
    from covidcxr.models.bundle import SHIPPED_DIR

    if not (SHIPPED_DIR / "DEFAULT").is_file():
        pytest.skip("no shipped model in this checkout")
    bundle = load_bundle()  # the default, every file's hash checked
    assert bundle.path.parent == SHIPPED_DIR
    assert {"weights.pt", "model.onnx", "MODEL_CARD.md", "split.csv"} <= set(bundle.files)
    size_mb = sum((bundle.path / name).stat().st_size for name in bundle.files) / 1e6
    assert size_mb < 10
    assert bundle.training["command"].startswith("covidcxr train")
    assert len(bundle.training["data"]["membership_sha256"]) == 64
    assert bundle.severity_interval["level"] == 0.9
    model = TrainedModel.from_bundle(bundle)
    out = model.predict(np.full((1, bundle.input_size, bundle.input_size), 128, np.uint8))
    assert out["findings"].shape == (1, len(bundle.findings))
    assert np.all(np.isfinite(out["severity"]))
