"""Lung segmentation: a compact U-Net trained here on the collection's lung masks.

The network sees the whole image letterboxed to ``INPUT_SIZE`` px (``crop="pad"`` of
:mod:`covidcxr.dataset.loading`), so its mask maps back onto every pixel of the image.
:class:`LungSegmenter` loads the shipped weights (default ``weights/lungs-unet-v2``) and runs
them on torch or, without torch, on their ONNX export with onnxruntime;
:func:`train_lungs` makes them again (``covidcxr train-lungs``). :func:`dice` and
:func:`mass_in_lungs` are plain numpy. Torch is imported where it is used.

Why it is built this way: ``docs/decisions/0070-lung-segmentation.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from covidcxr.atomic import atomic_output
from covidcxr.dataset.loading import _padded_size, grey_levels, load_image, preprocess_image
from covidcxr.dataset.samples import Sample, SampleSet, Selection, build_samples
from covidcxr.dataset.splits import Split, make_split
from covidcxr.dataset.tasks import get_task
from covidcxr.errors import MetadataError, MissingExtraError

if TYPE_CHECKING:
    import torch

    from covidcxr.store.db import Store

log = logging.getLogger(__name__)

#: The shipped segmenter that draws and measures masks (``LungSegmenter.load()``).
#: Models fitted on a segmenter's output (lung gates, pneumonia models) name theirs
#: and load it with :func:`pinned_segmenter`, whatever this default is.
MODEL_ID: Final = "lungs-unet-v2"
WEIGHTS_ROOT: Final = Path(__file__).parent / "weights"
WEIGHTS_DIR: Final = WEIGHTS_ROOT / MODEL_ID
INPUT_SIZE: Final = 128
#: Target value of pixels the loss and Dice skip (V7 Labs' grey 127, "ignore").
IGNORE: Final = 2
#: A reference mask with less lung than this share of the image is an empty mask
#: (V7 Labs ships empty masks for CT and lateral images).
MIN_LUNG_FRACTION: Final = 0.02
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


def letterbox_target(mask: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """A reference mask's grey levels as a ``size x size`` training target.

    Args:
        mask: ``(H, W)`` grey levels: 0 background, 127 ignore (V7 Labs), 255 lung.
        size: the side of the letterboxed square.

    Returns:
        ``uint8`` 0 background (and padding), 1 lung, :data:`IGNORE` ignore.
    """
    height, width = mask.shape
    left, top, out_width, out_height = letterbox_box(width, height, size)
    small = np.asarray(
        Image.fromarray(mask).resize((out_width, out_height), Image.Resampling.NEAREST)
    )
    target = np.zeros((size, size), dtype=np.uint8)
    region = np.where(small >= 192, 1, np.where(small >= 64, IGNORE, 0)).astype(np.uint8)
    target[top : top + out_height, left : left + out_width] = region
    return target


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


def _torch() -> Any:
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
    functions = _torch()
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


# --- data --------------------------------------------------------------------------


@dataclass(frozen=True)
class LungData:
    """Letterboxed images and targets of one split, ready to train on.

    Attributes:
        images: ``(N, S, S)`` uint8 grey levels.
        targets: ``(N, S, S)`` uint8, 0 / 1 lung / :data:`IGNORE`.
        folds: ``(N,)`` fold of each image (``train``, ``val``, ``test``).
        patients: ``(N,)`` patient of each image.
        image_sha256: ``(N,)`` the image blobs.
        split_sha256: the split's ``membership_sha256``.
    """

    images: NDArray[np.uint8]
    targets: NDArray[np.uint8]
    folds: NDArray[np.str_]
    patients: NDArray[np.str_]
    image_sha256: NDArray[np.str_]
    split_sha256: str

    def subset(self, fold: str) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
        """Images and targets of one fold."""
        chosen = self.folds == fold
        return self.images[chosen], self.targets[chosen]

    def save(self, path: str | Path) -> None:
        """Write the arrays as one ``.npz`` (atomically)."""
        with atomic_output(path) as temporary, temporary.open("wb") as handle:
            np.savez_compressed(handle, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | Path) -> LungData:
        """Read what :meth:`save` wrote."""
        with np.load(path) as data:
            values = {k: data[k] for k in cls.__dataclass_fields__}
        values["split_sha256"] = str(values["split_sha256"])
        return cls(**values)


def _read_grey(path: Path) -> NDArray[np.uint8]:
    with Image.open(path) as image:
        return grey_levels(image)


def masked_samples(store: Store) -> tuple[SampleSet, Split]:
    """:func:`masked_sample_set`, split by patient (holdout 70/15/15, seed 0;
    duplicate-linked patients kept together by :func:`make_split`).

    The split depends on everything in the store: to score weights again after more
    sources were ingested, use the ``split.csv`` saved with them
    (:func:`covidcxr.models.lung_dice.held_out`).
    """
    sample_set = masked_sample_set(store)
    with store.read() as conn:
        split = make_split(sample_set, conn, scheme="holdout", seed=0)
    return sample_set, split


def frontal_sample_set(store: Store) -> SampleSet:
    """The frontal X-rays with a findings label, masked or not."""
    return build_samples(store, get_task("findings"), Selection(views=("frontal",)))


def masked_sample_set(store: Store) -> SampleSet:
    """The frontal X-rays with a non-empty lung mask (the preferred annotator's)."""
    sample_set = frontal_sample_set(store)
    kept: list[Sample] = []
    for sample in sample_set.samples:
        mask = sample_set.mask_path(sample)
        if mask is not None and (_read_grey(mask) >= 192).mean() >= MIN_LUNG_FRACTION:
            kept.append(sample)
    sample_set.excluded["no lung mask (or an empty one)"] += len(sample_set.samples) - len(kept)
    sample_set.samples = kept
    return sample_set


def prepare_lung_data(store: Store, size: int = INPUT_SIZE) -> LungData:
    """Load every masked image of :func:`masked_samples` letterboxed to ``size``.

    Raises:
        MetadataError: the store has no image with a lung mask.
        ImageError: an image cannot be read.
    """
    sample_set, split = masked_samples(store)
    if not sample_set.samples:
        raise MetadataError(
            "prepare_lung_data: no frontal X-ray in the store has a lung mask; ingest the "
            "collection with its annotations/ folder"
        )
    images, targets = [], []
    for sample in sample_set.samples:
        images.append(load_image(sample_set.image_path(sample), size, crop="pad"))
        mask_path = sample_set.mask_path(sample)
        assert mask_path is not None  # masked_samples kept only samples with masks
        targets.append(letterbox_target(_read_grey(mask_path), size))
    return LungData(
        images=np.stack(images),
        targets=np.stack(targets),
        folds=np.array([split.fold_of(s.patient) for s in sample_set.samples]),
        patients=np.array([s.patient for s in sample_set.samples]),
        image_sha256=np.array([s.image_sha256 for s in sample_set.samples]),
        split_sha256=split.membership_sha256,
    )


# --- training ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`train_lungs` trains.

    Attributes:
        base_channels: U-Net width at full resolution.
        levels: U-Net resolutions.
        minutes: wall-clock budget; training stops at the first epoch end past it.
        max_epochs: at most this many epochs.
        batch_size: images per step.
        learning_rate: AdamW's initial rate (cosine decay over ``max_epochs``).
        seed: seeds the weights, the order and the augmentation.
        threads: torch CPU threads.
    """

    base_channels: int = 8
    levels: int = 4
    minutes: float = 25.0
    max_epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 3e-3
    seed: int = 0
    threads: int = 2


def _augment(torch: Any, images: Any, targets: Any, generator: Any) -> tuple[Any, Any]:
    """Small random flips, rotation/scale/shift and contrast, the same on image and
    target (nearest for the target, so it keeps its three values)."""
    batch = images.shape[0]

    def rand(*shape: int) -> Any:
        return torch.rand(*shape, generator=generator)

    angle = (rand(batch) - 0.5) * (2 * math.radians(10))
    scale = 1.0 + (rand(batch) - 0.5) * 0.2
    shift = (rand(batch, 2) - 0.5) * 0.16
    flip = torch.where(rand(batch) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    functional = torch.nn.functional
    grid = functional.affine_grid(theta, list(images.shape), align_corners=False)
    images = functional.grid_sample(images, grid, mode="bilinear", align_corners=False)
    targets = functional.grid_sample(targets, grid, mode="nearest", align_corners=False)
    gamma = torch.exp((rand(batch, 1, 1, 1) - 0.5) * 0.8)
    images = images.clamp(0, 1) ** gamma
    return images, targets


def _loss(torch: Any, logits: Any, targets: Any) -> Any:
    """Binary cross-entropy plus soft Dice, both over the pixels that are not ignored."""
    keep = (targets != IGNORE).float()
    lung = (targets == 1).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, lung, weight=keep)
    probability = torch.sigmoid(logits) * keep
    overlap = (probability * lung).sum(dim=(1, 2, 3))
    soft_dice = (2 * overlap + 1) / (probability.sum(dim=(1, 2, 3)) + lung.sum(dim=(1, 2, 3)) + 1)
    return bce + (1 - soft_dice).mean()


def _tensors(torch: Any, images: NDArray[np.uint8], targets: NDArray[np.uint8]) -> tuple[Any, Any]:
    return (
        torch.from_numpy(images.astype(np.float32) / 255.0)[:, None],
        torch.from_numpy(targets.astype(np.float32))[:, None],
    )


def _standardise_tensor(torch: Any, images: Any) -> Any:
    """Per-image zero mean, unit standard deviation: exposure and source matter less."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (images - mean) / std.clamp_min(1.0 / 255.0)


def train_steps(
    model: torch.nn.Module,
    images: NDArray[np.uint8],
    targets: NDArray[np.uint8],
    *,
    steps: int,
    settings: TrainSettings,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> list[float]:
    """Run ``steps`` optimiser steps on random augmented batches; returns the losses.

    Raises:
        MissingExtraError: torch is not installed.
    """
    torch = _torch()
    generator = generator or torch.Generator().manual_seed(settings.seed)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    x_all, y_all = _tensors(torch, images, targets)
    model.train()
    losses = []
    for _ in range(steps):
        chosen = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
        x, y = _augment(torch, x_all[chosen], y_all[chosen], generator)
        loss = _loss(torch, model(_standardise_tensor(torch, x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def _probability_tensor(torch: Any, model: torch.nn.Module, x: Any) -> Any:
    """Lung probability of ``(N, 1, S, S)`` grey levels / 255: what the ONNX graph holds."""
    return torch.sigmoid(model(_standardise_tensor(torch, x)))


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
    torch = _torch()
    model.eval()

    def run(x: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.no_grad():
            return cast(
                "NDArray[np.float32]",
                _probability_tensor(torch, model, torch.from_numpy(x)).numpy(),
            )

    return _in_batches(run, images, batch_size)


def mean_dice(probability: NDArray[np.floating], targets: NDArray[np.uint8]) -> float:
    """Mean per-image :func:`dice` of ``probability >= 0.5`` against targets (ignore skipped)."""
    scores = [
        dice(p >= 0.5, t == 1, t == IGNORE) for p, t in zip(probability, targets, strict=True)
    ]
    return float(np.mean(scores)) if scores else math.nan


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_lungs` made and measured.

    Attributes:
        epochs: epochs run.
        seconds: training time.
        val_dice: mean Dice on the validation patients at the input size, per epoch.
        best_epoch: the epoch whose weights were kept (best ``val_dice``).
    """

    epochs: int
    seconds: float
    val_dice: tuple[float, ...]
    best_epoch: int


def train_lungs(
    data: LungData, settings: TrainSettings = TrainSettings()
) -> tuple[torch.nn.Module, TrainResult]:
    """Train the U-Net on the ``train`` fold; keep the weights of the best ``val`` epoch.

    Raises:
        MissingExtraError: torch is not installed.
        MetadataError: a fold is empty.
    """
    torch = _torch()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    train_images, train_targets = data.subset("train")
    val_images, val_targets = data.subset("val")
    if not len(train_images) or not len(val_images):
        raise MetadataError("train_lungs: the train or val fold has no image; ingest more masks")
    model = build_unet(settings.base_channels, settings.levels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    steps = max(1, len(train_images) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.max_epochs * steps)
    generator = torch.Generator().manual_seed(settings.seed)
    started = time.monotonic()
    scores: list[float] = []
    best: dict[str, Any] = {}
    for epoch in range(settings.max_epochs):
        train_steps(
            model,
            train_images,
            train_targets,
            steps=steps,
            settings=settings,
            generator=generator,
            optimizer=optimizer,
            scheduler=schedule,
        )
        scores.append(mean_dice(predict_probability(model, val_images), val_targets))
        log.info(
            "train_lungs: epoch %d val Dice %.4f (%.0f s)",
            epoch + 1,
            scores[-1],
            time.monotonic() - started,
        )
        if scores[-1] >= max(scores):
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if time.monotonic() - started > settings.minutes * 60:
            break
    model.load_state_dict(best)
    result = TrainResult(
        len(scores), time.monotonic() - started, tuple(scores), int(np.argmax(scores)) + 1
    )
    return model, result


# --- shipping and loading -----------------------------------------------------------


def export_lungs_onnx(model: torch.nn.Module, path: str | Path, input_size: int) -> Path:
    """Write the U-Net as ONNX (fp32, weights inside, the project's opset), atomically.

    The graph holds the per-image standardisation and the sigmoid: input
    :data:`ONNX_INPUT` ``(N, 1, S, S)`` float32 grey levels / 255, output
    :data:`ONNX_OUTPUT` ``(N, 1, S, S)`` lung probability; the batch axis is dynamic,
    ``S`` is ``input_size``.

    Raises:
        MissingExtraError: torch is not installed.
    """
    torch = _torch()
    from covidcxr.models.onnx_export import OPSET

    class Probability(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Any) -> Any:
            return _probability_tensor(torch, self.net, x)

    was_training = model.training
    model.eval()
    target = Path(path)
    try:
        with atomic_output(target) as temporary:
            # The exporter wants a name ending in .onnx.
            onnx_path = temporary.with_suffix(".onnx")
            try:
                torch.onnx.export(
                    Probability().eval(),
                    (torch.zeros(2, 1, input_size, input_size),),
                    str(onnx_path),
                    input_names=[ONNX_INPUT],
                    output_names=[ONNX_OUTPUT],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    opset_version=OPSET,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
                onnx_path.replace(temporary)
            finally:
                onnx_path.unlink(missing_ok=True)
    finally:
        model.train(was_training)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_weights(model: torch.nn.Module, out_dir: str | Path, card: Mapping[str, Any]) -> Path:
    """Write ``weights.pt`` (float32 state dict), ``model.onnx`` (:func:`export_lungs_onnx`
    at ``card["input_size"]``) and ``model.json`` (``card`` plus both files' sha256)
    into ``out_dir``; returns the folder."""
    torch = _torch()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / "weights.pt") as temporary:
        torch.save(model.state_dict(), temporary)
    export_lungs_onnx(model, folder / "model.onnx", int(card["input_size"]))
    hashes = {
        "weights_sha256": _sha256(folder / "weights.pt"),
        "onnx_sha256": _sha256(folder / "model.onnx"),
    }
    text = json.dumps({**card, **hashes}, indent=2, sort_keys=True) + "\n"
    with atomic_output(folder / "model.json") as temporary:
        temporary.write_text(text, encoding="utf-8")
    return folder


def _verified(path: Path, card: Mapping[str, Any], key: str) -> Path:
    """``path`` if it exists and its sha256 is ``card[key]``."""
    if not path.is_file():
        raise MetadataError(
            f"LungSegmenter.load: {str(path)!r} is missing; "
            "train one with covidcxr train-lungs --out DIR"
        )
    digest = _sha256(path)
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
        session: an onnxruntime session of :func:`export_lungs_onnx`'s graph, instead
            of ``model``.

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
            weights_dir: the folder :func:`save_weights` wrote.
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
        torch = _torch()
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
        reference = _read_grey(mask_path)
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
