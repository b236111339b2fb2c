"""The training loop: losses, augmentation, AdamW with a cosine schedule, an EMA of the
weights, and early stopping on the validation loss; deterministic under one seed."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from torch.nn import functional as F

from covidcxr.models.calibration import macro_auroc, rounded
from covidcxr.models.config import TrainConfig
from covidcxr.models.network import CXRModel, SmallBackbone
from covidcxr.models.pools import NO_GATE_CLASS, Pool, TrainingPools, forward_pool, to_input
from covidcxr.models.sample_sets import CT, FRONTAL, INVERTED, LATERAL

log = logging.getLogger(__name__)

#: Chance that a frontal X-ray is shown inverted (as gate class ``inverted``).
INVERTED_PROBABILITY: Final = 0.1
#: The lowest validation loss must fall by more than this to count as better.
_MIN_IMPROVEMENT: Final = 1e-6

Progress = Callable[[dict[str, Any]], None]


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
def deterministic(device: str, seed: int, threads: int) -> Iterator[None]:
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


def initialise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """torch's default initialisation of conv and linear layers, from ``generator``."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def positive_weights(labels: NDArray[np.float32], names: Sequence[str]) -> NDArray[np.float64]:
    """Per label, negatives / positives among the training images, within [1/50, 50]
    (1 where a class is missing: that label's head learns nothing useful)."""
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


def gate_class_weights(counts: Sequence[float]) -> NDArray[np.float64]:
    """Inverse square-root frequency, 0 for absent classes, mean 1 over present ones."""
    array = np.asarray(counts, dtype=np.float64)
    weights = np.where(array > 0, 1.0 / np.sqrt(np.maximum(array, 1e-9)), 0.0)
    present = weights > 0
    if present.any():
        weights[present] /= weights[present].mean()
    return weights


@dataclass(frozen=True)
class LossWeights:
    """The findings loss's ``pos_weight`` per label and the gate's class weights."""

    pos_weight: NDArray[np.float64]
    gate: NDArray[np.float64]

    @classmethod
    def for_pools(cls, pools: TrainingPools, names: Sequence[str]) -> LossWeights:
        """From the training labels and the gate classes an epoch is expected to show."""
        frontal_per_epoch = (
            int((pools.findings_train.gate == FRONTAL).sum()) + pools.other_per_epoch
        )
        fixed = pools.gate_train.gate[pools.fixed_gate]
        expected = [
            frontal_per_epoch * (1 - INVERTED_PROBABILITY),
            float((fixed == LATERAL).sum()),
            float((fixed == CT).sum()),
            frontal_per_epoch * INVERTED_PROBABILITY,
            float(pools.drawn_per_epoch),
        ]
        weights = cls(
            positive_weights(pools.findings_train.labels, names), gate_class_weights(expected)
        )
        log.info(
            "fit: %d findings + %d gate-only training images, %d validation images, %d drawn "
            "per epoch; pos_weight %s; gate class weights %s",
            len(pools.findings_train),
            len(pools.gate_train),
            len(pools.val),
            pools.drawn_per_epoch,
            np.round(weights.pos_weight, 2).tolist(),
            np.round(weights.gate, 2).tolist(),
        )
        return weights

    def tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(pos_weight, gate weights) as float32 tensors on ``device``."""
        return (
            torch.tensor(self.pos_weight, dtype=torch.float32, device=device),
            torch.tensor(self.gate, dtype=torch.float32, device=device),
        )


def losses(
    findings_logits: Tensor,
    gate_logits: Tensor,
    labels: Tensor,
    gate: Tensor,
    pos_weight: Tensor,
    gate_weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """(findings loss, gate loss); the gate loss is 0 when no image has a gate class."""
    findings_loss = masked_bce(findings_logits, labels, pos_weight)
    if bool((gate != NO_GATE_CLASS).any()):
        gate_loss = F.cross_entropy(
            gate_logits, gate, weight=gate_weights, ignore_index=NO_GATE_CLASS
        )
    else:
        gate_loss = gate_logits.sum() * 0.0
    return findings_loss, gate_loss


class Ema:
    """Exponential moving average of a network's weights (buffers too; integer
    buffers copied). The decay ramps up as ``(1 + t) / (10 + t)`` so that the
    random initial weights are forgotten quickly."""

    def __init__(self, network: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.state = {k: v.detach().clone() for k, v in network.state_dict().items()}

    def update(self, network: torch.nn.Module) -> None:
        """Move the average one step towards ``network``'s weights."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for key, value in network.state_dict().items():
                if value.dtype.is_floating_point:
                    # lerp adds exactly nothing where nothing changed (frozen weights).
                    self.state[key].lerp_(value.detach(), 1 - decay)
                else:
                    self.state[key].copy_(value)


def _parameter_groups(network: CXRModel, decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only (not on norms and biases)."""
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


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True)
class TrainingRun:
    """What the loop did: one record per epoch, and the epoch whose weights were kept."""

    history: list[dict[str, Any]]
    best_epoch: int


class _Trainer:
    """One fit's optimiser, schedule, EMA and loss weights, stepping one network."""

    def __init__(
        self, network: CXRModel, pools: TrainingPools, config: TrainConfig, weights: LossWeights
    ) -> None:
        self.network, self.config = network, config
        self.device = torch.device(config.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        if isinstance(network.backbone, SmallBackbone):
            initialise(network.backbone, self.generator)
        initialise(network.heads, self.generator)
        network.to(self.device)
        if config.freeze_backbone:
            for parameter in network.backbone.parameters():
                parameter.requires_grad_(False)
        self.optimiser = torch.optim.AdamW(
            _parameter_groups(network, config.weight_decay), lr=config.lr
        )
        steps_per_epoch = max(1, (pools.base_count + pools.drawn_per_epoch) // config.batch_size)
        total = config.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimiser, _schedule(total, min(steps_per_epoch, total // 10 + 1))
        )
        self.pos_weight, self.gate_weights = weights.tensors(self.device)
        self.average = Ema(network, config.ema) if config.ema > 0 else None
        # What is validated and kept: the EMA's weights in a copy, or the raw network.
        self.validated = copy.deepcopy(network) if self.average is not None else network

    def epoch(self, pool: Pool) -> dict[str, float]:
        """Train one pass over ``pool`` (shuffled); mean training losses."""
        self.network.train()
        if self.config.freeze_backbone:
            self.network.backbone.eval()
        order = torch.randperm(len(pool), generator=self.generator).numpy()
        sums = {"loss": 0.0, "findings": 0.0, "gate": 0.0}
        steps = 0
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            if len(rows) < 2:
                continue  # BatchNorm needs two images
            for key, value in zip(sums, self._step(pool, rows), strict=True):
                sums[key] += value
            steps += 1
        if self.average is not None:
            self.validated.load_state_dict(self.average.state)
        return {key: value / max(steps, 1) for key, value in sums.items()}

    def _step(self, pool: Pool, rows: NDArray[np.int64]) -> tuple[float, float, float]:
        images = to_input(torch.from_numpy(pool.pixels[rows]))
        labels = torch.from_numpy(pool.labels[rows].copy())
        gate_target = torch.from_numpy(pool.gate[rows].copy())
        flip = (torch.rand(len(rows), generator=self.generator) < INVERTED_PROBABILITY) & (
            gate_target == FRONTAL
        )
        if bool(flip.any()):
            images[flip] = -images[flip]
            labels[flip] = math.nan
            gate_target[flip] = INVERTED
        if self.config.augment:
            images = augment(images, self.generator)
        outputs = self.network(images.to(self.device))
        findings_loss, gate_loss = losses(
            outputs["findings"],
            outputs["gate"],
            labels.to(self.device),
            gate_target.to(self.device),
            self.pos_weight,
            self.gate_weights,
        )
        loss = findings_loss + self.config.gate_weight * gate_loss
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimiser.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update(self.network)
        return float(loss.detach()), float(findings_loss.detach()), float(gate_loss.detach())

    def validate(self, pool: Pool) -> tuple[float, dict[str, NDArray[np.float32]]]:
        """Validation loss of the kept weights on ``pool`` (NaN when empty), and the
        outputs."""
        outputs = forward_pool(self.validated, pool, self.device, self.config.batch_size)
        if len(pool) == 0:
            return math.nan, outputs
        findings_loss, gate_loss = losses(
            torch.from_numpy(outputs["findings"]),
            torch.from_numpy(outputs["gate"]),
            torch.from_numpy(pool.labels),
            torch.from_numpy(pool.gate),
            self.pos_weight.cpu(),
            self.gate_weights.cpu(),
        )
        return float(findings_loss + self.config.gate_weight * gate_loss), outputs


def _epoch_record(
    epoch: int,
    train: dict[str, float],
    val_loss: float,
    val_outputs: dict[str, NDArray[np.float32]],
    pools: TrainingPools,
    seconds: float,
) -> dict[str, Any]:
    findings = val_outputs["findings"][: len(pools.findings_val)]
    gate_known = pools.val.gate >= 0
    gate_right = val_outputs["gate"].argmax(axis=1) == pools.val.gate
    return {
        "epoch": epoch,
        "train_loss": rounded(train["loss"]),
        "train_findings_loss": rounded(train["findings"]),
        "train_gate_loss": rounded(train["gate"]),
        "val_loss": rounded(val_loss),
        "val_findings_auroc": rounded(macro_auroc(findings, pools.findings_val.labels)),
        "val_gate_accuracy": rounded(float(gate_right[gate_known].mean())),
        "seconds": round(seconds, 1),
    }


def train_network(
    network: CXRModel,
    pools: TrainingPools,
    config: TrainConfig,
    weights: LossWeights,
    rng: np.random.Generator,
    progress: Progress | None = None,
) -> TrainingRun:
    """Initialise ``network`` from ``config.seed``, train it for up to ``config.epochs``
    and leave it holding the weights (EMA, when on) of the epoch with the lowest
    validation loss; stops after ``config.patience`` epochs without a new lowest.

    Run it inside :func:`deterministic`. ``rng`` draws each epoch's images
    (:meth:`TrainingPools.epoch`); ``progress`` gets each epoch's record.
    """
    trainer = _Trainer(network, pools, config, weights)
    history: list[dict[str, Any]] = []
    best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
    for epoch in range(1, config.epochs + 1):
        clock = time.perf_counter()
        train = trainer.epoch(pools.epoch(rng))
        val_loss, val_outputs = trainer.validate(pools.val)
        record = _epoch_record(
            epoch, train, val_loss, val_outputs, pools, time.perf_counter() - clock
        )
        history.append(record)
        log.info("fit: %s", record)
        if progress is not None:
            progress(record)
        if val_loss < best_loss - _MIN_IMPROVEMENT:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy(trainer.validated.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                log.info("fit: early stop after epoch %d (best %d)", epoch, best_epoch)
                break
    if best_state is not None:
        network.load_state_dict(best_state)
    network.eval()
    return TrainingRun(history, best_epoch)
