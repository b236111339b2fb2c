"""Training: a tiny synthetic store trains in seconds, deterministically, into a bundle
that loads; the pieces (masked loss, calibration, thresholds, gate pictures, severity
ridge, bring-your-own backbone) each do what they claim."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import encode, upstream_row, write_metadata
from covidcxr.errors import MetadataError
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.models import gate_data, severity
from covidcxr.store.db import Store, open_store

torch = pytest.importorskip("torch")

from covidcxr.models import train
from covidcxr.models.bundle import GATE_CLASSES, load_bundle
from covidcxr.models.calibration import (
    binary_nll,
    fit_temperature,
    youden_threshold,
)
from covidcxr.models.config import TrainConfig
from covidcxr.models.loop import masked_bce
from covidcxr.models.pools import load_pixels
from covidcxr.models.sample_sets import findings_samples
from covidcxr.models.train import fit_on_indices, train_model
from covidcxr.models.trained import TrainedModel

TINY = TrainConfig(size=32, width=8, epochs=2, batch_size=8, severity_splits=3)

# (finding, how many patients); every patient gets two frontal images.
FINDINGS = [
    ("COVID-19", 10),
    ("SARS", 3),
    ("Streptococcus", 4),
    ("Pneumocystis", 3),
    ("No Finding", 4),
]


def _picture(seed: int, finding: str, size: int = 48) -> np.ndarray:
    """A noisy "chest" whose brightness pattern depends a little on the finding."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((x - 0.3) ** 2) + (y - 0.5) ** 2) / 0.03) + np.exp(
        -(((x - 0.7) ** 2) + (y - 0.5) ** 2) / 0.03
    )
    level = {"COVID-19": 0.6, "SARS": 0.4, "Streptococcus": 0.2, "No Finding": 0.0}.get(
        finding, 0.3
    )
    picture = (
        0.5
        - 0.4 * lungs
        + level * lungs * rng.uniform(0.5, 1.0)
        + rng.normal(0, 0.05, (size, size))
    )
    return (np.clip(picture, 0, 1) * 255).astype(np.uint8)


def make_collection(root: Path) -> Path:
    """24 patients, 48 frontal images, 3 laterals, 2 CT slices, 6 scored images."""
    (root / "images").mkdir(parents=True)
    rows = []
    images: dict[str, bytes] = {}
    scores = ["## scores,,", "filename,geographic_mean,opacity_mean"]
    masks = root / "annotations" / "lungVAE-masks"
    masks.mkdir(parents=True)
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[8:40, 4:20] = 255
    mask[8:40, 28:44] = 255
    patient = 0
    for finding, count in FINDINGS:
        for _ in range(count):
            patient += 1
            for day in (0, 4):
                name = f"p{patient}-d{day}.png"
                images[name] = encode(_picture(patient * 10 + day, finding))
                rows.append(
                    upstream_row(
                        patientid=str(patient),
                        offset=str(day),
                        finding=finding,
                        filename=name,
                        view="PA" if day == 0 else "AP",
                    )
                )
            if finding == "COVID-19" and patient <= 6:
                scores.append(f"p{patient}-d0.png,{patient * 1.1:.1f},{patient * 0.8:.1f}")
                (masks / f"p{patient}-d0_mask.png").write_bytes(encode(mask))
    for k in range(3):
        name = f"lateral{k}.png"
        images[name] = encode(_picture(900 + k, "COVID-19"))
        rows.append(upstream_row(patientid=str(100 + k), filename=name, view="L"))
    for k in range(2):
        name = f"ct{k}.png"
        images[name] = encode(_picture(950 + k, "COVID-19"))
        rows.append(
            upstream_row(patientid=str(200 + k), filename=name, view="Axial", modality="CT")
        )
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    write_metadata(root / "metadata.csv", rows)
    (root / "annotations" / "covid-severity-scores.csv").write_text(
        "\n".join(scores) + "\n", encoding="utf-8"
    )
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("train-store")
    source = make_collection(root / "covid-chestxray")
    with open_store(f"sqlite:///{root / 'store.sqlite'}", root / "data", create=True) as opened:
        ingest_source(source, opened, workers=1)
        yield opened


@pytest.fixture(scope="module")
def trained(store: Store) -> TrainedModel:
    return train_model(store, TINY)


def _state(model: TrainedModel) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.network.state_dict().items()}


# -- the whole path -----------------------------------------------------------------


def test_train_model_uses_the_holdout_split_and_holds_out_severity(
    trained: TrainedModel,
) -> None:
    data = trained.provenance["data"]
    assert trained.split is not None and trained.split.scheme == "holdout"
    # Six scored patients are held out of the network's training (and validation).
    assert data["excluded_patients"][train.HELD_OUT_SEVERITY] == 6
    assert data["findings_train"]["images"] + data["findings_val"]["images"] <= 48 - 12
    assert trained.provenance["severity"]["out_of_sample"] is True
    assert "protocol" in trained.provenance["severity"]
    assert len(trained.severity_interval["half_width"]) == 2
    assert trained.provenance["holdout_test"]["images"] > 0
    assert len(trained.provenance["history"]) == TINY.epochs
    assert trained.provenance["data"]["gate_train"]["lateral_xray"] >= 1


def test_predict_shapes_and_ranges(trained: TrainedModel) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32), dtype=np.uint8)
    out = trained.predict(images)
    assert out["findings"].shape == (5, 5)
    assert np.all((out["findings"] > 0) & (out["findings"] < 1))
    assert out["gate"].shape == (5, len(GATE_CLASSES))
    np.testing.assert_allclose(out["gate"].sum(axis=1), 1.0, rtol=1e-5)
    assert out["severity"].shape == (5, 2)
    assert np.all(out["severity"][:, 0] <= 8) and np.all(out["severity"] >= 0)
    assert np.all(out["severity_lower"] <= out["severity"])
    assert np.all(out["severity_upper"] >= out["severity"])
    assert out["pooled"].shape == (5, 64)
    assert out["positive"].dtype == bool
    with pytest.raises(ValueError, match="takes 32x32"):
        trained.predict(np.zeros((1, 40, 40), dtype=np.uint8))


def test_predict_accepts_dataset_items(trained: TrainedModel, store: Store, tmp_path: Path) -> None:
    from covidcxr.dataset.torch_dataset import CollectionDataset

    samples = findings_samples(store)
    dataset = CollectionDataset(samples, size=32, indices=[0, 1, 2], cache_dir=tmp_path)
    from_items = trained.predict(dataset)
    pixels = load_pixels(samples, [0, 1, 2], 32, tmp_path)
    np.testing.assert_allclose(from_items["findings"], trained.predict(pixels)["findings"])


def test_severity_head_carries_the_ridge(trained: TrainedModel) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    out = trained.predict(images)
    head = trained.network.heads.severity
    manual = out["pooled"] @ head.weight.detach().numpy()[:2].T + head.bias.detach().numpy()[:2]
    np.testing.assert_allclose(
        out["severity"], severity.clip_to_ranges(manual, trained.severity_ranges), atol=1e-4
    )


def test_same_seed_same_weights_other_seed_differs(store: Store, tmp_path: Path) -> None:
    samples = findings_samples(store)
    train_idx, val_idx = _patient_halves(samples)
    config = TrainConfig(size=32, width=8, epochs=1, batch_size=8)
    first = fit_on_indices(samples, train_idx, val_idx, config, cache_dir=tmp_path)
    torch.manual_seed(12345)  # the caller's global state must not matter
    second = fit_on_indices(samples, train_idx, val_idx, config, cache_dir=tmp_path)
    other = fit_on_indices(
        samples,
        train_idx,
        val_idx,
        TrainConfig(**{**config.as_dict(), "seed": 1, "sources": ("covid-chestxray",)}),
        cache_dir=tmp_path,
    )
    a, b, c = _state(first), _state(second), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert first.temperatures == second.temperatures


def _patient_halves(samples: Any) -> tuple[list[int], list[int]]:
    patients = sorted(set(samples.patients))
    val_patients = set(patients[::4])
    train_idx = [i for i, s in enumerate(samples.samples) if s.patient not in val_patients]
    val_idx = [i for i, s in enumerate(samples.samples) if s.patient in val_patients]
    return train_idx, val_idx


def test_fit_refuses_a_patient_on_both_sides(store: Store, tmp_path: Path) -> None:
    samples = findings_samples(store)
    with pytest.raises(MetadataError, match="both sides"):
        fit_on_indices(samples, [0, 1, 2], [1, 3], TINY, cache_dir=tmp_path)
    with pytest.raises(MetadataError, match="non-empty"):
        fit_on_indices(samples, [0, 1], [], TINY, cache_dir=tmp_path)


def test_train_model_refuses_a_kfold_split(store: Store) -> None:
    from covidcxr.dataset.splits import make_split

    samples = findings_samples(store)
    with store.read() as conn:
        split = make_split(samples, conn, scheme="kfold", folds=3)
    with pytest.raises(MetadataError, match="holdout"):
        train_model(store, TINY, split=split)


def test_train_model_refuses_unknown_sources(store: Store) -> None:
    config = TrainConfig(size=32, width=8, epochs=1, sources=("nowhere",))
    with pytest.raises(MetadataError, match="nowhere"):
        train_model(store, config)


def test_exclude_patients_also_removes_them_from_severity(store: Store) -> None:
    config = TrainConfig(size=32, width=8, epochs=1, batch_size=8, severity_splits=0)
    model = train_model(store, config, exclude_patients=["covid-chestxray:1"])
    excluded = model.provenance["data"]["excluded_patients"]
    assert excluded[train.HELD_OUT_GIVEN] == 1
    assert excluded[train.HELD_OUT_SEVERITY] == 5
    assert model.provenance["severity"]["images"] == 5


def test_config_is_checked_and_round_trips() -> None:
    with pytest.raises(MetadataError, match="size 8"):
        TrainConfig(size=8)
    with pytest.raises(MetadataError, match="device"):
        TrainConfig(device="tpu")
    config = TrainConfig(sources=("a", "b"), epochs=3)
    assert TrainConfig.from_dict(config.as_dict()) == config


# -- losses, calibration, thresholds ------------------------------------------------


def test_masked_bce_ignores_unknown_labels() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    unknown = torch.full((2, 2), math.nan)
    loss = masked_bce(logits, unknown, torch.tensor([3.0, 1.0]))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0
    labels = torch.tensor([[1.0, math.nan], [math.nan, 0.0]])
    expected = (
        torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(2.0), torch.tensor(1.0))
        + torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(3.0), torch.tensor(0.0))
    ) / 2
    assert float(masked_bce(logits.detach(), labels)) == pytest.approx(float(expected))


def test_temperature_scaling_lowers_nll_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, size=400)
    labels = (rng.random(400) < 1 / (1 + np.exp(-true_logits))).astype(float)
    labels[::17] = math.nan  # unknowns are ignored
    overconfident = 4.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert 3.0 < temperature < 5.5
    assert binary_nll(overconfident, labels, temperature) < binary_nll(overconfident, labels) - 0.1
    assert fit_temperature([1.0, 2.0], [1.0, 1.0]) == 1.0  # one class: nothing to fit
    assert fit_temperature([1.0], [math.nan]) == 1.0


def test_youden_threshold_separates_and_prefers_fewer_false_positives() -> None:
    threshold, j = youden_threshold([0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1])
    assert 0.3 < threshold < 0.7 and j == 1.0
    threshold, j = youden_threshold([0.1, 0.6, 0.4, 0.9], [0, 0, 1, 1])
    assert j == pytest.approx(0.5)
    assert threshold == pytest.approx(0.75)  # ties in J go to the higher threshold
    assert all(math.isnan(v) for v in youden_threshold([0.2, 0.4], [1, 1]))
    threshold, j = youden_threshold([0.1, 0.9], [1, 0])  # no cut beats calling none
    assert j == 0.0 and threshold == pytest.approx(0.9 + 1e-6)


def test_youden_threshold_is_the_best_cut_by_brute_force() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = np.round(rng.random(40), 1)  # ties
        labels = (rng.random(40) < 0.2 + 0.6 * scores).astype(float)
        threshold, j = youden_threshold(scores, labels)
        positive = labels >= 0.5

        def youden(
            cut: float, scores: np.ndarray = scores, positive: np.ndarray = positive
        ) -> float:
            called = scores >= cut
            return float(called[positive].mean() + (~called[~positive]).mean() - 1.0)

        assert youden(threshold) == pytest.approx(j)
        assert all(youden(cut) <= j + 1e-12 for cut in np.unique(scores))
        assert threshold not in set(scores)  # midway, never on a validation score


# -- gate pictures ------------------------------------------------------------------


def test_not_medical_images_are_deterministic_per_seed() -> None:
    first = gate_data.not_medical_images(12, 40, np.random.default_rng(7))
    again = gate_data.not_medical_images(12, 40, np.random.default_rng(7))
    other = gate_data.not_medical_images(12, 40, np.random.default_rng(8))
    assert first.shape == (12, 40, 40) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert all(first[i].std() > 0 for i in range(12))  # none is blank
    with pytest.raises(ValueError, match="unknown kind"):
        gate_data.not_medical_images(1, 40, np.random.default_rng(0), kinds=("photo",))
    with pytest.raises(ValueError, match="size"):
        gate_data.not_medical_images(1, 4, np.random.default_rng(0))


def test_invert_and_colourfulness() -> None:
    pixels = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(gate_data.invert(pixels), [[255, 155], [55, 0]])
    grey = np.stack([pixels] * 3, axis=-1)
    assert gate_data.colourfulness(grey) == 0.0
    assert gate_data.colourfulness(pixels) == 0.0
    rgb = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    assert gate_data.colourfulness(rgb) > 0.2
    with pytest.raises(ValueError, match="expected"):
        gate_data.colourfulness(np.zeros((4, 4, 2)))


# -- severity -------------------------------------------------------------------------


def test_ridge_recovers_a_planted_linear_relation() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, size=(120, 6))
    weights = np.array([[1.5, -2.0, 0, 0, 0.5, 0], [0, 1.0, 0, -1.0, 0, 0]])
    targets = features @ weights.T + np.array([4.0, 3.0]) + rng.normal(0, 0.05, size=(120, 2))
    model = severity.fit_ridge(features, targets, alpha=0.01)
    np.testing.assert_allclose(model.coef, weights, atol=0.02)
    np.testing.assert_allclose(model.intercept, [4.0, 3.0], atol=0.1)
    groups = [f"p{i // 2}" for i in range(120)]
    fit = severity.fit_severity(
        features, targets, groups, ranges=[(-100.0, 100.0)] * 2, rng=np.random.default_rng(1)
    )
    assert np.all(fit.half_width < 0.2)
    weight, _ = severity.severity_head_parameters(fit)
    assert weight.shape == (4, 6) and np.all(weight[2:] == 0)


def test_reference_protocol_beats_the_mean_on_signal_and_not_on_noise() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(60, 10))
    signal = np.clip(features[:, :2] @ np.array([[2.0, 1.0], [1.0, 0.5]]) + 4, 0, 6)
    groups = [f"p{i // 2}" for i in range(60)]
    ranges = [(0.0, 8.0), (0.0, 6.0)]
    result = severity.random_split_protocol(
        features, signal, groups, labels=("g", "o"), ranges=ranges, splits=5, rng=rng
    )
    assert all(m < 0.6 * b for m, b in zip(result.mae, result.baseline_mae, strict=True))
    noise = rng.uniform(0, 6, size=(60, 2))
    result = severity.random_split_protocol(
        features, noise, groups, labels=("g", "o"), ranges=ranges, splits=5, rng=rng
    )
    assert all(m > 0.9 * b for m, b in zip(result.mae, result.baseline_mae, strict=True))
    assert set(result.as_dict()) >= {"mae", "baseline_mae", "r2", "pearson_r"}


def test_group_folds_keep_groups_together() -> None:
    groups = ["a", "a", "b", "c", "c", "c", "d", "e"]
    folds = severity.group_folds(groups, 3, np.random.default_rng(0))
    seen = sorted(int(i) for fold in folds for i in fold)
    assert seen == list(range(len(groups)))
    for fold in folds:
        inside = {groups[int(i)] for i in fold}
        assert all(groups[j] not in inside for other in folds if other is not fold for j in other)
    with pytest.raises(ValueError, match="cannot fill"):
        severity.group_folds(["a", "a"], 2, np.random.default_rng(0))


def test_conformal_half_width_uses_the_finite_sample_rank() -> None:
    residuals = np.arange(1, 20, dtype=float)  # 19 values
    assert severity.conformal_half_width(residuals, 0.9)[0] == 18.0  # ceil(20 * 0.9) = 18th
    assert math.isinf(severity.conformal_half_width(residuals[:5], 0.9)[0])
    with pytest.raises(ValueError, match="level"):
        severity.conformal_half_width(residuals, 1.0)


def test_lung_zone_features() -> None:
    pixels = np.zeros((30, 30), dtype=np.uint8)
    pixels[:, 15:] = 255
    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[3:27, 2:12] = 1
    mask[3:27, 18:28] = 1
    features = severity.lung_zone_features(pixels, mask)
    assert features.shape == (2 * (3 * severity.LUNG_ZONES + 1),)
    assert features[0] == 0.0 and features[10] == 1.0  # right lung dark, left bright
    with pytest.raises(ValueError, match="same"):
        severity.lung_zone_features(pixels, mask[:10])


# -- bring your own backbone ------------------------------------------------------------


class _TinyBackbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, stride=4, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x / 1024.0))


# network.build_backbone loads TorchScript files with torch.jit.load, and the stand-in
# is made with torch.jit.script/save: torch deprecates all three in favour of
# torch.export, which cannot read a user's saved TorchScript backbone (2026-11).
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning")
def test_torchscript_backbone_trains_and_predicts(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    torch.jit.script(_TinyBackbone()).save(str(path))
    config = TrainConfig(
        size=32, epochs=1, batch_size=8, backbone=f"torchscript:{path}", severity_splits=0
    )
    samples = findings_samples(store)
    train_idx, val_idx = _patient_halves(samples)
    model = fit_on_indices(samples, train_idx, val_idx, config, cache_dir=tmp_path / "cache")
    out = model.predict(np.zeros((2, 32, 32), dtype=np.uint8))
    assert out["pooled"].shape == (2, 6)
    record = model.backbone_record()
    assert record["spec"] == f"torchscript:{path}" and len(record["sha256"]) == 64
    saved = model.save(tmp_path / "byo", "byo-test", {"command": "test"}, onnx=False)
    loaded = TrainedModel.from_bundle(saved.path)
    images = np.random.default_rng(3).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    np.testing.assert_allclose(
        loaded.predict(images)["findings"], model.predict(images)["findings"], rtol=1e-5
    )
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(MetadataError, match="changed since training"):
        TrainedModel.from_bundle(saved.path)
    path.unlink()
    with pytest.raises(MetadataError, match="is missing"):
        TrainedModel.from_bundle(saved.path)


@pytest.mark.slow
def test_xrv_densenet_backbone_from_a_random_state_dict(store: Store, tmp_path: Path) -> None:
    xrv = pytest.importorskip("torchxrayvision")
    weights = tmp_path / "densenet.pt"
    torch.save(xrv.models.DenseNet(weights=None).state_dict(), weights)
    config = TrainConfig(
        size=64,
        epochs=1,
        batch_size=4,
        backbone=f"xrv-densenet121:{weights}",
        freeze_backbone=True,
        severity_splits=0,
    )
    samples = findings_samples(store)
    train_idx, val_idx = _patient_halves(samples)
    model = fit_on_indices(samples, train_idx[:8], val_idx[:4], config, cache_dir=tmp_path)
    out = model.predict(np.zeros((1, 64, 64), dtype=np.uint8))
    assert out["pooled"].shape == (1, 1024)
    frozen = xrv.models.DenseNet(weights=None)
    frozen.load_state_dict(torch.load(weights, weights_only=True))
    first_conv = model.network.backbone.features.conv0.weight  # type: ignore[union-attr]
    assert torch.equal(first_conv, frozen.features.conv0.weight)  # frozen: unchanged


# -- the command line -------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_writes_a_bundle_and_prints_the_command(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from covidcxr.cli import main

    url = str(store.url)
    out = tmp_path / "bundle"
    argv = [
        "train", "--size", "32", "--width", "8", "--epochs", "1", "--seed", "3",
        "--batch-size", "8", "--db", url, "--data-dir", str(store.data_dir),
        "--out", str(out), "--model-id", "cli-test",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote model cli-test to {out}" in printed
    assert "reproduce with: covidcxr train --size 32 --epochs 1 --width 8" in printed
    assert "--seed 3" in printed and "COVID-19" in printed
    bundle = load_bundle(out)
    assert bundle.training["command"].startswith("covidcxr train --size 32")
    assert {"weights.pt", "model.onnx", "MODEL_CARD.md", "split.csv"} <= set(bundle.files)
    assert main(argv) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


# -- cross-validation entry point -------------------------------------------------------


def test_inner_split_keeps_patients_together_and_finds_rare_positives(store: Store) -> None:
    samples = findings_samples(store)
    indices = list(range(len(samples.samples)))
    inner_train, inner_val = train.inner_split(samples, indices, seed=0)
    assert sorted(inner_train + inner_val) == indices
    train_patients = {samples.samples[i].patient for i in inner_train}
    assert not train_patients & {samples.samples[i].patient for i in inner_val}
    val_labels = np.array([samples.samples[i].labels for i in inner_val])
    assert np.all(np.nansum(val_labels, axis=0) >= 1)  # every label has a positive
    assert train.inner_split(samples, indices, seed=0) == (inner_train, inner_val)
    with pytest.raises(MetadataError, match="need two"):
        train.inner_split(samples, [0, 1], seed=0)


def test_fit_with_inner_split_serves_evaluation(store: Store, tmp_path: Path) -> None:
    samples = findings_samples(store)
    outer_train = list(range(0, len(samples.samples) - 8))
    config = TrainConfig(size=32, width=8, epochs=1, batch_size=8)
    model = train.fit_with_inner_split(
        samples, outer_train, seed=4, config=config, cache_dir=tmp_path
    )
    assert model.config.seed == 4 and model.input_size == 32
    images = np.zeros((3, 1, 32, 32), dtype=np.float32)  # as CollectionDataset gives them
    assert model.predict_findings(images).shape == (3, 5)
    assert model.features(images).shape == (3, 64)
    assert len(model.thresholds) == 5
    seen = model.provenance["data"]
    assert seen["findings_train"]["images"] + seen["findings_val"]["images"] == len(outer_train)


@pytest.mark.gpu
def test_training_on_cuda_predicts_like_the_cpu_copy(store: Store, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    samples = findings_samples(store)
    train_idx, val_idx = _patient_halves(samples)
    config = TrainConfig(size=32, width=8, epochs=1, batch_size=8, device="cuda")
    model = fit_on_indices(samples, train_idx, val_idx, config, cache_dir=tmp_path)
    assert model.device.type == "cuda"
    images = np.random.default_rng(5).integers(0, 256, size=(4, 32, 32), dtype=np.uint8)
    on_gpu = model.predict(images)
    saved = model.save(tmp_path / "gpu", "gpu", onnx=False)
    on_cpu = TrainedModel.from_bundle(saved.path).predict(images)
    np.testing.assert_allclose(on_gpu["findings"], on_cpu["findings"], atol=1e-4)
