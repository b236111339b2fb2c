"""Lung Dice on held-out patients, by who drew the reference mask.

The collection's lung masks come from two annotators who draw different lungs: V7 Labs'
masks (drawn by people) include the lung behind the heart and below the diaphragm
domes; lungVAE's (made by a segmentation model, Selvan et al., arXiv:2005.10052) stop
at the visible, aerated lung. A segmenter is therefore scored against each annotator
separately, and the two annotators against each other (:func:`reference_agreement`),
so that a mean over mixed references is not read as the segmenter's own error.

:func:`held_out` picks the patients of a weights folder's own ``split.csv``, so a
measurement made after more sources were ingested scores the same patients as the
training run did (a fresh :func:`covidcxr.models.lungs_training.masked_samples` split of a
larger store is another split).

Why: ``docs/decisions/0070-lung-segmentation.md``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.dataset.samples import MASK_PREFERENCE, Sample, SampleSet
from covidcxr.dataset.splits import Split
from covidcxr.errors import MetadataError
from covidcxr.models.lungs import (
    LungSegmenter,
    dice,
    full_size_dice,
    reference_lung,
    two_lungs,
)
from covidcxr.store import queries
from covidcxr.store.blobs import blob_path

if TYPE_CHECKING:
    from covidcxr.store.db import Store

#: The Dice a segmenter is asked to reach on held-out patients (what published lung
#: segmenters reach on clean chest X-rays).
GOAL: Final = 0.95
#: How each annotator made its masks, for reports.
MADE_BY: Final = {"v7labs": "drawn by people", "lungVAE": "made by a segmentation model"}
#: Patient resamples behind a mean's interval.
RESAMPLES: Final = 2000


def summarise(values: Sequence[float], patients: Sequence[str] | None = None) -> dict[str, Any]:
    """Count, mean, median, 10th percentile, minimum and the share at :data:`GOAL` or
    above, rounded to 4 digits; with ``patients`` (one per value) also ``mean_ci95``,
    the 95% percentile interval of the mean over :data:`RESAMPLES` resamples of
    patients (all images of a patient drawn together; seed 0).

    Raises:
        ValueError: ``values`` is empty, or ``patients`` is not one per value.
    """
    if not len(values):
        raise ValueError("summarise: no Dice values")
    array = np.asarray(values, dtype=np.float64)
    summary: dict[str, Any] = {
        "n": len(values),
        "mean": round(float(array.mean()), 4),
        "median": round(float(np.median(array)), 4),
        "p10": round(float(np.percentile(array, 10)), 4),
        "min": round(float(array.min()), 4),
        "share_at_goal": round(float((array >= GOAL).mean()), 4),
    }
    if patients is not None:
        if len(patients) != len(values):
            raise ValueError(f"summarise: {len(patients)} patients for {len(values)} values")
        summary["mean_ci95"] = [round(v, 4) for v in _patient_interval(array, patients)]
    return summary


def _patient_interval(values: np.ndarray[Any, Any], patients: Sequence[str]) -> tuple[float, float]:
    keys = np.unique(np.asarray(patients, dtype=str), return_inverse=True)[1]
    count = int(keys.max()) + 1
    sums = np.bincount(keys, weights=values, minlength=count)
    sizes = np.bincount(keys, minlength=count)
    drawn = np.random.default_rng(0).integers(0, count, (RESAMPLES, count))
    means = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def held_out(sample_set: SampleSet, split: Split, fold: str = "test") -> tuple[list[Sample], int]:
    """The masked samples whose patient ``split`` puts in ``fold``, and how many masked
    samples belong to patients the split does not know (ingested after it was made:
    they are left out, not re-split).

    Raises:
        MetadataError: ``fold`` is not one of the split's folds.
    """
    if fold not in split.folds:
        raise MetadataError(f"held_out: the split has no fold {fold!r}; it has {split.folds}")
    masked = [s for s in sample_set.samples if s.mask_sha256 is not None]
    chosen = [s for s in masked if split.assignment.get(s.patient) == fold]
    unknown = sum(1 for s in masked if s.patient not in split.assignment)
    return chosen, unknown


def dice_by_reference(
    segmenter: LungSegmenter, sample_set: SampleSet, samples: Sequence[Sample]
) -> dict[str, Any]:
    """:func:`covidcxr.models.lungs.full_size_dice` of each masked sample, summarised
    over all of them (``all``) and per mask annotator (``by_reference``).

    Raises:
        ValueError: no sample has a mask.
        MetadataError: a mask's size differs from its image's.
    """
    masked = [s for s in samples if s.mask_sha256 is not None]
    scores = full_size_dice(segmenter, sample_set, masked)
    rows: dict[str, list[int]] = defaultdict(list)  # annotator -> positions in masked
    for position, sample in enumerate(masked):
        rows[sample.mask_annotator or "unknown"].append(position)
    order = [*(n for n in MASK_PREFERENCE if n in rows), *sorted(set(rows) - set(MASK_PREFERENCE))]

    def of(positions: list[int]) -> dict[str, Any]:
        return summarise([scores[i] for i in positions], [masked[i].patient for i in positions])

    return {
        "all": of(list(range(len(masked)))),
        "by_reference": {name: of(rows[name]) for name in order},
    }


def _mask_levels(root: Path, sha256: str) -> NDArray[np.uint8]:
    with Image.open(blob_path(root, sha256)) as image:
        return np.asarray(image.convert("L"))


def reference_agreement(store: Store, sample_set: SampleSet) -> dict[str, dict[str, float]]:
    """Dice of every other annotator's mask against the preferred annotator's
    (:data:`~covidcxr.dataset.samples.MASK_PREFERENCE`) on the samples that have both,
    keyed ``"<other> vs <preferred>"``; pixels either marks "ignore" are skipped.

    Raises:
        MetadataError: two masks of one image differ in size.
    """
    shas = {s.image_sha256 for s in sample_set.samples if s.mask_sha256 is not None}
    with store.read() as conn:
        found = queries.annotations_for(conn, shas)
    scores: dict[str, list[float]] = defaultdict(list)
    for image_sha, image_annotations in sorted(found.items()):
        masks = {
            a["annotator"]: a["mask_sha256"] for a in image_annotations if a["kind"] == "lung_mask"
        }
        preferred = next((name for name in MASK_PREFERENCE if name in masks), None)
        if preferred is None or len(masks) < 2:
            continue
        reference = _mask_levels(sample_set.blob_root, masks[preferred])
        for other in sorted(set(masks) - {preferred}):
            levels = _mask_levels(sample_set.blob_root, masks[other])
            if levels.shape != reference.shape:
                raise MetadataError(
                    f"reference_agreement: image {image_sha[:12]}: the {other} mask is "
                    f"{levels.shape[::-1]} px, the {preferred} mask {reference.shape[::-1]} px"
                )
            (lung, ignore), (other_lung, other_ignore) = map(reference_lung, (reference, levels))
            scores[f"{other} vs {preferred}"].append(dice(other_lung, lung, ignore | other_ignore))
    return {pair: summarise(values) for pair, values in sorted(scores.items())}


def not_two_lungs(segmenter: LungSegmenter, sample_set: SampleSet) -> dict[str, dict[str, Any]]:
    """Segment every sample and count, per source, the masks that are not two lungs
    (:func:`~covidcxr.models.lungs.two_lungs`): ``images``, ``not_two_lungs``,
    ``share``, and the first ten such images' sha256 prefixes, to look at.

    Raises:
        OSError: an image cannot be read (Pillow's errors).
    """
    counts: dict[str, dict[str, Any]] = {}
    for sample in sample_set.samples:
        row = counts.setdefault(sample.source, {"images": 0, "not_two_lungs": 0, "examples": []})
        with Image.open(sample_set.image_path(sample)) as image:
            plausible = two_lungs(segmenter.segment(image))
        row["images"] += 1
        if not plausible:
            row["not_two_lungs"] += 1
            if len(row["examples"]) < 10:
                row["examples"].append(sample.image_sha256[:12])
    for row in counts.values():
        row["share"] = round(row["not_two_lungs"] / row["images"], 4)
    return dict(sorted(counts.items()))
