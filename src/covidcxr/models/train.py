"""Train the second-opinion model: findings, severity and the input gate in one network.

One :class:`~covidcxr.models.network.CXRModel` (backbone -> pooled features -> linear
heads) learns two things by gradient descent and gets a third by regression:

* **findings** (the ``second-opinion`` task: COVID-19, other viral, bacterial, fungal
  pneumonia, no finding): masked binary cross-entropy (unknown labels, NaN, add
  nothing), ``pos_weight`` = negatives / positives per label, on frontal X-rays of the
  *training sources* only (default: the upstream collection). Why only those: mixing
  sources (say NIH "No Finding" controls with the collection's COVID-19 images) makes
  "which hospital, which scanner, which text marker" the easiest way to tell the
  classes apart, and a network learns that instead of the disease (DeGrave et al.
  2021). Within one source every label is seen with the same shortcuts on both sides.
* **input gate** (:data:`~covidcxr.models.bundle.GATE_CLASSES`): cross-entropy over
  frontal X-rays (of *every* source in the store: the gate should accept any hospital's
  radiographs), lateral X-rays, CT slices, frontal X-rays inverted on the fly, and
  procedurally drawn pictures that are not radiographs
  (:mod:`covidcxr.models.gate_data`). The gate's other rules (tiny images, colour)
  are :class:`~covidcxr.models.bundle.GateRules` values stored with the model.
* **severity** (geographic extent 0-8, opacity 0-6): ridge regression on the pooled
  features of the ~93 expert-scored images, written into the severity head; its
  interval is split-conformal (see :mod:`covidcxr.models.severity`). By default the
  scored patients (and every patient linked to them by a duplicate picture) are held
  out of the network's training, so that their features, the ridge fit, its
  cross-validated error and therefore the stated interval are out-of-sample.

After training: the findings head's bias is corrected for ``pos_weight`` (it shifts
the optimum logit by ``log(pos_weight)``), then a temperature per label is fitted on the
validation fold (minimum NLL) and an operating point per label is chosen there
(maximum Youden's J).

Entry points:

* :func:`train_model`: from a store: selects the samples, makes (or takes) a
  patient-grouped holdout split, holds out patients, trains, fits severity, scores the
  test fold;
* :func:`fit_on_indices`: the core, for code that makes its own folds
  (cross-validation in :mod:`covidcxr.models.evaluate`);
* :class:`TrainedModel`: ``predict`` (calibrated probabilities, severity with its
  interval, gate probabilities, pooled features) and ``save`` (a bundle: weights.pt,
  model.onnx, model.json, MODEL_CARD.md, split.csv); :meth:`TrainedModel.from_bundle`
  loads one back.

Randomness: one seed. Shuffling, augmentation and drawn pictures come from a
``torch.Generator`` and ``numpy.random.default_rng`` made from it; weight
initialisation and dropout draw from torch's global generator, so training runs inside
``torch.random.fork_rng`` seeded from the config (the caller's generator state is
restored afterwards). ``torch.use_deterministic_algorithms`` is on while training on
the CPU (and restored). The same seed, data and thread count give the same weights.

Images are loaded once through :class:`~covidcxr.dataset.torch_dataset.CollectionDataset`
(and its on-disk cache, so a second run decodes nothing) and kept in memory as
``uint8`` (size^2 bytes each: 50 kB at 224 px).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from torch.nn import functional as F

from covidcxr import __version__
from covidcxr.atomic import atomic_directory
from covidcxr.dataset.loading import DEFAULT_CACHE_DIR, CacheDir
from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.splits import Split, linked_patients, make_split
from covidcxr.dataset.tasks import SECOND_OPINION_LABELS, Labels, Task, get_task
from covidcxr.dataset.torch_dataset import CollectionDataset, normalise_batch
from covidcxr.errors import MetadataError
from covidcxr.models import bundle as bundle_module
from covidcxr.models import card as card_module
from covidcxr.models import gate_data, severity
from covidcxr.models.bundle import GATE_CLASSES, GateRules, ModelBundle
from covidcxr.models.metrics import AUC, bootstrap, roc_auc
from covidcxr.models.network import CXRModel, SmallBackbone, build_backbone
from covidcxr.models.onnx_export import export_onnx
from covidcxr.schema.values import FRONTAL_VIEWS
from covidcxr.store.db import Store
from covidcxr.store.duplicates import duplicate_groups

log = logging.getLogger(__name__)

FINDINGS_TASK: Final = "second-opinion"
SEVERITY_TASK: Final = "severity"
#: The findings head learns from these sources only (see the module docstring).
DEFAULT_SOURCES: Final[tuple[str, ...]] = ("covid-chestxray",)
SPLIT_FILE: Final = "split.csv"

#: The gate rules stored with models trained here. ``min_side_px``: below every image
#: of the collection (smallest side 156 px) and below which a 224 px input is mostly
#: interpolation. ``max_colourfulness`` (:func:`gate_data.colourfulness`): above every
#: radiograph of the collection (the most colourful, 0.18, are tinted phone photographs
#: of films) and below "quite colourful" photographs (0.23 on Hasler and Süsstrunk's
#: scale). ``min_frontal_probability``: the gate head's most-likely-class boundary.
DEFAULT_GATE_RULES: Final = GateRules(
    min_side_px=128, max_colourfulness=0.2, min_frontal_probability=0.5
)

FRONTAL, LATERAL, CT, INVERTED, NOT_MEDICAL = range(5)
assert GATE_CLASSES[FRONTAL] == "frontal_xray" and GATE_CLASSES[NOT_MEDICAL] == "not_medical"
assert GATE_CLASSES[LATERAL] == "lateral_xray" and GATE_CLASSES[CT] == "ct"
assert GATE_CLASSES[INVERTED] == "inverted"
_NO_GATE_CLASS = -100  # cross_entropy's ignore_index

#: Per epoch: frontal X-rays without findings labels (other sources) drawn, as a share
#: of the findings training images; pictures that are not radiographs, as a share of
#: the epoch; chance that a frontal X-ray is shown inverted.
OTHER_FRONTAL_SHARE: Final = 0.5
NOT_MEDICAL_SHARE: Final = 0.08
INVERTED_PROBABILITY: Final = 0.1
#: Share of the patients outside the findings split whose gate images validate.
GATE_VAL_SHARE: Final = 0.15
#: Patient-bootstrap replicates for the test-fold intervals.
BOOTSTRAP_REPLICATES: Final = 1000

GATE_UNKNOWN_VIEW = "view unknown (no input-gate class)"
HELD_OUT_SEVERITY = "severity-scored, held out so severity is measured out of sample"
HELD_OUT_GIVEN = "excluded by the caller"


# --- configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (stored in model.json).

    Attributes:
        size: input side in pixels.
        width: width of the built-in ``small`` backbone (ignored by others).
        backbone: ``small``, ``torchscript:PATH`` or ``xrv-densenet121:PATH``.
        epochs: maximum epochs (early stopping may end sooner).
        batch_size: images per step.
        lr: peak learning rate of AdamW (cosine schedule, one warm-up epoch).
        weight_decay: AdamW decay on conv and linear weights (not on norms, biases).
        seed: the one seed (split, initialisation, shuffling, augmentation, pictures).
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        sources: the sources whose frontal X-rays train the findings head.
        patience: epochs without a lower validation loss before stopping.
        gate_weight: weight of the gate's loss against the findings loss.
        augment: small random affine and brightness/contrast changes.
        freeze_backbone: train only the heads (a pretrained backbone as a fixed
            feature extractor).
        hold_out_severity: keep the severity-scored patients out of the network's
            training so that severity is fitted and measured out of sample.
        severity_level: nominal coverage of the stated severity interval.
        severity_splits: random splits of the reference protocol (0: skip it).
        ema: decay per step of the exponential moving average of the weights that is
            validated, early-stopped on and kept (0: the raw weights). With a
            validation fold of a few dozen images the raw weights' validation loss
            jumps from epoch to epoch; the average is smoother and usually better.
        threads: torch's intra-op CPU threads while training. Part of the config
            because results depend on it (summation order), and 1 by default: on a
            shared or small machine more threads mostly wait for each other (4x
            slower measured on 2 busy cores); raise it on an idle many-core machine.
    """

    size: int = 224
    width: int = 24
    backbone: str = "small"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    device: str = "cpu"
    sources: tuple[str, ...] = DEFAULT_SOURCES
    patience: int = 8
    gate_weight: float = 0.5
    augment: bool = True
    freeze_backbone: bool = False
    hold_out_severity: bool = True
    severity_level: float = 0.9
    severity_splits: int = 50
    ema: float = 0.99
    threads: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.size < 32:
            problems.append(f"size {self.size} (need >= 32)")
        if self.width < 8 or self.width % 2:
            problems.append(f"width {self.width} (need an even number >= 8)")
        if self.epochs < 1:
            problems.append(f"epochs {self.epochs} (need >= 1)")
        if self.batch_size < 2:
            problems.append(f"batch_size {self.batch_size} (need >= 2)")
        if not (self.lr > 0 and self.weight_decay >= 0):
            problems.append(f"lr {self.lr} / weight_decay {self.weight_decay}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"device {self.device!r} (cpu or cuda)")
        if not 0 < self.severity_level < 1:
            problems.append(f"severity_level {self.severity_level} (in (0, 1))")
        if not 0 <= self.ema < 1:
            problems.append(f"ema {self.ema} (in [0, 1))")
        if self.threads < 1:
            problems.append(f"threads {self.threads} (need >= 1)")
        if self.patience < 1:
            problems.append(f"patience {self.patience} (need >= 1)")
        if problems:
            raise MetadataError("TrainConfig: bad " + "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        values = asdict(self)
        values["sources"] = list(self.sources)
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`as_dict` (unknown keys are ignored: newer versions)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "sources" in values:
            values["sources"] = tuple(values["sources"])
        return cls(**values)


# --- small numeric tools (numpy) ------------------------------------------------------


def binary_nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``sigmoid(logits / temperature)``; NaN labels
    are ignored (NaN when none is known)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    known = ~np.isnan(y)
    if not known.any():
        return math.nan
    z, y = z[known], y[known]
    # log(1 + exp(-z)) for positives, log(1 + exp(z)) for negatives, stably.
    return float(np.mean(np.logaddexp(0.0, np.where(y >= 0.5, -z, z))))


def fit_temperature(
    logits: Any, labels: Any, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature ``T`` minimising :func:`binary_nll` of ``logits / T``.

    The NLL is convex in ``1 / T``; a golden-section search over ``1 / T`` finds the
    minimum to 1e-6. Without known labels, or with one class only (the NLL then falls
    without end as ``T`` shrinks), 1.0 is returned.

    Args:
        logits: uncalibrated logits.
        labels: 0/1, NaN = unknown.
        bounds: the allowed range of T.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    known = y[~np.isnan(y)]
    if known.size == 0 or known.min() == known.max():
        return 1.0
    low, high = 1.0 / bounds[1], 1.0 / bounds[0]
    ratio = (math.sqrt(5) - 1) / 2

    def cost(inverse: float) -> float:
        return binary_nll(logits, labels, 1.0 / inverse)

    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = cost(c), cost(d)
    while b - a > 1e-6:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = cost(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = cost(d)
    return 1.0 / ((a + b) / 2)


def youden_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """The threshold maximising Youden's J = sensitivity + specificity - 1.

    Candidates are midpoints between consecutive distinct scores (and just outside
    their range); a score >= the threshold is positive. Ties in J go to the higher
    threshold (fewer false positives).

    Returns:
        (threshold, J); (NaN, NaN) when one class is missing.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    known = ~np.isnan(y)
    s, positive = s[known], y[known] >= 0.5
    if positive.all() or not positive.any():
        return math.nan, math.nan
    distinct = np.unique(s)
    candidates = np.concatenate(
        [[distinct[0] - 1e-6], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1e-6]]
    )
    best = (math.nan, -math.inf)
    for threshold in candidates:
        predicted = s >= threshold
        j = predicted[positive].mean() + (~predicted[~positive]).mean() - 1.0
        if j >= best[1] - 1e-12:
            best = (float(threshold), float(j))
    return best


def _bootstrap_auroc(
    scores: NDArray[np.float64],
    labels: NDArray[np.float64],
    patients: Sequence[str],
    rng: np.random.Generator,
    replicates: int = BOOTSTRAP_REPLICATES,
) -> tuple[float, float]:
    """95% percentile interval of the AUROC, resampling patients (not images)."""
    seed = int(rng.integers(0, 2**31 - 1))
    estimate = bootstrap([AUC], labels, scores, list(patients), n_resamples=replicates, seed=seed)[
        "auc"
    ]
    return estimate.low, estimate.high


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """1 / (1 + exp(-z)) without overflow."""
    result: NDArray[np.float64] = np.exp(-np.logaddexp(0.0, -z))
    return result


def _round(value: float, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), digits)


# --- samples for the gate and the folds -------------------------------------------------


def gate_class_of(view: str | None, modality: str | None) -> int | None:
    """The gate class of a stored image from its view and modality (None: unknown)."""
    if modality == "CT":
        return CT
    if modality != "X-ray" or view is None:
        return None
    if view in FRONTAL_VIEWS:
        return FRONTAL
    if view == "L":
        return LATERAL
    return None


def _gate_labels(record: Mapping[str, Any]) -> tuple[Labels | None, str | None]:
    gate_class = gate_class_of(record.get("view"), record.get("modality"))
    if gate_class is None:
        return None, GATE_UNKNOWN_VIEW
    return tuple(1.0 if i == gate_class else 0.0 for i in range(len(GATE_CLASSES))), None


#: Every stored image with a known gate class, labelled one-hot over GATE_CLASSES.
GATE_TASK: Final = Task(
    "input-gate",
    "multilabel",
    GATE_CLASSES,
    "input gate: frontal X-ray, lateral X-ray, CT (inverted and not-medical are drawn)",
    _gate_labels,
)


def gate_samples(store: Store) -> SampleSet:
    """Every stored image of every source with a gate class (frontal, lateral, CT)."""
    return build_samples(
        store, GATE_TASK, Selection(views=("any",), modalities=("any",), one_per_image=True)
    )


def findings_samples(store: Store, sources: Sequence[str] = DEFAULT_SOURCES) -> SampleSet:
    """The findings head's samples: frontal X-rays of ``sources``, second-opinion labels."""
    return build_samples(store, get_task(FINDINGS_TASK), Selection(sources=tuple(sources)))


def severity_samples(store: Store) -> SampleSet:
    """The expert-scored frontal X-rays (severity task)."""
    return build_samples(store, get_task(SEVERITY_TASK), Selection(has_severity=True))


@dataclass(frozen=True)
class GateSamples:
    """Gate-only images and their folds (images already in the findings set are not
    repeated here: they come with their findings labels).

    Attributes:
        samples: from :func:`gate_samples`.
        train_indices: positions used for training.
        val_indices: positions used for validation.
    """

    samples: SampleSet
    train_indices: tuple[int, ...]
    val_indices: tuple[int, ...]


def _stable_fraction(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_gate_samples(
    store: Store,
    gate: SampleSet,
    findings: SampleSet,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    *,
    exclude_patients: Iterable[str] = (),
    seed: int = 0,
) -> GateSamples:
    """Put gate-only images on the same side as their patients' findings images.

    Patients are joined into groups by duplicate pictures (as splits do). A group with
    a patient whose findings images are held out (a test fold, another CV fold, or
    ``exclude_patients``) gives nothing; a group with validation patients validates; a
    group with training patients trains; a group unknown to the findings set (lateral-
    or CT-only patients, other sources) validates with probability
    :data:`GATE_VAL_SHARE` (a hash of the group and ``seed``, so the same on every run).
    Images that are also in the findings set are left out (they come from there).
    """
    train_patients = {findings.samples[i].patient for i in train_indices}
    val_patients = {findings.samples[i].patient for i in val_indices}
    findings_patients = set(findings.patients)
    held = (findings_patients - train_patients - val_patients) | set(exclude_patients)
    findings_images = {s.image_sha256 for s in findings.samples}
    with store.read() as conn:
        groups = linked_patients(set(gate.patients) | findings_patients, duplicate_groups(conn))
    role: dict[str, str] = {}
    for group in groups:
        members = set(group)
        if members & held:
            side = "held"
        elif members & val_patients:
            side = "val"
        elif members & train_patients:
            side = "train"
        else:
            side = "val" if _stable_fraction(group[0], seed) < GATE_VAL_SHARE else "train"
        for patient in group:
            role[patient] = side
    train, val = [], []
    for index, sample in enumerate(gate.samples):
        if sample.image_sha256 in findings_images:
            continue
        side = role.get(sample.patient, "held")
        if side == "train":
            train.append(index)
        elif side == "val":
            val.append(index)
    return GateSamples(gate, tuple(train), tuple(val))


def linked_exclusions(store: Store, patients: Iterable[str], universe: Iterable[str]) -> set[str]:
    """``patients`` and every patient of ``universe`` linked to one by a duplicate
    picture (so a held-out image cannot come back under another patient's name)."""
    wanted = set(patients)
    if not wanted:
        return set()
    with store.read() as conn:
        groups = linked_patients(set(universe) | wanted, duplicate_groups(conn))
    result = set(wanted)
    for group in groups:
        if wanted & set(group):
            result |= set(group)
    return result


@dataclass(frozen=True)
class SeverityData:
    """The scored images for the severity head.

    Attributes:
        samples: from :func:`severity_samples`.
        indices: positions to fit on.
        groups: per position in ``indices``, the patient group (duplicate-linked
            patients share one), for grouped cross-validation.
        out_of_sample: whether the backbone never trained on these images (then the
            reference protocol is run and the interval is honest).
    """

    samples: SampleSet
    indices: tuple[int, ...]
    groups: tuple[str, ...]
    out_of_sample: bool


def severity_data(store: Store, samples: SampleSet, *, out_of_sample: bool) -> SeverityData:
    """All scored images with their duplicate-aware patient groups."""
    with store.read() as conn:
        groups = linked_patients(samples.patients, duplicate_groups(conn))
    group_of = {patient: group[0] for group in groups for patient in group}
    indices = tuple(range(len(samples.samples)))
    return SeverityData(
        samples,
        indices,
        tuple(group_of[samples.samples[i].patient] for i in indices),
        out_of_sample,
    )


# --- loading pixels ---------------------------------------------------------------------


def _load_pixels(
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


# --- losses and augmentation ----------------------------------------------------------


def masked_bce(logits: Tensor, labels: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy over known labels only (NaN = unknown contributes nothing).

    Returns the mean over known (image, label) pairs; exactly 0 when none is known.
    """
    known = ~torch.isnan(labels)
    targets = torch.where(known, labels, torch.zeros_like(labels))
    losses = F.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=pos_weight, reduction="none"
    )
    losses = torch.where(known, losses, torch.zeros_like(losses))
    return losses.sum() / known.sum().clamp(min=1)


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Small random affine (rotation +-5 degrees, scale 0.95-1.05, shift +-4 %) and
    brightness/contrast (x0.9-1.1, +-5 % of the range) per image; borders are black.

    Args:
        images: (N, 1, S, S) in [-1024, 1024].
        generator: the CPU generator every draw comes from.
    """
    n = images.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-5.0, 5.0) * math.pi / 180.0
    scale = uniform(0.95, 1.05)
    shift_x, shift_y = uniform(-0.08, 0.08), uniform(-0.08, 0.08)  # of the half-width
    contrast, brightness = uniform(0.9, 1.1), uniform(-0.05, 0.05) * 2048.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift_x], dim=1), torch.stack([sin, cos, shift_y], dim=1)],
        dim=1,
    ).to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Sample x + 1024 so that zero padding is black (-1024), then shift back.
    moved = F.grid_sample(images + 1024.0, grid, align_corners=False, padding_mode="zeros")
    moved = moved - 1024.0
    moved = moved * contrast.to(images.device).view(n, 1, 1, 1)
    moved = moved + brightness.to(images.device).view(n, 1, 1, 1)
    return moved.clamp(-1024.0, 1024.0)


@contextmanager
def _deterministic(device: str, seed: int, threads: int) -> Iterator[None]:
    """Deterministic algorithms (CPU), a fixed thread count, and torch's global
    generators forked and seeded; all restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    devices: list[int] = []
    if cuda:
        devices = [torch.device(device).index or 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # CUDA has no deterministic kernel for some backward passes (and needs a
        # CUBLAS workspace setting); there determinism is best effort.
        torch.use_deterministic_algorithms(not cuda)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
            torch.set_num_threads(previous_threads)


def _initialise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """torch's default initialisation of conv and linear layers, from ``generator``."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def build_network(config: TrainConfig, n_findings: int, n_severity: int = 2) -> CXRModel:
    """The network a config describes (weights as torch initialises them)."""
    backbone, channels = build_backbone(config.backbone, width=config.width)
    return CXRModel(backbone, channels, n_findings, n_severity, len(GATE_CLASSES))


# --- the trained model ---------------------------------------------------------------


@dataclass
class TrainedModel:
    """A trained network with its calibration, operating points, severity interval and
    gate rules: everything a bundle holds.

    Attributes:
        network: the torch module (eval mode).
        config: how it was trained.
        findings: finding label names (output order).
        finding_definitions: per label, ``{"include": [...], "exclude": [...]}``.
        temperatures: per label, divide the logit by this.
        thresholds: per label, the operating point on calibrated probability.
        operating_point: how the thresholds were chosen.
        severity_labels: severity output names.
        severity_ranges: per output, (min, max).
        severity_interval: ``{"level", "half_width", "method"}``; empty when severity
            was not fitted (then predictions are NaN).
        gate_rules: the stored gate rules.
        provenance: what training recorded (data, split, history, metrics).
        split: the split it was trained on (saved as split.csv), if any.
    """

    network: CXRModel
    config: TrainConfig
    findings: tuple[str, ...]
    finding_definitions: dict[str, dict[str, list[str]]]
    temperatures: tuple[float, ...]
    thresholds: tuple[float, ...]
    operating_point: str
    severity_labels: tuple[str, ...]
    severity_ranges: tuple[tuple[float, float], ...]
    severity_interval: dict[str, Any]
    gate_rules: GateRules = DEFAULT_GATE_RULES
    provenance: dict[str, Any] = field(default_factory=dict)
    split: Split | None = None

    @property
    def device(self) -> torch.device:
        """Where the network's weights are."""
        return next(self.network.parameters()).device

    @property
    def input_size(self) -> int:
        """The side of the square input in pixels."""
        return self.config.size

    def predict_findings(self, images: Any) -> NDArray[np.float64]:
        """N x labels calibrated probabilities (``predict(images)["findings"]``)."""
        return self.predict(images)["findings"]

    def features(self, images: Any) -> NDArray[np.float64]:
        """N x C pooled backbone features (``predict(images)["pooled"]``)."""
        pooled: NDArray[np.float64] = self.predict(images)["pooled"].astype(np.float64)
        return pooled

    def _batches(self, images: Any, batch_size: int) -> Iterator[Tensor]:
        """Inputs as float (B, 1, S, S) batches in [-1024, 1024]."""
        size = self.config.size

        def check(shape: Sequence[int]) -> None:
            if tuple(shape[-2:]) != (size, size):
                raise ValueError(
                    f"TrainedModel.predict: images are {tuple(shape[-2:])}, the model takes "
                    f"{size}x{size}; load them with covidcxr.dataset.loading.load_image(path, "
                    f"{size}) or CollectionDataset(size={size})"
                )

        if isinstance(images, np.ndarray) and images.dtype != np.uint8:
            # Float images as CollectionDataset gives them: (N, 1, S, S) in [-1024, 1024].
            images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if isinstance(images, np.ndarray):
            array = images[None] if images.ndim == 2 else images
            if array.dtype != np.uint8 or array.ndim != 3:
                raise ValueError(
                    "TrainedModel.predict: give uint8 images (N, S, S) or (S, S) or float "
                    f"images (N, 1, S, S), got {array.dtype} {array.shape}"
                )
            check(array.shape)
            for start in range(0, len(array), batch_size):
                yield to_input(
                    torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size]))
                )
            return
        if isinstance(images, Tensor):
            tensor = images if images.ndim == 4 else images.unsqueeze(0)
            if tensor.ndim != 4 or tensor.shape[1] != 1:
                raise ValueError(
                    "TrainedModel.predict: float images must be (N, 1, S, S), got "
                    f"{tuple(images.shape)}"
                )
            check(tensor.shape)
            for start in range(0, len(tensor), batch_size):
                yield tensor[start : start + batch_size].to(torch.float32)
            return
        # A CollectionDataset (or any sequence of its item dicts).
        length = len(images)
        for start in range(0, length, batch_size):
            wanted = list(range(start, min(start + batch_size, length)))
            getitems = getattr(images, "__getitems__", None)
            items = getitems(wanted) if getitems is not None else [images[i] for i in wanted]
            batch = torch.stack([item["img"] for item in items]).to(torch.float32)
            check(batch.shape)
            yield batch

    def predict(
        self, images: Any, *, batch_size: int = 64, features: bool = False
    ) -> dict[str, NDArray[Any]]:
        """Run the network on preprocessed images.

        Args:
            images: ``uint8`` array (N, S, S) or (S, S) as
                :func:`~covidcxr.dataset.loading.load_image` gives; a float tensor
                (N, 1, S, S) in [-1024, 1024]; or a CollectionDataset (or a list of
                its items). ``S`` must be the model's input size.
            batch_size: images per forward pass.
            features: also return the last feature maps (N, C, h, w).

        Returns:
            ``findings`` (N, labels): calibrated probabilities; ``findings_logits``:
            before calibration; ``positive`` (N, labels): probability >= threshold;
            ``severity`` (N, 2): mean, clipped to the ranges; ``severity_lower`` and
            ``severity_upper`` (N, 2): the stated interval, clipped (all NaN when
            severity was not fitted); ``gate`` (N, gate classes): probabilities;
            ``pooled`` (N, C); ``features`` when asked.

        Raises:
            ValueError: images of another size or type.
        """
        network = self.network.eval()
        device = self.device
        parts: dict[str, list[NDArray[Any]]] = {
            k: [] for k in ("findings_logits", "severity", "gate", "pooled", "features")
        }
        with torch.no_grad():
            for batch in self._batches(images, batch_size):
                outputs = network(batch.to(device))
                parts["findings_logits"].append(outputs["findings"].cpu().numpy())
                parts["severity"].append(outputs["severity"].cpu().numpy())
                parts["gate"].append(torch.softmax(outputs["gate"], dim=1).cpu().numpy())
                parts["pooled"].append(outputs["pooled"].cpu().numpy())
                if features:
                    parts["features"].append(outputs["features"].cpu().numpy())
        n_labels, k = len(self.findings), len(self.severity_labels)
        channels = self.network.heads.findings.in_features

        def joined(name: str, width: int) -> NDArray[Any]:
            return (
                np.concatenate(parts[name])
                if parts[name]
                else np.zeros((0, width), dtype=np.float32)
            )

        logits = joined("findings_logits", n_labels).astype(np.float64)
        temperatures = np.array(self.temperatures, dtype=np.float64)
        probabilities = _sigmoid(logits / temperatures)
        raw_severity = joined("severity", 2 * k)[:, :k].astype(np.float64)
        result: dict[str, NDArray[Any]] = {
            "findings": probabilities,
            "findings_logits": logits,
            "positive": probabilities >= np.array(self.thresholds),
            "gate": joined("gate", len(GATE_CLASSES)).astype(np.float64),
            "pooled": joined("pooled", channels),
        }
        if self.severity_interval.get("half_width") is not None:
            mean = severity.clip_to_ranges(raw_severity, self.severity_ranges)
            half = np.array(self.severity_interval["half_width"], dtype=np.float64)
            result["severity"] = mean
            result["severity_lower"] = severity.clip_to_ranges(mean - half, self.severity_ranges)
            result["severity_upper"] = severity.clip_to_ranges(mean + half, self.severity_ranges)
        else:
            nan = np.full(raw_severity.shape, math.nan)
            result["severity"] = nan
            result["severity_lower"] = nan.copy()
            result["severity_upper"] = nan.copy()
        if features:
            result["features"] = (
                np.concatenate(parts["features"])
                if parts["features"]
                else (np.zeros((0, channels, 0, 0), dtype=np.float32))
            )
        return result

    def backbone_record(self) -> dict[str, Any]:
        """The bundle's ``backbone`` entry: spec, width, channels, and the sha256 of an
        external backbone's file."""
        record: dict[str, Any] = {
            "spec": self.config.backbone,
            "width": self.config.width,
            "channels": int(self.network.heads.findings.in_features),
        }
        kind, _, location = self.config.backbone.partition(":")
        if kind != "small":
            path = Path(location).expanduser()
            record["file"] = str(path)
            record["sha256"] = bundle_module.file_sha256(path) if path.is_file() else None
        return record

    def to_bundle(self, folder: Path, model_id: str, training: Mapping[str, Any]) -> ModelBundle:
        """The bundle description (files not yet hashed)."""
        return ModelBundle(
            path=folder,
            model_id=model_id,
            backbone=self.backbone_record(),
            input_size=self.config.size,
            findings=self.findings,
            finding_definitions=self.finding_definitions,
            temperatures=self.temperatures,
            thresholds=self.thresholds,
            operating_point=self.operating_point,
            severity=self.severity_labels,
            severity_ranges=self.severity_ranges,
            severity_interval=self.severity_interval,
            gate_classes=GATE_CLASSES,
            gate=self.gate_rules,
            training=dict(training),
            metrics={},
        )

    def save(
        self,
        folder: str | os.PathLike[str],
        model_id: str,
        training_provenance: Mapping[str, Any] | None = None,
        *,
        onnx: bool = True,
    ) -> ModelBundle:
        """Write the bundle: weights.pt, model.onnx, split.csv, MODEL_CARD.md, model.json.

        The files are written into a temporary folder beside ``folder`` that then
        takes its place, so a crash leaves no half bundle. An existing ``folder`` is
        replaced.

        Args:
            folder: the bundle folder (its name is usually ``model_id``).
            model_id: the model's id.
            training_provenance: merged over :attr:`provenance` (e.g. the command).
            onnx: also export model.onnx (skip only when no exporter can handle the
                backbone).

        Returns:
            the written bundle (with its file hashes).

        Raises:
            MetadataError: the model cannot be exported or written.
        """
        target = Path(folder).expanduser()
        with atomic_directory(target) as staging:
            training = {**self.provenance, **dict(training_provenance or {})}
            cpu_state = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
            torch.save(cpu_state, staging / bundle_module.WEIGHTS_FILE)
            if onnx:
                export_onnx(self.network, staging / bundle_module.ONNX_FILE, self.config.size)
            split_record = dict(training.get("split") or {})
            split_record.pop("file", None)  # listed only when written below
            listed: dict[str, str] = {}
            if self.split is not None:
                self.split.save(staging / SPLIT_FILE)
                split_record["file"] = SPLIT_FILE
                listed[SPLIT_FILE] = ""  # hashed by write_bundle
            if split_record:
                training["split"] = split_record
            described = _replace_files(self.to_bundle(staging, model_id, training), listed)
            bundle_module.write_bundle(described, card_module.render_card)
        return bundle_module.load_bundle(target)

    @classmethod
    def from_bundle(
        cls, model: ModelBundle | str | os.PathLike[str] | None = None, *, device: str = "cpu"
    ) -> TrainedModel:
        """Load a bundle (by object, id, folder, or the default) into a TrainedModel.

        An external backbone (``torchscript:PATH``, ``xrv-densenet121:PATH``) is
        rebuilt from its file, which must still be where the bundle says and have the
        recorded sha256; weights.pt then supplies every weight.

        Raises:
            MetadataError: a damaged bundle, a missing or changed backbone file, or
                weights that do not fit the network.
        """
        bundle = model if isinstance(model, ModelBundle) else bundle_module.load_bundle(model)
        spec = str(bundle.backbone.get("spec", "small"))
        if not spec.startswith("small"):
            recorded = bundle.backbone.get("sha256")
            path = Path(spec.partition(":")[2]).expanduser()
            if not path.is_file():
                raise MetadataError(
                    f"TrainedModel.from_bundle: {bundle.model_id} was trained on the backbone "
                    f"{spec!r}; its file {path} is missing: put it back there"
                )
            if recorded and bundle_module.file_sha256(path) != recorded:
                raise MetadataError(
                    f"TrainedModel.from_bundle: {bundle.model_id}: backbone file {path} has "
                    f"changed since training (sha256 {str(recorded)[:12]}… recorded)"
                )
        config_data = dict(bundle.training.get("config", {}))
        config_data.update(
            backbone=spec,
            width=int(bundle.backbone.get("width", 24)),
            size=bundle.input_size,
            device=device,
        )
        config = TrainConfig.from_dict(config_data)
        network = build_network(config, len(bundle.findings), len(bundle.severity))
        try:
            state = torch.load(bundle.weights_path, map_location="cpu", weights_only=True)
            network.load_state_dict(state)
        except (RuntimeError, OSError, ValueError) as exc:
            raise MetadataError(
                f"TrainedModel.from_bundle: {bundle.weights_path} does not fit the network "
                f"{spec!r}: {exc}"
            ) from exc
        network.to(device).eval()
        return cls(
            network=network,
            config=config,
            findings=tuple(bundle.findings),
            finding_definitions={
                k: {kk: list(vv) for kk, vv in v.items()}
                for k, v in bundle.finding_definitions.items()
            },
            temperatures=tuple(bundle.temperatures),
            thresholds=tuple(bundle.thresholds),
            operating_point=bundle.operating_point,
            severity_labels=tuple(bundle.severity),
            severity_ranges=tuple(bundle.severity_ranges),
            severity_interval=dict(bundle.severity_interval),
            gate_rules=bundle.gate,
            provenance=dict(bundle.training),
            split=None,
        )


def _replace_files(described: ModelBundle, files: Mapping[str, str]) -> ModelBundle:
    return ModelBundle(**{**described.__dict__, "files": dict(files)})


# --- the training loop ------------------------------------------------------------------


@dataclass
class _Pool:
    """Images in memory with their findings labels and gate classes."""

    pixels: NDArray[np.uint8]
    labels: NDArray[np.float32]
    gate: NDArray[np.int64]
    patients: list[str]

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @classmethod
    def empty(cls, size: int, n_labels: int) -> _Pool:
        return cls(
            np.zeros((0, size, size), np.uint8),
            np.zeros((0, n_labels), np.float32),
            np.zeros(0, np.int64),
            [],
        )

    @classmethod
    def join(cls, pools: Sequence[_Pool]) -> _Pool:
        return cls(
            np.concatenate([p.pixels for p in pools]),
            np.concatenate([p.labels for p in pools]),
            np.concatenate([p.gate for p in pools]),
            [x for p in pools for x in p.patients],
        )

    def take(self, rows: NDArray[np.int64]) -> _Pool:
        return _Pool(
            self.pixels[rows], self.labels[rows], self.gate[rows], [self.patients[i] for i in rows]
        )


def _findings_pool(
    samples: SampleSet, indices: Sequence[int], size: int, cache_dir: CacheDir
) -> _Pool:
    chosen = [samples.samples[i] for i in indices]
    gate = [gate_class_of(s.metadata.get("view"), s.metadata.get("modality")) for s in chosen]
    return _Pool(
        _load_pixels(samples, indices, size, cache_dir),
        np.array([s.labels for s in chosen], dtype=np.float32).reshape(
            len(chosen), len(samples.label_names)
        ),
        np.array([_NO_GATE_CLASS if g is None else g for g in gate], dtype=np.int64),
        [s.patient for s in chosen],
    )


def _gate_pool(
    samples: SampleSet, indices: Sequence[int], size: int, n_labels: int, cache_dir: CacheDir
) -> _Pool:
    chosen = [samples.samples[i] for i in indices]
    return _Pool(
        _load_pixels(samples, indices, size, cache_dir),
        np.full((len(chosen), n_labels), np.nan, dtype=np.float32),
        np.array([int(np.argmax(s.labels)) for s in chosen], dtype=np.int64),
        [s.patient for s in chosen],
    )


def _drawn_pool(pixels: NDArray[np.uint8], gate_class: int, n_labels: int) -> _Pool:
    return _Pool(
        pixels,
        np.full((len(pixels), n_labels), np.nan, dtype=np.float32),
        np.full(len(pixels), gate_class, dtype=np.int64),
        ["drawn"] * len(pixels),
    )


def _pos_weight(labels: NDArray[np.float32], names: Sequence[str]) -> NDArray[np.float64]:
    weights = []
    for column, name in enumerate(names):
        values = labels[:, column]
        known = values[~np.isnan(values)]
        positives, negatives = int((known >= 0.5).sum()), int((known < 0.5).sum())
        if positives == 0 or negatives == 0:
            log.warning(
                "fit: label %r has %d positive and %d negative training images; its "
                "head learns nothing useful",
                name,
                positives,
                negatives,
            )
            weights.append(1.0)
        else:
            weights.append(min(max(negatives / positives, 1 / 50), 50.0))
    return np.array(weights)


def _gate_class_weights(counts: Sequence[float]) -> NDArray[np.float64]:
    """Inverse square-root frequency, 0 for absent classes, mean 1 over present ones."""
    array = np.asarray(counts, dtype=np.float64)
    weights = np.where(array > 0, 1.0 / np.sqrt(np.maximum(array, 1e-9)), 0.0)
    present = weights > 0
    if present.any():
        weights[present] /= weights[present].mean()
    return weights


def _parameter_groups(network: CXRModel, decay: float) -> list[dict[str, Any]]:
    with_decay: list[torch.nn.Parameter] = []
    without: list[torch.nn.Parameter] = []
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        (with_decay if parameter.ndim >= 2 and not name.endswith("bias") else without).append(
            parameter
        )
    return [
        {"params": with_decay, "weight_decay": decay},
        {"params": without, "weight_decay": 0.0},
    ]


class _Ema:
    """Exponential moving average of a network's weights (buffers too; integer
    buffers copied). The decay ramps up as ``(1 + t) / (10 + t)`` so that the
    random initial weights are forgotten quickly."""

    def __init__(self, network: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.state = {k: v.detach().clone() for k, v in network.state_dict().items()}

    def update(self, network: torch.nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for key, value in network.state_dict().items():
                if value.dtype.is_floating_point:
                    # lerp adds exactly nothing where nothing changed (frozen weights).
                    self.state[key].lerp_(value.detach(), 1 - decay)
                else:
                    self.state[key].copy_(value)


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _forward_pool(
    network: CXRModel, pool: _Pool, device: torch.device, batch_size: int
) -> dict[str, NDArray[np.float32]]:
    """Logits and pooled features of a pool (eval mode, no augmentation)."""
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


def _losses(
    findings_logits: Tensor,
    gate_logits: Tensor,
    labels: Tensor,
    gate: Tensor,
    pos_weight: Tensor,
    gate_weights: Tensor,
) -> tuple[Tensor, Tensor]:
    findings_loss = masked_bce(findings_logits, labels, pos_weight)
    if bool((gate != _NO_GATE_CLASS).any()):
        gate_loss = F.cross_entropy(
            gate_logits, gate, weight=gate_weights, ignore_index=_NO_GATE_CLASS
        )
    else:
        gate_loss = gate_logits.sum() * 0.0
    return findings_loss, gate_loss


def _validation_loss(
    network: CXRModel,
    pool: _Pool,
    device: torch.device,
    config: TrainConfig,
    pos_weight: Tensor,
    gate_weights: Tensor,
) -> tuple[float, dict[str, NDArray[np.float32]]]:
    outputs = _forward_pool(network, pool, device, config.batch_size)
    if len(pool) == 0:
        return math.nan, outputs
    findings_loss, gate_loss = _losses(
        torch.from_numpy(outputs["findings"]),
        torch.from_numpy(outputs["gate"]),
        torch.from_numpy(pool.labels),
        torch.from_numpy(pool.gate),
        pos_weight.cpu(),
        gate_weights.cpu(),
    )
    return float(findings_loss + config.gate_weight * gate_loss), outputs


def _macro_auroc(logits: NDArray[Any], labels: NDArray[Any]) -> float:
    values = [roc_auc(labels[:, j], logits[:, j]) for j in range(labels.shape[1])]
    known = [v for v in values if not math.isnan(v)]
    return float(np.mean(known)) if known else math.nan


def _label_counts(labels: NDArray[np.float32], names: Sequence[str]) -> dict[str, dict[str, int]]:
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


def _gate_counts(gate: NDArray[np.int64]) -> dict[str, int]:
    counts = Counter(int(g) for g in gate if g != _NO_GATE_CLASS)
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


def fit_on_indices(
    findings: SampleSet,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    config: TrainConfig,
    *,
    gate: GateSamples | None = None,
    severity_fit: SeverityData | None = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainedModel:
    """Train on chosen samples: the core that :func:`train_model` and cross-validation
    share.

    Args:
        findings: samples of the ``second-opinion`` task (frontal X-rays of the
            training sources, e.g. :func:`findings_samples`).
        train_indices: positions in ``findings`` to train on.
        val_indices: positions for early stopping, calibration and operating points
            (must hold no patient of ``train_indices``; the caller's split sees to it).
        config: the settings.
        gate: lateral/CT/other-source images for the gate (:func:`assign_gate_samples`);
            None trains the gate on the findings images, inverted copies and drawn
            pictures only (its lateral and CT outputs then mean nothing).
        severity_fit: the scored images to fit the severity head on; None leaves
            severity unfitted (predictions NaN).
        cache_dir: the preprocessed-pixel cache (see CollectionDataset).
        progress: called after each epoch with that epoch's record.

    Returns:
        The trained, calibrated model; :attr:`TrainedModel.provenance` records the
        data counts, the history, the validation metrics and the severity fit.

    Raises:
        MetadataError: no training or validation images, or a patient on both sides.
    """
    names = tuple(findings.label_names)
    n_labels = len(names)
    if not train_indices or not val_indices:
        raise MetadataError(
            f"fit_on_indices: {len(train_indices)} training and {len(val_indices)} "
            "validation images; both must be non-empty"
        )
    overlap = {findings.samples[i].patient for i in train_indices} & {
        findings.samples[i].patient for i in val_indices
    }
    if overlap:
        raise MetadataError(
            f"fit_on_indices: {len(overlap)} patient(s) on both sides, e.g. "
            f"{sorted(overlap)[0]!r}; make the folds with covidcxr.dataset.splits"
        )
    started = time.perf_counter()
    size = config.size
    device = torch.device(config.device)
    seeds = np.random.SeedSequence(config.seed)
    rng_epochs, rng_val_drawn, rng_severity, rng_bootstrap = (
        np.random.default_rng(s) for s in seeds.spawn(4)
    )

    # Pools: training images (findings + gate-only) and validation images (the same,
    # plus inverted copies of the validation frontals and a fixed set of drawings).
    findings_train = _findings_pool(findings, train_indices, size, cache_dir)
    findings_val = _findings_pool(findings, val_indices, size, cache_dir)
    gate_train = gate_val = _Pool.empty(size, n_labels)
    if gate is not None:
        gate_train = _gate_pool(gate.samples, gate.train_indices, size, n_labels, cache_dir)
        gate_val = _gate_pool(gate.samples, gate.val_indices, size, n_labels, cache_dir)
    other_frontal = np.flatnonzero(gate_train.gate == FRONTAL)
    fixed_gate = np.flatnonzero(gate_train.gate != FRONTAL)
    other_per_epoch = min(len(other_frontal), int(OTHER_FRONTAL_SHARE * len(findings_train)))
    base_count = len(findings_train) + len(fixed_gate) + other_per_epoch
    drawn_per_epoch = max(4, round(NOT_MEDICAL_SHARE * base_count))

    val_frontal = np.flatnonzero(findings_val.gate == FRONTAL)
    val_pool = _Pool.join(
        [
            findings_val,
            gate_val,
            _drawn_pool(gate_data.invert(findings_val.pixels[val_frontal]), INVERTED, n_labels),
            _drawn_pool(
                gate_data.not_medical_images(
                    max(6, round(NOT_MEDICAL_SHARE * (len(findings_val) + len(gate_val)))),
                    size,
                    rng_val_drawn,
                ),
                NOT_MEDICAL,
                n_labels,
            ),
        ]
    )

    pos_weight_np = _pos_weight(findings_train.labels, names)
    frontal_per_epoch = int((findings_train.gate == FRONTAL).sum()) + other_per_epoch
    expected = [
        frontal_per_epoch * (1 - INVERTED_PROBABILITY),
        float((gate_train.gate[fixed_gate] == LATERAL).sum()),
        float((gate_train.gate[fixed_gate] == CT).sum()),
        frontal_per_epoch * INVERTED_PROBABILITY,
        float(drawn_per_epoch),
    ]
    gate_weights_np = _gate_class_weights(expected)
    pos_weight = torch.tensor(pos_weight_np, dtype=torch.float32, device=device)
    gate_weights = torch.tensor(gate_weights_np, dtype=torch.float32, device=device)
    log.info(
        "fit: %d findings + %d gate-only training images, %d validation images, %d drawn "
        "per epoch; pos_weight %s; gate class weights %s",
        len(findings_train),
        len(gate_train),
        len(val_pool),
        drawn_per_epoch,
        np.round(pos_weight_np, 2).tolist(),
        np.round(gate_weights_np, 2).tolist(),
    )

    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    with _deterministic(config.device, config.seed, config.threads):
        network = build_network(config, n_labels)
        if isinstance(network.backbone, SmallBackbone):
            _initialise(network.backbone, generator)
        _initialise(network.heads, generator)
        network.to(device)
        if config.freeze_backbone:
            for parameter in network.backbone.parameters():
                parameter.requires_grad_(False)
        optimiser = torch.optim.AdamW(_parameter_groups(network, config.weight_decay), lr=config.lr)
        steps_per_epoch = max(1, (base_count + drawn_per_epoch) // config.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimiser,
            _schedule(
                config.epochs * steps_per_epoch,
                min(steps_per_epoch, config.epochs * steps_per_epoch // 10 + 1),
            ),
        )
        best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
        average = _Ema(network, config.ema) if config.ema > 0 else None
        validated = copy.deepcopy(network) if average is not None else network
        for epoch in range(1, config.epochs + 1):
            clock = time.perf_counter()
            network.train()
            if config.freeze_backbone:
                network.backbone.eval()
            chosen = rng_epochs.choice(other_frontal, size=other_per_epoch, replace=False)
            epoch_pool = _Pool.join(
                [
                    findings_train,
                    gate_train.take(np.concatenate([fixed_gate, np.sort(chosen)]).astype(np.int64)),
                    _drawn_pool(
                        gate_data.not_medical_images(drawn_per_epoch, size, rng_epochs),
                        NOT_MEDICAL,
                        n_labels,
                    ),
                ]
            )
            order = torch.randperm(len(epoch_pool), generator=generator).numpy()
            sums = {"loss": 0.0, "findings": 0.0, "gate": 0.0}
            steps = 0
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                if len(rows) < 2:
                    continue  # BatchNorm needs two images
                images = to_input(torch.from_numpy(epoch_pool.pixels[rows]))
                labels = torch.from_numpy(epoch_pool.labels[rows].copy())
                gate_target = torch.from_numpy(epoch_pool.gate[rows].copy())
                flip = (torch.rand(len(rows), generator=generator) < INVERTED_PROBABILITY) & (
                    gate_target == FRONTAL
                )
                if bool(flip.any()):
                    images[flip] = -images[flip]
                    labels[flip] = math.nan
                    gate_target[flip] = INVERTED
                if config.augment:
                    images = augment(images, generator)
                outputs = network(images.to(device))
                findings_loss, gate_loss = _losses(
                    outputs["findings"],
                    outputs["gate"],
                    labels.to(device),
                    gate_target.to(device),
                    pos_weight,
                    gate_weights,
                )
                loss = findings_loss + config.gate_weight * gate_loss
                optimiser.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
                scheduler.step()
                if average is not None:
                    average.update(network)
                sums["loss"] += float(loss.detach())
                sums["findings"] += float(findings_loss.detach())
                sums["gate"] += float(gate_loss.detach())
                steps += 1
            if average is not None:
                validated.load_state_dict(average.state)
            val_loss, val_outputs = _validation_loss(
                validated, val_pool, device, config, pos_weight, gate_weights
            )
            n_findings_val = len(findings_val)
            record = {
                "epoch": epoch,
                "train_loss": _round(sums["loss"] / max(steps, 1)),
                "train_findings_loss": _round(sums["findings"] / max(steps, 1)),
                "train_gate_loss": _round(sums["gate"] / max(steps, 1)),
                "val_loss": _round(val_loss),
                "val_findings_auroc": _round(
                    _macro_auroc(val_outputs["findings"][:n_findings_val], findings_val.labels)
                ),
                "val_gate_accuracy": _round(
                    float(
                        (val_outputs["gate"].argmax(axis=1) == val_pool.gate)[
                            val_pool.gate >= 0
                        ].mean()
                    )
                ),
                "seconds": round(time.perf_counter() - clock, 1),
            }
            history.append(record)
            log.info("fit: %s", record)
            if progress is not None:
                progress(record)
            if val_loss < best_loss - 1e-6:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = copy.deepcopy(validated.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    log.info("fit: early stop after epoch %d (best %d)", epoch, best_epoch)
                    break
        if best_state is not None:
            network.load_state_dict(best_state)
        network.eval()

        # Prior correction: pos_weight w moves the loss's optimum logit by log(w).
        with torch.no_grad():
            network.heads.findings.bias.sub_(torch.log(pos_weight))
        val_outputs = _forward_pool(network, findings_val, device, config.batch_size)
        val_logits = val_outputs["findings"].astype(np.float64)
        temperatures, thresholds, calibration, validation = _calibrate(
            val_logits, findings_val.labels, findings_val.patients, names, rng_bootstrap
        )
        gate_outputs = _forward_pool(network, val_pool, device, config.batch_size)
        validation["gate"] = _gate_report(gate_outputs["gate"], val_pool.gate)

        severity_interval: dict[str, Any] = {}
        severity_record: dict[str, Any] = {"fitted": False}
        if severity_fit is not None and severity_fit.indices:
            severity_interval, severity_record = _fit_severity_head(
                network, severity_fit, config, device, cache_dir, rng_severity
            )

    severity_task = get_task(SEVERITY_TASK)
    seconds = time.perf_counter() - started
    per_epoch = [h["seconds"] for h in history]
    provenance: dict[str, Any] = {
        "config": config.as_dict(),
        "seed": config.seed,
        "covidcxr_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": config.threads,
        "device": config.device,
        "task": findings.task.as_dict(),
        "selection": findings.selection.as_dict(),
        "data": {
            "findings_train": {
                "images": len(findings_train),
                "patients": len(set(findings_train.patients)),
                "labels": _label_counts(findings_train.labels, names),
            },
            "findings_val": {
                "images": len(findings_val),
                "patients": len(set(findings_val.patients)),
                "labels": _label_counts(findings_val.labels, names),
            },
            "gate_train": {
                **{
                    name: count
                    for name, count in _gate_counts(
                        np.concatenate([findings_train.gate, gate_train.gate])
                    ).items()
                    if name in ("frontal_xray", "lateral_xray", "ct")
                },
                "other_source_frontal_drawn_per_epoch": other_per_epoch,
                "frontal_shown_inverted_probability": INVERTED_PROBABILITY,
                "not_medical_drawn_per_epoch": drawn_per_epoch,
            },
            "gate_val": _gate_counts(val_pool.gate),
            "pos_weight": [round(float(w), 4) for w in pos_weight_np],
            "membership_sha256": card_module.data_membership_sha256(
                membership_entries(findings, [*train_indices, *val_indices], gate)
            ),
        },
        "history": history,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(float(np.mean(per_epoch)), 1) if per_epoch else None,
        "calibration": calibration,
        "validation": validation,
        "severity": severity_record,
    }
    operating_point = (
        "Per label, the threshold on the calibrated probability that maximises Youden's J "
        "(sensitivity + specificity - 1) on the validation fold "
        f"({len(findings_val)} images of {len(set(findings_val.patients))} patients; positives "
        + ", ".join(f"{name} {validation['positives'][name]}" for name in names)
        + "). Youden's J weighs sensitivity and specificity equally and does not depend "
        "on prevalence, which differs between this collection (mostly COVID-19) and any "
        "clinic. With a handful of validation positives a threshold is uncertain: choose "
        "one on local data before relying on it. A label without validation positives "
        "or negatives falls back to its training prevalence."
    )
    model = TrainedModel(
        network=network,
        config=config,
        findings=names,
        finding_definitions={
            d.name: {"include": list(d.include), "exclude": list(d.exclude)}
            for d in SECOND_OPINION_LABELS
            if d.name in names
        },
        temperatures=temperatures,
        thresholds=tuple(
            t if not math.isnan(t) else _prevalence(findings_train.labels[:, j])
            for j, t in enumerate(thresholds)
        ),
        operating_point=operating_point,
        severity_labels=tuple(severity_task.labels),
        severity_ranges=tuple(severity_task.ranges),
        severity_interval=severity_interval,
        gate_rules=DEFAULT_GATE_RULES,
        provenance=provenance,
    )
    return model


def _prevalence(column: NDArray[np.float32]) -> float:
    known = column[~np.isnan(column)]
    return float((known >= 0.5).mean()) if known.size else 0.5


def _calibrate(
    logits: NDArray[np.float64],
    labels: NDArray[np.float32],
    patients: Sequence[str],
    names: Sequence[str],
    rng: np.random.Generator,
) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, Any], dict[str, Any]]:
    temperatures, thresholds = [], []
    before, after, j_values = [], [], []
    aurocs: dict[str, float | None] = {}
    intervals: dict[str, list[float | None]] = {}
    positives: dict[str, int] = {}
    negatives: dict[str, int] = {}
    for j, name in enumerate(names):
        z, y = logits[:, j], labels[:, j].astype(np.float64)
        temperature = fit_temperature(z, y)
        temperatures.append(round(temperature, 6))
        before.append(_round(binary_nll(z, y)))
        after.append(_round(binary_nll(z, y, temperature)))
        probabilities = _sigmoid(z / temperature)
        threshold, j_value = youden_threshold(probabilities, y)
        thresholds.append(threshold)
        j_values.append(_round(j_value))
        aurocs[name] = _round(roc_auc(y, z))
        low, high = _bootstrap_auroc(z, y, patients, rng, replicates=200)
        intervals[name] = [_round(low), _round(high)]
        known = y[~np.isnan(y)]
        positives[name] = int((known >= 0.5).sum())
        negatives[name] = int((known < 0.5).sum())
    calibration = {
        "method": "bias minus log(pos_weight) (prior correction), then one temperature per "
        "label minimising the validation NLL",
        "temperatures": temperatures,
        "val_nll_before": before,
        "val_nll_after": after,
    }
    validation = {
        "images": len(labels),
        "patients": len(set(patients)),
        "auroc": aurocs,
        "auroc_95ci_patient_bootstrap": intervals,
        "youden_j": dict(zip(names, j_values, strict=True)),
        "positives": positives,
        "negatives": negatives,
    }
    return tuple(temperatures), tuple(thresholds), calibration, validation


def _gate_report(logits: NDArray[np.float32], truth: NDArray[np.int64]) -> dict[str, Any]:
    known = truth >= 0
    predicted = logits.argmax(axis=1)
    confusion = {
        GATE_CLASSES[t]: {
            GATE_CLASSES[p]: int(((truth == t) & (predicted == p)).sum())
            for p in range(len(GATE_CLASSES))
        }
        for t in range(len(GATE_CLASSES))
        if (truth == t).any()
    }
    recall = {
        name: _round(row[name] / max(1, sum(row.values()))) for name, row in confusion.items()
    }
    return {
        "accuracy": _round(
            float((predicted[known] == truth[known]).mean()) if known.any() else math.nan
        ),
        "recall": recall,
        "confusion": confusion,
    }


def _fit_severity_head(
    network: CXRModel,
    data: SeverityData,
    config: TrainConfig,
    device: torch.device,
    cache_dir: CacheDir,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, Any]]:
    task = get_task(SEVERITY_TASK)
    chosen = [data.samples.samples[i] for i in data.indices]
    targets = np.array([s.labels for s in chosen], dtype=np.float64)
    pixels = _load_pixels(data.samples, data.indices, config.size, cache_dir)
    n_labels = len(network.heads.findings.weight)
    pool = _Pool(
        pixels,
        np.zeros((len(chosen), n_labels), np.float32),
        np.zeros(len(chosen), np.int64),
        [s.patient for s in chosen],
    )
    features = _forward_pool(network, pool, device, config.batch_size)["pooled"].astype(np.float64)
    groups = list(data.groups)
    fit = severity.fit_severity(
        features, targets, groups, ranges=task.ranges, level=config.severity_level, rng=rng
    )
    weight, bias = severity.severity_head_parameters(fit)
    with torch.no_grad():
        network.heads.severity.weight.copy_(torch.from_numpy(weight).to(torch.float32))
        network.heads.severity.bias.copy_(torch.from_numpy(bias).to(torch.float32))
    interval = {
        "level": config.severity_level,
        # Too few images for the level give an infinite width: the whole range.
        "half_width": [
            round(float(min(h, high - low)), 4)
            for h, (low, high) in zip(fit.half_width, task.ranges, strict=True)
        ],
        "method": "split-conformal: the ceil((n+1)*level)-th smallest absolute residual of "
        f"patient-grouped 5-fold cross-validated ridge predictions on the {fit.n_images} "
        f"scored images ({fit.n_groups} patient groups); "
        + (
            "the backbone never trained on them"
            if data.out_of_sample
            else "the backbone trained on them, so the interval is optimistic"
        ),
    }
    record: dict[str, Any] = {
        "fitted": True,
        "images": fit.n_images,
        "patient_groups": fit.n_groups,
        "out_of_sample": data.out_of_sample,
        "alpha": fit.ridge.alpha,
        "features": "pooled backbone features (ridge, standardisation folded into the head)",
        "cross_validated_mae": [round(float(v), 4) for v in fit.cross_validated_mae],
        "residual_sd": [round(float(v), 4) for v in fit.residual_sd],
    }
    if data.out_of_sample and config.severity_splits > 0 and fit.n_groups >= 4:
        protocol = severity.random_split_protocol(
            features,
            targets,
            groups,
            labels=task.labels,
            ranges=task.ranges,
            splits=config.severity_splits,
            rng=rng,
        )
        record["protocol"] = protocol.as_dict()
        study = _mask_feature_study(data, pixels, features, targets, config, cache_dir, rng)
        if study:
            record["mask_feature_study"] = study
    elif not data.out_of_sample:
        record["protocol"] = (
            "not measured: the backbone trained on the scored images "
            "(train with hold_out_severity to measure)"
        )
    return interval, record


def _mask_feature_study(
    data: SeverityData,
    pixels: NDArray[np.uint8],
    pooled: NDArray[np.float64],
    targets: NDArray[np.float64],
    config: TrainConfig,
    cache_dir: CacheDir,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The reference protocol on lung-zone features (from lung masks) alone and with the
    pooled features: a measurement only, as the shipped head cannot use masks."""
    rows = [k for k, i in enumerate(data.indices) if data.samples.samples[i].mask_sha256]
    if len(rows) < len(data.indices):
        return {"skipped": f"{len(data.indices) - len(rows)} scored image(s) have no lung mask"}
    dataset = CollectionDataset(
        data.samples, size=config.size, indices=list(data.indices), cache_dir=cache_dir, masks=True
    )
    zone = np.stack(
        [
            severity.lung_zone_features(pixels[k], dataset[k]["mask"][0].numpy().astype(np.uint8))
            for k in range(len(dataset))
        ]
    )
    task = get_task(SEVERITY_TASK)
    groups = list(data.groups)
    result = {}
    for name, features in (
        ("lung_zones", zone),
        ("pooled_and_lung_zones", np.hstack([pooled, zone])),
    ):
        protocol = severity.random_split_protocol(
            features,
            targets,
            groups,
            labels=task.labels,
            ranges=task.ranges,
            splits=config.severity_splits,
            rng=rng,
        )
        result[name] = {
            "mae": protocol.as_dict()["mae"],
            "mae_sd": protocol.as_dict()["mae_sd"],
            "r2": protocol.as_dict()["r2"],
        }
    return result


def inner_split(
    samples: SampleSet,
    indices: Sequence[int],
    *,
    seed: int,
    val_fraction: float = 0.15,
    groups: Mapping[str, str] | None = None,
) -> tuple[list[int], list[int]]:
    """Split training images into inner train and validation, whole patient groups at
    a time, stratified on each group's rarest positive label.

    Groups (patients, or duplicate-linked patient groups when ``groups`` maps patient
    -> group name) are shuffled with ``numpy.random.default_rng(seed)``, then taken
    rarest label first; a group goes to validation while validation holds fewer than
    ``ceil(val_fraction * positives)`` of that label (and fewer than ``val_fraction``
    of the images for groups without positives). Every label with two or more
    positive groups therefore gets at least one validation positive.

    Returns:
        (train positions, validation positions), both in ``indices`` order.

    Raises:
        MetadataError: fewer than two groups.
    """
    group_of = dict(groups or {})
    members: dict[str, list[int]] = {}
    for index in indices:
        patient = samples.samples[index].patient
        members.setdefault(group_of.get(patient, patient), []).append(index)
    if len(members) < 2:
        raise MetadataError(
            f"inner_split: {len(members)} patient group(s); need two to hold one out"
        )
    n_labels = len(samples.label_names)
    positives = np.zeros(n_labels)
    group_positive: dict[str, NDArray[np.bool_]] = {}
    for name, rows in members.items():
        labels = np.array([samples.samples[i].labels for i in rows], dtype=np.float64)
        group_positive[name] = np.nan_to_num(labels, nan=0.0).max(axis=0) >= 0.5
        positives += group_positive[name]
    names = sorted(members)
    order = [names[int(i)] for i in np.random.default_rng(seed).permutation(len(names))]

    def rarity(name: str) -> float:
        present = positives[group_positive[name]]
        return float(present.min()) if present.size else math.inf

    order.sort(key=rarity)  # stable: ties keep the seeded order
    quota = np.ceil(val_fraction * positives)
    taken = np.zeros(n_labels)
    image_quota = val_fraction * len(indices)
    val_images = 0
    val_groups: set[str] = set()
    for name in order:
        present = np.flatnonzero(group_positive[name])
        if present.size:
            rarest = present[np.argmin(positives[present])]
            wanted = taken[rarest] < quota[rarest]
        else:
            wanted = val_images < image_quota
        if wanted and len(val_groups) < len(names) - 1:
            val_groups.add(name)
            taken += group_positive[name]
            val_images += len(members[name])
    chosen = {i for name in val_groups for i in members[name]}
    return [i for i in indices if i not in chosen], [i for i in indices if i in chosen]


def fit_with_inner_split(
    samples: SampleSet,
    train_indices: Sequence[int],
    *,
    seed: int,
    config: TrainConfig | None = None,
    groups: Mapping[str, str] | None = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
) -> TrainedModel:
    """Train on ``train_indices`` only, validating on an inner split of their patients.

    The fit function of cross-validation (``covidcxr.models.evaluate``'s
    ``FitFunction``): it sees nothing outside ``train_indices``. The inner validation
    split (:func:`inner_split`) serves early stopping, calibration and the operating
    points. The gate learns from these images, inverted copies and drawn pictures
    only, and severity is not fitted (the evaluation measures severity separately).

    Args:
        samples: the findings samples.
        train_indices: the outer training fold.
        seed: replaces ``config.seed`` (one seed per fold and repeat).
        config: the settings (default :class:`TrainConfig`).
        groups: patient -> duplicate group (see :func:`inner_split`).
        cache_dir: the preprocessed-pixel cache.
    """
    settings = replace(config or TrainConfig(), seed=seed)
    inner_train, inner_val = inner_split(samples, train_indices, seed=seed, groups=groups)
    return fit_on_indices(samples, inner_train, inner_val, settings, cache_dir=cache_dir)


# --- from a store -------------------------------------------------------------------------


def _fold_report(
    model: TrainedModel,
    findings: SampleSet,
    indices: Sequence[int],
    cache_dir: CacheDir,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """AUROC with patient-bootstrap 95% intervals, and sensitivity/specificity at the
    operating point, on held-out images."""
    pool = _findings_pool(findings, indices, model.config.size, cache_dir)
    if len(pool) == 0:
        return {"images": 0}
    predicted = model.predict(pool.pixels, batch_size=model.config.batch_size)
    report: dict[str, Any] = {
        "images": len(pool),
        "patients": len(set(pool.patients)),
        "labels": _label_counts(pool.labels, model.findings),
        "auroc": {},
        "auroc_95ci_patient_bootstrap": {},
        "sensitivity_at_operating_point": {},
        "specificity_at_operating_point": {},
    }
    for j, name in enumerate(model.findings):
        y = pool.labels[:, j].astype(np.float64)
        p = predicted["findings"][:, j]
        report["auroc"][name] = _round(roc_auc(y, p))
        low, high = _bootstrap_auroc(p, y, pool.patients, rng)
        report["auroc_95ci_patient_bootstrap"][name] = [_round(low), _round(high)]
        known = ~np.isnan(y)
        positive = y[known] >= 0.5
        called = predicted["positive"][known, j]
        report["sensitivity_at_operating_point"][name] = (
            _round(float(called[positive].mean())) if positive.any() else None
        )
        report["specificity_at_operating_point"][name] = (
            _round(float((~called[~positive]).mean())) if (~positive).any() else None
        )
    return report


def train_model(
    store: Store,
    config: TrainConfig,
    *,
    split: Split | None = None,
    exclude_patients: Iterable[str] = (),
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainedModel:
    """Train the second-opinion model on a store.

    Steps: select the findings samples (frontal X-rays of ``config.sources``), the gate
    images (every source) and the scored images; make a patient-grouped holdout split
    (``make_split(scheme="holdout", seed=config.seed)``: train / val / test, duplicate-
    linked patients together) unless ``split`` is given; hold out ``exclude_patients``
    and, with ``config.hold_out_severity``, every severity-scored patient (each with
    the patients linked to it by duplicate pictures); train on ``train``, stop early,
    calibrate and choose operating points on ``val``; fit the severity head; score the
    untouched ``test`` fold.

    Args:
        store: the open store.
        config: the settings.
        split: a holdout split of the findings samples (``covidcxr split --task
            second-opinion --scheme holdout``); None makes one.
        exclude_patients: ``source:patient_id`` values kept out of training entirely.
        cache_dir: the preprocessed-pixel cache.
        progress: called after each epoch with that epoch's record.

    Raises:
        MetadataError: no samples, a split that is not a holdout split or does not
            match the samples.
    """
    findings = findings_samples(store, config.sources)
    if not findings.samples:
        raise MetadataError(
            f"train_model: no frontal X-rays with second-opinion labels from source(s) "
            f"{', '.join(config.sources)}; ingest them or pick --source"
        )
    made_here = split is None
    if split is None:
        with store.read() as conn:
            split = make_split(findings, conn, scheme="holdout", seed=config.seed)
    if split.scheme != "holdout":
        raise MetadataError(
            f"train_model: the split is {split.scheme!r}; training needs a holdout split "
            "(train/val/test); cross-validation calls fit_on_indices per fold"
        )
    gate_set = gate_samples(store)
    scored = severity_samples(store)
    universe = set(findings.patients) | set(gate_set.patients) | set(scored.patients)
    given = linked_exclusions(store, exclude_patients, universe)
    held_severity: set[str] = set()
    if config.hold_out_severity and scored.samples:
        held_severity = linked_exclusions(store, scored.patients, universe) - given
    excluded = given | held_severity

    def kept(fold: str) -> list[int]:
        return [
            i for i in split.indices(findings, fold) if findings.samples[i].patient not in excluded
        ]

    train, val, test = kept("train"), kept("val"), kept("test")
    gate = assign_gate_samples(
        store, gate_set, findings, train, val, exclude_patients=excluded, seed=config.seed
    )
    severity_input = severity_data(store, scored, out_of_sample=config.hold_out_severity)
    if given:
        keep = tuple(
            k
            for k, i in enumerate(severity_input.indices)
            if severity_input.samples.samples[i].patient not in given
        )
        severity_input = SeverityData(
            severity_input.samples,
            tuple(severity_input.indices[k] for k in keep),
            tuple(severity_input.groups[k] for k in keep),
            severity_input.out_of_sample,
        )
    model = fit_on_indices(
        findings,
        train,
        val,
        config,
        gate=gate,
        severity_fit=severity_input if severity_input.indices else None,
        cache_dir=cache_dir,
        progress=progress,
    )
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(5)[4])
    model.provenance["holdout_test"] = _fold_report(model, findings, test, cache_dir, rng)
    model.provenance["split"] = {
        "scheme": split.scheme,
        "seed": split.seed,
        "fractions": list(split.fractions) if split.fractions else None,
        "membership_sha256": split.membership_sha256,
        "content_sha256": split.header()["content_sha256"],
        "made_by_train": made_here,
    }
    model.provenance["data"]["excluded_patients"] = {
        HELD_OUT_GIVEN: len(given),
        HELD_OUT_SEVERITY: len(held_severity),
    }
    model.provenance["data"]["findings_sample_set"] = findings.summary()
    model.provenance["data"]["findings_test"] = {
        "images": len(test),
        "patients": len({findings.samples[i].patient for i in test}),
    }
    model.split = split
    return model


def canonical_command(config: TrainConfig, *, model_id: str, split_file: str | None = None) -> str:
    """The ``covidcxr train`` command line that reproduces ``config`` (store options
    left out: they depend on the machine)."""
    parts = [
        "covidcxr train",
        f"--size {config.size}",
        f"--epochs {config.epochs}",
        f"--width {config.width}",
        f"--backbone {config.backbone}",
        f"--seed {config.seed}",
        *(f"--source {s}" for s in config.sources),
        f"--device {config.device}",
        f"--model-id {model_id}",
    ]
    if split_file is not None:
        parts.append(f"--split {split_file}")
    return " ".join(parts)
