"""Lung segmentation: a compact U-Net trained here on the collection's lung masks.

The network sees the whole image letterboxed to ``INPUT_SIZE`` px (``crop="pad"`` of
:mod:`covidcxr.dataset.loading`), so its mask maps back onto every pixel of the image.
:class:`LungSegmenter` loads the shipped weights (default ``weights/lungs-unet-v2``) and runs
them on torch or, without torch, on their ONNX export with onnxruntime;
:mod:`covidcxr.models.lungs_training` makes them again (``covidcxr train-lungs``).
:func:`dice`, :func:`two_lungs` and :func:`mass_in_lungs` are plain numpy. Torch is
imported where it is used.

Why it is built this way: ``docs/decisions/0070-lung-segmentation.md``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from covidcxr.dataset.loading import _padded_size, grey_levels, preprocess_image
from covidcxr.dataset.samples import Sample, SampleSet
from covidcxr.errors import MetadataError, MissingExtraError
from covidcxr.models.bundle import file_sha256

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)

#: The shipped segmenter that draws and measures masks (``LungSegmenter.load()``).
#: Models fitted on a segmenter's output (lung gates, pneumonia models) name theirs
#: and load it with :func:`pinned_segmenter`, whatever this default is.
MODEL_ID: Final = "lungs-unet-v2"
WEIGHTS_ROOT: Final = Path(__file__).parent / "weights"
WEIGHTS_DIR: Final = WEIGHTS_ROOT / MODEL_ID
INPUT_SIZE: Final = 128
#: :func:`two_lungs`: the smallest share of the image each of the two lungs must cover.
MIN_LUNG_SHARE: Final = 0.04
#: The ONNX graph's input, ``(N, 1, S, S)`` float32 grey levels / 255, and output,
#: ``(N, 1, S, S)`` lung probability (standardisation and sigmoid are in the graph).
ONNX_INPUT: Final = "image"
ONNX_OUTPUT: Final = "probability"
Backend = Literal["auto", "torch", "onnx"]


# --- measures ----------------------------------------------------------------------


def dice(
    predicted: NDArray[np.integer] | NDArray[np.bool_],
    reference: NDArray[np.integer] | NDArray[np.bool_],
    ignore: NDArray[np.bool_] | None = None,
) -> float:
    """Dice overlap ``2 |P & R| / (|P| + |R|)`` of two binary masks.

    Args:
        predicted: mask, non-zero = lung.
        reference: mask of the same shape, non-zero = lung.
        ignore: pixels left out of both (e.g. V7 Labs' "ignore" grey), or None.

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty.

    Raises:
        ValueError: the shapes differ.
    """
    if predicted.shape != reference.shape or (
        ignore is not None and ignore.shape != predicted.shape
    ):
        raise ValueError(
            f"dice: shapes differ: predicted {predicted.shape}, reference {reference.shape}"
            + (f", ignore {ignore.shape}" if ignore is not None else "")
        )
    keep = np.ones(predicted.shape, dtype=bool) if ignore is None else ~ignore
    p = (np.asarray(predicted) != 0) & keep
    r = (np.asarray(reference) != 0) & keep
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int((p & r).sum()) / total


def mass_in_lungs(
    heat: NDArray[np.floating], lungs: NDArray[np.integer] | NDArray[np.bool_]
) -> float:
    """The share of a heat map's mass that lies on the lungs.

    A uniform map scores the lung area fraction: that is the baseline a map must beat
    to say it looks at the lungs more than anywhere else.

    Args:
        heat: non-negative map (e.g. a [0, 1] heatmap), ``(H, W)``.
        lungs: lung mask of the same shape, non-zero = lung.

    Returns:
        ``sum(heat on lungs) / sum(heat)``; NaN for an all-zero map.

    Raises:
        ValueError: the shapes differ or the map has negative values.
    """
    values = np.asarray(heat, dtype=np.float64)
    if values.shape != lungs.shape:
        raise ValueError(f"mass_in_lungs: heat map {values.shape} and mask {lungs.shape} differ")
    if values.size and float(values.min()) < 0.0:
        raise ValueError("mass_in_lungs: the heat map has negative values; apply ReLU first")
    total = float(values.sum())
    if total == 0.0:
        return math.nan
    return float(values[np.asarray(lungs) != 0].sum()) / total


def two_lungs(mask: NDArray[np.integer] | NDArray[np.bool_]) -> bool:
    """Whether a frontal lung mask looks like two lungs: its two largest connected
    components each cover at least :data:`MIN_LUNG_SHARE` of the image, with their
    centres on either side of the vertical midline. A check that needs no reference
    mask; it cannot see a lung that is too small or an arm kept in its place."""
    labelled, count = ndimage.label(np.asarray(mask) != 0)
    if count < 2:
        return False
    sizes = np.bincount(labelled.ravel())[1:]
    largest = np.argsort(sizes)[::-1][:2] + 1
    if sizes[largest - 1].min() < MIN_LUNG_SHARE * labelled.size:
        return False
    columns = [ndimage.center_of_mass(labelled == k)[1] for k in largest]
    return bool(min(columns) < labelled.shape[1] / 2 < max(columns))


def found_two_lungs(
    probability: NDArray[np.floating], width: int, height: int, threshold: float = 0.5
) -> bool:
    """:func:`two_lungs` of a letterboxed lung probability (``(S, S)``, as the segmenter
    gave it for a ``width x height`` image), on the image's own area."""
    rows, columns = letterbox_area(width, height, probability.shape[0])
    return two_lungs(probability[rows, columns] >= threshold)


def clean_mask(probability: NDArray[np.floating], threshold: float = 0.5) -> NDArray[np.uint8]:
    """A lung mask from a probability map: ``probability >= threshold``, then only its
    two largest connected components (4-connected), so specks away from the lungs go.

    Chosen on the validation patients among thresholds, hole filling, small openings
    and closings (``docs/decisions/0070-lung-segmentation.md``): hole filling and
    morphology changed nothing or lost a little, so neither is done here.

    Args:
        probability: ``(H, W)`` lung probability.
        threshold: the lung cut-off.

    Returns:
        ``(H, W)`` uint8, 1 lung, 0 elsewhere (all zero when nothing passes).
    """
    mask = np.asarray(probability) >= threshold
    labels, count = ndimage.label(mask)
    if count > 2:
        sizes = np.bincount(labels.ravel())[1:]
        mask = np.isin(labels, np.argsort(sizes)[::-1][:2] + 1)
    return mask.astype(np.uint8)


# --- geometry: letterbox and back ---------------------------------------------------


def letterbox_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the image inside the ``size`` square (as
    :func:`covidcxr.dataset.loading.load_image` with ``crop="pad"`` pastes it)."""
    out_width, out_height = _padded_size(width, height, size)
    return (size - out_width) // 2, (size - out_height) // 2, out_width, out_height


def letterbox_area(width: int, height: int, size: int) -> tuple[slice, slice]:
    """The (rows, columns) of the ``size`` square that hold the image itself (no bars):
    :func:`letterbox_box` as slices, to cut a letterboxed array to the image."""
    left, top, out_width, out_height = letterbox_box(width, height, size)
    return slice(top, top + out_height), slice(left, left + out_width)


def unletterbox(probability: NDArray[np.floating], width: int, height: int) -> NDArray[np.float32]:
    """A ``size x size`` map of the letterboxed input back at ``width x height``."""
    size = probability.shape[0]
    left, top, out_width, out_height = letterbox_box(width, height, size)
    inner = np.ascontiguousarray(
        probability[top : top + out_height, left : left + out_width], dtype=np.float32
    )
    resized = Image.fromarray(inner).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


# --- the network -------------------------------------------------------------------


def torch_or_missing() -> Any:
    """The torch module; :class:`MissingExtraError` (``ml``) without it."""
    try:
        import torch
    except ImportError as exc:
        raise MissingExtraError("torch", "ml") from exc
    return torch


def build_unet(base_channels: int = 8, levels: int = 4) -> torch.nn.Module:
    """A compact U-Net: ``levels`` resolutions, channels doubling from ``base_channels``.

    Input ``(B, 1, S, S)`` grey levels, each image standardised to zero mean and unit
    standard deviation, ``S`` a multiple of ``2 ** (levels - 1)``; output
    ``(B, 1, S, S)`` lung logits.

    Raises:
        MissingExtraError: torch is not installed.
        ValueError: fewer than 2 levels or no channels.
    """
    functions = torch_or_missing()
    nn = functions.nn
    if levels < 2 or base_channels < 1:
        raise ValueError(f"build_unet: levels={levels}, base_channels={base_channels}")

    def block(cin: int, cout: int) -> Any:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    widths = [base_channels * 2**i for i in range(levels)]

    class UNet(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.ModuleList(
                [block(1, widths[0])] + [block(widths[i - 1], widths[i]) for i in range(1, levels)]
            )
            self.up = nn.ModuleList(
                [
                    nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2)
                    for i in range(1, levels)
                ]
            )
            self.merge = nn.ModuleList(
                [block(2 * widths[i - 1], widths[i - 1]) for i in range(1, levels)]
            )
            self.head = nn.Conv2d(widths[0], 1, 1)

        def forward(self, x: Any) -> Any:
            skips = []
            for i, stage in enumerate(self.down):
                x = stage(x if i == 0 else functions.nn.functional.max_pool2d(x, 2))
                skips.append(x)
            for i in reversed(range(levels - 1)):
                x = self.merge[i](functions.cat([skips[i], self.up[i](x)], dim=1))
            return self.head(x)

    return cast("torch.nn.Module", UNet())


def read_levels(path: Path) -> NDArray[np.uint8]:
    """The grey levels of an image file (a lung mask, say) as ``(H, W)`` uint8."""
    with Image.open(path) as image:
        return grey_levels(image)


def standardise_tensor(torch: Any, images: Any) -> Any:
    """Per-image zero mean, unit standard deviation: exposure and source matter less."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (images - mean) / std.clamp_min(1.0 / 255.0)


def probability_tensor(torch: Any, model: torch.nn.Module, x: Any) -> Any:
    """Lung probability of ``(N, 1, S, S)`` grey levels / 255: what the ONNX graph holds."""
    return torch.sigmoid(model(standardise_tensor(torch, x)))


def _network_input(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    return (images.astype(np.float32) / 255.0)[:, None]


def _in_batches(
    run: Callable[[NDArray[np.float32]], NDArray[np.float32]],
    images: NDArray[np.uint8],
    batch_size: int,
) -> NDArray[np.float32]:
    """``run`` (``(B, 1, S, S)`` -> ``(B, 1, S, S)``) over ``(N, S, S)`` images."""
    out = [
        run(_network_input(images[start : start + batch_size]))[:, 0]
        for start in range(0, len(images), batch_size)
    ]
    return (
        np.concatenate(out).astype(np.float32)
        if out
        else np.zeros((0, *images.shape[1:]), np.float32)
    )


def predict_probability(
    model: torch.nn.Module, images: NDArray[np.uint8], batch_size: int = 32
) -> NDArray[np.float32]:
    """Lung probability of letterboxed ``(N, S, S)`` images, ``(N, S, S)`` float32."""
    torch = torch_or_missing()
    model.eval()

    def run(x: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.no_grad():
            return cast(
                "NDArray[np.float32]",
                probability_tensor(torch, model, torch.from_numpy(x)).numpy(),
            )

    return _in_batches(run, images, batch_size)


# --- shipping and loading -----------------------------------------------------------


def _verified(path: Path, card: Mapping[str, Any], key: str) -> Path:
    """``path`` if it exists and its sha256 is ``card[key]``."""
    if not path.is_file():
        raise MetadataError(
            f"LungSegmenter.load: {str(path)!r} is missing; "
            "train one with covidcxr train-lungs --out DIR"
        )
    digest = file_sha256(path)
    if digest != card.get(key):
        raise MetadataError(
            f"LungSegmenter.load: {str(path)!r} has sha256 {digest[:12]}..., "
            f"but model.json records {str(card.get(key))[:12]}... ({key}); "
            "restore the file or make it again (covidcxr train-lungs)"
        )
    return path


def _pick_backend(backend: Backend) -> Literal["torch", "onnx"]:
    """``torch`` when importable, else ``onnx`` when onnxruntime is (for ``auto``)."""
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"LungSegmenter.load: backend={backend!r}; use auto, torch or onnx")
    if backend != "auto":
        return backend
    for module, choice in (("torch", "torch"), ("onnxruntime", "onnx")):
        try:
            __import__(module)
        except ImportError:
            continue
        return cast("Literal['torch', 'onnx']", choice)
    raise MissingExtraError("LungSegmenter.load: torch or onnxruntime", ("runtime", "ml"))


def _onnx_session(path: Path) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingExtraError("onnxruntime", "runtime") from exc
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unrelated classes
        raise MetadataError(f"LungSegmenter.load: cannot load {str(path)!r}: {exc}") from exc


def _picture(image: Image.Image | NDArray[np.uint8]) -> Image.Image:
    """A Pillow image of a decoded image or of ``(H, W)`` uint8 grey levels."""
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


class LungSegmenter:
    """A lung U-Net for whole images of any size (:meth:`load` reads the shipped one).

    Args:
        model: a network from :func:`build_unet`, or None with ``session``.
        input_size: the letterboxed square it was trained on.
        card: what ``model.json`` says about it (empty for a model not saved yet).
        session: an onnxruntime session of the graph
            :func:`~covidcxr.models.lungs_training.export_lungs_onnx` writes, instead of
            ``model``.

    Raises:
        ValueError: not exactly one of ``model`` and ``session``.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        input_size: int,
        card: Mapping[str, Any] | None = None,
        *,
        session: Any = None,
    ) -> None:
        if (model is None) == (session is None):
            raise ValueError("LungSegmenter: give a torch model or an onnxruntime session")
        self.model = model.eval() if model is not None else None
        self.session = session
        self.backend: Literal["torch", "onnx"] = "torch" if model is not None else "onnx"
        self.input_size = input_size
        self.card: dict[str, Any] = dict(card or {})

    @classmethod
    def load(
        cls, weights_dir: str | Path | None = None, backend: Backend = "auto"
    ) -> LungSegmenter:
        """Load ``model.json`` and ``weights.pt`` (torch) or ``model.onnx`` (onnxruntime)
        (default folder: the shipped :data:`MODEL_ID`).

        Args:
            weights_dir: the folder
                :func:`~covidcxr.models.lungs_training.save_weights` wrote.
            backend: ``torch``, ``onnx``, or ``auto``: torch when it can be imported,
                else onnxruntime.

        Raises:
            MissingExtraError: the backend's package (``auto``: both) is not installed.
            MetadataError: a file is missing, or its sha256 is not the one
                ``model.json`` records.
            ValueError: an unknown backend.
        """
        chosen = _pick_backend(backend)
        folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        card_path = folder / "model.json"
        if not card_path.is_file():
            raise MetadataError(
                f"LungSegmenter.load: {str(card_path)!r} is missing; "
                "train one with covidcxr train-lungs --out DIR"
            )
        card = json.loads(card_path.read_text(encoding="utf-8"))
        size = int(card["input_size"])
        if chosen == "onnx":
            session = _onnx_session(_verified(folder / "model.onnx", card, "onnx_sha256"))
            return cls(None, size, card, session=session)
        torch = torch_or_missing()
        weights_path = _verified(folder / "weights.pt", card, "weights_sha256")
        model = build_unet(int(card["base_channels"]), int(card["levels"]))
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        return cls(model, size, card)

    def batch_probability(
        self, images: NDArray[np.uint8], batch_size: int = 32
    ) -> NDArray[np.float32]:
        """Lung probability of letterboxed images on either backend.

        Args:
            images: ``(N, S, S)`` uint8 grey levels, ``S`` the input size.
            batch_size: images per network call.

        Returns:
            ``(N, S, S)`` float32 in [0, 1].

        Raises:
            ValueError: the images are not ``(N, S, S)`` uint8.
        """
        size = self.input_size
        if images.ndim != 3 or images.shape[1:] != (size, size) or images.dtype != np.uint8:
            raise ValueError(
                f"LungSegmenter.batch_probability: images are {images.dtype} {images.shape}; "
                f"expected uint8 (N, {size}, {size}) letterboxed grey levels"
            )
        if self.model is not None:
            return predict_probability(self.model, images, batch_size)
        session = self.session

        def run(x: NDArray[np.float32]) -> NDArray[np.float32]:
            return cast("NDArray[np.float32]", session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0])

        return _in_batches(run, images, batch_size)

    def probability(self, image: Image.Image | NDArray[np.uint8]) -> NDArray[np.float32]:
        """Lung probability at the image's size, ``(H, W)`` float32 in [0, 1]."""
        picture = _picture(image)
        small = preprocess_image(picture, self.input_size, crop="pad")
        probability = self.batch_probability(small[None])[0]
        return unletterbox(probability, picture.width, picture.height)

    def segment(self, image: Image.Image | NDArray[np.uint8]) -> NDArray[np.uint8]:
        """The lung mask at the image's size: ``(H, W)`` uint8, 1 lung, 0 elsewhere.

        The mean of :meth:`probability` of the image and of its mirror image (mirrored
        back), through :func:`clean_mask`: on held-out patients this scores a higher
        Dice than ``probability >= 0.5`` at about twice the network time. Only the
        drawn and measured masks (heatmap outlines, the shortcut audit, Dice) come
        from here; the lung gate and the pneumonia model compute their features from
        :meth:`batch_probability`, which this does not change.

        Args:
            image: a decoded image (any Pillow mode) or ``(H, W)`` uint8 grey levels.
        """
        picture = _picture(image)
        mirrored = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views = [
            preprocess_image(view, self.input_size, crop="pad") for view in (picture, mirrored)
        ]
        plain, flipped = (
            unletterbox(p, picture.width, picture.height)
            for p in self.batch_probability(np.stack(views))
        )
        return clean_mask((plain + flipped[:, ::-1]) / 2)


def segmenter_record(segmenter: LungSegmenter) -> dict[str, Any]:
    """What a model fitted on ``segmenter``'s output stores to load it again
    (:func:`pinned_segmenter`): its ``model_id`` and ``weights_sha256``."""
    return {
        "model_id": segmenter.card.get("model_id"),
        "weights_sha256": segmenter.card.get("weights_sha256"),
    }


def pinned_segmenter(record: Any, backend: Backend, where: str) -> LungSegmenter:
    """The shipped segmenter a fitted model names (:func:`segmenter_record`): a lung
    gate or pneumonia model given another segmenter's output would misjudge images
    without any error, so the weights must be the very ones it was fitted on.

    Raises:
        MetadataError: ``record`` is not ``{"model_id", "weights_sha256"}``, names no
            shipped segmenter, or the shipped weights of that id differ.
        MissingExtraError: the backend's package is not installed.
    """
    if not isinstance(record, Mapping) or not all(
        isinstance(record.get(k), str) for k in ("model_id", "weights_sha256")
    ):
        raise MetadataError(
            f"{where}: its 'segmenter' entry {record!r} must name the lung segmenter it was "
            "fitted on ({'model_id': ..., 'weights_sha256': ...}); refit it"
        )
    model_id = str(record["model_id"])
    folder = WEIGHTS_ROOT / model_id
    if "/" in model_id or not (folder / "model.json").is_file():
        raise MetadataError(f"{where}: it was fitted on lung segmenter {model_id!r}, not shipped")
    segmenter = LungSegmenter.load(folder, backend)
    if segmenter.card.get("weights_sha256") != record["weights_sha256"]:
        raise MetadataError(
            f"{where}: it was fitted on {model_id} with weights sha256 "
            f"{str(record['weights_sha256'])[:12]}..., but the shipped {model_id} has "
            f"{str(segmenter.card.get('weights_sha256'))[:12]}...; refit it"
        )
    return segmenter


def reference_lung(levels: NDArray[np.uint8]) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """A reference mask's grey levels as ``(lung, ignore)``: lung from 192 up, V7 Labs'
    "ignore" grey (127) from 64 to 191, background below."""
    return levels >= 192, (levels >= 64) & (levels < 192)


def full_size_dice(
    segmenter: LungSegmenter, sample_set: SampleSet, samples: Sequence[Sample]
) -> list[float]:
    """Per-image :func:`dice` of the segmenter's mask against each sample's reference
    mask at the image's own size (V7 Labs' "ignore" pixels skipped)."""
    scores = []
    for sample in samples:
        mask_path = sample_set.mask_path(sample)
        if mask_path is None:
            continue
        reference = read_levels(mask_path)
        with Image.open(sample_set.image_path(sample)) as image:
            predicted = segmenter.segment(image)
        if predicted.shape != reference.shape:
            raise MetadataError(
                f"full_size_dice: image {sample.image_sha256[:12]} is {predicted.shape[::-1]} px "
                f"but its lung mask is {reference.shape[::-1]} px; re-ingest the annotations"
            )
        lung, ignore = reference_lung(reference)
        scores.append(dice(predicted, lung, ignore))
    return scores
