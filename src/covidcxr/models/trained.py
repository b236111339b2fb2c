"""TrainedModel: a trained network with its calibration, operating points, severity
interval and gate rules; it predicts, saves a bundle and loads one back."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from covidcxr.atomic import atomic_directory
from covidcxr.dataset.splits import Split
from covidcxr.errors import MetadataError
from covidcxr.models import bundle as bundle_module
from covidcxr.models import card as card_module
from covidcxr.models import severity
from covidcxr.models.bundle import GATE_CLASSES, GateRules, ModelBundle
from covidcxr.models.calibration import sigmoid
from covidcxr.models.config import TrainConfig
from covidcxr.models.network import CXRModel, build_backbone
from covidcxr.models.onnx_export import export_onnx
from covidcxr.models.pools import to_input

SPLIT_FILE: Final = "split.csv"

#: The gate rules stored with models trained here (docs/decisions/0022-*).
DEFAULT_GATE_RULES: Final = GateRules(
    min_side_px=128, max_colourfulness=0.2, min_frontal_probability=0.5
)


def build_network(config: TrainConfig, n_findings: int, n_severity: int = 2) -> CXRModel:
    """The network a config describes (weights as torch initialises them)."""
    backbone, channels = build_backbone(config.backbone, width=config.width)
    return CXRModel(backbone, channels, n_findings, n_severity, len(GATE_CLASSES))


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
            for batch in _input_batches(images, self.config.size, batch_size):
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
        probabilities = sigmoid(logits / temperatures)
        raw_severity = joined("severity", 2 * k)[:, :k].astype(np.float64)
        result: dict[str, NDArray[Any]] = {
            "findings": probabilities,
            "findings_logits": logits,
            "positive": probabilities >= np.array(self.thresholds),
            "gate": joined("gate", len(GATE_CLASSES)).astype(np.float64),
            "pooled": joined("pooled", channels),
        }
        result.update(self._severity_outputs(raw_severity))
        if features:
            result["features"] = (
                np.concatenate(parts["features"])
                if parts["features"]
                else (np.zeros((0, channels, 0, 0), dtype=np.float32))
            )
        return result

    def _severity_outputs(self, raw: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
        """Mean and interval clipped to the ranges; all NaN when severity is not fitted."""
        if self.severity_interval.get("half_width") is None:
            nan = np.full(raw.shape, math.nan)
            return {"severity": nan, "severity_lower": nan.copy(), "severity_upper": nan.copy()}
        mean = severity.clip_to_ranges(raw, self.severity_ranges)
        half = np.array(self.severity_interval["half_width"], dtype=np.float64)
        return {
            "severity": mean,
            "severity_lower": severity.clip_to_ranges(mean - half, self.severity_ranges),
            "severity_upper": severity.clip_to_ranges(mean + half, self.severity_ranges),
        }

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
            _check_backbone_file(bundle, spec)
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


def _check_backbone_file(bundle: ModelBundle, spec: str) -> None:
    """An external backbone's file must be where the bundle says, with its sha256."""
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


def _input_batches(images: Any, size: int, batch_size: int) -> Iterator[Tensor]:
    """``TrainedModel.predict``'s inputs as float (B, 1, S, S) batches in [-1024, 1024]."""

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


def _replace_files(described: ModelBundle, files: Mapping[str, str]) -> ModelBundle:
    return ModelBundle(**{**described.__dict__, "files": dict(files)})
