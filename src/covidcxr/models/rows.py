"""Prediction rows and outputs: the row types, record columns, and raw outputs to scores."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from covidcxr import RESEARCH_USE_ONLY
from covidcxr.errors import MetadataError
from covidcxr.models import coherence, gate
from covidcxr.models.bundle import ModelBundle

#: The coherent summary's columns in a record, and the Summary attribute of each.
SUMMARY_COLUMNS: Final = {
    "p_pneumonia": "pneumonia",
    "p_viral_pneumonia": "viral",
    "p_COVID-19_if_pneumonia": "covid_if_pneumonia",
    "p_COVID-19_overall": "covid",
    "covid_19_prevalence": "prevalence",
}


@dataclass(frozen=True)
class SeverityScore:
    """A severity score with its interval.

    Attributes:
        mean: the predicted score, clipped to the output's range.
        low: lower end of the interval (clipped to the range).
        high: upper end of the interval (clipped to the range).
        level: the interval's nominal coverage (0.9 for a 90% interval).
    """

    mean: float
    low: float
    high: float
    level: float


@dataclass(frozen=True)
class PredictionRow:
    """One image's second opinion, with its provenance.

    Attributes:
        file: the file (or the name given to an in-memory image).
        image_sha256: sha256 of the file's bytes (``None`` for in-memory images or
            unreadable files).
        gate: the input gate's verdict.
        probabilities: calibrated probability per finding label; ``None`` values when
            the image failed the gate.
        positive: finding labels at or above their operating point (``None`` when the
            image failed the gate); only labels the model can call.
        no_call: labels reported as a probability only, because their operating point
            rests on too few validation images (:attr:`ModelBundle.uncalled_findings`).
        severity: per severity output, the score and interval (``None`` values when the
            image failed the gate).
        model_id: the bundle's id.
        weights_sha256: sha256 of the bundle's ``weights.pt`` (the network's identity;
            the ONNX file is the same network, hashed in ``model.json`` too).
        engine: ``torch`` or ``onnx``.
        heatmap_files: overlay PNGs (and raw ``.npy`` maps) written for this image.
        heatmaps: per explained finding, the [0, 1] map on the whole image (only when
            asked for with ``heatmaps=True``).
        summary: the coherent answer (:mod:`covidcxr.models.coherence`): pneumonia at
            all, COVID-19 given pneumonia, COVID-19 at the stated prevalence; ``None``
            when the image failed the gate or the model lacks the labels.
        note: "research use only, not a diagnosis".
    """

    file: str
    image_sha256: str | None
    gate: gate.GateVerdict
    probabilities: Mapping[str, float | None]
    positive: tuple[str, ...] | None
    severity: Mapping[str, SeverityScore | None]
    model_id: str
    weights_sha256: str
    engine: str
    heatmap_files: tuple[str, ...] = ()
    heatmaps: Mapping[str, NDArray[np.float32]] = field(default_factory=dict)
    no_call: tuple[str, ...] = ()
    summary: coherence.Summary | None = None
    note: str = RESEARCH_USE_ONLY

    @property
    def input_check(self) -> str:
        """``pass`` or ``fail``."""
        return self.gate.verdict

    @property
    def reason(self) -> str:
        """The gate's reason."""
        return self.gate.reason

    def record(self) -> dict[str, Any]:
        """The row as a flat dict (the CSV/JSON columns, see :func:`record_columns`)."""
        out: dict[str, Any] = {
            "file": self.file,
            "image_sha256": self.image_sha256,
            "input_check": self.gate.verdict,
            "reason": self.gate.reason,
            "checks_passed": list(self.gate.checks_passed),
            "checks_failed": list(self.gate.checks_failed),
            "gate_p_frontal": _rounded(self.gate.frontal_probability),
        }
        for label, probability in self.probabilities.items():
            out[f"p_{label}"] = _rounded(probability)
        out["positive_findings"] = None if self.positive is None else list(self.positive)
        out["no_call_findings"] = list(self.no_call)
        summary = self.summary
        for column, attribute in SUMMARY_COLUMNS.items():
            out[column] = None if summary is None else _rounded(getattr(summary, attribute))
        level: float | None = None
        for name, score in self.severity.items():
            out[name] = None if score is None else _rounded(score.mean, 3)
            out[f"{name}_low"] = None if score is None else _rounded(score.low, 3)
            out[f"{name}_high"] = None if score is None else _rounded(score.high, 3)
            if score is not None:
                level = score.level
        out["severity_interval_level"] = level
        out["model_id"] = self.model_id
        out["weights_sha256"] = self.weights_sha256
        out["engine"] = self.engine
        out["heatmaps"] = list(self.heatmap_files)
        out["note"] = self.note
        return out


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def summarise_row(
    probabilities: Mapping[str, float | None], bundle: ModelBundle, prevalence: float | None = None
) -> coherence.Summary | None:
    """The coherent summary of one row's probabilities (``None`` when the bundle does
    not record its training prevalence or lacks the second-opinion labels)."""
    model_prevalence = coherence.training_prevalence(bundle.training)
    if model_prevalence is None:
        return None
    return coherence.summarise(probabilities, model_prevalence, prevalence)


def record_columns(bundle: ModelBundle) -> list[str]:
    """The columns of :meth:`PredictionRow.record` for a bundle, in order."""
    columns = [
        "file",
        "image_sha256",
        "input_check",
        "reason",
        "checks_passed",
        "checks_failed",
        "gate_p_frontal",
    ]
    columns += [f"p_{label}" for label in bundle.findings]
    columns += ["positive_findings", "no_call_findings", *SUMMARY_COLUMNS]
    for name in bundle.severity:
        columns += [name, f"{name}_low", f"{name}_high"]
    columns += ["severity_interval_level", "model_id", "weights_sha256", "engine"]
    columns += ["heatmaps", "note"]
    return columns


@dataclass(frozen=True)
class NetworkOutputs:
    """One batch's raw network outputs, as numpy arrays.

    Attributes:
        findings: ``(B, K)`` finding logits.
        severity: ``(B, 2 S)`` severity means then log-variances.
        gate: ``(B, G)`` gate logits.
        features: ``(B, C, h, w)`` feature maps (for CAM).
    """

    findings: NDArray[np.float32]
    severity: NDArray[np.float32]
    gate: NDArray[np.float32]
    features: NDArray[np.float32]


def sigmoid(values: NDArray[np.floating]) -> NDArray[np.float64]:
    """The logistic function, stable for large negative and positive values."""
    x = np.asarray(values, dtype=np.float64)
    result: NDArray[np.float64] = np.empty_like(x)
    positive = x >= 0
    result[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    exp_x = np.exp(x[~positive])
    result[~positive] = exp_x / (1.0 + exp_x)
    return result


def calibrated_probabilities(
    logits: NDArray[np.floating], temperatures: Sequence[float]
) -> NDArray[np.float64]:
    """``sigmoid(logit / T)`` per finding (the last axis)."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / np.asarray(temperatures))


def severity_scores(raw: NDArray[np.floating], bundle: ModelBundle) -> dict[str, SeverityScore]:
    """Severity scores and intervals from one image's severity head output.

    Args:
        raw: ``(2 S,)``: S means, then S log-variances.
        bundle: gives the names, ranges and interval (``severity_interval``).
    """
    n = len(bundle.severity)
    means = np.asarray(raw[:n], dtype=np.float64)
    spec = bundle.severity_interval
    level = float(spec.get("level", 0.9))
    half_width = spec.get("half_width")
    if half_width is None:
        z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
        logvar = np.clip(np.asarray(raw[n : 2 * n], dtype=np.float64), -30.0, 30.0)
        halves = z * np.exp(0.5 * logvar)
    else:
        halves = np.broadcast_to(np.asarray(half_width, dtype=np.float64), (n,))
    scores: dict[str, SeverityScore] = {}
    for i, name in enumerate(bundle.severity):
        low, high = bundle.severity_ranges[i]
        mean = float(np.clip(means[i], low, high))
        scores[name] = SeverityScore(
            mean=mean,
            low=float(np.clip(mean - halves[i], low, high)),
            high=float(np.clip(mean + halves[i], low, high)),
            level=level,
        )
    return scores


def check_bundle(bundle: ModelBundle) -> None:
    """Refuse a bundle whose description cannot drive a prediction.

    Raises:
        MetadataError: naming what is inconsistent.
    """
    where = f"{bundle.model_id} ({bundle.path})"
    if gate.FRONTAL_CLASS not in bundle.gate_classes:
        raise MetadataError(
            f"predict: model {where} has gate classes {list(bundle.gate_classes)} without "
            f"{gate.FRONTAL_CLASS!r}"
        )
    if len(bundle.severity_ranges) != len(bundle.severity):
        raise MetadataError(
            f"predict: model {where} has {len(bundle.severity)} severity outputs but "
            f"{len(bundle.severity_ranges)} ranges"
        )
    if any(t <= 0 for t in bundle.temperatures):
        raise MetadataError(f"predict: model {where} has a temperature <= 0")
