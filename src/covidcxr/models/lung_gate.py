"""The lung gate: is this a usable frontal chest X-ray? Judged from where the lungs are.

The gate head trained inside the findings network learns what its training sources look
like, and turned away ordinary frontal X-rays from a hospital it never saw. This gate
looks instead at facts that hold at any hospital:

- the lung segmenter (:mod:`covidcxr.models.lungs`) finds two lung fields, side by side,
  taller than wide, with confidence, on a frontal X-ray; on a lateral view, a CT slice
  or a picture that is not medical it finds one field, a flat pair, or nothing sure;
- lungs are darker than the mediastinum and bone around them; an inverted image shows
  them brighter, and the segmenter finds its lungs in the *negative* of such an image;
- the grey-level histogram, edges, border and left-right symmetry of the whole picture.

:func:`view_features` measures one view (the image, or its negative); :func:`features`
joins both views. A boosted tree ensemble (:class:`BoostedTrees`, fitted by scikit-learn
and stored as plain arrays in JSON) turns the features into class probabilities;
:class:`LungGate` loads the shipped one (``weights/gate-lungs-v1``) and classifies
images. Training and the leave-one-source-out measurement live in
:mod:`covidcxr.models.lung_gate_train`. The segmenter runs on torch or onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
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
from covidcxr.models.lungs import Backend, LungSegmenter, letterbox_area, pinned_segmenter
from covidcxr.serialise import read_json_object

GATE_ID: Final = "gate-lungs-v1"
WEIGHTS_DIR: Final = Path(__file__).parent / "weights" / GATE_ID
FORMAT: Final = "covidcxr-lung-gate/1"

#: The classes, in output order (the same names as the network's gate head).
CLASSES: Final[tuple[str, ...]] = ("frontal_xray", "lateral_xray", "ct", "inverted", "not_medical")

#: What :func:`view_features` measures, in order (grey levels are 0..255 at the
#: segmenter's input size; "sd" is the view's grey-level standard deviation + 1).
VIEW_FEATURES: Final[tuple[str, ...]] = (
    "lung_fraction",  # share of the image the segmenter calls lung
    "lung_confidence",  # mean |2p - 1| of the segmenter's probability over the image
    "lung_probability_in_lung",  # mean probability inside the called lung
    "lung_components",  # connected lung regions of at least 1% of the image
    "left_right_balance",  # smaller / larger of the lung areas in the two image halves
    "lung_centre_y",  # centroid of the lung, as a share of height
    "lung_centre_x",  # ... and of width
    "lung_darkness",  # (mean grey outside lung - inside) / sd: > 0 when lungs are dark
    "grey_p5",
    "grey_p25",
    "grey_p50",
    "grey_p75",
    "grey_p95",  # percentiles of grey / 255
    "black_share",  # grey < 8
    "white_share",  # grey > 247
    "edge_strength",  # mean gradient magnitude / sd
    "mirror_correlation",  # correlation of the image with its left-right mirror
    "corner_contrast",  # (mean of the four corners - mean) / sd
    "aspect",  # width / height
    "lung_height",  # height of the lung bounding box / image height
    "lung_width",  # its width / image width
    "lung_tall",  # lung_height / lung_width
    "lung_top_share",  # share of lung pixels in the top third
    "lung_bottom_share",  # ... in the bottom third
    "border_black_share",  # grey < 8 in the outer 5% frame
    "centre_minus_rim",  # (mean grey in the central disc - in the rim) / sd
    "row_profile_spread",  # sd of the row means / sd
    "column_profile_spread",  # sd of the column means / sd
)

#: Every feature of :func:`features`: the image's, then its negative's.
FEATURE_NAMES: Final[tuple[str, ...]] = tuple(
    [f"image_{n}" for n in VIEW_FEATURES] + [f"negative_{n}" for n in VIEW_FEATURES]
)

Box = tuple[int, int, int, int]


def _lung_shape(lung: NDArray[np.bool_]) -> list[float]:
    height, width = lung.shape
    if not lung.any():
        return [0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    labels, count = ndimage.label(lung)
    sizes = np.asarray(ndimage.sum(lung, labels, range(1, count + 1)))
    left, right = lung[:, : width // 2].sum(), lung[:, width // 2 :].sum()
    ys, xs = np.nonzero(lung)
    lung_height = (ys.max() - ys.min() + 1) / height
    lung_width = (xs.max() - xs.min() + 1) / width
    return [
        float((sizes >= 0.01 * lung.size).sum()),
        float(min(left, right) / max(left, right, 1)),
        float(ys.mean() / height),
        float(xs.mean() / width),
        lung_height,
        lung_width,
        lung_height / max(lung_width, 1e-3),
        float((ys < height / 3).mean()),
        float((ys > 2 * height / 3).mean()),
        1.0,
    ]


def _grey_shape(grey: NDArray[np.float64], sd: float) -> list[float]:
    height, width = grey.shape
    gy, gx = np.gradient(np.pad(grey, ((0, max(0, 2 - height)), (0, max(0, 2 - width))), "edge"))
    mirror = np.corrcoef(grey.ravel(), grey[:, ::-1].ravel())[0, 1] if grey.std() > 0 else 1.0
    k = max(1, height // 10)
    corners = np.concatenate(
        [grey[:k, :k].ravel(), grey[:k, -k:].ravel(), grey[-k:, :k].ravel(), grey[-k:, -k:].ravel()]
    )
    ky, kx = max(1, height // 20), max(1, width // 20)
    frame = np.concatenate(
        [grey[:ky].ravel(), grey[-ky:].ravel(), grey[:, :kx].ravel(), grey[:, -kx:].ravel()]
    )
    yy, xx = np.mgrid[0:height, 0:width]
    radius = np.hypot((yy - height / 2) / (height / 2), (xx - width / 2) / (width / 2))
    rim = grey[(radius > 0.9) & (radius < 1.0)]
    disc = grey[radius < 0.6]
    return [
        *(np.percentile(grey, [5, 25, 50, 75, 95]) / 255.0).tolist(),
        float((grey < 8).mean()),
        float((grey > 247).mean()),
        float(np.hypot(gy, gx).mean() / sd),
        float(mirror),
        float((corners.mean() - grey.mean()) / sd),
        width / max(height, 1),
        float((frame < 8).mean()),
        float(
            (
                (disc.mean() if disc.size else grey.mean())
                - (rim.mean() if rim.size else grey.mean())
            )
            / sd
        ),
        float(grey.mean(axis=1).std() / sd),
        float(grey.mean(axis=0).std() / sd),
    ]


def view_features(
    probability: NDArray[np.floating], pixels: NDArray[np.uint8]
) -> NDArray[np.float64]:
    """The :data:`VIEW_FEATURES` of one view.

    Args:
        probability: the segmenter's lung probability, ``(H, W)`` in [0, 1].
        pixels: the grey levels it saw, ``(H, W)`` uint8 (the image area only, no
            letterbox padding).

    Raises:
        ValueError: the two arrays differ in shape or are empty.
    """
    if probability.shape != pixels.shape or pixels.size == 0 or pixels.ndim != 2:
        raise ValueError(
            f"view_features: probability {probability.shape} and pixels {pixels.shape} "
            "must be the same non-empty 2-D shape"
        )
    grey = pixels.astype(np.float64)
    lung = probability >= 0.5
    sd = float(grey.std()) + 1.0
    inside = grey[lung].mean() if lung.any() else grey.mean()
    outside = grey[~lung].mean() if (~lung).any() else inside
    shape = _lung_shape(lung)
    grey_part = _grey_shape(grey, sd)
    values = [
        float(lung.mean()),
        float(np.abs(2.0 * probability - 1.0).mean()),
        float(probability[lung].mean()) if lung.any() else 0.0,
        *shape[:4],
        float((outside - inside) / sd),
        *grey_part[:11],
        *shape[4:9],
        *grey_part[11:],
    ]
    return np.asarray(values, dtype=np.float64)


def features(segmenter: LungSegmenter, image: Image.Image) -> NDArray[np.float64]:
    """:data:`FEATURE_NAMES` of a decoded image: :func:`view_features` of the image and
    of its negative, both letterboxed to the segmenter's input size (black bars on
    both, as the segmenter saw in training)."""
    return measure(segmenter, image)[0]


def measure(
    segmenter: LungSegmenter, image: Image.Image
) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
    """:func:`features`, and the segmenter's lung probability of the image itself
    (letterboxed, ``(S, S)``), which other lung models can reuse."""
    size = segmenter.input_size
    pixels = preprocess_image(image, size, crop="pad")
    area = letterbox_area(image.width, image.height, size)
    negative = np.zeros_like(pixels)
    negative[area] = 255 - pixels[area]
    views = np.stack([pixels, negative])
    probability = segmenter.batch_probability(views)
    values = np.concatenate([view_features(probability[k][area], views[k][area]) for k in range(2)])
    return values, probability[0]


# --- the classifier ------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """One regression tree, as scikit-learn's ``tree_`` arrays (a leaf has child -1)."""

    left: NDArray[np.int64]
    right: NDArray[np.int64]
    feature: NDArray[np.int64]
    threshold: NDArray[np.float64]
    value: NDArray[np.float64]

    def predict(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """Leaf values for rows of ``x`` (scikit-learn's rule: go left when <= threshold)."""
        node = np.zeros(len(x), dtype=np.int64)
        active = self.left[node] >= 0
        while active.any():
            rows = np.flatnonzero(active)
            n = node[rows]
            go_left = x[rows, self.feature[n]] <= self.threshold[n]
            node[rows] = np.where(go_left, self.left[n], self.right[n])
            active = self.left[node] >= 0
        return self.value[node]

    def as_dict(self) -> dict[str, list[Any]]:
        """JSON-ready arrays (thresholds at full float precision)."""
        return {
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "feature": self.feature.tolist(),
            "threshold": self.threshold.tolist(),
            "value": self.value.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[Any]]) -> Tree:
        """Inverse of :meth:`as_dict`."""
        return cls(
            np.asarray(data["left"], dtype=np.int64),
            np.asarray(data["right"], dtype=np.int64),
            np.asarray(data["feature"], dtype=np.int64),
            np.asarray(data["threshold"], dtype=np.float64),
            np.asarray(data["value"], dtype=np.float64),
        )


@dataclass(frozen=True)
class BoostedTrees:
    """A multi-class gradient-boosted tree ensemble with a zero initial score.

    ``trees[m][k]`` is round ``m``'s tree for class ``k``; a class's score is
    ``learning_rate`` times the sum of its trees' leaf values, and the probabilities are
    the softmax of the scores (scikit-learn's ``GradientBoostingClassifier`` with
    ``init="zero"``, whose ``predict_proba`` this reproduces).
    """

    trees: tuple[tuple[Tree, ...], ...]
    learning_rate: float

    def predict_proba(self, x: NDArray[np.floating]) -> NDArray[np.float64]:
        """Class probabilities, ``(rows, classes)``."""
        # scikit-learn compares float32 features with its (float64) thresholds
        rows = np.atleast_2d(np.asarray(x, dtype=np.float32)).astype(np.float64)
        scores = np.zeros((len(rows), len(self.trees[0])))
        for round_trees in self.trees:
            for k, tree in enumerate(round_trees):
                scores[:, k] += self.learning_rate * tree.predict(rows)
        scores -= scores.max(axis=1, keepdims=True)
        expo = np.exp(scores)
        probabilities: NDArray[np.float64] = expo / expo.sum(axis=1, keepdims=True)
        return probabilities

    @classmethod
    def from_sklearn(cls, model: Any) -> BoostedTrees:
        """From a fitted ``GradientBoostingClassifier(init="zero")`` of 3+ classes.

        Raises:
            ValueError: another initial estimator, or fewer than three classes.
        """
        if model.init != "zero" or model.estimators_.shape[1] < 3:
            raise ValueError(
                "BoostedTrees.from_sklearn: needs GradientBoostingClassifier(init='zero') "
                "fitted on three or more classes"
            )
        trees = tuple(
            tuple(
                Tree(
                    est.tree_.children_left.astype(np.int64),
                    est.tree_.children_right.astype(np.int64),
                    est.tree_.feature.astype(np.int64),
                    est.tree_.threshold.astype(np.float64),
                    est.tree_.value[:, 0, 0].astype(np.float64),
                )
                for est in round_estimators
            )
            for round_estimators in model.estimators_
        )
        return cls(trees, float(model.learning_rate))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "learning_rate": self.learning_rate,
            "trees": [[tree.as_dict() for tree in round_trees] for round_trees in self.trees],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BoostedTrees:
        """Inverse of :meth:`as_dict`."""
        trees = tuple(tuple(Tree.from_dict(t) for t in r) for r in data["trees"])
        return cls(trees, float(data["learning_rate"]))


# --- the shipped gate ----------------------------------------------------------------


class LungGate:
    """A fitted lung gate: the segmenter, the classifier and the threshold it was
    measured at.

    Attributes:
        gate_id: the gate's id (``gate-lungs-v1``).
        threshold: an image passes when P(frontal_xray) reaches it.
        card: the gate's ``model.json`` (its measurements included).
    """

    def __init__(
        self,
        segmenter: LungSegmenter,
        classifier: BoostedTrees,
        threshold: float,
        card: Mapping[str, Any] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.classifier = classifier
        self.threshold = threshold
        self.card: dict[str, Any] = dict(card or {})
        self.gate_id = str(self.card.get("gate_id", GATE_ID))

    @classmethod
    def load(cls, weights_dir: str | Path | None = None, backend: Backend = "auto") -> LungGate:
        """Load ``model.json`` and ``trees.json`` (default: the shipped gate), with the
        segmenter it was trained on (:func:`~covidcxr.models.lungs.pinned_segmenter`)
        on ``backend``.

        Raises:
            MissingExtraError: neither torch nor onnxruntime runs the segmenter.
            MetadataError: a file is missing, of another format, or its sha256 is not
                the one ``model.json`` records; the segmenter it names is not shipped
                or its weights differ.
        """
        folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        card_path, trees_path = folder / "model.json", folder / "trees.json"
        for path in (card_path, trees_path):
            if not path.is_file():
                raise MetadataError(
                    f"LungGate.load: {str(path)!r} is missing; "
                    "train one with covidcxr train-gate --out DIR"
                )
        card = read_json_object(card_path, "LungGate.load")
        if card.get("format") != FORMAT or "threshold" not in card:
            raise MetadataError(
                f"LungGate.load: {str(card_path)!r} has format {card.get('format')!r} "
                f"(expected {FORMAT!r}) or lacks its threshold"
            )
        data = trees_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != card.get("trees_sha256"):
            raise MetadataError(
                f"LungGate.load: {str(trees_path)!r} has sha256 {digest[:12]}..., but "
                f"model.json records {str(card.get('trees_sha256'))[:12]}...; restore it "
                "or retrain the gate (covidcxr train-gate)"
            )
        try:
            classifier = BoostedTrees.from_dict(json.loads(data))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise MetadataError(
                f"LungGate.load: {str(trees_path)!r} is not a tree ensemble: {exc!r}"
            ) from exc
        segmenter = pinned_segmenter(card.get("segmenter"), backend, f"LungGate.load: {folder}")
        return cls(segmenter, classifier, float(card["threshold"]), card)

    def probabilities(self, image: Image.Image) -> NDArray[np.float64]:
        """P(class) over :data:`CLASSES` for one decoded image."""
        return self.judge(image)[0]

    def judge(self, image: Image.Image) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
        """:meth:`probabilities`, and the lung probability it was judged from (see
        :func:`measure`)."""
        values, lungs = measure(self.segmenter, image)
        row: NDArray[np.float64] = self.classifier.predict_proba(values[None])[0]
        return row, lungs
