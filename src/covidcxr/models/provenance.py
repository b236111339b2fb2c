"""What training records in model.json's ``training``: versions, data counts, history,
calibration, validation and held-out test results, the split."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from covidcxr import __version__
from covidcxr.dataset.loading import CacheDir
from covidcxr.dataset.samples import SampleSet
from covidcxr.dataset.splits import Split
from covidcxr.models import card as card_module
from covidcxr.models.calibration import Calibration, bootstrap_auroc, rounded
from covidcxr.models.config import TrainConfig
from covidcxr.models.loop import INVERTED_PROBABILITY, LossWeights, TrainingRun
from covidcxr.models.metrics import roc_auc
from covidcxr.models.pools import (
    Pool,
    TrainingPools,
    findings_pool,
    gate_counts,
    label_counts,
    membership_entries,
)
from covidcxr.models.sample_sets import GateSamples
from covidcxr.models.trained import TrainedModel


def _pool_counts(pool: Pool, names: Sequence[str]) -> dict[str, Any]:
    return {
        "images": len(pool),
        "patients": len(set(pool.patients)),
        "labels": label_counts(pool.labels, names),
    }


def data_record(
    findings: SampleSet,
    indices: Sequence[int],
    gate: GateSamples | None,
    pools: TrainingPools,
    weights: LossWeights,
) -> dict[str, Any]:
    """Counts of what one fit trained and validated on, and its membership hash."""
    names = findings.label_names
    seen = gate_counts(np.concatenate([pools.findings_train.gate, pools.gate_train.gate]))
    return {
        "findings_train": _pool_counts(pools.findings_train, names),
        "findings_val": _pool_counts(pools.findings_val, names),
        "gate_train": {
            **{k: v for k, v in seen.items() if k in ("frontal_xray", "lateral_xray", "ct")},
            "other_source_frontal_drawn_per_epoch": pools.other_per_epoch,
            "frontal_shown_inverted_probability": INVERTED_PROBABILITY,
            "not_medical_drawn_per_epoch": pools.drawn_per_epoch,
        },
        "gate_val": gate_counts(pools.val.gate),
        "pos_weight": [round(float(w), 4) for w in weights.pos_weight],
        "membership_sha256": card_module.data_membership_sha256(
            membership_entries(findings, indices, gate)
        ),
    }


def fit_record(
    config: TrainConfig,
    findings: SampleSet,
    data: dict[str, Any],
    run: TrainingRun,
    calibration: Calibration,
    severity: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """The provenance of one fit (:attr:`TrainedModel.provenance`)."""
    per_epoch = [h["seconds"] for h in run.history]
    return {
        "config": config.as_dict(),
        "seed": config.seed,
        "covidcxr_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": config.threads,
        "device": config.device,
        "task": findings.task.as_dict(),
        "selection": findings.selection.as_dict(),
        "data": data,
        "history": run.history,
        "epochs_run": len(run.history),
        "best_epoch": run.best_epoch,
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(float(np.mean(per_epoch)), 1) if per_epoch else None,
        "calibration": calibration.record,
        "validation": calibration.validation,
        "severity": severity,
    }


def fold_report(
    model: TrainedModel,
    findings: SampleSet,
    indices: Sequence[int],
    cache_dir: CacheDir,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """AUROC with patient-bootstrap 95% intervals, and sensitivity/specificity at the
    operating point, on held-out images."""
    pool = findings_pool(findings, indices, model.config.size, cache_dir)
    if len(pool) == 0:
        return {"images": 0}
    predicted = model.predict(pool.pixels, batch_size=model.config.batch_size)
    report: dict[str, Any] = {
        "images": len(pool),
        "patients": len(set(pool.patients)),
        "labels": label_counts(pool.labels, model.findings),
        "auroc": {},
        "auroc_95ci_patient_bootstrap": {},
        "sensitivity_at_operating_point": {},
        "specificity_at_operating_point": {},
    }
    for j, name in enumerate(model.findings):
        y = pool.labels[:, j].astype(np.float64)
        p = predicted["findings"][:, j]
        report["auroc"][name] = rounded(roc_auc(y, p))
        low, high = bootstrap_auroc(p, y, pool.patients, rng)
        report["auroc_95ci_patient_bootstrap"][name] = [rounded(low), rounded(high)]
        known = ~np.isnan(y)
        positive = y[known] >= 0.5
        called = predicted["positive"][known, j]
        report["sensitivity_at_operating_point"][name] = (
            rounded(float(called[positive].mean())) if positive.any() else None
        )
        report["specificity_at_operating_point"][name] = (
            rounded(float((~called[~positive]).mean())) if (~positive).any() else None
        )
    return report


def split_record(split: Split, *, made_by_train: bool) -> dict[str, Any]:
    """The split a model was trained on, by its hashes."""
    return {
        "scheme": split.scheme,
        "seed": split.seed,
        "fractions": list(split.fractions) if split.fractions else None,
        "membership_sha256": split.membership_sha256,
        "content_sha256": split.header()["content_sha256"],
        "made_by_train": made_by_train,
    }
