"""Shortcut audit: does the model still "see" the finding when the lungs are gone?

Pneumonia is in the lungs. A model that separates COVID-19 from other pneumonias as
well without the lung fields as with them is reading something else: text markers,
electrodes and tubes, the hospital's post-processing, patient positioning, the source
(DeGrave et al. 2021). The audit predicts every audited image three times:

* ``full``: the image as the model was evaluated on it;
* ``no_lungs``: the lung fields (the lung mask, dilated by :data:`DILATION_FRACTION`
  of the side) replaced by one grey level;
* ``lungs_only``: everything outside the dilated lung fields replaced likewise.

**The fill.** The removed region becomes the *median of the kept pixels* of that image.
A constant carries no information about the removed region, and a statistic of the kept
pixels carries none beyond what the kept pixels already show: so a model scoring well on
``no_lungs`` images can only have used what lies outside the lungs. The alternatives
leak: a heavy blur keeps the lungs' mean brightness, which *is* the opacity signal of
pneumonia; a fixed black fill (or the median of the whole image) puts the lungs'
brightness, or the source's typical exposure, into the fill. The mask is dilated first
so that the bright rim at the lung boundary (diaphragm, heart border, partial volume)
goes too; the silhouette of the lungs remains visible as the edge of the fill (their
size and shape, which hint at age and AP/PA projection): the audit is therefore a
lower bound on what a model can do without lung *content*, which is the right side to
err on for a flag.

**The rule** (:func:`flag_label`): a label is flagged when, on ``no_lungs`` images,

1. its AUC's lower 95 % bound exceeds :data:`FLAG_LOWER_BOUND` (0.6): the model
   confidently discriminates with no lung pixels, at a level that is no longer
   "barely above chance"; or
2. its AUC stays within :data:`FLAG_RETAINED_MARGIN` (0.05) of the full-image AUC
   while that is clearly useful (> 0.6) and the no-lungs AUC is itself above chance
   (lower bound > 0.5): the model lost (almost) nothing when the lungs went, so what it
   learned is not in them.

Rule 1 alone misses a mediocre model whose whole skill lives outside the lungs; rule 2
alone would flag a noisy small-sample AUC that happens to match a poor full-image AUC,
hence its guard. A model is flagged when any label is. ``lungs_only`` is reported next
to it: a model whose AUC collapses on lung-only images also relied on the context.

The lung mask of an image is its reference mask where it has one, else the lung
segmenter's (:mod:`covidcxr.models.audit_masks`); every result says how many of each.

Functions here work on arrays (no torch, no store) so that they can be tested with fake
models: one that reads a corner marker is flagged, one that reads the lungs is not.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from covidcxr.models.audit_masks import LungMasks, MaskProvenance
from covidcxr.models.metrics import (
    AUC,
    DEFAULT_RESAMPLES,
    Estimate,
    bootstrap,
)

#: The dilation radius of the lung mask, as a share of the image side (224 px: 4 px).
DILATION_FRACTION = 0.02
#: Rule 1: flag when the no-lungs AUC's lower bound is above this.
FLAG_LOWER_BOUND = 0.6
#: Rule 2: flag when the no-lungs AUC is within this of the full-image AUC ...
FLAG_RETAINED_MARGIN = 0.05
#: ... and the full-image AUC is above this.
FLAG_MIN_FULL_AUC = 0.6

VARIANTS = ("full", "no_lungs", "lungs_only")

#: A model as the audit sees it: N x 1 x H x W float32 images in [-1024, 1024] ->
#: N x L probabilities.
PredictFunction = Callable[[NDArray[np.float32]], NDArray[np.float64]]


def dilate(mask: ArrayLike, radius: int) -> NDArray[np.bool_]:
    """Binary dilation with a (2 radius + 1)-pixel square, in numpy."""
    grown = np.asarray(mask).astype(bool)
    for _ in range(max(0, radius)):
        step = grown.copy()
        step[1:, :] |= grown[:-1, :]
        step[:-1, :] |= grown[1:, :]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        step[1:, 1:] |= grown[:-1, :-1]
        step[:-1, :-1] |= grown[1:, 1:]
        step[1:, :-1] |= grown[:-1, 1:]
        step[:-1, 1:] |= grown[1:, :-1]
        grown = step
    return grown


def lung_region(mask: ArrayLike, dilation_fraction: float = DILATION_FRACTION) -> NDArray[np.bool_]:
    """The lung fields the audit removes or keeps: the mask, dilated.

    Raises:
        ValueError: the mask is not 2-D or holds no lung pixel.
    """
    lungs = np.asarray(mask)
    if lungs.ndim != 2:
        raise ValueError(f"lung_region: expected a 2-D mask, got shape {lungs.shape}")
    if not lungs.any():
        raise ValueError("lung_region: the mask holds no lung pixel; audit only masked images")
    return dilate(lungs, round(dilation_fraction * max(lungs.shape)))


def _fill(pixels: NDArray[Any], removed: NDArray[np.bool_]) -> NDArray[Any]:
    kept = pixels[~removed]
    result = pixels.copy()
    if kept.size:
        value = np.median(kept)
        result[removed] = np.rint(value) if np.issubdtype(pixels.dtype, np.integer) else value
    return result


def mask_out_lungs(
    pixels: NDArray[Any], mask: ArrayLike, dilation_fraction: float = DILATION_FRACTION
) -> NDArray[Any]:
    """The image with its (dilated) lung fields set to the median of the rest."""
    return _fill(np.asarray(pixels), lung_region(mask, dilation_fraction))


def keep_only_lungs(
    pixels: NDArray[Any], mask: ArrayLike, dilation_fraction: float = DILATION_FRACTION
) -> NDArray[Any]:
    """The image with everything outside the (dilated) lung fields set to the median
    of the lung fields."""
    return _fill(np.asarray(pixels), ~lung_region(mask, dilation_fraction))


#: Variant name -> pixel transform (``None``: the image as it is).
TRANSFORMS: Mapping[str, Callable[[NDArray[Any], ArrayLike], NDArray[Any]] | None] = {
    "full": None,
    "no_lungs": mask_out_lungs,
    "lungs_only": keep_only_lungs,
}


def apply_variant(variant: str, images: NDArray[Any], masks: NDArray[Any]) -> NDArray[Any]:
    """Apply a variant's transform to each image of an N x H x W stack.

    Raises:
        ValueError: an unknown variant or mismatched shapes.
    """
    if variant not in TRANSFORMS:
        raise ValueError(f"apply_variant: unknown variant {variant!r}; use one of {VARIANTS}")
    if images.shape != masks.shape:
        raise ValueError(
            f"apply_variant: images {images.shape} and masks {masks.shape} differ in shape"
        )
    transform = TRANSFORMS[variant]
    if transform is None:
        return images
    return np.stack([transform(image, mask) for image, mask in zip(images, masks, strict=True)])


# --- verdict --------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelAudit:
    """One label's AUC on the three variants, and whether it is flagged.

    Attributes:
        label: the label name.
        auc: variant -> AUC estimate (with patient-bootstrap interval).
        flagged: whether the rule fired.
        reason: which rule fired, or why it did not (or could not) apply.
    """

    label: str
    auc: Mapping[str, Estimate]
    flagged: bool
    reason: str


@dataclass(frozen=True)
class AuditResult:
    """The shortcut audit of a model (or of the cross-validated models).

    Attributes:
        labels: per label, its :class:`LabelAudit`.
        flagged: whether any label is flagged.
        n_images: audited images (those with a lung mask and a known label).
        n_without_mask: evaluated images left out because they have no lung mask.
        method: how the variants were made and the rule (for reports).
        masks: how many audited images had a reference or a segmented mask, and the
            segmenter (``None`` in reports written before it was recorded).
    """

    labels: tuple[LabelAudit, ...]
    flagged: bool
    n_images: int
    n_without_mask: int = 0
    method: Mapping[str, Any] = field(default_factory=dict)
    masks: MaskProvenance | None = None

    @property
    def verdict(self) -> str:
        """One sentence for people, ending with where the lung masks came from."""
        provenance = "" if self.masks is None else f" ({self.masks.text(self.n_without_mask)})"
        return self._finding() + provenance

    def _finding(self) -> str:
        if not any(a.auc["full"].defined for a in self.labels):
            return (
                f"shortcut audit not computable: no label has both classes among the "
                f"{self.n_images} images with lung masks"
            )
        flagged = [a.label for a in self.labels if a.flagged]
        if flagged:
            return (
                "FLAGGED: the model still discriminates with the lungs masked out ("
                + ", ".join(flagged)
                + "): it relies on something outside the lungs (markers, devices, source)"
            )
        return (
            "not flagged: without the lungs, no label keeps an AUC clearly above chance "
            "or close to its full-image AUC"
        )


def flag_label(full: Estimate, no_lungs: Estimate) -> tuple[bool, str]:
    """The flag rule (see the module docstring) on one label's AUCs."""
    if not full.defined or not no_lungs.defined:
        return False, "not computable: " + (full.note or no_lungs.note or "AUC undefined")
    low = no_lungs.low
    if math.isfinite(low) and low > FLAG_LOWER_BOUND:
        return True, (f"AUC without lungs {no_lungs.text()}: lower bound above {FLAG_LOWER_BOUND}")
    if (
        full.value > FLAG_MIN_FULL_AUC
        and no_lungs.value >= full.value - FLAG_RETAINED_MARGIN
        and math.isfinite(low)
        and low > 0.5
    ):
        return True, (
            f"AUC without lungs {no_lungs.text()} within {FLAG_RETAINED_MARGIN} of the "
            f"full-image {full.value:.2f}"
        )
    if not math.isfinite(low):
        return False, f"AUC without lungs {no_lungs.text()}; no interval: {no_lungs.note}"
    return False, f"AUC without lungs {no_lungs.text()} vs {full.value:.2f} with them"


def method_description() -> dict[str, Any]:
    """The audit's settings, for reports and cards."""
    return {
        "fill": "median of the kept pixels of each image",
        "dilation_fraction": DILATION_FRACTION,
        "rule": (
            f"flag a label if its no-lungs AUC lower 95% bound > {FLAG_LOWER_BOUND}, or if "
            f"it is within {FLAG_RETAINED_MARGIN} of a full-image AUC > {FLAG_MIN_FULL_AUC} "
            "with a lower bound > 0.5"
        ),
    }


def audit_predictions(
    label_names: Sequence[str],
    labels: ArrayLike,
    groups: Sequence[Hashable] | ArrayLike,
    predictions: Mapping[str, ArrayLike],
    *,
    n_without_mask: int = 0,
    masks: MaskProvenance | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> AuditResult:
    """Audit from predictions already made on the three variants.

    Args:
        label_names: the L label names.
        labels: N x L labels of the audited images (``NaN`` = unknown).
        groups: N patients (the bootstrap's clusters).
        predictions: variant -> N x L probabilities, or R x N x L over R repeats
            (``NaN`` where an image was not predicted in a repeat).
        n_without_mask: images left out for lack of a mask (reported).
        masks: where the audited images' lung masks came from (reported).
        n_resamples: bootstrap resamples.
        seed: the bootstrap's seed (the same draws for every variant).

    Raises:
        ValueError: a variant is missing or shapes do not match.
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != len(label_names):
        raise ValueError(
            f"audit_predictions: labels have shape {y.shape}, expected (N, {len(label_names)})"
        )
    missing = [v for v in VARIANTS if v not in predictions]
    if missing:
        raise ValueError(f"audit_predictions: no predictions for variant(s) {missing}")
    arrays = {}
    for variant in VARIANTS:
        scores = np.asarray(predictions[variant], dtype=np.float64)
        if scores.ndim == 2:
            scores = scores[None]
        if scores.shape[1:] != y.shape:
            raise ValueError(
                f"audit_predictions: {variant} predictions have shape {scores.shape}, "
                f"expected (N, L) or (R, N, L) with N, L = {y.shape}"
            )
        arrays[variant] = scores
    audits = []
    for column, name in enumerate(label_names):
        auc = {
            variant: bootstrap(
                [AUC],
                y[:, column],
                arrays[variant][:, :, column],
                groups,
                n_resamples=n_resamples,
                seed=seed,
            )["auc"]
            for variant in VARIANTS
        }
        flagged, reason = flag_label(auc["full"], auc["no_lungs"])
        audits.append(LabelAudit(name, auc, flagged, reason))
    known = ~np.isnan(y).all(axis=1)
    return AuditResult(
        labels=tuple(audits),
        flagged=any(a.flagged for a in audits),
        n_images=int(known.sum()),
        n_without_mask=n_without_mask,
        method=method_description(),
        masks=masks,
    )


def shortcut_audit(
    predict: PredictFunction,
    images: NDArray[np.uint8],
    masks: NDArray[Any],
    label_names: Sequence[str],
    labels: ArrayLike,
    groups: Sequence[Hashable] | ArrayLike,
    *,
    lung_masks: LungMasks | None = None,
    originals: Sequence[str | os.PathLike[str] | None] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    batch_size: int = 64,
) -> AuditResult:
    """Predict the three variants of each image and audit the model.

    Args:
        predict: N x 1 x H x W float32 in [-1024, 1024] -> N x L probabilities.
        images: N x H x W ``uint8`` grey levels (as loaded for the model).
        masks: N x H x W reference lung masks (nonzero = lung; all zero: none).
        lung_masks: masks for the images without a reference mask (default: none, so
            they are left out); see :meth:`LungMasks.mask_for`. Images left without a
            mask are counted.
        originals: the N files the images were cut from, so that the segmenter sees
            whole images as it was trained to (default: it segments ``images``).
        label_names: the L label names.
        labels: N x L labels (``NaN`` = unknown).
        groups: N patients.
        n_resamples: bootstrap resamples.
        seed: the bootstrap's seed.
        batch_size: images per call of ``predict``.
    """
    from covidcxr.dataset.loading import normalise

    y = np.asarray(labels, dtype=np.float64)
    keys = np.asarray(groups, dtype=object).reshape(-1)
    source = lung_masks if lung_masks is not None else LungMasks()
    masks, provenance = source.masks_for(images, np.asarray(masks), originals)
    has_mask = provenance != "none"
    images, masks, y, keys = images[has_mask], masks[has_mask], y[has_mask], keys[has_mask]
    predictions: dict[str, NDArray[np.float64]] = {}
    for variant in VARIANTS:
        changed = apply_variant(variant, images, masks)
        parts = [
            np.asarray(predict(normalise(changed[i : i + batch_size])[:, None]), dtype=np.float64)
            for i in range(0, len(changed), batch_size)
        ]
        predictions[variant] = np.concatenate(parts) if parts else np.zeros((0, len(label_names)))
    return audit_predictions(
        label_names,
        y.reshape(-1, len(label_names)),
        keys,
        predictions,
        n_without_mask=int((~has_mask).sum()),
        masks=source.provenance(provenance[has_mask]),
        n_resamples=n_resamples,
        seed=seed,
    )
