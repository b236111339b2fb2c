"""The evaluation report: per-label results, trained folds, schemes, and the JSON
document (``covidcxr-evaluation/1``) with the compact metrics a model card shows."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr import RESEARCH_USE_ONLY, __version__, serialise
from covidcxr.atomic import atomic_output
from covidcxr.errors import MetadataError
from covidcxr.models.audit import AuditResult
from covidcxr.models.eval_severity import SeverityResult
from covidcxr.models.metrics import Estimate, ReliabilityBin

FORMAT = "covidcxr-evaluation/1"


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class LabelResult:
    """One finding label's metrics on some predictions.

    Attributes:
        label: the label name.
        n: images with a known label that were predicted.
        patients: their patients.
        positives: known positives among them; negatives likewise.
        negatives: known negatives.
        unknown: predicted images whose label is unknown (not scored).
        model: auc, sensitivity, specificity, brier, ece.
        baseline: the prevalence predictor's auc (0.5), brier and ece.
        reliability: equal-width calibration bins over all repeats' predictions.
        notes: why a metric is missing (one class, too few patients, ...).
    """

    label: str
    n: int
    patients: int
    positives: int
    negatives: int
    unknown: int
    model: Mapping[str, Estimate]
    baseline: Mapping[str, Estimate]
    reliability: tuple[ReliabilityBin, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FoldRecord:
    """One trained model of an evaluation: what it saw and what it chose.

    Attributes:
        scheme: ``kfold``, ``source``, ``region`` or ``severity``.
        repeat: the repeat (k-fold), else 0.
        test_fold: the held-out fold (k-fold number, source or region name).
        seed: the seed passed to ``fit``.
        train_samples: training images (fit's own validation split comes out of them).
        train_patients: their patients.
        test_samples: held-out images.
        test_patients: their patients.
        thresholds: the model's stored operating points, per label.
    """

    scheme: str
    repeat: int
    test_fold: str
    seed: int
    train_samples: int
    train_patients: int
    test_samples: int
    test_patients: int
    thresholds: tuple[float, ...] = ()


@dataclass(frozen=True)
class SchemeResult:
    """The results of one evaluation scheme.

    Attributes:
        scheme: ``kfold``, ``source`` or ``region``.
        description: the protocol in one sentence.
        labels: per label, pooled over the held-out folds (and averaged over repeats).
        heldout: for source/region, per held-out group, per label.
        folds: every trained model.
        skipped: held-out groups not evaluated, and why.
        note: why the scheme is not computable, or a caveat; None if fine.
    """

    scheme: str
    description: str
    labels: tuple[LabelResult, ...] = ()
    heldout: Mapping[str, tuple[LabelResult, ...]] = field(default_factory=dict)
    folds: tuple[FoldRecord, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)
    note: str | None = None

    @property
    def computed(self) -> bool:
        """Whether any label was scored."""
        return bool(self.labels)


@dataclass(frozen=True)
class EvaluationReport:
    """Everything an evaluation found, serialisable to JSON.

    Attributes:
        task: the task as data.
        selection: the selection as data.
        samples: the sample set's summary (counts, exclusions).
        settings: folds, repeats, seed, bootstrap resamples, ... and the fit's own
            settings when given.
        schemes: scheme name -> result.
        severity: the severity evaluation, when run.
        audit: the shortcut audit of the k-fold models, when run.
        not_computable: plain sentences on what could not be computed and why.
        created: when (UTC).
        covidcxr_version: the version that made it.
    """

    task: Mapping[str, Any]
    selection: Mapping[str, Any]
    samples: Mapping[str, Any]
    settings: Mapping[str, Any]
    schemes: Mapping[str, SchemeResult]
    severity: SeverityResult | None = None
    audit: AuditResult | None = None
    not_computable: tuple[str, ...] = ()
    created: str = field(default_factory=_now)
    covidcxr_version: str = __version__

    def as_dict(self) -> dict[str, Any]:
        """The JSON document: the fields (:func:`covidcxr.serialise.to_dict`) under a
        ``format`` and ``intended_use`` header, with the audit's verdict written out for
        readers of the file."""
        document = {"format": FORMAT, "intended_use": RESEARCH_USE_ONLY, **serialise.to_dict(self)}
        if self.audit is not None:
            document["audit"]["verdict"] = self.audit.verdict
        return document

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`as_dict` (keys it does not know are ignored).

        Raises:
            MetadataError: not an evaluation document, or a malformed one.
        """
        if data.get("format") != FORMAT:
            raise MetadataError(
                f"EvaluationReport: format {data.get('format')!r}, expected {FORMAT!r}"
            )
        try:
            return serialise.from_dict(cls, data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MetadataError(f"EvaluationReport: malformed document: {exc!r}") from exc

    def to_json(self) -> str:
        """The JSON text (NaN written as null)."""
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON atomically.

        Raises:
            OSError: the file cannot be written.
        """
        target = Path(path)
        with atomic_output(target) as temporary:
            temporary.write_text(self.to_json(), encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvaluationReport:
        """Read a saved report.

        Raises:
            MetadataError: unreadable or not an evaluation document.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MetadataError(f"EvaluationReport.load: cannot read {path}: {exc}") from exc
        return cls.from_dict(data)

    def to_card_metrics(self) -> dict[str, Any]:
        """The compact metrics that go into a model bundle's ``metrics`` (model.json)
        and its card: per scheme and label the point estimates with intervals, the
        baselines, the severity table against the literature, the audit verdict, and
        what could not be computed."""
        metrics: dict[str, Any] = {
            "evaluation": {
                "format": FORMAT,
                "created": self.created,
                "task": self.task.get("name"),
                "samples": self.samples.get("samples"),
                "patients": self.samples.get("patients"),
                "settings": dict(self.settings),
            },
            "findings": {name: _scheme_card(result) for name, result in self.schemes.items()},
        }
        if self.severity is not None:
            metrics["severity"] = _severity_card(self.severity)
        if self.audit is not None:
            metrics["shortcut_audit"] = _audit_card(self.audit)
        metrics["not_computable"] = list(self.not_computable)
        return metrics


def _rounded(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def _compact(estimate: Estimate) -> dict[str, Any]:
    """Value and interval rounded to 4 digits; the note when undefined."""
    has_interval = math.isfinite(estimate.low) and math.isfinite(estimate.high)
    return {
        "value": _rounded(estimate.value),
        "ci95": [round(estimate.low, 4), round(estimate.high, 4)] if has_interval else None,
        **({"note": estimate.note} if estimate.note and not estimate.defined else {}),
    }


def _labels_card(results: Iterable[LabelResult]) -> dict[str, Any]:
    return {
        r.label: {
            "n": r.n,
            "patients": r.patients,
            "positives": r.positives,
            **{name: _compact(e) for name, e in r.model.items()},
            "baseline": {name: _compact(e) for name, e in r.baseline.items()},
        }
        for r in results
    }


def _scheme_card(result: SchemeResult) -> dict[str, Any]:
    entry: dict[str, Any] = {"protocol": result.description}
    if result.note:
        entry["note"] = result.note
    if result.labels:
        entry["labels"] = _labels_card(result.labels)
    if result.heldout:
        entry["heldout"] = {k: _labels_card(v) for k, v in result.heldout.items()}
    if result.skipped:
        entry["skipped"] = dict(result.skipped)
    return entry


def _severity_card(severity: SeverityResult) -> dict[str, Any]:
    return {
        "protocol": severity.protocol,
        "n_images": severity.n_images,
        "targets": {
            t.target: {
                **{k: _compact(e) for k, e in t.model.items()},
                "baseline": {k: _compact(e) for k, e in t.baseline.items()},
                "literature": dict(t.literature),
                "verdict": t.verdict,
            }
            for t in severity.targets
        },
        "reason": severity.reason,
    }


def _audit_card(audit: AuditResult) -> dict[str, Any]:
    return {
        "flagged": audit.flagged,
        "verdict": audit.verdict,
        "n_images": audit.n_images,
        "labels": {
            a.label: {**{v: _compact(e) for v, e in a.auc.items()}, "flagged": a.flagged}
            for a in audit.labels
        },
    }
