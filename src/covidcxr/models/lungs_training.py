"""Making a lung segmenter: the masked images, training the U-Net, and saving it.

:func:`masked_samples` picks the collection's frontal X-rays with a lung mask and splits
them by patient; :func:`prepare_lung_data` letterboxes them into arrays;
:func:`train_lungs` trains :func:`covidcxr.models.lungs.build_unet` on them and
:func:`save_weights` writes the folder :meth:`covidcxr.models.lungs.LungSegmenter.load`
reads (``covidcxr train-lungs``). Using a segmenter needs only :mod:`covidcxr.models.lungs`.
Torch is imported where it is used.

Why it is built this way: ``docs/decisions/0070-lung-segmentation.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.atomic import atomic_output
from covidcxr.dataset.loading import load_image
from covidcxr.dataset.samples import Sample, SampleSet, Selection, build_samples
from covidcxr.dataset.splits import Split, make_split
from covidcxr.dataset.tasks import get_task
from covidcxr.errors import MetadataError
from covidcxr.models.bundle import file_sha256
from covidcxr.models.lungs import (
    INPUT_SIZE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    build_unet,
    dice,
    letterbox_box,
    predict_probability,
    probability_tensor,
    read_levels,
    standardise_tensor,
    torch_or_missing,
)

if TYPE_CHECKING:
    import torch

    from covidcxr.store.db import Store

log = logging.getLogger(__name__)

#: Target value of pixels the loss and Dice skip (V7 Labs' grey 127, "ignore").
IGNORE: Final = 2


#: A reference mask with less lung than this share of the image is an empty mask
#: (V7 Labs ships empty masks for CT and lateral images).
MIN_LUNG_FRACTION: Final = 0.02


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
        if mask is not None and (read_levels(mask) >= 192).mean() >= MIN_LUNG_FRACTION:
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
        targets.append(letterbox_target(read_levels(mask_path), size))
    return LungData(
        images=np.stack(images),
        targets=np.stack(targets),
        folds=np.array([split.fold_of(s.patient) for s in sample_set.samples]),
        patients=np.array([s.patient for s in sample_set.samples]),
        image_sha256=np.array([s.image_sha256 for s in sample_set.samples]),
        split_sha256=split.membership_sha256,
    )


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
    torch = torch_or_missing()
    generator = generator or torch.Generator().manual_seed(settings.seed)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    x_all, y_all = _tensors(torch, images, targets)
    model.train()
    losses = []
    for _ in range(steps):
        chosen = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
        x, y = _augment(torch, x_all[chosen], y_all[chosen], generator)
        loss = _loss(torch, model(standardise_tensor(torch, x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


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
    torch = torch_or_missing()
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


def export_lungs_onnx(model: torch.nn.Module, path: str | Path, input_size: int) -> Path:
    """Write the U-Net as ONNX (fp32, weights inside, the project's opset), atomically.

    The graph holds the per-image standardisation and the sigmoid: input
    :data:`ONNX_INPUT` ``(N, 1, S, S)`` float32 grey levels / 255, output
    :data:`ONNX_OUTPUT` ``(N, 1, S, S)`` lung probability; the batch axis is dynamic,
    ``S`` is ``input_size``.

    Raises:
        MissingExtraError: torch is not installed.
    """
    torch = torch_or_missing()
    from covidcxr.models.onnx_export import OPSET

    class Probability(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Any) -> Any:
            return probability_tensor(torch, self.net, x)

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


def save_weights(model: torch.nn.Module, out_dir: str | Path, card: Mapping[str, Any]) -> Path:
    """Write ``weights.pt`` (float32 state dict), ``model.onnx`` (:func:`export_lungs_onnx`
    at ``card["input_size"]``) and ``model.json`` (``card`` plus both files' sha256)
    into ``out_dir``; returns the folder."""
    torch = torch_or_missing()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / "weights.pt") as temporary:
        torch.save(model.state_dict(), temporary)
    export_lungs_onnx(model, folder / "model.onnx", int(card["input_size"]))
    hashes = {
        "weights_sha256": file_sha256(folder / "weights.pt"),
        "onnx_sha256": file_sha256(folder / "model.onnx"),
    }
    text = json.dumps({**card, **hashes}, indent=2, sort_keys=True) + "\n"
    with atomic_output(folder / "model.json") as temporary:
        temporary.write_text(text, encoding="utf-8")
    return folder
