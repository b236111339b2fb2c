"""A second-opinion bundle that looks at the lungs first: a base bundle's network for
the kind of pneumonia and severity, the lung gate for the input check, and the lung-zone
model for "pneumonia at all?".

:func:`build` measures, evaluates and writes the bundle (``covidcxr train-lung-model``):

- the base bundle's network files are copied unchanged (same weights, same sha256);
- ``abnormality.json``: the lung-zone pneumonia model fitted on one hospital's normal
  and pneumonia images, with its measurements (:mod:`covidcxr.models.abnormality_train`);
- ``model.json`` names the lung gate and the pneumonia model, and carries new operating
  points: the kinds of pneumonia on the base's validation patients, "No finding" on the
  pneumonia model's out-of-fold scores; and the base's held-out test patients scored
  again with the combined probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from covidcxr.atomic import atomic_output
from covidcxr.dataset.split_file import load_split
from covidcxr.errors import MetadataError
from covidcxr.models import abnormality, abnormality_train, lung_gate, metrics
from covidcxr.models.bundle import ModelBundle, write_bundle
from covidcxr.models.calibration import youden_threshold
from covidcxr.models.coherence import COVID, NO_FINDING, PNEUMONIA_LABELS, summarise
from covidcxr.models.lungs import LungSegmenter, segmenter_record
from covidcxr.store.db import Store

ABNORMALITY_FILE: Final = "abnormality.json"
COPIED: Final = ("weights.pt", "model.onnx", "split.csv")


def _network_probabilities(base: ModelBundle, paths: Sequence[str]) -> list[dict[str, float]]:
    """The base network's calibrated per-label probabilities (its own gate ignored:
    these images are the base's own validation and test images)."""
    from covidcxr.models.engines import make_engine

    engine = make_engine(base, "torch")
    rows = engine.predict_files([Path(p) for p in paths])
    out = []
    for row in rows:
        if row.probabilities and all(v is not None for v in row.probabilities.values()):
            out.append({k: float(v) for k, v in row.probabilities.items() if v is not None})
        else:
            out.append({})
    return out


def _combined(
    base: ModelBundle, data: abnormality_train.ZoneData, risk: abnormality.LinearRisk
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Combined probabilities ``(n, labels)`` for the rows of ``data`` and which rows
    the base's gate let through."""
    network = _network_probabilities(base, list(data.path))
    pneumonia = risk.probability(data.x)
    table = np.full((len(network), len(base.findings)), np.nan)
    for i, probs in enumerate(network):
        if probs:
            combined = abnormality.combine(probs, float(pneumonia[i]), base.findings)
            table[i] = [float(combined[label] or 0.0) for label in base.findings]
    return table, ~np.isnan(table[:, 0])


def _labels(
    data: abnormality_train.ZoneData, base: ModelBundle, store: Store
) -> NDArray[np.float64]:
    """The second-opinion label matrix of ``data``'s rows (NaN: unknown)."""
    from covidcxr.dataset.samples import Selection, build_samples
    from covidcxr.dataset.tasks import get_task

    task = get_task("second-opinion")
    samples = build_samples(store, task, Selection())
    by_path = {str(samples.image_path(s)): s.labels for s in samples.samples}
    order = [task.labels.index(label) for label in base.findings]
    return np.asarray([[by_path[p][k] for k in order] for p in data.path], dtype=np.float64)


def _fold_rows(data: abnormality_train.ZoneData, base: ModelBundle, fold: str) -> NDArray[np.intp]:
    split = load_split(base.path / "split.csv")
    patients = set(split.patients_in(fold))
    return np.flatnonzero(np.isin(data.patient, list(patients)))


def _auc_table(
    table: NDArray[np.float64],
    labels: NDArray[np.float64],
    groups: Sequence[str],
    names: Sequence[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, name in enumerate(names):
        estimate = metrics.bootstrap([metrics.AUC], labels[:, k], table[:, k], groups)["auc"]
        known = labels[~np.isnan(labels[:, k]), k]
        out[name] = {
            "auc": round(estimate.value, 4),
            "low": round(estimate.low, 4),
            "high": round(estimate.high, 4),
            "positives": int((known >= 0.5).sum()),
            "negatives": int((known < 0.5).sum()),
        }
    return out


def operating_points(
    base: ModelBundle,
    table: NDArray[np.float64],
    labels: NDArray[np.float64],
    no_finding_oof: tuple[NDArray[np.float64], NDArray[np.float64]],
) -> tuple[tuple[float, ...], dict[str, Any]]:
    """Youden thresholds: pneumonia kinds on the validation rows of ``table``; "No
    finding" on the pneumonia model's out-of-fold scores (``(labels, P(pneumonia))``).
    A label without both classes keeps the base's threshold."""
    thresholds, record = [], {}
    for k, name in enumerate(base.findings):
        if name == NO_FINDING:
            pneumonia_labels, scores = no_finding_oof
            threshold, j = youden_threshold(1.0 - scores, 1.0 - pneumonia_labels)
            where = "the pneumonia model's out-of-fold scores"
        else:
            threshold, j = youden_threshold(table[:, k], labels[:, k])
            where = "the base's validation patients"
        if not np.isfinite(threshold):
            threshold, where = base.thresholds[k], "kept from the base (one class missing)"
        thresholds.append(float(threshold))
        record[name] = {"threshold": round(float(threshold), 6), "youden_j": j, "on": where}
    return tuple(thresholds), record


@dataclass(frozen=True)
class FittedPneumonia:
    """The lung-zone pneumonia model fitted on one source, with what was measured.

    Attributes:
        risk: the model, fitted on every labelled image of ``source``.
        evaluation: :func:`abnormality_train.evaluate`'s measurements.
        oof_part: the labelled images of ``source``; ``oof``: their out-of-fold
            P(pneumonia) (mean over repeats).
        prevalence: the share of pneumonia among them (the prior ``risk`` carries).
        segmenter: the lung segmenter whose output it was fitted on
            (:func:`~covidcxr.models.lungs.segmenter_record`), when known.
    """

    source: str
    risk: abnormality.LinearRisk
    evaluation: dict[str, Any]
    oof_part: abnormality_train.ZoneData
    oof: NDArray[np.float64]
    prevalence: float
    segmenter: dict[str, Any] | None = None

    def as_file(self) -> dict[str, Any]:
        """The content of ``abnormality.json``."""
        return {
            "format": abnormality.FORMAT,
            "features": list(abnormality.FEATURE_NAMES),
            "model": self.risk.as_dict(),
            "train_source": self.source,
            "training_images": len(self.oof_part.x),
            "pneumonia_prevalence": self.prevalence,
            "C": abnormality_train.C,
            "evaluation": self.evaluation,
            **({"segmenter": self.segmenter} if self.segmenter else {}),
        }


def fit_pneumonia(
    data: abnormality_train.ZoneData,
    source: str,
    seed: int,
    segmenter: LungSegmenter | None = None,
) -> FittedPneumonia:
    """Fit the pneumonia model on ``source`` and measure it (with ``segmenter``, also
    under processing: :func:`abnormality_train.processing_drift`).

    Raises:
        MetadataError: ``data`` has no labelled image of ``source``.
    """
    if not len(data.labelled(source)):
        raise MetadataError(
            f"train-lung-model: the store has no labelled frontal X-rays of {source!r}; "
            "ingest it first (see README)"
        )
    train = data.take(data.labelled(source))
    oof_part, oof = abnormality_train.out_of_fold(data, source, seed=seed)
    return FittedPneumonia(
        source,
        abnormality_train.fit(train.x, train.pneumonia),
        abnormality_train.evaluate(data, source, seed, segmenter),
        oof_part,
        oof.mean(axis=0),
        abnormality_train.prevalence(data, source),
        None if segmenter is None else segmenter_record(segmenter),
    )


@dataclass(frozen=True)
class BaseFolds:
    """The base's validation and test images, scored with the combined probabilities.

    ``table``/``labels``: ``(n, labels)``; ``groups``: patient groups; ``val`` and
    ``test``: rows of each fold that the base's gate let through.
    """

    table: NDArray[np.float64]
    labels: NDArray[np.float64]
    groups: list[str]
    val: NDArray[np.intp]
    test: NDArray[np.intp]

    def fold(self, name: str) -> tuple[NDArray[np.float64], NDArray[np.float64], list[str]]:
        """(table, labels, groups) of ``val`` or ``test``."""
        rows = self.val if name == "val" else self.test
        return self.table[rows], self.labels[rows], [self.groups[i] for i in rows]


def score_base_folds(
    store: Store, base: ModelBundle, data: abnormality_train.ZoneData, risk: abnormality.LinearRisk
) -> BaseFolds:
    """Combined probabilities on the base split's validation and test patients."""
    val_rows, test_rows = _fold_rows(data, base, "val"), _fold_rows(data, base, "test")
    part = data.take(np.concatenate([val_rows, test_rows]))
    table, passed = _combined(base, part, risk)
    val = np.arange(len(val_rows))
    test = np.arange(len(val_rows), len(val_rows) + len(test_rows))
    return BaseFolds(
        table,
        _labels(part, base, store),
        [str(g) for g in part.group],
        val[passed[val]],
        test[passed[test]],
    )


def _training_record(
    base: ModelBundle,
    fitted: FittedPneumonia,
    folds: BaseFolds,
    points: dict[str, Any],
    command: str,
) -> dict[str, Any]:
    covid_share = _covid_share_of_pneumonia(base)
    return {
        **base.training,
        "validation": _support(base, fitted.oof_part, fitted.oof, folds.fold("val")),
        "covid_prevalence": round(fitted.prevalence * covid_share, 4),
        "covid_prevalence_how": (
            f"P(pneumonia) prior of the pneumonia model ({fitted.prevalence:.3f}, its "
            f"training share) x COVID-19's share of the base's pneumonia training labels "
            f"({covid_share:.3f})"
        ),
        "operating_points": points,
        "base_model": {"model_id": base.model_id, "weights_sha256": base.weights_sha256},
        "command": command,
    }


def build(
    store: Store,
    base: ModelBundle,
    out_dir: Path,
    *,
    gate_id: str,
    model_id: str,
    command: str,
    seed: int = 0,
) -> ModelBundle:
    """Measure, evaluate, fit and write the bundle; returns it.

    Raises:
        MetadataError: the base lacks the second-opinion labels or a file to copy, or
            the store lacks the training source.
    """
    missing = [n for n in (NO_FINDING, *PNEUMONIA_LABELS) if n not in base.findings]
    if missing:
        raise MetadataError(f"train-lung-model: base {base.model_id} lacks labels {missing}")
    # The gate's own segmenter: the runtime gives the pneumonia model the gate's.
    segmenter = lung_gate.LungGate.load(lung_gate.WEIGHTS_DIR.parent / gate_id).segmenter
    data = abnormality_train.measure(store, segmenter)
    fitted = fit_pneumonia(data, abnormality_train.DEFAULT_SOURCE, seed, segmenter)
    folds = score_base_folds(store, base, data, fitted.risk)
    val_table, val_labels, _ = folds.fold("val")
    thresholds, points = operating_points(
        base, val_table, val_labels, (fitted.oof_part.pneumonia, fitted.oof)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(base.path / name, out_dir / name)
    with atomic_output(out_dir / ABNORMALITY_FILE) as tmp:
        tmp.write_text(json.dumps(fitted.as_file(), indent=1) + "\n", encoding="utf-8")
    lung_metrics = {
        "holdout_test_combined": _auc_table(*folds.fold("test"), base.findings),
        "pneumonia_model": fitted.evaluation,
        "out_of_fold_on_training_source": out_of_fold_answers(
            base, fitted.oof_part, fitted.oof, thresholds
        ),
    }
    bundle = dataclasses.replace(
        base,
        path=out_dir,
        model_id=model_id,
        thresholds=thresholds,
        operating_point=_operating_text(points),
        training=_training_record(base, fitted, folds, points, command),
        metrics={**base.metrics, "lung_model": lung_metrics},
        files={"split.csv": "", ABNORMALITY_FILE: ""},
        extra={
            **base.extra,
            "lung_gate": {"gate_id": gate_id},
            "abnormality": {"file": ABNORMALITY_FILE, "train_source": fitted.source},
        },
    )
    from covidcxr.models.card import render_card

    return write_bundle(bundle, render_card)


def out_of_fold_answers(
    base: ModelBundle,
    part: abnormality_train.ZoneData,
    pneumonia: NDArray[np.float64],
    thresholds: Sequence[float],
) -> dict[str, Any]:
    """What the combined model answers on the pneumonia model's own training images,
    with out-of-fold P(pneumonia) (never from a model that saw the patient): P(COVID-19)
    of the normal chests, the AUC of P(pneumonia), and the hierarchy check (images where
    P(COVID-19) > P(viral) or P(viral) > P(pneumonia): must be none)."""
    network = _network_probabilities(base, list(part.path))
    covid_k = base.findings.index(COVID)
    covid, violations, scored, base_pneumonia, base_covid = [], 0, [], [], []
    for i, probs in enumerate(network):
        if not probs:
            continue
        combined = abnormality.combine(probs, float(pneumonia[i]), base.findings)
        summary, before = summarise(combined, 0.5), summarise(probs, 0.5)
        if summary is None or before is None:
            continue
        scored.append(i)
        covid.append(float(combined[COVID] or 0.0))
        base_pneumonia.append(before.pneumonia)
        base_covid.append(before.covid)
        ordered = summary.covid <= summary.viral + 1e-12 <= summary.pneumonia + 2e-12
        violations += 0 if ordered else 1
    rows = np.asarray(scored, dtype=np.intp)
    normal = part.pneumonia[rows] == 0
    covid_p = np.asarray(covid)
    auc = metrics.bootstrap([metrics.AUC], part.pneumonia[rows], pneumonia[rows], part.group[rows])
    base_auc = metrics.roc_auc(part.pneumonia[rows], np.asarray(base_pneumonia))
    return {
        "base_pneumonia_auc": round(float(base_auc), 4),
        "base_normal_covid_median": round(float(np.median(np.asarray(base_covid)[normal])), 4),
        "source": str(part.source[0]) if len(part.source) else None,
        "images": len(rows),
        "refused_by_base_gate": len(network) - len(rows),
        "pneumonia_auc": {k: round(getattr(auc["auc"], k), 4) for k in ("value", "low", "high")},
        "normal_covid_median": round(float(np.median(covid_p[normal])), 4),
        "normal_covid_p90": round(float(np.percentile(covid_p[normal], 90)), 4),
        "normal_called_covid": round(float((covid_p[normal] >= thresholds[covid_k]).mean()), 4),
        "normal_images": int(normal.sum()),
        "hierarchy_violations": violations,
    }


def _support(
    base: ModelBundle,
    part: abnormality_train.ZoneData,
    scores: NDArray[np.float64],
    val: tuple[NDArray[np.float64], NDArray[np.float64], Sequence[str]],
) -> dict[str, Any]:
    """The validation record of the combined probabilities: AUROC per label on the
    base's validation images (``val``: table, labels, patient groups), except "No
    finding", which gets what its operating point was chosen on (the pneumonia model's
    out-of-fold images: counts and AUROC), so that :attr:`ModelBundle.uncalled_findings`
    and the card judge each label by its own validation."""
    validation = dict(base.training.get("validation", {}))
    combined = _auc_table(*val, base.findings)
    validation["auroc"] = {n: row["auc"] for n, row in combined.items()}
    validation["auroc_95ci_patient_bootstrap"] = {
        n: [row["low"], row["high"]] for n, row in combined.items()
    }
    normal = int((part.pneumonia == 0).sum())
    auc = metrics.bootstrap([metrics.AUC], 1.0 - part.pneumonia, 1.0 - scores, part.group)["auc"]
    updates = {
        "positives": normal,
        "negatives": len(part.pneumonia) - normal,
        "auroc": round(auc.value, 4),
        "auroc_95ci_patient_bootstrap": [round(auc.low, 4), round(auc.high, 4)],
    }
    for key, value in updates.items():
        validation[key] = {**validation.get(key, {}), NO_FINDING: value}
    validation["no_finding_from"] = "the pneumonia model's out-of-fold images"
    return validation


def _covid_share_of_pneumonia(base: ModelBundle) -> float:
    counts = base.training.get("data", {}).get("findings_train", {}).get("labels", {})
    positives = {n: counts.get(n, {}).get("positive", 0) for n in PNEUMONIA_LABELS}
    total = sum(positives.values())
    if not total:
        raise MetadataError(f"train-lung-model: base {base.model_id} records no pneumonia labels")
    return float(positives[COVID] / total)


def _operating_text(points: Mapping[str, Mapping[str, Any]]) -> str:
    return (
        "Per label, the threshold on the combined probability that maximises Youden's J "
        "(sensitivity + specificity - 1): "
        + "; ".join(f"{name} on {p['on']}" for name, p in points.items())
        + ". Youden's J does not depend on prevalence; with a handful of validation "
        "positives a threshold is uncertain: choose one on local data before relying on it."
    )
