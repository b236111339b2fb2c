"""Honest evaluation: patient-grouped cross-validation, external folds, severity, audit.

:func:`evaluate` trains models through an injected ``fit`` function (see
:class:`FitFunction`; :func:`training_fit` wraps the real one,
:func:`covidcxr.models.train.fit_on_indices`) and scores what they predict on patients
they never saw:

* ``kfold``: for each of ``repeats`` repeats, a stratified, patient-grouped,
  duplicate-aware k-fold split (:func:`~covidcxr.dataset.splits.make_split` with seed
  ``seed + repeat``); each fold's model is trained on the other folds (``fit`` makes its
  own inner validation split from those training patients only, for calibration, early
  stopping and the operating point) and predicts the held-out fold. Every image gets
  one out-of-fold prediction per repeat. Metrics are computed per repeat and
  **averaged over repeats**; the 95 % interval is a patient bootstrap that applies the
  same patient draw to every repeat (:func:`covidcxr.models.metrics.bootstrap`).
* ``source`` / ``region``: leave-one-source-out and leave-one-region-out. Each
  held-out source or region with at least ``min_heldout_samples`` images is predicted
  by a model trained on all the others; smaller ones stay in training and are listed
  as skipped (so are images of unknown location). Results per held-out group, and
  pooled over them; the pooled AUC mixes groups with different prevalences and
  different models, so read the per-group tables first.
* severity (:func:`evaluate_severity`): the reference protocol (Cohen et al. 2020):
  50 random patient-grouped 50/50 splits of the scored images, a ridge regression on
  frozen backbone features per split, MAE, R^2 and Pearson r against the
  predict-the-training-mean baseline and the literature. The backbone is trained
  once, on the task's samples *minus every patient linked to a scored image*, so it
  has never seen a scored image (nor a duplicate of one).
* the shortcut audit (:mod:`covidcxr.models.audit`): each k-fold model also predicts
  its held-out images with the lungs masked out and with only the lungs kept.

Sensitivity and specificity are taken at each model's *stored operating point* (the
threshold its fit chose on its own validation data), per image: ``p >= threshold of
the model that predicted it``. Baselines: the training prevalence of the fold as a
constant probability (Brier, calibration; its AUC is 0.5 by construction) and the
training mean for severity.

Nothing here imports torch (only :func:`training_fit` does, when called): images are
read from the preprocessed-pixel cache
(:class:`covidcxr.dataset.cache.PreprocessCache`, the same files the torch Dataset
and training use) or decoded from the blobs when absent, so an evaluation can run from
a store's database plus its cache folder alone (``<data dir>/covidcxr.sqlite`` and
``<data dir>/cache/v<CACHE_VERSION>-<size>-center`` and ``...-center-mask``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from covidcxr import RESEARCH_USE_ONLY, __version__
from covidcxr.atomic import atomic_output
from covidcxr.dataset.cache import PreprocessCache
from covidcxr.dataset.loading import (
    DEFAULT_CACHE_DIR,
    CacheDir,
    Crop,
    load_image,
    load_mask,
    normalise,
    resolve_cache_dir,
)
from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.splits import UNKNOWN_REGION, Split, linked_patients, make_split
from covidcxr.dataset.tasks import Task, get_task
from covidcxr.errors import MetadataError, MissingExtraError
from covidcxr.models import audit as audit_module
from covidcxr.models.audit import AuditResult
from covidcxr.models.metrics import (
    AUC,
    BRIER,
    DEFAULT_RESAMPLES,
    ECE,
    MAE,
    PEARSON,
    R2,
    REGRESSION_METRICS,
    Estimate,
    ReliabilityBin,
    bootstrap,
    constant_estimate,
    operating_point_metrics,
    reliability_table,
)
from covidcxr.models.severity import choose_alpha, clip_to_ranges, fit_ridge
from covidcxr.store.db import Store
from covidcxr.store.duplicates import duplicate_groups

log = logging.getLogger(__name__)

FORMAT = "covidcxr-evaluation/1"
DEFAULT_SCHEMES = ("kfold", "source", "region")
DEFAULT_MIN_HELDOUT = 30
SEVERITY_SPLITS = 50
SEVERITY_TARGETS = ("geographic_extent", "opacity")

#: Cohen et al., "Predicting COVID-19 Pneumonia Severity on Chest X-ray with Deep
#: Learning", Cureus 12(7):e9448, 2020: 94 PA images, 50 random patient-grouped 50/50
#: splits, linear regression on a DenseNet pretrained on ~200k external chest X-rays.
LITERATURE_SEVERITY: Mapping[str, Mapping[str, float]] = {
    "geographic_extent": {"mae": 1.14, "pearson_r": 0.81, "r2": 0.60, "baseline_mae": 2.07,
                          "baseline_r2": -0.09},
    "opacity": {"mae": 0.78},
}  # fmt: skip
LITERATURE_SOURCE = (
    "Cohen et al. 2020, Cureus 12(7):e9448 (94 PA images, 50 patient-grouped 50/50 "
    "splits, DenseNet pretrained on ~200k external chest X-rays)"
)


# --- what evaluation needs from training ---------------------------------------------


class EvaluationModel(Protocol):
    """A trained model as evaluation uses it (the real one wraps ``TrainedModel``).

    Images are N x 1 x S x S float32 in [-1024, 1024] (``S = input_size``, centre
    crop), exactly what :class:`~covidcxr.dataset.torch_dataset.CollectionDataset`
    gives for ``img``.
    """

    @property
    def input_size(self) -> int:
        """The side S of the square input."""
        ...

    @property
    def thresholds(self) -> Sequence[float]:
        """Per finding label, the operating point on the calibrated probability."""
        ...

    def predict_findings(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        """N x L calibrated finding probabilities."""
        ...

    def features(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        """N x C pooled backbone features (for the severity regression)."""
        ...


class FitFunction(Protocol):
    """Train a model on some samples of a set.

    ``fit`` sees only ``train_indices``; it must make any validation split it needs
    (calibration, early stopping, operating point) from those samples' patients, and
    must use no image of ``exclude_patients`` for anything (they are the test fold, or
    the severity-scored patients; an auxiliary objective such as the input gate must
    not see them either).
    """

    def __call__(
        self,
        samples: SampleSet,
        train_indices: Sequence[int],
        *,
        seed: int,
        exclude_patients: frozenset[str],
    ) -> EvaluationModel: ...


#: Fit a regressor on features X (n x C), targets Y (n x k) and the patient of each row
#: (for any inner, grouped validation); returns its predict (m x C -> m x k).
RegressorFit = Callable[
    [NDArray[np.float64], NDArray[np.float64], Sequence[str]],
    Callable[[NDArray[np.float64]], NDArray[np.float64]],
]

Progress = Callable[[str], None]


# --- pixels ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pixels:
    """Images (and lung masks) of some samples, as the model's input grey levels.

    Attributes:
        images: N x S x S ``uint8``.
        masks: N x S x S ``uint8`` (1 = lung; zeros where no mask is known).
        has_mask: N booleans.
    """

    images: NDArray[np.uint8]
    masks: NDArray[np.uint8]
    has_mask: NDArray[np.bool_]


def load_pixels(
    samples: SampleSet,
    indices: Sequence[int],
    size: int,
    *,
    crop: Crop = "center",
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    masks: bool = True,
    threads: int = 2,
) -> Pixels:
    """Load samples' pixels from the preprocessed cache, decoding (and caching) misses.

    The cache is the one :class:`~covidcxr.dataset.torch_dataset.CollectionDataset`
    fills (same folder, same keys), so a cache prepared once serves training and
    evaluation, and the blobs are not read for cached images.

    Raises:
        ImageError: an uncached image or mask is missing from the blobs or undecodable.
    """
    root = resolve_cache_dir(cache_dir, samples.blob_root.parent)
    images_cache = None if root is None else PreprocessCache(root, size, crop)
    masks_cache = None if root is None else PreprocessCache(root, size, crop, kind="mask")
    chosen = [samples.samples[i] for i in indices]

    def one_image(i: int) -> NDArray[np.uint8]:
        sample = chosen[i]

        def load() -> NDArray[np.uint8]:
            return load_image(samples.image_path(sample), size, crop=crop)

        if images_cache is None:
            return load()
        return images_cache.get_or_load(sample.image_sha256, load)

    def one_mask(i: int) -> NDArray[np.uint8] | None:
        sample = chosen[i]
        path = samples.mask_path(sample)
        if not masks or path is None or sample.mask_sha256 is None:
            return None

        def load() -> NDArray[np.uint8]:
            return load_mask(path, size, crop=crop)

        if masks_cache is None:
            return load()
        return masks_cache.get_or_load(sample.mask_sha256, load)

    n = len(chosen)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        image_list = list(pool.map(one_image, range(n)))
        mask_list = list(pool.map(one_mask, range(n)))
    images = np.zeros((n, size, size), dtype=np.uint8)
    mask_array = np.zeros((n, size, size), dtype=np.uint8)
    has_mask = np.zeros(n, dtype=bool)
    for i, (image, mask) in enumerate(zip(image_list, mask_list, strict=True)):
        images[i] = image
        if mask is not None and mask.any():
            mask_array[i] = mask
            has_mask[i] = True
    return Pixels(images, mask_array, has_mask)


def predict_batches(
    function: Callable[[NDArray[np.float32]], NDArray[np.float64]],
    images: NDArray[np.uint8],
    batch_size: int = 32,
) -> NDArray[np.float64]:
    """Run a model function over ``uint8`` images in batches (normalised to
    [-1024, 1024], N x 1 x S x S)."""
    parts = [
        np.asarray(function(normalise(images[i : i + batch_size])[:, None]), dtype=np.float64)
        for i in range(0, len(images), batch_size)
    ]
    if not parts:
        return np.zeros((0, 0))
    return np.concatenate(parts)


# --- results --------------------------------------------------------------------------


def _estimates_dict(values: Mapping[str, Estimate]) -> dict[str, Any]:
    return {k: v.as_dict() for k, v in values.items()}


def _estimates_from(data: Mapping[str, Any]) -> dict[str, Estimate]:
    return {k: Estimate.from_dict(v) for k, v in data.items()}


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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "label": self.label,
            "n": self.n,
            "patients": self.patients,
            "positives": self.positives,
            "negatives": self.negatives,
            "unknown": self.unknown,
            "model": _estimates_dict(self.model),
            "baseline": _estimates_dict(self.baseline),
            "reliability": [b.as_dict() for b in self.reliability],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelResult:
        """Inverse of :meth:`as_dict`."""
        return cls(
            label=str(data["label"]),
            n=int(data["n"]),
            patients=int(data["patients"]),
            positives=int(data["positives"]),
            negatives=int(data["negatives"]),
            unknown=int(data["unknown"]),
            model=_estimates_from(data["model"]),
            baseline=_estimates_from(data["baseline"]),
            reliability=tuple(
                ReliabilityBin(
                    lower=float(b["lower"]),
                    upper=float(b["upper"]),
                    n=int(b["n"]),
                    mean_probability=math.nan
                    if b["mean_probability"] is None
                    else float(b["mean_probability"]),
                    observed_rate=math.nan
                    if b["observed_rate"] is None
                    else float(b["observed_rate"]),
                )
                for b in data.get("reliability", [])
            ),
            notes=tuple(data.get("notes", [])),
        )


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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**self.__dict__, "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FoldRecord:
        """Inverse of :meth:`as_dict`."""
        return cls(**{**data, "thresholds": tuple(data.get("thresholds", ()))})


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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "scheme": self.scheme,
            "description": self.description,
            "note": self.note,
            "labels": [r.as_dict() for r in self.labels],
            "heldout": {k: [r.as_dict() for r in v] for k, v in self.heldout.items()},
            "folds": [f.as_dict() for f in self.folds],
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchemeResult:
        """Inverse of :meth:`as_dict`."""
        return cls(
            scheme=str(data["scheme"]),
            description=str(data["description"]),
            labels=tuple(LabelResult.from_dict(r) for r in data.get("labels", [])),
            heldout={
                k: tuple(LabelResult.from_dict(r) for r in v)
                for k, v in data.get("heldout", {}).items()
            },
            folds=tuple(FoldRecord.from_dict(f) for f in data.get("folds", [])),
            skipped=dict(data.get("skipped", {})),
            note=data.get("note"),
        )


@dataclass(frozen=True)
class SeverityTarget:
    """One severity score's results.

    Attributes:
        target: ``geographic_extent`` or ``opacity``.
        model: mae, r2, pearson_r (mean over splits, patient-bootstrap interval).
        baseline: the same for predicting the training half's mean.
        split_sd: standard deviation over the splits of each model metric.
        literature: the reference numbers, where published.
        verdict: one plain sentence: match, beat or fall short, and by how much.
    """

    target: str
    model: Mapping[str, Estimate]
    baseline: Mapping[str, Estimate]
    split_sd: Mapping[str, float]
    literature: Mapping[str, float]
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "target": self.target,
            "model": _estimates_dict(self.model),
            "baseline": _estimates_dict(self.baseline),
            "split_sd": {k: _finite(v) for k, v in self.split_sd.items()},
            "literature": dict(self.literature),
            "verdict": self.verdict,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeverityTarget:
        """Inverse of :meth:`as_dict`."""
        return cls(
            target=str(data["target"]),
            model=_estimates_from(data["model"]),
            baseline=_estimates_from(data["baseline"]),
            split_sd={k: math.nan if v is None else float(v) for k, v in data["split_sd"].items()},
            literature={k: float(v) for k, v in data.get("literature", {}).items()},
            verdict=str(data["verdict"]),
        )


@dataclass(frozen=True)
class SeverityResult:
    """The severity evaluation.

    Attributes:
        protocol: the protocol in words.
        n_images: scored images evaluated.
        n_patients: their patients.
        views: image count per view.
        splits: random 50/50 splits.
        backbone: what the feature backbone was trained on (and what was held out).
        targets: per score, its results.
        reason: why we fall short, where we do (None otherwise).
    """

    protocol: str
    n_images: int
    n_patients: int
    views: Mapping[str, int]
    splits: int
    backbone: Mapping[str, Any]
    targets: tuple[SeverityTarget, ...]
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "protocol": self.protocol,
            "n_images": self.n_images,
            "n_patients": self.n_patients,
            "views": dict(self.views),
            "splits": self.splits,
            "backbone": dict(self.backbone),
            "targets": [t.as_dict() for t in self.targets],
            "reason": self.reason,
            "literature_source": LITERATURE_SOURCE,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeverityResult:
        """Inverse of :meth:`as_dict`."""
        return cls(
            protocol=str(data["protocol"]),
            n_images=int(data["n_images"]),
            n_patients=int(data["n_patients"]),
            views=dict(data.get("views", {})),
            splits=int(data["splits"]),
            backbone=dict(data.get("backbone", {})),
            targets=tuple(SeverityTarget.from_dict(t) for t in data["targets"]),
            reason=data.get("reason"),
        )


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


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
        """The JSON document."""
        return {
            "format": FORMAT,
            "intended_use": RESEARCH_USE_ONLY,
            "covidcxr_version": self.covidcxr_version,
            "created": self.created,
            "task": dict(self.task),
            "selection": dict(self.selection),
            "samples": dict(self.samples),
            "settings": dict(self.settings),
            "schemes": {k: v.as_dict() for k, v in self.schemes.items()},
            "severity": None if self.severity is None else self.severity.as_dict(),
            "audit": None if self.audit is None else self.audit.as_dict(),
            "not_computable": list(self.not_computable),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`as_dict`.

        Raises:
            MetadataError: not an evaluation document.
        """
        if data.get("format") != FORMAT:
            raise MetadataError(
                f"EvaluationReport: format {data.get('format')!r}, expected {FORMAT!r}"
            )
        try:
            return cls(
                task=dict(data["task"]),
                selection=dict(data["selection"]),
                samples=dict(data["samples"]),
                settings=dict(data["settings"]),
                schemes={k: SchemeResult.from_dict(v) for k, v in data["schemes"].items()},
                severity=None
                if data.get("severity") is None
                else SeverityResult.from_dict(data["severity"]),
                audit=None if data.get("audit") is None else AuditResult.from_dict(data["audit"]),
                not_computable=tuple(data.get("not_computable", [])),
                created=str(data["created"]),
                covidcxr_version=str(data["covidcxr_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
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

        def compact(estimate: Estimate) -> dict[str, Any]:
            return {
                "value": _finite_or_none(estimate.value),
                "ci95": None
                if not (math.isfinite(estimate.low) and math.isfinite(estimate.high))
                else [round(estimate.low, 4), round(estimate.high, 4)],
                **({"note": estimate.note} if estimate.note and not estimate.defined else {}),
            }

        def labels_of(results: Iterable[LabelResult]) -> dict[str, Any]:
            return {
                r.label: {
                    "n": r.n,
                    "patients": r.patients,
                    "positives": r.positives,
                    **{name: compact(e) for name, e in r.model.items()},
                    "baseline": {name: compact(e) for name, e in r.baseline.items()},
                }
                for r in results
            }

        schemes: dict[str, Any] = {}
        for name, result in self.schemes.items():
            entry: dict[str, Any] = {"protocol": result.description}
            if result.note:
                entry["note"] = result.note
            if result.labels:
                entry["labels"] = labels_of(result.labels)
            if result.heldout:
                entry["heldout"] = {k: labels_of(v) for k, v in result.heldout.items()}
            if result.skipped:
                entry["skipped"] = dict(result.skipped)
            schemes[name] = entry
        metrics: dict[str, Any] = {
            "evaluation": {
                "format": FORMAT,
                "created": self.created,
                "task": self.task.get("name"),
                "samples": self.samples.get("samples"),
                "patients": self.samples.get("patients"),
                "settings": dict(self.settings),
            },
            "findings": schemes,
        }
        if self.severity is not None:
            metrics["severity"] = {
                "protocol": self.severity.protocol,
                "n_images": self.severity.n_images,
                "targets": {
                    t.target: {
                        **{k: compact(e) for k, e in t.model.items()},
                        "baseline": {k: compact(e) for k, e in t.baseline.items()},
                        "literature": dict(t.literature),
                        "verdict": t.verdict,
                    }
                    for t in self.severity.targets
                },
                "reason": self.severity.reason,
            }
        if self.audit is not None:
            metrics["shortcut_audit"] = {
                "flagged": self.audit.flagged,
                "verdict": self.audit.verdict,
                "n_images": self.audit.n_images,
                "labels": {
                    a.label: {
                        **{v: compact(e) for v, e in a.auc.items()},
                        "flagged": a.flagged,
                    }
                    for a in self.audit.labels
                },
            }
        metrics["not_computable"] = list(self.not_computable)
        return metrics


def _finite_or_none(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


# --- scoring predictions --------------------------------------------------------------


def score_labels(
    label_names: Sequence[str],
    labels: NDArray[np.float64],
    probabilities: NDArray[np.float64],
    thresholds: NDArray[np.float64],
    baseline: NDArray[np.float64],
    groups: Sequence[str],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[LabelResult, ...]:
    """Metrics per label from out-of-fold predictions over R repeats.

    Args:
        label_names: the L labels.
        labels: N x L (``NaN`` = unknown).
        probabilities: R x N x L calibrated probabilities (``NaN`` = not predicted in
            that repeat).
        thresholds: R x N x L: the operating point of the model that predicted each.
        baseline: R x N x L: the prevalence of each prediction's training set.
        groups: N patients.
        n_resamples: bootstrap resamples.
        seed: the bootstrap seed (the same patient draws for every metric and label).
    """
    sens, spec = operating_point_metrics()
    results = []
    predicted = np.asarray(~np.isnan(probabilities).all(axis=0))  # N x L
    for column, name in enumerate(label_names):
        y = labels[:, column]
        p = probabilities[:, :, column]
        present = predicted[:, column]
        known = present & ~np.isnan(y)
        model = bootstrap([AUC, BRIER, ECE], y, p, groups, n_resamples=n_resamples, seed=seed)
        model.update(
            bootstrap(
                [sens, spec],
                y,
                p - thresholds[:, :, column],
                groups,
                n_resamples=n_resamples,
                seed=seed,
            )
        )
        base = bootstrap(
            [BRIER, ECE], y, baseline[:, :, column], groups, n_resamples=n_resamples, seed=seed
        )
        base = {
            "auc": constant_estimate(0.5, "a constant predictor ranks nothing: AUC 0.5"),
            **base,
        }
        ordered = {k: model[k] for k in ("auc", "sensitivity", "specificity", "brier", "ece")}
        pooled_y = np.tile(y, p.shape[0])
        pooled_p = p.reshape(-1)
        keep = ~np.isnan(pooled_p) & ~np.isnan(pooled_y)
        reliability = tuple(reliability_table(pooled_y[keep], pooled_p[keep])) if keep.any() else ()
        notes = tuple(
            dict.fromkeys(e.note for e in ordered.values() if e.note is not None and not e.defined)
        )
        results.append(
            LabelResult(
                label=name,
                n=int(known.sum()),
                patients=len({groups[int(i)] for i in np.flatnonzero(known)}),
                positives=int((y[known] == 1.0).sum()),
                negatives=int((y[known] == 0.0).sum()),
                unknown=int((present & np.isnan(y)).sum()),
                model=ordered,
                baseline=base,
                reliability=reliability,
                notes=notes,
            )
        )
    return tuple(results)


# --- the evaluation -------------------------------------------------------------------


def _check_disjoint(samples: SampleSet, train: Sequence[int], test: Sequence[int]) -> None:
    """Refuse a fold whose training and test sets share a patient (a bug upstream)."""
    shared = {samples.samples[i].patient for i in train} & {
        samples.samples[i].patient for i in test
    }
    if shared:
        raise MetadataError(
            f"evaluate: patients {sorted(shared)[:5]} are on both sides of a fold; "
            "the split is broken (covidcxr split --verify)"
        )


def _patients(samples: SampleSet, indices: Iterable[int]) -> int:
    return len({samples.samples[i].patient for i in indices})


def _thresholds(model: EvaluationModel, n_labels: int) -> NDArray[np.float64]:
    values = np.asarray(model.thresholds, dtype=np.float64).reshape(-1)
    if values.size != n_labels:
        raise MetadataError(
            f"evaluate: the model gives {values.size} thresholds for {n_labels} labels"
        )
    return values


class _Collector:
    """Out-of-fold predictions over repeats (R x N x L; NaN = not predicted)."""

    def __init__(self, repeats: int, n: int, n_labels: int, variants: tuple[str, ...] = ()) -> None:
        shape = (repeats, n, n_labels)
        self.n_labels = n_labels
        self.variants = variants
        self.probabilities: NDArray[np.float64] = np.full(shape, np.nan)
        self.thresholds: NDArray[np.float64] = np.full(shape, np.nan)
        self.baseline: NDArray[np.float64] = np.full(shape, np.nan)
        self.audit: dict[str, NDArray[np.float64]] = {v: np.full(shape, np.nan) for v in variants}
        self.audited: NDArray[np.bool_] = np.zeros(n, dtype=bool)
        self.without_mask: NDArray[np.bool_] = np.zeros(n, dtype=bool)


def _fit_and_predict(
    collector: _Collector,
    repeat: int,
    samples: SampleSet,
    labels: NDArray[np.float64],
    train: Sequence[int],
    test: Sequence[int],
    fit: FitFunction,
    seed: int,
    *,
    cache_dir: CacheDir,
    batch_size: int,
) -> EvaluationModel:
    _check_disjoint(samples, train, test)
    test_patients = frozenset(samples.samples[i].patient for i in test)
    model = fit(samples, list(train), seed=seed, exclude_patients=test_patients)
    pixels = load_pixels(
        samples, test, model.input_size, cache_dir=cache_dir, masks=bool(collector.variants)
    )
    probabilities = predict_batches(model.predict_findings, pixels.images, batch_size)
    n_labels = collector.n_labels
    if probabilities.shape != (len(test), n_labels):
        raise MetadataError(
            f"evaluate: predict_findings gave shape {probabilities.shape}, expected "
            f"({len(test)}, {n_labels})"
        )
    rows = np.asarray(test, dtype=np.intp)
    collector.probabilities[repeat, rows] = probabilities
    collector.thresholds[repeat, rows] = _thresholds(model, n_labels)
    with np.errstate(invalid="ignore"):
        train_labels = labels[np.asarray(train, dtype=np.intp)]
        known = ~np.isnan(train_labels)
        prevalence = np.where(
            known.any(axis=0),
            np.nansum(train_labels, axis=0) / np.maximum(known.sum(axis=0), 1),
            0.5,
        )
    collector.baseline[repeat, rows] = prevalence
    if collector.variants:
        masked = np.flatnonzero(pixels.has_mask)
        collector.without_mask[rows[~pixels.has_mask]] = True
        if masked.size:
            collector.audited[rows[masked]] = True
            for variant in collector.variants:
                if variant == "full":
                    continue  # the predictions above
                changed = audit_module.apply_variant(
                    variant, pixels.images[masked], pixels.masks[masked]
                )
                collector.audit[variant][repeat, rows[masked]] = predict_batches(
                    model.predict_findings, changed, batch_size
                )
    return model


def _joined(result: LabelResult) -> str:
    """A label's undefined metrics in one line: "auc undefined (why); ..."."""
    by_reason: dict[str, list[str]] = {}
    for note in result.notes:
        name, _, reason = note.partition(": ")
        by_reason.setdefault(reason or name, []).append(name if reason else "")
    return "; ".join(
        f"{', '.join(n for n in names if n)} undefined ({reason})"
        for reason, names in by_reason.items()
    )


def _heldout_groups(
    split: Split, samples: SampleSet, min_samples: int
) -> tuple[list[str], dict[str, str]]:
    evaluated, skipped = [], {}
    for fold in split.folds:
        n = len(split.indices(samples, fold))
        if fold == UNKNOWN_REGION:
            skipped[fold] = f"{n} images of unknown location: not a region to hold out"
        elif n < min_samples:
            skipped[fold] = (
                f"{n} images < {min_samples}: too few to evaluate; kept in every training set"
            )
        else:
            evaluated.append(fold)
    return evaluated, skipped


def evaluate(
    store: Store,
    fit: FitFunction,
    *,
    task: str | Task = "second-opinion",
    selection: Selection | None = None,
    folds: int = 5,
    repeats: int = 2,
    seed: int = 0,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    severity: bool = True,
    audit: bool = True,
    severity_splits: int = SEVERITY_SPLITS,
    severity_selection: Selection | None = None,
    regressor: RegressorFit | None = None,
    min_heldout_samples: int = DEFAULT_MIN_HELDOUT,
    n_resamples: int = DEFAULT_RESAMPLES,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    batch_size: int = 32,
    settings: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> EvaluationReport:
    """Cross-validate, hold out sources and regions, score severity, audit shortcuts.

    Args:
        store: the store (read only).
        fit: trains a model on sample indices (see :class:`FitFunction`).
        task: the findings task (a name or a Task).
        selection: which records (default: frontal X-rays of every source).
        folds: k of the k-fold.
        repeats: k-fold repeats (seeds ``seed``, ``seed + 1``, ...).
        seed: the base seed of splits, fits and bootstraps. Fit seeds: k-fold
            ``seed * 1000 + 100 * repeat + fold``; held-out source/region ``seed * 1000
            + 500 + i``; the severity backbone ``seed * 1000 + 900``.
        schemes: any of ``kfold``, ``source``, ``region``.
        severity: run the severity protocol.
        audit: run the shortcut audit on the k-fold models (needs ``kfold``).
        severity_splits: random 50/50 splits of the severity protocol.
        severity_selection: the scored images (default: frontal X-rays with scores).
        regressor: the severity regression (default: :func:`ridge_regressor`).
        min_heldout_samples: a source or region with fewer images is not held out.
        n_resamples: bootstrap resamples for every interval.
        cache_dir: the preprocessed-pixel cache (see :func:`load_pixels`).
        batch_size: images per prediction call.
        settings: extra settings to record (the fit's epochs, size, device, ...).
        progress: called with a line of text at each step (the CLI prints them).

    Raises:
        MetadataError: no samples, an unknown scheme, a bad fold count, or a model
            whose outputs do not match the task.
    """
    say = progress or (lambda line: log.info("%s", line))
    unknown = sorted(set(schemes) - set(DEFAULT_SCHEMES))
    if unknown:
        raise MetadataError(
            f"evaluate: unknown scheme(s) {unknown}; use {', '.join(DEFAULT_SCHEMES)}"
        )
    if repeats < 1:
        raise MetadataError(f"evaluate: repeats must be >= 1, got {repeats}")
    resolved = get_task(task) if isinstance(task, str) else task
    if resolved.kind == "regression":
        raise MetadataError(
            f"evaluate: task {resolved.name!r} is a regression task; evaluate a findings "
            "task (severity is evaluated with it)"
        )
    samples = build_samples(store, resolved, selection or Selection())
    if not samples.samples:
        raise MetadataError(
            f"evaluate: no samples for task {resolved.name!r} in the selection; "
            "ingest a source or widen the selection"
        )
    label_names = samples.label_names
    labels = np.array([s.labels for s in samples.samples], dtype=np.float64).reshape(
        len(samples.samples), len(label_names)
    )
    groups = [s.patient for s in samples.samples]
    summary = samples.summary()
    say(
        f"{resolved.name}: {summary['samples']} images of {summary['patients']} patients "
        f"from {', '.join(f'{k} {v}' for k, v in sorted(summary['sources'].items()))}"
    )
    not_computable: list[str] = []
    results: dict[str, SchemeResult] = {}
    audit_result: AuditResult | None = None

    if "kfold" in schemes:
        with store.read() as conn:
            splits = [
                make_split(samples, conn, scheme="kfold", folds=folds, seed=seed + r)
                for r in range(repeats)
            ]
        variants = ("full", "no_lungs", "lungs_only") if audit else ()
        collector = _Collector(repeats, len(samples.samples), len(label_names), variants)
        records = []
        for r, split in enumerate(splits):
            for k, (train_folds, test_fold) in enumerate(split.cross_validation()):
                train = split.indices(samples, train_folds)
                test = split.indices(samples, test_fold)
                fit_seed = seed * 1000 + 100 * r + k
                say(
                    f"kfold repeat {r + 1}/{repeats} fold {k + 1}/{folds}: training on "
                    f"{len(train)} images, testing on {len(test)}"
                )
                model = _fit_and_predict(
                    collector, r, samples, labels, train, test, fit, fit_seed,
                    cache_dir=cache_dir, batch_size=batch_size,
                )  # fmt: skip
                records.append(
                    FoldRecord(
                        "kfold",
                        r,
                        test_fold,
                        fit_seed,
                        len(train),
                        _patients(samples, train),
                        len(test),
                        _patients(samples, test),
                        tuple(float(t) for t in _thresholds(model, len(label_names))),
                    )
                )
        if variants:
            collector.audit["full"] = collector.probabilities.copy()
        say("kfold: scoring (patient bootstrap)")
        label_results = score_labels(
            label_names,
            labels,
            collector.probabilities,
            collector.thresholds,
            collector.baseline,
            groups,
            n_resamples=n_resamples,
            seed=seed,
        )
        results["kfold"] = SchemeResult(
            "kfold",
            f"{folds}-fold cross-validation x {repeats} repeat(s) (split seeds "
            f"{seed}..{seed + repeats - 1}), patient-grouped and duplicate-aware, "
            "stratified; metrics averaged over repeats, 95% patient-bootstrap intervals "
            f"({n_resamples} resamples)",
            labels=label_results,
            folds=tuple(records),
        )
        for label_result in label_results:
            if label_result.notes:
                not_computable.append(f"kfold, {label_result.label}: {_joined(label_result)}")
        if audit:
            rows = np.flatnonzero(collector.audited)
            say(f"shortcut audit on {rows.size} images with lung masks")
            audit_result = audit_module.audit_predictions(
                label_names,
                labels[rows],
                [groups[i] for i in rows],
                {v: collector.audit[v][:, rows] for v in variants},
                n_without_mask=int((collector.without_mask & ~collector.audited).sum()),
                n_resamples=n_resamples,
                seed=seed,
            )
            audited_sources = {samples.samples[int(i)].source for i in rows}
            unmasked = sorted({s.source for s in samples.samples} - audited_sources)
            if unmasked:
                not_computable.append(
                    f"shortcut audit: no lung masks for source(s) {', '.join(unmasked)}, so "
                    "the audit covers only "
                    + (", ".join(sorted(audited_sources)) or "no source")
                    + " and cannot see a shortcut that tells the sources apart (compare "
                    "the k-fold and leave-one-source-out results for that)"
                )
    elif audit:
        not_computable.append("shortcut audit: it audits the k-fold models; kfold was not run")

    for scheme in ("source", "region"):
        if scheme not in schemes:
            continue
        heldout_result = _evaluate_heldout(
            scheme,
            store,
            samples,
            labels,
            groups,
            fit,
            seed=seed,
            min_heldout_samples=min_heldout_samples,
            n_resamples=n_resamples,
            say=say,
            cache_dir=cache_dir,
            batch_size=batch_size,
        )
        results[scheme] = heldout_result
        if heldout_result.note:
            not_computable.append(f"{scheme}: {heldout_result.note}")
        for group, label_results in heldout_result.heldout.items():
            for label_result in label_results:
                if label_result.notes:
                    not_computable.append(
                        f"{scheme} {group}, {label_result.label}: {_joined(label_result)}"
                    )

    severity_result: SeverityResult | None = None
    if severity:
        severity_result = evaluate_severity(
            store,
            fit,
            samples,
            selection=severity_selection,
            splits=severity_splits,
            seed=seed,
            regressor=regressor,
            n_resamples=n_resamples,
            say=say,
            cache_dir=cache_dir,
            batch_size=batch_size,
        )
    recorded = {
        "folds": folds,
        "repeats": repeats,
        "seed": seed,
        "schemes": list(schemes),
        "severity_splits": severity_splits if severity else None,
        "min_heldout_samples": min_heldout_samples,
        "bootstrap_resamples": n_resamples,
        "calibration_bins": 10,
        **dict(settings or {}),
    }
    return EvaluationReport(
        task=resolved.as_dict(),
        selection=samples.selection.as_dict(),
        samples=summary,
        settings=recorded,
        schemes=results,
        severity=severity_result,
        audit=audit_result,
        not_computable=tuple(not_computable),
    )


def _evaluate_heldout(
    scheme: str,
    store: Store,
    samples: SampleSet,
    labels: NDArray[np.float64],
    groups: Sequence[str],
    fit: FitFunction,
    *,
    seed: int,
    min_heldout_samples: int,
    n_resamples: int,
    say: Progress,
    cache_dir: CacheDir,
    batch_size: int,
) -> SchemeResult:
    """Leave-one-source-out or leave-one-region-out."""
    what = "source" if scheme == "source" else "region (country from location)"
    description = (
        f"leave-one-{what}-out: each {scheme} with >= {min_heldout_samples} images is "
        f"predicted by a model trained on all other {scheme}s; patient-bootstrap intervals"
    )
    try:
        with store.read() as conn:
            split = make_split(samples, conn, scheme=scheme)  # type: ignore[arg-type]
    except MetadataError as exc:
        present = sorted({s.source for s in samples.samples})
        reason = (
            f"not computable: {exc}. "
            + (
                f"Only {present[0]} carries this task's labels in the selection, so there is "
                "no other source to hold out. Ingest a second source (e.g. the NIH subset) "
                "and evaluate with both to expose the source shortcut."
                if scheme == "source" and len(present) == 1
                else ""
            )
        ).strip()
        say(f"{scheme}: {reason}")
        return SchemeResult(scheme, description, note=reason)
    evaluated, skipped = _heldout_groups(split, samples, min_heldout_samples)
    if not evaluated:
        return SchemeResult(
            scheme,
            description,
            skipped=skipped,
            note=f"not computable: no {scheme} has >= {min_heldout_samples} images to hold out",
        )
    collector = _Collector(1, len(samples.samples), len(samples.label_names))
    records = []
    heldout: dict[str, tuple[LabelResult, ...]] = {}
    for i, group in enumerate(evaluated):
        test = split.indices(samples, group)
        train = split.indices(samples, [f for f in split.folds if f != group])
        fit_seed = seed * 1000 + 500 + i
        say(f"{scheme} {group}: training on {len(train)} images, testing on {len(test)}")
        single = _Collector(1, len(samples.samples), len(samples.label_names))
        model = _fit_and_predict(
            single, 0, samples, labels, train, test, fit, fit_seed,
            cache_dir=cache_dir, batch_size=batch_size,
        )  # fmt: skip
        rows = np.asarray(test, dtype=np.intp)
        for name in ("probabilities", "thresholds", "baseline"):
            getattr(collector, name)[0, rows] = getattr(single, name)[0, rows]
        heldout[group] = score_labels(
            samples.label_names,
            labels,
            single.probabilities,
            single.thresholds,
            single.baseline,
            groups,
            n_resamples=n_resamples,
            seed=seed,
        )
        records.append(
            FoldRecord(
                scheme,
                0,
                group,
                fit_seed,
                len(train),
                _patients(samples, train),
                len(test),
                _patients(samples, test),
                tuple(float(t) for t in _thresholds(model, len(samples.label_names))),
            )
        )
    pooled = score_labels(
        samples.label_names,
        labels,
        collector.probabilities,
        collector.thresholds,
        collector.baseline,
        groups,
        n_resamples=n_resamples,
        seed=seed,
    )
    note: str | None = None
    if split.excluded:
        note = "left out of every fold: " + "; ".join(
            f"{n} patient(s): {reason}" for reason, n in split.excluded_counts.items()
        )
    return SchemeResult(
        scheme,
        description,
        labels=pooled,
        heldout=heldout,
        folds=tuple(records),
        skipped=skipped,
        note=note,
    )


# --- severity -------------------------------------------------------------------------


def ridge_regressor(ranges: Sequence[tuple[float, float]], seed: int = 0) -> RegressorFit:
    """The severity regression the trained model uses (:mod:`covidcxr.models.severity`):
    ridge on standardised features, its penalty chosen by patient-grouped 5-fold
    cross-validation inside the training half, predictions clipped to ``ranges``."""
    rng = np.random.default_rng(seed)
    scales = [high - low for low, high in ranges]

    def fit(
        features: NDArray[np.float64], targets: NDArray[np.float64], groups: Sequence[str]
    ) -> Callable[[NDArray[np.float64]], NDArray[np.float64]]:
        folds = min(5, len(set(groups)))
        alpha = choose_alpha(features, targets, groups, folds=folds, rng=rng, scales=scales)
        ridge = fit_ridge(features, targets, alpha)

        def predict(new: NDArray[np.float64]) -> NDArray[np.float64]:
            return clip_to_ranges(ridge.predict(new), ranges)

        return predict

    return fit


def _severity_verdict(target: str, model: Estimate, literature: Mapping[str, float]) -> str:
    reference = literature.get("mae")
    if not model.defined:
        return f"{target}: MAE not computable ({model.note})"
    ours = model.text()
    if reference is None:
        return f"{target}: MAE {ours}; no published reference"
    if model.value <= reference:
        return f"{target}: MAE {ours} matches or beats the reference {reference:.2f}"
    if math.isfinite(model.low) and model.low <= reference:
        return (
            f"{target}: MAE {ours} is above the reference {reference:.2f} by "
            f"{model.value - reference:.2f}, but the interval includes it"
        )
    return (
        f"{target}: MAE {ours} falls short of the reference {reference:.2f} by "
        f"{model.value - reference:.2f}"
    )


def evaluate_severity(
    store: Store,
    fit: FitFunction,
    samples: SampleSet,
    *,
    selection: Selection | None = None,
    splits: int = SEVERITY_SPLITS,
    seed: int = 0,
    regressor: RegressorFit | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    batch_size: int = 32,
    say: Progress | None = None,
) -> SeverityResult:
    """The severity protocol of Cohen et al. 2020 on the scored images.

    1. The scored images (default: frontal X-rays with severity scores) and every
       patient linked to them by a duplicate picture are removed from ``samples``;
       ``fit`` trains the feature backbone on the rest (seed ``seed * 1000 + 900``).
    2. Pooled features of the scored images; for each of ``splits`` patient-grouped,
       duplicate-aware 50/50 splits (k-fold with k = 2, seed ``seed + i``), a
       regression (:func:`ridge_regressor` unless given) on the first half, predicting
       the second; the baseline predicts the first half's mean.
    3. MAE, R^2 and Pearson r, averaged over splits, with patient-bootstrap intervals
       (the same patient draw in every split), next to the baseline and the literature.

    Raises:
        MetadataError: no scored images, or none left to train the backbone on.
    """
    say = say or (lambda line: log.info("%s", line))
    scored = build_samples(store, get_task("severity"), selection or Selection(has_severity=True))
    regress = regressor or ridge_regressor(scored.task.ranges, seed)
    if len(scored.samples) < 4:
        raise MetadataError(
            f"evaluate_severity: {len(scored.samples)} scored image(s) in the selection; "
            "the protocol needs at least 4 (ingest the severity scores)"
        )
    with store.read() as conn:
        groups = duplicate_groups(conn)
        half_splits = [
            make_split(scored, conn, scheme="kfold", folds=2, seed=seed + i) for i in range(splits)
        ]
    scored_patients = set(scored.patients)
    linked = linked_patients(set(samples.patients) | scored_patients, groups)
    held = {p for group in linked if scored_patients & set(group) for p in group}
    train = [i for i, s in enumerate(samples.samples) if s.patient not in held]
    if not train:
        raise MetadataError(
            "evaluate_severity: every sample belongs to a scored patient; nothing is left "
            "to train the feature backbone on"
        )
    held_out = [i for i, s in enumerate(samples.samples) if s.patient in held]
    say(
        f"severity: training the feature backbone on {len(train)} images "
        f"({len(held_out)} images of {len(held & set(samples.patients))} scored or linked "
        "patients held out)"
    )
    backbone_seed = seed * 1000 + 900
    model = fit(samples, train, seed=backbone_seed, exclude_patients=frozenset(held))
    pixels = load_pixels(
        scored, range(len(scored.samples)), model.input_size, cache_dir=cache_dir, masks=False
    )
    features = predict_batches(model.features, pixels.images, batch_size)
    targets = np.array([s.labels for s in scored.samples], dtype=np.float64)
    patient_of = [s.patient for s in scored.samples]
    n = len(scored.samples)
    n_targets = targets.shape[1]
    predictions = np.full((splits, n, n_targets), np.nan)
    baseline = np.full((splits, n, n_targets), np.nan)
    say(f"severity: {splits} patient-grouped 50/50 splits of {n} scored images")
    for i, split in enumerate(half_splits):
        first = np.asarray(split.indices(scored, "0"), dtype=np.intp)
        second = np.asarray(split.indices(scored, "1"), dtype=np.intp)
        predict = regress(features[first], targets[first], [patient_of[j] for j in first])
        predictions[i, second] = np.asarray(predict(features[second]), dtype=np.float64).reshape(
            len(second), n_targets
        )
        baseline[i, second] = targets[first].mean(axis=0)
    result_targets = []
    for t, name in enumerate(scored.task.labels):
        model_estimates = bootstrap(
            REGRESSION_METRICS,
            targets[:, t],
            predictions[:, :, t],
            patient_of,
            n_resamples=n_resamples,
            seed=seed,
        )
        baseline_estimates = bootstrap(
            [MAE, R2], targets[:, t], baseline[:, :, t], patient_of,
            n_resamples=n_resamples, seed=seed,
        )  # fmt: skip
        baseline_estimates["pearson_r"] = Estimate(
            math.nan, note="pearson_r: the baseline's predictions are constant"
        )
        tested = ~np.isnan(predictions[:, :, t])
        per_split = {
            metric.name: [
                metric(targets[tested[i], t], predictions[i, tested[i], t]) for i in range(splits)
            ]
            for metric in (MAE, R2, PEARSON)
        }
        split_sd = {
            k: float(np.nanstd(v)) if np.isfinite(v).any() else math.nan
            for k, v in per_split.items()
        }
        literature = dict(LITERATURE_SEVERITY.get(name, {}))
        result_targets.append(
            SeverityTarget(
                target=name,
                model=model_estimates,
                baseline=baseline_estimates,
                split_sd=split_sd,
                literature=literature,
                verdict=_severity_verdict(name, model_estimates["mae"], literature),
            )
        )
    short = [
        t
        for t in result_targets
        if "mae" in t.literature and t.model["mae"].defined
        and t.model["mae"].value > t.literature["mae"]
    ]  # fmt: skip
    reason = None
    if short:
        reason = (
            f"We fall short on {', '.join(t.target for t in short)}. The reference's "
            "features come from a DenseNet-121 pretrained on ~200k external chest X-rays "
            "with many radiological labels (opacity, consolidation, ...); ours come from a "
            f"network trained here on {len(train)} images of this collection with finding "
            "labels only, so its features encode 'which pneumonia' more than 'how much "
            "lung is affected'. Plugging pretrained weights in as the backbone "
            "(xrv-densenet121:PATH) is the way to close the gap."
        )
    views: dict[str, int] = {}
    for sample in scored.samples:
        view = str(sample.metadata.get("view") or "unknown")
        views[view] = views.get(view, 0) + 1
    return SeverityResult(
        protocol=(
            f"{splits} random patient-grouped, duplicate-aware 50/50 splits of the scored "
            "images (seeds "
            f"{seed}..{seed + splits - 1}); ridge regression on the pooled features of a "
            "backbone that never saw a scored patient; metrics averaged over splits, 95% "
            f"patient-bootstrap intervals ({n_resamples} resamples)"
        ),
        n_images=n,
        n_patients=len(scored.patients),
        views=views,
        splits=splits,
        backbone={
            "train_samples": len(train),
            "train_patients": _patients(samples, train),
            "held_out_samples": len(held_out),
            "held_out_patients": len(held & set(samples.patients)),
            "seed": backbone_seed,
        },
        targets=tuple(result_targets),
        reason=reason,
    )


# --- the real training function -------------------------------------------------------

#: Inner validation share of each training set: one fold of a k-fold split of the
#: training patients (k = 6: 17 %, close to train_model's 0.15 / 0.85).
INNER_VALIDATION_FOLDS = 6


class _TrainedAdapter:
    """A :class:`~covidcxr.models.train.TrainedModel` as an :class:`EvaluationModel`."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    def input_size(self) -> int:
        return int(self.model.config.size)

    @property
    def thresholds(self) -> Sequence[float]:
        return tuple(float(t) for t in self.model.thresholds)

    def _predict(self, images: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        result: dict[str, NDArray[Any]] = self.model.predict(
            batch, batch_size=self.model.config.batch_size
        )
        return result

    def predict_findings(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        return np.asarray(self._predict(images)["findings"], dtype=np.float64)

    def features(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        return np.asarray(self._predict(images)["pooled"], dtype=np.float64)


def training_fit(
    store: Store,
    *,
    model: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    size: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    progress: Progress | None = None,
) -> tuple[FitFunction, dict[str, Any]]:
    """The real :class:`FitFunction`: :func:`covidcxr.models.train.fit_on_indices` with
    the recipe of ``model`` (its recorded training config) or the default config, and
    ``epochs``, ``size``, ``device``, ``threads`` overriding it.

    Each call splits the training patients once more (stratified, duplicate-aware
    k-fold with k = :data:`INNER_VALIDATION_FOLDS`, seed = the fit's seed; fold ``0``
    validates: early stopping, temperatures, thresholds), puts the store's gate-only
    images (laterals, CT, other sources' frontals) on the side of their patients with
    :func:`~covidcxr.models.train.assign_gate_samples` (``exclude_patients`` and the
    held-out folds give none), and trains. Severity is not fitted here (evaluation runs
    its own protocol on the pooled features).

    Returns:
        The fit function and the settings to record in the report.

    Raises:
        MissingExtraError: torch is not installed.
        MetadataError: a bad option or an unreadable bundle.
    """
    try:
        from covidcxr.models import train as train_module
    except ImportError as exc:
        raise MissingExtraError("torch", "ml") from exc
    say = progress or (lambda line: log.info("%s", line))
    base = train_module.TrainConfig()
    recipe = "covidcxr.models.train.TrainConfig defaults"
    if model is not None:
        from covidcxr.models.bundle import load_bundle

        bundle = load_bundle(model)
        recorded = dict(bundle.training.get("config", {}))
        recorded.update(
            backbone=str(bundle.backbone.get("spec", base.backbone)),
            width=int(bundle.backbone.get("width", base.width)),
            size=bundle.input_size,
        )
        base = train_module.TrainConfig.from_dict(recorded)
        recipe = f"the training config recorded in {bundle.model_id}"
    overrides: dict[str, Any] = {"device": device}
    if epochs is not None:
        overrides["epochs"] = epochs
    if size is not None:
        overrides["size"] = size
    if threads is not None:
        overrides["threads"] = threads
    config = dataclasses.replace(base, **overrides)
    gate_set = train_module.gate_samples(store)

    def fit(
        samples: SampleSet,
        train_indices: Sequence[int],
        *,
        seed: int,
        exclude_patients: frozenset[str],
    ) -> EvaluationModel:
        subset = SampleSet(
            samples.task,
            samples.selection,
            [samples.samples[i] for i in train_indices],
            Counter(),
            samples.blob_root,
        )
        with store.read() as conn:
            inner = make_split(
                subset, conn, scheme="kfold", folds=INNER_VALIDATION_FOLDS, seed=seed
            )
        val_positions = set(inner.indices(subset, "0"))
        train = [i for k, i in enumerate(train_indices) if k not in val_positions]
        val = [i for k, i in enumerate(train_indices) if k in val_positions]
        gate = train_module.assign_gate_samples(
            store, gate_set, samples, train, val, exclude_patients=exclude_patients, seed=seed
        )
        seeded = dataclasses.replace(
            config,
            seed=seed,
            sources=tuple(sorted({s.source for s in samples.samples})),
        )

        def epoch_line(record: Mapping[str, Any]) -> None:
            say(
                f"  epoch {record.get('epoch')}: train loss {record.get('train_loss')}, "
                f"val loss {record.get('val_loss')}, val AUROC "
                f"{record.get('val_findings_auroc')} ({record.get('seconds')} s)"
            )

        trained = train_module.fit_on_indices(
            samples,
            train,
            val,
            seeded,
            gate=gate,
            severity_fit=None,
            cache_dir=cache_dir,
            progress=epoch_line,
        )
        return _TrainedAdapter(trained)

    settings = {
        "fit": "covidcxr.models.train.fit_on_indices",
        "recipe": recipe,
        "train_config": {k: v for k, v in config.as_dict().items() if k != "seed"},
        "inner_validation": (
            f"fold 0 of a stratified, duplicate-aware {INNER_VALIDATION_FOLDS}-fold split "
            "of each training set's patients (seed = the fit's seed)"
        ),
        "gate_images": "laterals, CT and other sources' frontals, assigned by patient",
    }
    return fit, settings
