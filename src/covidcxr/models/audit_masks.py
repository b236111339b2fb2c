"""Lung masks for the shortcut audit: an image's reference mask where it has one, else
the lung segmenter's mask, each with its provenance (no torch at import)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.errors import MetadataError

Provenance = Literal["reference", "segmented", "none"]
REFERENCE: Final = "reference"
SEGMENTED: Final = "segmented"
NONE: Final = "none"


@dataclass(frozen=True)
class MaskProvenance:
    """Where an audit's lung masks came from.

    Attributes:
        n_reference: audited images with their reference mask.
        n_segmented: audited images with the segmenter's mask.
        segmenter: the segmenter's model id (``None``: none was used).
        segmenter_dice: its mean Dice on held-out patients, as its card records it.
        note: why there was no segmenter (empty when there was one).
    """

    n_reference: int = 0
    n_segmented: int = 0
    segmenter: str | None = None
    segmenter_dice: float | None = None
    note: str = ""

    def text(self, n_without_mask: int) -> str:
        """One clause for people: the counts, the segmenter, and what was left out."""
        dice = "" if self.segmenter_dice is None else f", held-out Dice {self.segmenter_dice:.3f}"
        by = f"by {self.segmenter}{dice}" if self.segmenter else f"({self.note})"
        return (
            f"lung masks: {self.n_reference} reference, {self.n_segmented} segmented {by}; "
            f"{n_without_mask} image(s) without a lung mask not audited"
        )


class Segmenter(Protocol):
    """Anything with :meth:`~covidcxr.models.lungs.LungSegmenter.segment`."""

    def segment(self, image: NDArray[np.uint8]) -> NDArray[Any]:
        """The lung mask at the image's size (nonzero = lung)."""
        ...


@dataclass(frozen=True)
class LungMasks:
    """Where the audit's lung masks come from.

    Attributes:
        segmenter: segments images that have no reference mask (``None``: such
            images are not audited).
        segmenter_id: the segmenter's model id (reported with every audit).
        segmenter_dice: its measured mean Dice on held-out patients (reported).
        note: why there is no segmenter (reported; empty when there is one).
    """

    segmenter: Segmenter | None = None
    segmenter_id: str | None = None
    segmenter_dice: float | None = None
    note: str = "no lung segmenter given"

    def mask_for(
        self,
        image: NDArray[np.uint8],
        reference: NDArray[Any] | None,
        original: str | os.PathLike[str] | None = None,
    ) -> tuple[NDArray[np.uint8] | None, Provenance]:
        """The lung mask of one image and where it came from.

        Args:
            image: ``(H, W)`` uint8 grey levels, as the model sees them (its centre
                square, resized).
            reference: the image's reference mask at the same size (``None`` or
                all zero: it has none).
            original: the file ``image`` was cut from. The segmenter was trained on
                whole images, so with it the whole image is segmented and its mask cut
                and resized as ``image`` was; without it, ``image`` itself is.

        Returns:
            ``(mask, "reference")`` when the reference mask has a lung pixel, else
            ``(mask, "segmented")`` when the segmenter finds lung, else ``(None, "none")``.

        Raises:
            ValueError: the segmenter's mask is not the image's size.
        """
        if reference is not None and np.any(reference):
            return (np.asarray(reference) != 0).astype(np.uint8), REFERENCE
        if self.segmenter is None:
            return None, NONE
        mask = self._segmented(image, original)
        if mask.shape != image.shape:
            raise ValueError(
                f"LungMasks.mask_for: segmenter {self.segmenter_id!r} gave a mask of shape "
                f"{mask.shape} for an image of shape {image.shape}"
            )
        return ((mask != 0).astype(np.uint8), SEGMENTED) if mask.any() else (None, NONE)

    def _segmented(
        self, image: NDArray[np.uint8], original: str | os.PathLike[str] | None
    ) -> NDArray[Any]:
        assert self.segmenter is not None
        if original is None:
            return np.asarray(self.segmenter.segment(image))
        from covidcxr.dataset.loading import grey_levels, preprocess_image

        with Image.open(original) as whole:
            whole.load()
            full = np.asarray(self.segmenter.segment(grey_levels(whole)))
        picture = Image.fromarray(((full != 0) * 255).astype(np.uint8))
        return preprocess_image(picture, image.shape[0], crop="center") > 127

    def masks_for(
        self,
        images: NDArray[np.uint8],
        references: NDArray[Any],
        originals: Sequence[str | os.PathLike[str] | None] | None = None,
    ) -> tuple[NDArray[np.uint8], NDArray[np.str_]]:
        """:meth:`mask_for` over an ``(N, H, W)`` stack (``originals``: the N files,
        None where unknown): the masks (zeros where none) and the N provenances."""
        masks = np.zeros(images.shape, dtype=np.uint8)
        provenance = np.full(len(images), NONE, dtype="<U9")
        files = list(originals) if originals is not None else [None] * len(images)
        for i, (image, reference) in enumerate(zip(images, references, strict=True)):
            mask, provenance[i] = self.mask_for(image, reference, files[i])
            if mask is not None:
                masks[i] = mask
        return masks, provenance

    def provenance(self, provenances: Sequence[str] | NDArray[np.str_]) -> MaskProvenance:
        """The counts of audited images per mask provenance, with this source's
        segmenter id (or why there is none)."""
        found = np.asarray(provenances, dtype=str)
        return MaskProvenance(
            n_reference=int((found == REFERENCE).sum()),
            n_segmented=int((found == SEGMENTED).sum()),
            segmenter=self.segmenter_id,
            segmenter_dice=self.segmenter_dice,
            note="" if self.segmenter is not None else self.note or "no lung segmenter",
        )


def shipped_lung_masks() -> LungMasks:
    """Reference masks, else the default shipped lung segmenter's
    (:data:`~covidcxr.models.lungs.MODEL_ID`).

    Without torch or onnxruntime, or with its weights missing or altered, the result
    has no segmenter and its note says why: the audit then covers only images with a
    reference mask, as it did before the segmenter.
    """
    try:
        from covidcxr.models.lungs import MODEL_ID, LungSegmenter

        segmenter = LungSegmenter.load()
    except (ImportError, MetadataError) as exc:
        return LungMasks(note=f"no lung segmenter: {exc}")
    card = segmenter.card
    dice = card.get("test_dice_full_size", {}).get("mean")
    return LungMasks(
        segmenter,
        str(card.get("model_id", MODEL_ID)),
        None if dice is None else float(dice),
        note="",
    )
