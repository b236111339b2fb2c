"""TrainConfig: every setting that decides the trained weights (stored in model.json)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from covidcxr.errors import MetadataError
from covidcxr.serialise import from_dict, to_dict

#: The findings head learns from these sources only (docs/decisions/0020-*).
DEFAULT_SOURCES: Final[tuple[str, ...]] = ("covid-chestxray",)


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
            validated, early-stopped on and kept (0: the raw weights).
        threads: torch's intra-op CPU threads while training; part of the config
            because results depend on it (summation order).
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
        """JSON-ready (:func:`covidcxr.serialise.to_dict`)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`as_dict` (unknown keys are ignored: newer versions)."""
        return from_dict(cls, data)
