"""Shortcut audit on arrays with fake models: a marker reader is flagged, a lung reader not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from numpy.typing import NDArray

from covidcxr.models.audit import (
    AuditResult,
    apply_variant,
    audit_predictions,
    dilate,
    flag_label,
    keep_only_lungs,
    lung_region,
    mask_out_lungs,
    shortcut_audit,
)
from covidcxr.models.metrics import Estimate
from covidcxr.serialise import from_dict, to_dict

SIDE = 48
LABELS = ("COVID-19", "No finding")


def _lung_mask() -> NDArray[np.uint8]:
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[12:40, 6:20] = 1
    mask[12:40, 28:42] = 1
    return mask


def _synthetic(n: int = 60, seed: int = 0) -> tuple[NDArray[np.uint8], ...]:
    """Positives have brighter lungs (the finding) and a corner marker (the shortcut)."""
    rng = np.random.default_rng(seed)
    positive = np.arange(n) % 2 == 1
    images = np.full((n, SIDE, SIDE), 60, dtype=np.uint8)
    mask = _lung_mask().astype(bool)
    for i in range(n):
        lungs = (180 if positive[i] else 120) + rng.integers(-25, 26, int(mask.sum()))
        images[i][mask] = lungs.astype(np.uint8)
        if positive[i]:
            images[i, 1:5, 1:5] = 250
    masks = np.repeat(_lung_mask()[None], n, axis=0)
    labels = np.stack([positive.astype(float), np.zeros(n)], axis=1)  # 2nd: one class
    return images, masks, labels


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def corner_model(images: NDArray[np.float32]) -> NDArray[np.float64]:
    """Reads only the top-left corner, where the marker is."""
    score = images[:, 0, 0:6, 0:6].astype(np.float64).mean(axis=(1, 2)) / 256.0
    return np.stack([_sigmoid(score), _sigmoid(-score)], axis=1)


def lung_model(images: NDArray[np.float32]) -> NDArray[np.float64]:
    """Reads only a band inside the lung fields (it does not know the mask)."""
    score = images[:, 0, 16:36, 8:40].astype(np.float64).mean(axis=(1, 2)) / 256.0
    return np.stack([_sigmoid(score), _sigmoid(-score)], axis=1)


def _groups(n: int) -> NDArray[np.int64]:
    return np.arange(n) // 2 * 2 + np.arange(n) % 2  # one image per patient


# --- pixel transforms ---------------------------------------------------------------


def test_dilate_grows_by_radius() -> None:
    mask = np.zeros((7, 7), dtype=bool)
    mask[3, 3] = True
    assert dilate(mask, 0).sum() == 1
    assert dilate(mask, 1).sum() == 9
    assert dilate(mask, 2).sum() == 25


def test_mask_out_and_keep_only_fill_with_the_median_of_the_kept_pixels() -> None:
    pixels = np.arange(100, dtype=np.uint8).reshape(10, 10)
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[3:7, 3:7] = 1
    lungs = mask.astype(bool)
    out = mask_out_lungs(pixels, mask, dilation_fraction=0.0)
    assert out.dtype == np.uint8
    assert (out[~lungs] == pixels[~lungs]).all()
    assert (out[lungs] == np.rint(np.median(pixels[~lungs]))).all()
    kept = keep_only_lungs(pixels, mask, dilation_fraction=0.0)
    assert (kept[lungs] == pixels[lungs]).all()
    assert (kept[~lungs] == np.rint(np.median(pixels[lungs]))).all()
    # Dilation: 0.1 of a 10 px side = 1 px ring around the lungs goes too.
    region = lung_region(mask, 0.1)
    assert region.sum() == 36
    filled = mask_out_lungs(pixels, mask, 0.1)[region]
    assert (filled == np.rint(np.median(pixels[~region]))).all()


def test_lung_region_refuses_empty_masks() -> None:
    with pytest.raises(ValueError, match="lung_region: the mask holds no lung pixel"):
        lung_region(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="expected a 2-D mask"):
        lung_region(np.ones((1, 4, 4)))


def test_apply_variant_checks() -> None:
    images, masks, _ = _synthetic(4)
    assert apply_variant("full", images, masks) is images
    assert apply_variant("no_lungs", images, masks).shape == images.shape
    with pytest.raises(ValueError, match="unknown variant 'blur'"):
        apply_variant("blur", images, masks)
    with pytest.raises(ValueError, match="differ in shape"):
        apply_variant("no_lungs", images, masks[:2])


# --- the rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("full", "no_lungs", "flagged", "words"),
    [
        (Estimate(0.9, 0.85, 0.95), Estimate(0.75, 0.65, 0.84), True, "lower bound above"),
        (Estimate(0.7, 0.6, 0.8), Estimate(0.68, 0.55, 0.8), True, "within 0.05"),
        # Close to a poor full AUC but not above chance: noise, not a shortcut.
        (Estimate(0.62, 0.5, 0.75), Estimate(0.6, 0.45, 0.74), False, "vs 0.62"),
        (Estimate(0.9, 0.85, 0.95), Estimate(0.55, 0.45, 0.65), False, "vs 0.90"),
        (
            Estimate(math.nan, note="auc: all 3 known labels are positive"),
            Estimate(0.5),
            False,
            "not computable: auc: all 3",
        ),
        (Estimate(0.9, 0.8, 0.95), Estimate(0.7, note="few"), False, "no interval"),
    ],
)
def test_flag_label(full: Estimate, no_lungs: Estimate, flagged: bool, words: str) -> None:
    result, reason = flag_label(full, no_lungs)
    assert result is flagged
    assert words in reason


# --- fake models --------------------------------------------------------------------


def test_a_model_reading_a_corner_marker_is_flagged() -> None:
    images, masks, labels = _synthetic()
    result = shortcut_audit(
        corner_model, images, masks, LABELS, labels, _groups(60), n_resamples=200
    )
    covid = result.labels[0]
    assert covid.auc["full"].value == 1.0
    assert covid.auc["no_lungs"].value == 1.0  # the marker survives
    assert covid.flagged
    assert result.flagged
    assert result.verdict.startswith("FLAGGED")
    assert "COVID-19" in result.verdict
    no_finding = result.labels[1]
    assert not no_finding.flagged
    assert no_finding.reason.startswith("not computable")
    assert result.n_images == 60


def test_a_model_reading_the_lungs_is_not_flagged() -> None:
    images, masks, labels = _synthetic()
    result = shortcut_audit(lung_model, images, masks, LABELS, labels, _groups(60), n_resamples=200)
    covid = result.labels[0]
    assert covid.auc["full"].value == 1.0
    assert covid.auc["no_lungs"].value == 0.5  # every masked image looks the same
    assert covid.auc["lungs_only"].value == 1.0
    assert not result.flagged
    assert result.verdict.startswith("not flagged")


def test_images_without_mask_are_left_out_and_counted() -> None:
    images, masks, labels = _synthetic(20)
    masks[:4] = 0
    result = shortcut_audit(lung_model, images, masks, LABELS, labels, _groups(20), n_resamples=0)
    assert result.n_images == 16
    assert result.n_without_mask == 4
    back = from_dict(AuditResult, json.loads(json.dumps(to_dict(result), allow_nan=False)))
    assert to_dict(back) == to_dict(result)
    assert back.flagged == result.flagged
    assert back.n_without_mask == 4
    assert back.labels[0].auc["no_lungs"].value == result.labels[0].auc["no_lungs"].value


def test_audit_predictions_over_repeats_and_checks() -> None:
    labels = np.array([[0.0], [1.0], [0.0], [1.0]])
    # Repeat 0 predicted the negatives only, repeat 1 the positives only.
    full = np.array([[[0.1], [np.nan], [0.2], [np.nan]], [[np.nan], [0.9], [np.nan], [0.8]]])
    result = audit_predictions(
        ["x"],
        labels,
        [0, 1, 2, 3],
        {"full": full, "no_lungs": full, "lungs_only": full},
        n_resamples=0,
    )
    assert math.isnan(result.labels[0].auc["full"].value)  # one class per repeat
    assert "not computable" in result.verdict
    with pytest.raises(ValueError, match="no predictions for variant"):
        audit_predictions(["x"], labels, [0, 1, 2, 3], {"full": full})
    with pytest.raises(ValueError, match="labels have shape"):
        audit_predictions(["x", "y"], labels, [0, 1, 2, 3], {})
