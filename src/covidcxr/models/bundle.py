"""Model bundles: a folder holding a trained model, everything needed to use it, and its card.

Layout of a bundle folder (``<id>/``)::

    model.json      what the model is: labels, input, calibration, operating points,
                    gate rules, training provenance, metrics (format below)
    weights.pt      torch state dict (the torch path, training, Grad-CAM)
    model.onnx      the same network for onnxruntime (the CPU path without torch)
    MODEL_CARD.md   the card for people (rendered from model.json)

``model.json`` is the single source of truth; the card is rendered from it. Files are
listed with their sha256 and checked when a bundle is loaded, so a prediction's
provenance (model id + weights hash) means something.

Bundles are found by id in the package's ``models/weights/`` folder (shipped) and in
``<data dir>/models/`` (trained here), or given as a path.

This module needs no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr import RESEARCH_USE_ONLY, config
from covidcxr.atomic import atomic_output
from covidcxr.errors import MetadataError

FORMAT = "covidcxr-model/1"
SHIPPED_DIR = Path(__file__).with_name("weights")
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
CONFIG_FILE = "model.json"
CARD_FILE = "MODEL_CARD.md"

#: Classes of the input gate's network head, in output order.
GATE_CLASSES = ("frontal_xray", "lateral_xray", "ct", "inverted", "not_medical")

#: A finding is called (positive or not) only when its operating point was chosen on at
#: least this many validation positives and as many negatives. Below that, Youden's J
#: picks a threshold from a handful of images (3 fungal positives, say) and the call
#: would be noise: the probability is still reported, with no call.
MIN_OPERATING_SUPPORT = 10


@dataclass(frozen=True)
class GateRules:
    """Checks made before any prediction.

    Attributes:
        min_side_px: images whose shorter side is smaller are refused (tiny).
        max_colourfulness: images more colourful than this are refused (photos,
            slides): radiographs are grey.
        min_frontal_probability: the gate head's frontal_xray probability must reach
            this, else the image is refused with the most likely other class.
    """

    min_side_px: int = 128
    max_colourfulness: float = 0.08
    min_frontal_probability: float = 0.5


@dataclass(frozen=True)
class ModelBundle:
    """A model on disk, described by its ``model.json``.

    Attributes:
        path: the bundle folder.
        model_id: the model's id (``covidcxr-small-v1``).
        backbone: backbone spec and options (``{"spec": "small", "width": 24}``).
        input_size: side of the square input in pixels.
        findings: finding label names, in output order.
        finding_definitions: per label, ``{"include": [...], "exclude": [...]}`` nodes.
        temperatures: per finding label, the calibration temperature (logit / T).
        thresholds: per finding label, the operating point on calibrated probability.
        operating_point: how the thresholds were chosen (stored with the model).
        severity: severity output names (geographic_extent, opacity).
        severity_ranges: per output, (min, max).
        severity_interval: per output, the half width of the stated interval and its
            level, e.g. ``{"level": 0.9, "half_width": [1.9, 1.4]}``.
        gate_classes: the gate head's classes.
        gate: the gate rules.
        files: file name -> sha256 of every file of the bundle but model.json.
        training: provenance (data, split hash, command, seed, epochs, ...).
        metrics: evaluation results with intervals (for the card).
        extra: any other top-level keys of model.json (kept, not interpreted).
    """

    path: Path
    model_id: str
    backbone: Mapping[str, Any]
    input_size: int
    findings: tuple[str, ...]
    finding_definitions: Mapping[str, Mapping[str, Sequence[str]]]
    temperatures: tuple[float, ...]
    thresholds: tuple[float, ...]
    operating_point: str
    severity: tuple[str, ...]
    severity_ranges: tuple[tuple[float, float], ...]
    severity_interval: Mapping[str, Any]
    gate_classes: tuple[str, ...] = GATE_CLASSES
    gate: GateRules = field(default_factory=GateRules)
    files: Mapping[str, str] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        """The torch state dict."""
        return self.path / WEIGHTS_FILE

    @property
    def onnx_path(self) -> Path:
        """The ONNX network."""
        return self.path / ONNX_FILE

    @property
    def operating_support(self) -> dict[str, tuple[int | None, int | None]]:
        """Per finding label, the validation (positives, negatives) its operating point
        was chosen on; ``None`` where the bundle does not record them."""
        validation = self.training.get("validation") or {}
        positives = validation.get("positives") or {}
        negatives = validation.get("negatives") or {}
        return {label: (positives.get(label), negatives.get(label)) for label in self.findings}

    @property
    def uncalled_findings(self) -> tuple[str, ...]:
        """Labels reported as a probability only: their operating point rests on fewer
        than :data:`MIN_OPERATING_SUPPORT` validation positives or negatives. A bundle
        that records no validation counts (one made by hand) is taken at its word."""
        return tuple(
            label
            for label, (positives, negatives) in self.operating_support.items()
            if (positives is not None and positives < MIN_OPERATING_SUPPORT)
            or (negatives is not None and negatives < MIN_OPERATING_SUPPORT)
        )

    @property
    def weights_sha256(self) -> str:
        """The weights' hash: a prediction's provenance."""
        return self.files.get(WEIGHTS_FILE, "")

    def as_json(self) -> dict[str, Any]:
        """The ``model.json`` document."""
        return {
            "format": FORMAT,
            "model_id": self.model_id,
            "intended_use": RESEARCH_USE_ONLY,
            "backbone": dict(self.backbone),
            "input": {
                "size": self.input_size,
                "crop": "center",
                "range": [-1024, 1024],
                "channels": 1,
            },
            "findings": {
                "labels": list(self.findings),
                "definitions": {
                    k: {kk: list(vv) for kk, vv in v.items()}
                    for k, v in self.finding_definitions.items()
                },
                "temperatures": list(self.temperatures),
                "thresholds": list(self.thresholds),
                "operating_point": self.operating_point,
            },
            "severity": {
                "labels": list(self.severity),
                "ranges": [list(r) for r in self.severity_ranges],
                "interval": dict(self.severity_interval),
            },
            "gate": {
                "classes": list(self.gate_classes),
                "rules": {
                    "min_side_px": self.gate.min_side_px,
                    "max_colourfulness": self.gate.max_colourfulness,
                    "min_frontal_probability": self.gate.min_frontal_probability,
                },
            },
            "files": dict(self.files),
            "training": dict(self.training),
            "metrics": dict(self.metrics),
            **dict(self.extra),
        }


_KNOWN_KEYS = {
    "format",
    "model_id",
    "intended_use",
    "backbone",
    "input",
    "findings",
    "severity",
    "gate",
    "files",
    "training",
    "metrics",
}


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_bundle(path: Path, doc: Mapping[str, Any]) -> ModelBundle:
    """Build a :class:`ModelBundle` from a parsed ``model.json``.

    Raises:
        MetadataError: a required key is missing or malformed (the message names it).
    """
    where = path / CONFIG_FILE
    if doc.get("format") != FORMAT:
        raise MetadataError(
            f"load_bundle: {where}: format {doc.get('format')!r}, expected {FORMAT!r}"
        )
    try:
        findings = doc["findings"]
        severity = doc["severity"]
        gate = doc.get("gate", {})
        rules = gate.get("rules", {})
        bundle = ModelBundle(
            path=path,
            model_id=str(doc["model_id"]),
            backbone=dict(doc["backbone"]),
            input_size=int(doc["input"]["size"]),
            findings=tuple(findings["labels"]),
            finding_definitions=dict(findings.get("definitions", {})),
            temperatures=tuple(float(t) for t in findings["temperatures"]),
            thresholds=tuple(float(t) for t in findings["thresholds"]),
            operating_point=str(findings.get("operating_point", "")),
            severity=tuple(severity["labels"]),
            severity_ranges=tuple((float(a), float(b)) for a, b in severity["ranges"]),
            severity_interval=dict(severity.get("interval", {})),
            gate_classes=tuple(gate.get("classes", GATE_CLASSES)),
            gate=GateRules(**rules),
            files=dict(doc.get("files", {})),
            training=dict(doc.get("training", {})),
            metrics=dict(doc.get("metrics", {})),
            extra={k: v for k, v in doc.items() if k not in _KNOWN_KEYS},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MetadataError(f"load_bundle: {where}: missing or malformed {exc}") from exc
    n = len(bundle.findings)
    if len(bundle.temperatures) != n or len(bundle.thresholds) != n:
        raise MetadataError(
            f"load_bundle: {where}: {n} finding labels but "
            f"{len(bundle.temperatures)} temperatures and "
            f"{len(bundle.thresholds)} thresholds"
        )
    return bundle


def search_dirs() -> list[Path]:
    """Where bundles are looked up by id: the user's models, then the shipped ones."""
    return [config.data_dir() / "models", SHIPPED_DIR]


def load_bundle(model: str | os.PathLike[str] | None = None, *, verify: bool = True) -> ModelBundle:
    """Load a bundle by id or folder; None loads the default shipped model.

    Args:
        model: a bundle folder, or a model id found in :func:`search_dirs`.
        verify: check every listed file's sha256.

    Raises:
        MetadataError: no such model, a malformed model.json, or a file whose
            hash does not match (a damaged or altered bundle).
    """
    if model is None:
        model = default_model_id()
    candidate = Path(model).expanduser()
    folder = candidate if (candidate / CONFIG_FILE).is_file() else None
    if folder is None:
        for directory in search_dirs():
            if (directory / str(model) / CONFIG_FILE).is_file():
                folder = directory / str(model)
                break
    if folder is None:
        known = ", ".join(b.model_id for b in list_bundles()) or "none"
        raise MetadataError(f"load_bundle: no model {str(model)!r}; known models: {known}")
    try:
        doc = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MetadataError(f"load_bundle: cannot read {folder / CONFIG_FILE}: {exc}") from exc
    bundle = parse_bundle(folder, doc)
    if verify:
        for name, expected in bundle.files.items():
            file = folder / name
            if not file.is_file():
                raise MetadataError(f"load_bundle: {bundle.model_id}: {file} is missing")
            actual = file_sha256(file)
            if actual != expected:
                raise MetadataError(
                    f"load_bundle: {bundle.model_id}: {file} has sha256 {actual[:12]}…, "
                    f"model.json lists {expected[:12]}…: the bundle is damaged or altered"
                )
    return bundle


def list_bundles() -> list[ModelBundle]:
    """Every bundle in :func:`search_dirs` (unreadable ones are skipped)."""
    found: dict[str, ModelBundle] = {}
    for directory in search_dirs():
        if not directory.is_dir():
            continue
        for config_file in sorted(directory.glob(f"*/{CONFIG_FILE}")):
            try:
                bundle = parse_bundle(
                    config_file.parent, json.loads(config_file.read_text(encoding="utf-8"))
                )
            except (OSError, ValueError, MetadataError):
                continue
            found.setdefault(bundle.model_id, bundle)
    return list(found.values())


def default_model_id() -> str:
    """The shipped model used when none is named."""
    marker = SHIPPED_DIR / "DEFAULT"
    if marker.is_file():
        return marker.read_text(encoding="utf-8").strip()
    raise MetadataError(
        "load_bundle: no default model is shipped; train one with `covidcxr train` and pass --model"
    )


def write_bundle(bundle: ModelBundle, card: str | Callable[[ModelBundle], str]) -> ModelBundle:
    """Write ``model.json`` (with the sha256 of every other file) and the card.

    The weights and ONNX files, and any other file named in ``bundle.files`` (a
    split file), must already be in ``bundle.path``; their hashes are recomputed.

    Args:
        bundle: what to describe.
        card: the card text, or a renderer called with the bundle once its file
            hashes are known (so the card can quote them).

    Returns:
        the bundle with its ``files`` filled in.
    """
    names = dict.fromkeys([WEIGHTS_FILE, ONNX_FILE, *bundle.files])
    names.pop(CARD_FILE, None)
    files = {n: file_sha256(bundle.path / n) for n in names if (bundle.path / n).is_file()}
    hashed = dataclasses.replace(bundle, files=dict(files))
    text = card(hashed) if callable(card) else card
    with atomic_output(bundle.path / CARD_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")
    written = dataclasses.replace(
        hashed, files={**files, CARD_FILE: file_sha256(bundle.path / CARD_FILE)}
    )
    with atomic_output(bundle.path / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(written.as_json(), indent=2) + "\n", encoding="utf-8")
    return written
