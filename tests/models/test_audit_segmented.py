"""The shortcut audit on images without a reference lung mask: the segmenter's mask is
used, reference masks still win, and every output counts which was which."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import test_evaluate
from numpy.typing import NDArray

from covidcxr.dataset.samples import build_samples
from covidcxr.dataset.tasks import get_task
from covidcxr.errors import MissingExtraError
from covidcxr.models import audit_masks
from covidcxr.models.audit import AuditResult, shortcut_audit
from covidcxr.models.audit_masks import LungMasks, MaskProvenance, shipped_lung_masks
from covidcxr.models.evaluate import evaluate
from covidcxr.models.lungs import MODEL_ID
from covidcxr.report import validation
from covidcxr.report.labels import Case
from covidcxr.report.validation import ValidationRequest
from covidcxr.serialise import from_dict, to_dict
from covidcxr.store.db import Store

# The synthetic two-source store of test_evaluate (alpha has some reference masks,
# beta none) and its fake fit.
synthetic = test_evaluate.synthetic
store = test_evaluate.store
FakeFit = test_evaluate.FakeFit

SIDE = 48
LABELS = ("COVID-19", "No finding")


def _lung_mask(side: int = SIDE) -> NDArray[np.uint8]:
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[side // 4 : side * 5 // 6, side // 8 : side * 5 // 12] = 1
    mask[side // 4 : side * 5 // 6, side * 7 // 12 : side * 7 // 8] = 1
    return mask


class StubSegmenter:
    """Gives a fixed mask (default: :func:`_lung_mask` at the image's side) and records
    the images it was asked to segment."""

    def __init__(self, mask: NDArray[np.uint8] | None = None) -> None:
        self.mask = mask
        self.calls: list[NDArray[np.uint8]] = []

    def segment(self, image: NDArray[np.uint8]) -> NDArray[np.uint8]:
        self.calls.append(image)
        return _lung_mask(len(image)) if self.mask is None else self.mask


def _synthetic(n: int = 40, seed: int = 0) -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
    """Positives have brighter lungs; labels: N x 2 (the second has one class)."""
    rng = np.random.default_rng(seed)
    positive = np.arange(n) % 2 == 1
    images = np.full((n, SIDE, SIDE), 60, dtype=np.uint8)
    lungs = _lung_mask().astype(bool)
    for i in range(n):
        level = (180 if positive[i] else 120) + rng.integers(-25, 26, int(lungs.sum()))
        images[i][lungs] = level.astype(np.uint8)
    return images, np.stack([positive.astype(float), np.zeros(n)], axis=1)


def _model(images: NDArray[np.float32]) -> NDArray[np.float64]:
    score = images[:, 0, 16:36, 8:40].astype(np.float64).mean(axis=(1, 2)) / 256.0
    p = 1.0 / (1.0 + np.exp(-score))
    return np.stack([p, 1.0 - p], axis=1)


def _references(n: int, with_reference: int) -> NDArray[np.uint8]:
    """The first ``with_reference`` images have a reference mask, the rest none."""
    masks = np.zeros((n, SIDE, SIDE), dtype=np.uint8)
    masks[:with_reference] = _lung_mask()
    return masks


def _audit(masks: NDArray[np.uint8], lung_masks: LungMasks | None) -> AuditResult:
    images, labels = _synthetic(len(masks))
    groups = np.arange(len(masks))
    return shortcut_audit(
        _model, images, masks, LABELS, labels, groups, lung_masks=lung_masks, n_resamples=100
    )


# --- one image: mask and provenance ------------------------------------------------------


def test_an_image_without_a_reference_mask_gets_the_segmenters() -> None:
    stub = StubSegmenter(_lung_mask())
    image = np.full((SIDE, SIDE), 90, dtype=np.uint8)
    mask, provenance = LungMasks(stub, "stub-v0").mask_for(image, None)
    assert provenance == "segmented"
    assert mask is not None and np.array_equal(mask, _lung_mask())
    assert len(stub.calls) == 1 and stub.calls[0] is image
    empty = np.zeros((SIDE, SIDE), dtype=np.uint8)
    assert LungMasks(stub, "stub-v0").mask_for(image, empty)[1] == "segmented"


def test_the_reference_mask_wins_over_the_segmenter() -> None:
    stub = StubSegmenter(np.ones((SIDE, SIDE), dtype=np.uint8))
    reference = _lung_mask() * 255  # any nonzero grey level is lung
    image = np.full((SIDE, SIDE), 90, dtype=np.uint8)
    mask, provenance = LungMasks(stub, "stub-v0").mask_for(image, reference)
    assert provenance == "reference"
    assert mask is not None and np.array_equal(mask, _lung_mask())
    assert stub.calls == []


def test_no_segmenter_or_no_lung_found_gives_no_mask() -> None:
    image = np.full((SIDE, SIDE), 90, dtype=np.uint8)
    assert LungMasks().mask_for(image, None) == (None, "none")
    blind = StubSegmenter(np.zeros((SIDE, SIDE), dtype=np.uint8))
    assert LungMasks(blind, "stub-v0").mask_for(image, None) == (None, "none")


def test_a_segmenter_mask_of_the_wrong_size_is_refused() -> None:
    wrong = StubSegmenter(np.ones((SIDE, SIDE + 1), dtype=np.uint8))
    image = np.full((SIDE, SIDE), 90, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"segmenter 'stub-v0' gave a mask of shape \(48, 49\)"):
        LungMasks(wrong, "stub-v0").mask_for(image, None)


class MiddleThird:
    """Marks the middle third of the columns of whatever it is given (so its answer
    depends on the whole picture it sees)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def segment(self, image: NDArray[np.uint8]) -> NDArray[np.uint8]:
        self.shapes.append(image.shape)
        mask = np.zeros(image.shape, dtype=np.uint8)
        width = image.shape[1]
        mask[:, width // 3 : 2 * width // 3] = 1
        return mask


def test_with_its_original_the_whole_image_is_segmented_and_cut_as_the_input(
    tmp_path: Path,
) -> None:
    from PIL import Image

    from covidcxr.dataset.loading import preprocess_image

    original = tmp_path / "wide.png"
    Image.fromarray(np.full((100, 300), 90, dtype=np.uint8)).save(original)
    image = preprocess_image(Image.open(original), SIDE, crop="center")
    stub = MiddleThird()
    mask, provenance = LungMasks(stub, "stub-v0").mask_for(image, None, original)
    assert stub.shapes == [(100, 300)]  # the whole image, as the segmenter was trained
    assert provenance == "segmented"
    assert mask is not None and mask.all()  # its middle third is the centre square
    alone, _ = LungMasks(stub, "stub-v0").mask_for(image, None)
    assert alone is not None and not alone.all()  # the square alone: a band of it
    masks, found = LungMasks(stub, "stub-v0").masks_for(
        np.stack([image, image]), np.zeros((2, SIDE, SIDE)), [original, None]
    )
    assert np.array_equal(masks[0], mask) and np.array_equal(masks[1], alone)
    assert list(found) == ["segmented", "segmented"]


# --- the audit: counts and text ------------------------------------------------------------


def test_the_audit_covers_images_without_reference_masks_and_counts_them() -> None:
    stub = StubSegmenter(_lung_mask())
    result = _audit(_references(40, 15), LungMasks(stub, "stub-v0", 0.9))
    assert result.n_images == 40
    assert result.n_without_mask == 0
    assert result.masks == MaskProvenance(15, 25, "stub-v0", 0.9, "")
    assert len(stub.calls) == 25  # only the images without a reference mask
    assert "lung masks: 15 reference, 25 segmented by stub-v0, held-out Dice 0.900" in (
        result.verdict
    )
    assert result.labels[0].auc["no_lungs"].defined


def test_without_a_segmenter_the_audit_is_as_before_and_says_why() -> None:
    why = "no lung segmenter: torch is not installed"
    result = _audit(_references(40, 20), LungMasks(note=why))
    assert result.n_images == 20
    assert result.n_without_mask == 20
    assert result.masks == MaskProvenance(20, 0, None, None, why)
    assert f"20 reference, 0 segmented ({why}); 20 image(s) without a lung mask" in (result.verdict)


def test_images_the_segmenter_finds_no_lung_in_are_counted_out() -> None:
    blind = StubSegmenter(np.zeros((SIDE, SIDE), dtype=np.uint8))
    result = _audit(_references(40, 30), LungMasks(blind, "stub-v0"))
    assert (result.n_images, result.n_without_mask) == (30, 10)
    assert result.masks is not None and result.masks.n_segmented == 0


def test_the_provenance_survives_serialisation_and_old_results_still_load() -> None:
    result = _audit(_references(40, 15), LungMasks(StubSegmenter(_lung_mask()), "stub-v0"))
    back = from_dict(AuditResult, to_dict(result))
    assert back.masks == result.masks
    assert back.verdict == result.verdict
    old = {k: v for k, v in to_dict(result).items() if k != "masks"}
    assert from_dict(AuditResult, old).masks is None
    assert "lung masks" not in from_dict(AuditResult, old).verdict


def test_shipped_lung_masks_without_the_runtime_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from covidcxr.models import lungs

    def missing(*_args: Any, **_kwargs: Any) -> None:
        raise MissingExtraError("torch or onnxruntime", "runtime")

    monkeypatch.setattr(lungs.LungSegmenter, "load", missing)
    masks = shipped_lung_masks()
    assert masks.segmenter is None
    assert masks.note.startswith("no lung segmenter: torch or onnxruntime is not installed")
    assert masks.mask_for(np.zeros((4, 4), np.uint8), None)[1] == audit_masks.NONE


# --- evaluate -----------------------------------------------------------------------------

EVALUATE: dict[str, Any] = {"folds": 2, "repeats": 1, "schemes": ("kfold",), "severity": False,
            "n_resamples": 50}  # fmt: skip


def _reference_count(store: Store) -> tuple[int, int]:
    """Images of the selection with and without a reference lung mask."""
    samples = build_samples(store, get_task("second-opinion")).samples
    with_mask = sum(1 for s in samples if s.mask_sha256)
    return with_mask, len(samples) - with_mask


def test_evaluate_audits_every_source_with_segmented_masks(store: Store) -> None:
    stub = StubSegmenter()
    report = evaluate(store, FakeFit(), lung_masks=LungMasks(stub, "stub-v0"), **EVALUATE)
    audit = report.audit
    assert audit is not None and audit.masks is not None
    with_mask, without = _reference_count(store)
    assert (audit.masks.n_reference, audit.masks.n_segmented) == (with_mask, without)
    assert len(stub.calls) == without  # reference masks win: never segmented
    assert audit.n_images == with_mask + without and audit.n_without_mask == 0
    assert not any("no lung masks" in line for line in report.not_computable)
    document = report.as_dict()["audit"]
    assert document["masks"]["segmenter"] == "stub-v0"
    assert f"{with_mask} reference, {without} segmented by stub-v0" in document["verdict"]


def test_evaluate_names_a_segmenter_that_finds_no_lung(store: Store) -> None:
    blind = StubSegmenter(np.zeros((32, 32), dtype=np.uint8))
    report = evaluate(store, FakeFit(), lung_masks=LungMasks(blind, "stub-v0"), **EVALUATE)
    assert any(
        "no lung masks for source(s) beta (no reference mask, and stub-v0 found no lung" in line
        for line in report.not_computable
    )


def test_evaluate_uses_the_shipped_segmenter_by_default(store: Store) -> None:
    pytest.importorskip("torch")
    report = evaluate(store, FakeFit(), **EVALUATE)
    audit = report.audit
    assert audit is not None and audit.masks is not None
    assert audit.masks.segmenter == MODEL_ID
    assert audit.masks.n_reference == _reference_count(store)[0]
    assert audit.masks.n_segmented + audit.n_without_mask == _reference_count(store)[1]
    dice = shipped_lung_masks().segmenter_dice
    assert f"{MODEL_ID}, held-out Dice {dice:.3f}" in audit.verdict


# --- validate-model ------------------------------------------------------------------------


def _fake_engine() -> Any:
    """Just what the image audit uses of an InferenceEngine: the bundle and forward."""

    def forward(batch: NDArray[np.float32]) -> Any:
        score = batch[:, 0, 16:36, 8:40].astype(np.float64).mean(axis=(1, 2)) / 256.0
        return SimpleNamespace(findings=np.stack([score, -score], axis=1))

    bundle = SimpleNamespace(input_size=SIDE, findings=LABELS, temperatures=(1.0, 1.0))
    return SimpleNamespace(bundle=bundle, forward=forward)


def _site(tmp_path: Path, n: int = 30) -> tuple[Any, Path]:
    """PNG images of :func:`_synthetic`, reference masks for the first ten."""
    from PIL import Image

    images, labels = _synthetic(n)
    folder, masks = tmp_path / "images", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    cases, paths = [], []
    for i in range(n):
        paths.append(folder / f"x{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
        if i < 10:
            Image.fromarray(_lung_mask() * 255).save(masks / f"x{i}_mask.png")
        found = {LABELS[0]: float(labels[i, 0]), LABELS[1]: math.nan}
        cases.append(Case(f"x{i}.png", i + 2, found, "r", f"p{i}"))
    scored = validation._Scored(cases, paths, [], {}, [], [])
    return scored, masks


def test_validate_audits_without_masks_using_the_segmenter(tmp_path: Path) -> None:
    scored, masks = _site(tmp_path)
    stub = StubSegmenter(_lung_mask())
    for folder, expected in ((None, (0, 30)), (masks, (10, 20))):
        request = ValidationRequest(tmp_path, tmp_path / "labels.csv", tmp_path, masks=folder)
        found = validation._image_audit(
            request, scored, LABELS, _fake_engine(), LungMasks(stub, "stub-v0")
        )
        assert found["status"] == "run"
        assert (found["masks"]["n_reference"], found["masks"]["n_segmented"]) == expected
        assert found["masks"]["segmenter"] == "stub-v0"
        assert f"{expected[1]} segmented by stub-v0" in found["verdict"]


def test_validate_without_masks_or_segmenter_is_not_run_and_says_why(tmp_path: Path) -> None:
    scored, _ = _site(tmp_path)
    request = ValidationRequest(tmp_path, tmp_path / "labels.csv", tmp_path)
    found = validation._image_audit(
        request, scored, LABELS, _fake_engine(), LungMasks(note="no lung segmenter: no torch")
    )
    assert found == {
        "status": "not run",
        "reason": "no lung masks given (--masks DIR) and no lung segmenter: no torch",
    }


# --- the shipped segmenter -----------------------------------------------------------------


def _drawn_chest(side: int = 128) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """A bright body on a dark background with two dark lung fields (and those fields)."""
    yy, xx = np.mgrid[:side, :side] / side * 128
    image = np.full((side, side), 40, dtype=np.uint8)
    image[((xx - 64) / 58) ** 2 + ((yy - 70) / 60) ** 2 < 1] = 200
    lungs = np.zeros((side, side), dtype=bool)
    for centre in (40, 88):
        lungs |= ((xx - centre) / 18) ** 2 + ((yy - 62) / 38) ** 2 < 1
    image[lungs] = 70
    return image, lungs


def test_the_shipped_segmenter_masks_an_image_without_a_reference() -> None:
    """Plumbing only: how well it finds lungs is measured on real X-rays
    (``tests/integration``); lungs-unet-v2 finds none in drawn cartoons."""
    pytest.importorskip("torch")
    masks = shipped_lung_masks()
    assert masks.segmenter_id == MODEL_ID
    assert masks.segmenter_dice is not None and masks.segmenter_dice > 0.9
    image, _ = _drawn_chest()
    mask, provenance = masks.mask_for(image, None)
    assert provenance == "segmented" and mask is not None
    assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 1}
    reference = np.zeros_like(image)
    reference[10:20, 10:20] = 1
    kept, provenance = masks.mask_for(image, reference)
    assert provenance == "reference" and kept is not None and kept.sum() == 100
