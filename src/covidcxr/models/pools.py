"""Images in memory for training: uint8 pixels with findings labels and gate classes,
and the per-epoch mix of findings, gate-only and drawn pictures."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from covidcxr.dataset.loading import CacheDir
from covidcxr.dataset.samples import SampleSet
from covidcxr.dataset.torch_dataset import CollectionDataset, normalise_batch
from covidcxr.models import gate_data
from covidcxr.models.bundle import GATE_CLASSES
from covidcxr.models.sample_sets import (
    FRONTAL,
    INVERTED,
    NOT_MEDICAL,
    GateSamples,
    gate_class_of,
)

#: cross_entropy's ignore_index: images without a gate class.
NO_GATE_CLASS: Final = -100
#: Per epoch: frontal X-rays without findings labels (other sources) drawn, as a share
#: of the findings training images; pictures that are not radiographs, as a share of
#: the epoch.
OTHER_FRONTAL_SHARE: Final = 0.5
NOT_MEDICAL_SHARE: Final = 0.08


def load_pixels(
    samples: SampleSet, indices: Sequence[int], size: int, cache_dir: CacheDir
) -> NDArray[np.uint8]:
    """uint8 (n, size, size) through CollectionDataset (cached on disk)."""
    if not indices:
        return np.zeros((0, size, size), dtype=np.uint8)
    dataset = CollectionDataset(
        samples,
        size=size,
        indices=list(indices),
        cache_dir=cache_dir,
        masks=False,
        normalise=False,
    )
    pixels = np.empty((len(dataset), size, size), dtype=np.uint8)
    chunk = 64
    for start in range(0, len(dataset), chunk):
        items = dataset.__getitems__(list(range(start, min(start + chunk, len(dataset)))))
        for offset, item in enumerate(items):
            pixels[start + offset] = item["img"][0].numpy()
    return pixels


def to_input(pixels: Tensor) -> Tensor:
    """uint8 (N, S, S) -> float32 (N, 1, S, S) in [-1024, 1024], the values of
    :func:`covidcxr.dataset.loading.normalise`."""
    return normalise_batch(pixels.unsqueeze(1))


@dataclass
class Pool:
    """Images in memory with their findings labels (NaN: unknown) and gate classes
    (:data:`NO_GATE_CLASS`: none)."""

    pixels: NDArray[np.uint8]
    labels: NDArray[np.float32]
    gate: NDArray[np.int64]
    patients: list[str]

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @classmethod
    def empty(cls, size: int, n_labels: int) -> Pool:
        """No images."""
        return cls.drawn(np.zeros((0, size, size), np.uint8), 0, n_labels)

    @classmethod
    def drawn(cls, pixels: NDArray[np.uint8], gate_class: int, n_labels: int) -> Pool:
        """Pictures made here (inverted, not medical): one gate class, no findings."""
        return cls(
            pixels,
            np.full((len(pixels), n_labels), np.nan, dtype=np.float32),
            np.full(len(pixels), gate_class, dtype=np.int64),
            ["drawn"] * len(pixels),
        )

    @classmethod
    def join(cls, pools: Sequence[Pool]) -> Pool:
        """The pools one after the other."""
        return cls(
            np.concatenate([p.pixels for p in pools]),
            np.concatenate([p.labels for p in pools]),
            np.concatenate([p.gate for p in pools]),
            [x for p in pools for x in p.patients],
        )

    def take(self, rows: NDArray[np.int64]) -> Pool:
        """The images at ``rows``."""
        return Pool(
            self.pixels[rows], self.labels[rows], self.gate[rows], [self.patients[i] for i in rows]
        )


def findings_pool(
    samples: SampleSet, indices: Sequence[int], size: int, cache_dir: CacheDir
) -> Pool:
    """Findings images with their labels and gate class (from view and modality)."""
    chosen = [samples.samples[i] for i in indices]
    gate = [gate_class_of(s.metadata.get("view"), s.metadata.get("modality")) for s in chosen]
    return Pool(
        load_pixels(samples, indices, size, cache_dir),
        np.array([s.labels for s in chosen], dtype=np.float32).reshape(
            len(chosen), len(samples.label_names)
        ),
        np.array([NO_GATE_CLASS if g is None else g for g in gate], dtype=np.int64),
        [s.patient for s in chosen],
    )


def gate_pool(
    samples: SampleSet, indices: Sequence[int], size: int, n_labels: int, cache_dir: CacheDir
) -> Pool:
    """Gate-only images: their gate class, no findings labels."""
    chosen = [samples.samples[i] for i in indices]
    return Pool(
        load_pixels(samples, indices, size, cache_dir),
        np.full((len(chosen), n_labels), np.nan, dtype=np.float32),
        np.array([int(np.argmax(s.labels)) for s in chosen], dtype=np.int64),
        [s.patient for s in chosen],
    )


@dataclass(frozen=True)
class TrainingPools:
    """What one fit trains and validates on.

    Attributes:
        findings_train: the findings training images.
        findings_val: the findings validation images.
        gate_train: gate-only training images (frontal ones are sampled per epoch).
        val: findings and gate-only validation images, inverted copies of the
            validation frontals and a fixed set of drawn pictures.
        other_per_epoch: gate-only frontal images drawn per epoch.
        drawn_per_epoch: not-medical pictures drawn per epoch.
    """

    findings_train: Pool
    findings_val: Pool
    gate_train: Pool
    val: Pool
    other_per_epoch: int
    drawn_per_epoch: int

    @property
    def other_frontal(self) -> NDArray[np.intp]:
        """Rows of ``gate_train`` that are frontal X-rays (sampled per epoch)."""
        return np.flatnonzero(self.gate_train.gate == FRONTAL)

    @property
    def fixed_gate(self) -> NDArray[np.intp]:
        """Rows of ``gate_train`` shown every epoch (lateral, CT)."""
        return np.flatnonzero(self.gate_train.gate != FRONTAL)

    @property
    def base_count(self) -> int:
        """Images per epoch before the drawn pictures."""
        return len(self.findings_train) + len(self.fixed_gate) + self.other_per_epoch

    def epoch(self, rng: np.random.Generator) -> Pool:
        """One epoch's images: every findings and fixed gate image, a draw of the other
        frontal images and fresh not-medical pictures (in that order)."""
        chosen = rng.choice(self.other_frontal, size=self.other_per_epoch, replace=False)
        size = self.findings_train.pixels.shape[1]
        n_labels = self.findings_train.labels.shape[1]
        rows = np.concatenate([self.fixed_gate, np.sort(chosen)]).astype(np.int64)
        pictures = gate_data.not_medical_images(self.drawn_per_epoch, size, rng)
        return Pool.join(
            [
                self.findings_train,
                self.gate_train.take(rows),
                Pool.drawn(pictures, NOT_MEDICAL, n_labels),
            ]
        )


def training_pools(
    findings: SampleSet,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    gate: GateSamples | None,
    size: int,
    cache_dir: CacheDir,
    rng: np.random.Generator,
) -> TrainingPools:
    """Load the images of one fit (``rng`` draws the fixed validation pictures)."""
    n_labels = len(findings.label_names)
    findings_train = findings_pool(findings, train_indices, size, cache_dir)
    findings_val = findings_pool(findings, val_indices, size, cache_dir)
    gate_train = gate_val = Pool.empty(size, n_labels)
    if gate is not None:
        gate_train = gate_pool(gate.samples, gate.train_indices, size, n_labels, cache_dir)
        gate_val = gate_pool(gate.samples, gate.val_indices, size, n_labels, cache_dir)
    other_frontal = int((gate_train.gate == FRONTAL).sum())
    val_frontal = np.flatnonzero(findings_val.gate == FRONTAL)
    n_drawn_val = max(6, round(NOT_MEDICAL_SHARE * (len(findings_val) + len(gate_val))))
    val = Pool.join(
        [
            findings_val,
            gate_val,
            Pool.drawn(gate_data.invert(findings_val.pixels[val_frontal]), INVERTED, n_labels),
            Pool.drawn(gate_data.not_medical_images(n_drawn_val, size, rng), NOT_MEDICAL, n_labels),
        ]
    )
    other_per_epoch = min(other_frontal, int(OTHER_FRONTAL_SHARE * len(findings_train)))
    base_count = len(findings_train) + len(gate_train) - other_frontal + other_per_epoch
    return TrainingPools(
        findings_train,
        findings_val,
        gate_train,
        val,
        other_per_epoch=other_per_epoch,
        drawn_per_epoch=max(4, round(NOT_MEDICAL_SHARE * base_count)),
    )


def label_counts(labels: NDArray[np.float32], names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per label: positive, negative and unknown images."""
    result = {}
    for j, name in enumerate(names):
        column = labels[:, j]
        known = column[~np.isnan(column)]
        result[name] = {
            "positive": int((known >= 0.5).sum()),
            "negative": int((known < 0.5).sum()),
            "unknown": int(np.isnan(column).sum()),
        }
    return result


def gate_counts(gate: NDArray[np.int64]) -> dict[str, int]:
    """Images per gate class."""
    counts = Counter(int(g) for g in gate if g != NO_GATE_CLASS)
    return {name: counts.get(i, 0) for i, name in enumerate(GATE_CLASSES)}


def membership_entries(
    findings: SampleSet, indices: Iterable[int], gate: GateSamples | None
) -> list[tuple[str, Sequence[float] | str]]:
    """(image sha256, label vector or gate class) of every image training saw."""
    entries: list[tuple[str, Sequence[float] | str]] = [
        (findings.samples[i].image_sha256, findings.samples[i].labels) for i in indices
    ]
    if gate is not None:
        for i in (*gate.train_indices, *gate.val_indices):
            sample = gate.samples.samples[i]
            entries.append((sample.image_sha256, GATE_CLASSES[int(np.argmax(sample.labels))]))
    return entries


def forward_pool(
    network: torch.nn.Module, pool: Pool, device: torch.device, batch_size: int
) -> dict[str, NDArray[np.float32]]:
    """Findings and gate logits and pooled features of a pool (eval mode, no
    augmentation)."""
    network.eval()
    out: dict[str, list[NDArray[np.float32]]] = {"findings": [], "gate": [], "pooled": []}
    with torch.no_grad():
        for start in range(0, len(pool), batch_size):
            batch = to_input(torch.from_numpy(pool.pixels[start : start + batch_size]))
            outputs = network(batch.to(device))
            for key in out:
                out[key].append(outputs[key].cpu().numpy())
    return {
        key: np.concatenate(values) if values else np.zeros((0, 0), np.float32)
        for key, values in out.items()
    }
