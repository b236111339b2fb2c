"""Is there pneumonia at all? Answered from the lungs, by a model that cannot learn the
source.

The findings network learned its "no finding" output from 14 images of the collection,
whose other 570 frontal images are all pneumonia from other hospitals; on a hospital's
own normal chests it said pneumonia. This model answers the first question of the
second opinion from measurements inside the segmented lungs
(:mod:`covidcxr.models.lungs`), in six zones (left and right, upper, middle and lower
thirds): grey levels standardised to the lungs' own mean and spread (so exposure and
windowing cancel), their spread and percentiles, blob and edge strength (a Laplacian of
Gaussian and a gradient magnitude), and each zone's share of the lung. It is fitted on
one hospital's normal and pneumonia frontal X-rays (the NIH subset), so both classes
carry the same scanner, text markers and processing, and the only way to tell them
apart is what is in the lungs.

:func:`zone_features` measures; :class:`LinearRisk` holds the fitted standardised
logistic regression as plain numbers; :func:`combine` puts its P(pneumonia) together
with the network's split of pneumonia into its kinds, so that P(COVID-19) <=
P(viral pneumonia) <= P(pneumonia) and a chest the model calls normal gets a low
P(COVID-19). :meth:`PneumoniaModel.zone_map` shows which zones raised P(pneumonia)
(:func:`zone_logits`). Fitting and measurement: :mod:`covidcxr.models.abnormality_train`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from covidcxr.dataset.loading import preprocess_image
from covidcxr.errors import MetadataError
from covidcxr.models.coherence import NO_FINDING, PNEUMONIA_LABELS
from covidcxr.models.lungs import LungSegmenter, letterbox_area, pinned_segmenter, segmenter_record
from covidcxr.serialise import read_json_object

FORMAT: Final = "covidcxr-lung-pneumonia/1"
#: The lung segmenter of pneumonia models written before files named theirs
#: (``covidcxr-small-v2``'s ``abnormality.json``).
FITTED_BEFORE_PINNING: Final = {
    "model_id": "lungs-unet-v1",
    "weights_sha256": "c987f37c66e54975e37ce2ceca6f58d8132cd3718d9a08cab7ebc2ff58a197ea",
}
#: Side of the letterboxed image the zones are measured on (twice the segmenter's).
MEASURE_SIZE: Final = 256
ZONES: Final[tuple[str, ...]] = tuple(
    f"{side}_{third}" for side in ("right", "left") for third in ("upper", "middle", "lower")
)
ZONE_MEASURES: Final[tuple[str, ...]] = (
    "mean",  # mean standardised grey level (standardised over both lungs)
    "sd",
    "p10",
    "p50",
    "p90",
    "blob",  # mean |Laplacian of Gaussian, sigma 1.5 px| / lung sd
    "edge",  # mean gradient magnitude (Gaussian, sigma 1 px) / lung sd
    "share",  # the zone's share of the lung
    "body_contrast",  # (zone mean - mean outside the lung) / image sd: diffuse opacity
    "body_rank",  # share of the pixels outside the lung darker than the zone's median
)
#: Every feature, in order: each zone's measures, then four of the whole lung.
FEATURE_NAMES: Final[tuple[str, ...]] = (
    *(f"{zone}_{m}" for zone in ZONES for m in ZONE_MEASURES),
    "lung_fraction",
    "outside_minus_lung",
    "lung_blob",
    "lung_edge",
)
#: Fewer lung pixels than this (at :data:`MEASURE_SIZE`) and no lung is measured.
MIN_LUNG_PIXELS: Final = 50


def _zone_masks(lung: NDArray[np.bool_]) -> list[NDArray[np.bool_]]:
    """Image-right/left (patient's right is on the image's left) by upper/middle/lower
    thirds of the lung's height."""
    ys, xs = np.nonzero(lung)
    top, height = ys.min(), ys.max() + 1 - ys.min()
    middle = int((xs.min() + xs.max()) / 2)
    masks = []
    for side in (slice(None, middle), slice(middle, None)):
        for third in range(3):
            zone = np.zeros_like(lung)
            rows = slice(top + third * height // 3, top + (third + 1) * height // 3)
            zone[rows, side] = True
            masks.append(zone & lung)
    return masks


def zone_features(pixels: NDArray[np.uint8], lung: NDArray[np.bool_]) -> NDArray[np.float64]:
    """:data:`FEATURE_NAMES` of one image area and its lung mask (same shape).

    A lung smaller than :data:`MIN_LUNG_PIXELS` gives all zeros (the lung gate refuses
    such images before this is asked).

    Raises:
        ValueError: the shapes differ or are not 2-D.
    """
    if pixels.shape != lung.shape or pixels.ndim != 2:
        raise ValueError(f"zone_features: pixels {pixels.shape} and lung {lung.shape} differ")
    if lung.sum() < MIN_LUNG_PIXELS:
        return np.zeros(len(FEATURE_NAMES))
    grey = pixels.astype(np.float64)
    mean, sd = grey[lung].mean(), grey[lung].std() + 1.0
    body = np.sort(grey[~lung]) if (~lung).any() else np.sort(grey.ravel())
    image_sd = grey.std() + 1.0
    z = (grey - mean) / sd
    blob = np.abs(ndimage.gaussian_laplace(grey, 1.5)) / sd
    edge = ndimage.gaussian_gradient_magnitude(grey, 1.0) / sd
    values: list[float] = []
    for zone in _zone_masks(lung):
        if zone.sum() < 10:
            values += [0.0] * len(ZONE_MEASURES)
            continue
        v = z[zone]
        values += [v.mean(), v.std(), *np.percentile(v, [10, 50, 90]).tolist()]
        values += [blob[zone].mean(), edge[zone].mean(), zone.sum() / lung.sum()]
        zone_grey = grey[zone]
        rank = np.searchsorted(body, np.median(zone_grey)) / len(body)
        values += [(zone_grey.mean() - body.mean()) / image_sd, float(rank)]
    outside = grey[~lung].mean() if (~lung).any() else mean
    values += [lung.mean(), (outside - mean) / sd, blob[lung].mean(), edge[lung].mean()]
    return np.asarray(values, dtype=np.float64)


def _measured_area(
    segmenter: LungSegmenter, image: Image.Image, lungs: NDArray[np.floating] | None
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """The image letterboxed to :data:`MEASURE_SIZE`, cut to its own area (no bars),
    and the segmenter's lung mask over it (at its input size, enlarged)."""
    small_size = segmenter.input_size
    scale = MEASURE_SIZE // small_size
    big = preprocess_image(image, MEASURE_SIZE, crop="pad")
    probability = (
        segmenter.batch_probability(preprocess_image(image, small_size, crop="pad")[None])[0]
        if lungs is None
        else lungs
    )
    lung = np.kron(probability >= 0.5, np.ones((scale, scale), dtype=bool))
    area = letterbox_area(image.width, image.height, MEASURE_SIZE)
    return big[area], lung[area]


def features(
    segmenter: LungSegmenter,
    image: Image.Image,
    lungs: NDArray[np.floating] | None = None,
) -> NDArray[np.float64]:
    """:func:`zone_features` of a decoded image: the segmenter's mask (at its input
    size, enlarged) over the image letterboxed to :data:`MEASURE_SIZE`.

    Args:
        lungs: the segmenter's letterboxed probability of this image, when already
            computed (:func:`covidcxr.models.lung_gate.measure`); else it is computed.
    """
    return zone_features(*_measured_area(segmenter, image, lungs))


@dataclass(frozen=True)
class LinearRisk:
    """A logistic regression on standardised features: ``sigmoid(coef . (x - mean) /
    scale + intercept)``."""

    mean: NDArray[np.float64]
    scale: NDArray[np.float64]
    coef: NDArray[np.float64]
    intercept: float

    def probability(self, x: NDArray[np.floating]) -> NDArray[np.float64]:
        """P(positive) for rows of ``x``."""
        rows = np.atleast_2d(np.asarray(x, dtype=np.float64))
        score = ((rows - self.mean) / self.scale) @ self.coef + self.intercept
        result: NDArray[np.float64] = 1.0 / (1.0 + np.exp(-score))
        return result

    @classmethod
    def from_sklearn(cls, pipeline: Any) -> LinearRisk:
        """From a fitted ``make_pipeline(StandardScaler(), LogisticRegression())``."""
        scaler, logistic = pipeline[0], pipeline[-1]
        return cls(
            np.asarray(scaler.mean_, dtype=np.float64),
            np.asarray(scaler.scale_, dtype=np.float64),
            np.asarray(logistic.coef_[0], dtype=np.float64),
            float(logistic.intercept_[0]),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinearRisk:
        """Inverse of :meth:`as_dict`."""
        return cls(
            np.asarray(data["mean"], dtype=np.float64),
            np.asarray(data["scale"], dtype=np.float64),
            np.asarray(data["coef"], dtype=np.float64),
            float(data["intercept"]),
        )


#: The label of :meth:`PneumoniaModel.zone_map` among a prediction's heatmaps.
ZONE_MAP_LABEL: Final = "Pneumonia (lung zones)"
#: A lung zone that adds this much to the log-odds of pneumonia is drawn at full heat
#: by :meth:`PneumoniaModel.zone_map` (odds times e^2, about 7).
ZONE_MAP_FULL_LOGIT: Final = 2.0


def zone_logits(risk: LinearRisk, x: NDArray[np.floating]) -> NDArray[np.float64]:
    """Each of the :data:`ZONES`' share of the log-odds of pneumonia: the sum over the
    zone's :data:`ZONE_MEASURES` of ``coef * (x - mean) / scale``, relative to the
    training images' mean. The four whole-lung features belong to no zone, so the six
    shares plus theirs and the intercept give the model's log-odds exactly.

    Raises:
        ValueError: ``x`` is not one row of :data:`FEATURE_NAMES`.
    """
    row = np.asarray(x, dtype=np.float64)
    if row.shape != (len(FEATURE_NAMES),):
        raise ValueError(f"zone_logits: expected {len(FEATURE_NAMES)} features, got {row.shape}")
    terms = risk.coef * (row - risk.mean) / risk.scale
    zoned = len(ZONES) * len(ZONE_MEASURES)
    shares: NDArray[np.float64] = terms[:zoned].reshape(len(ZONES), -1).sum(axis=1)
    return shares


def _floor(value: float | None) -> float:
    """A network probability for :func:`combine`: missing or NaN counts as none."""
    return 1e-9 if value is None or not math.isfinite(value) else max(float(value), 1e-9)


def combine(
    network: Mapping[str, float | None], pneumonia: float, labels: Sequence[str]
) -> dict[str, float | None]:
    """Per-label probabilities with P(pneumonia) from this model and the network's split
    of pneumonia into its kinds: ``No finding`` = 1 - ``pneumonia``; each pneumonia kind
    = ``pneumonia`` times its share of the network's pneumonia probabilities. Labels
    outside the second-opinion set keep the network's value.

    Raises:
        ValueError: ``pneumonia`` outside [0, 1], or ``labels`` lack the second-opinion
            labels.
    """
    if not 0.0 <= pneumonia <= 1.0:
        raise ValueError(f"combine: P(pneumonia) {pneumonia} outside [0, 1]")
    missing = [n for n in (NO_FINDING, *PNEUMONIA_LABELS) if n not in labels]
    if missing:
        raise ValueError(f"combine: the model lacks the labels {missing}")
    kinds = {n: _floor(network.get(n)) for n in PNEUMONIA_LABELS}
    total = sum(kinds.values())
    out: dict[str, float | None] = {n: network.get(n) for n in labels}
    out[NO_FINDING] = 1.0 - pneumonia
    for name, value in kinds.items():
        out[name] = pneumonia * value / total
    return out


class PneumoniaModel:
    """The fitted model with the segmenter it measures with.

    Attributes:
        risk: the logistic regression.
        card: what the bundle's ``abnormality`` entry and file say about it.
    """

    def __init__(
        self, segmenter: LungSegmenter, risk: LinearRisk, card: Mapping[str, Any] | None = None
    ) -> None:
        self.segmenter = segmenter
        self.risk = risk
        self.card: dict[str, Any] = dict(card or {})

    @classmethod
    def load(cls, path: Path, segmenter: LungSegmenter | None = None) -> PneumoniaModel:
        """Read a file written by :func:`covidcxr.models.lung_model.build`, with the lung
        segmenter it was fitted on: ``segmenter`` (the lung gate's, which must be that
        one) or the shipped one it names (a file that names none was fitted on
        :data:`FITTED_BEFORE_PINNING`).

        Raises:
            MetadataError: the file is missing, unreadable or of another format, or its
                features are not :data:`FEATURE_NAMES`; ``segmenter`` is not the one it
                was fitted on, or that one is not shipped.
            MissingExtraError: neither torch nor onnxruntime runs the segmenter.
        """
        where = f"PneumoniaModel.load: {str(path)!r}"
        data = read_json_object(path, "PneumoniaModel.load")
        if data.get("format") != FORMAT or data.get("features") != list(FEATURE_NAMES):
            raise MetadataError(
                f"{where} is not a {FORMAT} file with this version's features; refit it "
                "(covidcxr train-lung-model)"
            )
        try:
            risk = LinearRisk.from_dict(data["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"{where} has no usable 'model' entry: {exc!r}") from exc
        if not len(risk.coef) == len(risk.mean) == len(risk.scale) == len(FEATURE_NAMES):
            raise MetadataError(f"{where}: the model's arrays do not match its features")
        record = data.get("segmenter", FITTED_BEFORE_PINNING)
        if segmenter is None:
            segmenter = pinned_segmenter(record, "auto", where)
        elif segmenter_record(segmenter) != record:
            raise MetadataError(
                f"{where} was fitted on lung segmenter {record!r}, but is given "
                f"{segmenter_record(segmenter)!r}"
            )
        return cls(segmenter, risk, data)

    def probability(self, image: Image.Image, lungs: NDArray[np.floating] | None = None) -> float:
        """P(pneumonia) of one decoded image (``lungs``: see :func:`features`)."""
        return float(self.risk.probability(features(self.segmenter, image, lungs))[0])

    def zone_map(
        self, image: Image.Image, lungs: NDArray[np.floating] | None = None
    ) -> NDArray[np.float32]:
        """Where in the lungs this model saw pneumonia: an ``(H, W)`` map of the whole
        image, each lung zone painted with its :func:`zone_logits` over
        :data:`ZONE_MAP_FULL_LOGIT` (clipped to [0, 1]; zones that lower P(pneumonia),
        and everything outside the lungs, are 0). ``lungs``: see :func:`features`."""
        pixels, lung = _measured_area(self.segmenter, image, lungs)
        heat = np.zeros(lung.shape, dtype=np.float32)
        if lung.sum() >= MIN_LUNG_PIXELS:
            weights = np.clip(zone_logits(self.risk, zone_features(pixels, lung)), 0.0, None)
            for zone, weight in zip(_zone_masks(lung), weights, strict=True):
                heat[zone] = min(1.0, float(weight) / ZONE_MAP_FULL_LOGIT)
        resized = Image.fromarray(heat).resize(image.size, Image.Resampling.NEAREST)
        return np.asarray(resized, dtype=np.float32)
