"""Train the second-opinion model (findings, severity and the input gate in one network):
from a store (:func:`train_model`) or on folds the caller made (:func:`fit_on_indices`,
:func:`fit_with_inner_split`). Why it is trained this way: docs/decisions/ (training-*)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from covidcxr.dataset.loading import DEFAULT_CACHE_DIR, CacheDir
from covidcxr.dataset.samples import SampleSet
from covidcxr.dataset.splits import Split, make_split
from covidcxr.dataset.tasks import SECOND_OPINION_LABELS, get_task
from covidcxr.errors import MetadataError
from covidcxr.models.calibration import (
    Calibration,
    calibrate,
    gate_report,
    operating_point_text,
    prevalence,
)
from covidcxr.models.config import TrainConfig
from covidcxr.models.loop import LossWeights, Progress, deterministic, train_network
from covidcxr.models.network import CXRModel
from covidcxr.models.pools import TrainingPools, forward_pool, training_pools
from covidcxr.models.provenance import data_record, fit_record, fold_report, split_record
from covidcxr.models.sample_sets import (
    SEVERITY_TASK,
    GateSamples,
    SeverityData,
    assign_gate_samples,
    findings_samples,
    gate_samples,
    linked_exclusions,
    severity_data,
    severity_samples,
)
from covidcxr.models.severity_head import fit_severity_head
from covidcxr.models.trained import DEFAULT_GATE_RULES, TrainedModel, build_network
from covidcxr.store.db import Store

__all__ = [
    "HELD_OUT_GIVEN",
    "HELD_OUT_SEVERITY",
    "canonical_command",
    "fit_on_indices",
    "fit_with_inner_split",
    "inner_split",
    "train_model",
]

HELD_OUT_SEVERITY = "severity-scored, held out so severity is measured out of sample"
HELD_OUT_GIVEN = "excluded by the caller"


def _check_folds(
    findings: SampleSet, train_indices: Sequence[int], val_indices: Sequence[int]
) -> None:
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


def _calibrate_network(
    network: CXRModel,
    pools: TrainingPools,
    names: Sequence[str],
    weights: LossWeights,
    config: TrainConfig,
    rng: np.random.Generator,
) -> Calibration:
    """Correct the findings bias for ``pos_weight``, then fit temperatures and operating
    points on the validation findings and report the gate on the validation pool."""
    device = torch.device(config.device)
    pos_weight, _ = weights.tensors(device)
    # Prior correction: pos_weight w moves the loss's optimum logit by log(w).
    with torch.no_grad():
        network.heads.findings.bias.sub_(torch.log(pos_weight))
    val = pools.findings_val
    logits = forward_pool(network, val, device, config.batch_size)["findings"]
    calibration = calibrate(logits.astype(np.float64), val.labels, val.patients, names, rng)
    gate_logits = forward_pool(network, pools.val, device, config.batch_size)["gate"]
    calibration.validation["gate"] = gate_report(gate_logits, pools.val.gate)
    return calibration


def _trained_model(
    network: CXRModel,
    config: TrainConfig,
    names: tuple[str, ...],
    train_labels: NDArray[np.float32],
    calibration: Calibration,
    severity_interval: dict[str, Any],
    provenance: dict[str, Any],
) -> TrainedModel:
    severity_task = get_task(SEVERITY_TASK)
    return TrainedModel(
        network=network,
        config=config,
        findings=names,
        finding_definitions={
            d.name: {"include": list(d.include), "exclude": list(d.exclude)}
            for d in SECOND_OPINION_LABELS
            if d.name in names
        },
        temperatures=calibration.temperatures,
        thresholds=tuple(
            t if not math.isnan(t) else prevalence(train_labels[:, j])
            for j, t in enumerate(calibration.thresholds)
        ),
        operating_point=operating_point_text(names, calibration.validation),
        severity_labels=tuple(severity_task.labels),
        severity_ranges=tuple(severity_task.ranges),
        severity_interval=severity_interval,
        gate_rules=DEFAULT_GATE_RULES,
        provenance=provenance,
    )


def fit_on_indices(
    findings: SampleSet,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    config: TrainConfig,
    *,
    gate: GateSamples | None = None,
    severity_fit: SeverityData | None = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    progress: Progress | None = None,
) -> TrainedModel:
    """Train on chosen samples: the core that :func:`train_model` and cross-validation
    share.

    Steps: load the images (:func:`~covidcxr.models.pools.training_pools`); train with
    early stopping (:func:`~covidcxr.models.loop.train_network`); correct the findings
    bias for ``pos_weight`` and calibrate on the validation images
    (:mod:`~covidcxr.models.calibration`); fit the severity head
    (:mod:`~covidcxr.models.severity_head`). One seed (``config.seed``) decides every
    draw; the same seed, data and thread count give the same weights.

    Args:
        findings: samples of the ``second-opinion`` task (frontal X-rays of the
            training sources, e.g. :func:`~covidcxr.models.sample_sets.findings_samples`).
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
    _check_folds(findings, train_indices, val_indices)
    started = time.perf_counter()
    names = tuple(findings.label_names)
    rng_epochs, rng_val_drawn, rng_severity, rng_bootstrap = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(4)
    )
    pools = training_pools(
        findings, train_indices, val_indices, gate, config.size, cache_dir, rng_val_drawn
    )
    weights = LossWeights.for_pools(pools, names)
    severity_interval: dict[str, Any] = {}
    severity_record: dict[str, Any] = {"fitted": False}
    with deterministic(config.device, config.seed, config.threads):
        network = build_network(config, len(names))
        run = train_network(network, pools, config, weights, rng_epochs, progress)
        calibration = _calibrate_network(network, pools, names, weights, config, rng_bootstrap)
        if severity_fit is not None and severity_fit.indices:
            severity_interval, severity_record = fit_severity_head(
                network, severity_fit, config, torch.device(config.device), cache_dir, rng_severity
            )
    data = data_record(findings, [*train_indices, *val_indices], gate, pools, weights)
    provenance = fit_record(
        config, findings, data, run, calibration, severity_record, time.perf_counter() - started
    )
    return _trained_model(
        network,
        config,
        names,
        pools.findings_train.labels,
        calibration,
        severity_interval,
        provenance,
    )


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


def _findings_and_split(
    store: Store, config: TrainConfig, split: Split | None
) -> tuple[SampleSet, Split, bool]:
    """The findings samples and the holdout split (made here when None; True then)."""
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
    return findings, split, made_here


def _held_out(
    store: Store,
    config: TrainConfig,
    universe: set[str],
    scored: SampleSet,
    exclude_patients: Iterable[str],
) -> tuple[set[str], set[str]]:
    """(patients the caller excluded, severity-scored patients held out), each with the
    patients linked to them by duplicate pictures."""
    given = linked_exclusions(store, exclude_patients, universe)
    held_severity: set[str] = set()
    if config.hold_out_severity and scored.samples:
        held_severity = linked_exclusions(store, scored.patients, universe) - given
    return given, held_severity


def train_model(
    store: Store,
    config: TrainConfig,
    *,
    split: Split | None = None,
    exclude_patients: Iterable[str] = (),
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    progress: Progress | None = None,
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
    findings, split, made_here = _findings_and_split(store, config, split)
    gate_set, scored = gate_samples(store), severity_samples(store)
    universe = set(findings.patients) | set(gate_set.patients) | set(scored.patients)
    given, held_severity = _held_out(store, config, universe, scored, exclude_patients)
    excluded = given | held_severity
    train, val, test = (
        [i for i in split.indices(findings, fold) if findings.samples[i].patient not in excluded]
        for fold in ("train", "val", "test")
    )
    gate = assign_gate_samples(
        store, gate_set, findings, train, val, exclude_patients=excluded, seed=config.seed
    )
    scored_data = severity_data(store, scored, out_of_sample=config.hold_out_severity)
    scored_data = scored_data.without(given)
    model = fit_on_indices(
        findings,
        train,
        val,
        config,
        gate=gate,
        severity_fit=scored_data if scored_data.indices else None,
        cache_dir=cache_dir,
        progress=progress,
    )
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(5)[4])
    model.provenance["holdout_test"] = fold_report(model, findings, test, cache_dir, rng)
    model.provenance["split"] = split_record(split, made_by_train=made_here)
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
