"""Honest evaluation: patient-grouped cross-validation, held-out sources and regions,
severity, and the shortcut audit.

:func:`evaluate` trains models through an injected ``fit`` (see
:class:`~covidcxr.models.eval_fit.FitFunction`; :func:`~covidcxr.models.eval_fit.training_fit`
wraps the real one) and scores what they predict on patients they never saw:

* ``kfold``: for each of ``repeats`` repeats, a stratified, patient-grouped,
  duplicate-aware k-fold split (:func:`~covidcxr.dataset.splits.make_split`, seed
  ``seed + repeat``); each fold's model is trained on the other folds (``fit`` makes its
  own inner validation split from those patients only) and predicts the held-out fold.
  Metrics are computed per repeat and averaged over repeats; the 95 % interval is a
  patient bootstrap applying the same patient draw to every repeat
  (:func:`covidcxr.models.metrics.bootstrap`).
* ``source`` / ``region``: leave-one-source-out and leave-one-region-out. Each held-out
  group with at least ``min_heldout_samples`` images is predicted by a model trained on
  all the others; smaller ones (and images of unknown location) stay in training and
  are listed as skipped. Results per held-out group, and pooled over them.
* severity: :func:`covidcxr.models.eval_severity.evaluate_severity`.
* the shortcut audit (:mod:`covidcxr.models.audit`): each k-fold model also predicts
  its held-out images with the lungs masked out and with only the lungs kept (lung
  masks: the reference mask, else the lung segmenter's; see
  :mod:`covidcxr.models.audit_masks`).

Sensitivity and specificity are taken per image at the *stored operating point* of the
model that predicted it. Baselines: the training prevalence of the fold as a constant
probability (its AUC is 0.5 by construction). Nothing here imports torch: images come
from the preprocessed-pixel cache (:func:`~covidcxr.models.eval_pixels.load_pixels`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from covidcxr.dataset.loading import DEFAULT_CACHE_DIR, CacheDir
from covidcxr.dataset.regions import UNKNOWN_REGION
from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.splits import Split, make_split
from covidcxr.dataset.tasks import Task, get_task
from covidcxr.errors import MetadataError
from covidcxr.models import audit as audit_module
from covidcxr.models.audit import AuditResult
from covidcxr.models.audit_masks import NONE, LungMasks, shipped_lung_masks
from covidcxr.models.eval_fit import EvaluationModel, FitFunction, Progress
from covidcxr.models.eval_pixels import Pixels, load_pixels, predict_batches
from covidcxr.models.eval_report import EvaluationReport, FoldRecord, LabelResult, SchemeResult
from covidcxr.models.eval_severity import (
    SEVERITY_SPLITS,
    RegressorFit,
    SeverityResult,
    evaluate_severity,
)
from covidcxr.models.metrics import (
    AUC,
    BRIER,
    CALIBRATION_BINS,
    DEFAULT_RESAMPLES,
    ECE,
    bootstrap,
    constant_estimate,
    operating_point_metrics,
    reliability_table,
)
from covidcxr.store.db import Store

log = logging.getLogger(__name__)

DEFAULT_SCHEMES = ("kfold", "source", "region")
DEFAULT_MIN_HELDOUT = 30
AUDIT_VARIANTS = ("full", "no_lungs", "lungs_only")


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
    return tuple(
        _score_label(
            name,
            labels[:, column],
            probabilities[:, :, column],
            thresholds[:, :, column],
            baseline[:, :, column],
            groups,
            n_resamples=n_resamples,
            seed=seed,
        )
        for column, name in enumerate(label_names)
    )


def _score_label(
    name: str,
    y: NDArray[np.float64],
    p: NDArray[np.float64],
    thresholds: NDArray[np.float64],
    baseline: NDArray[np.float64],
    groups: Sequence[str],
    *,
    n_resamples: int,
    seed: int,
) -> LabelResult:
    """One label: N labels, R x N probabilities, thresholds and baseline."""
    sens, spec = operating_point_metrics()
    model = bootstrap([AUC, BRIER, ECE], y, p, groups, n_resamples=n_resamples, seed=seed)
    model |= bootstrap([sens, spec], y, p - thresholds, groups, n_resamples=n_resamples, seed=seed)
    base = {
        "auc": constant_estimate(0.5, "a constant predictor ranks nothing: AUC 0.5"),
        **bootstrap([BRIER, ECE], y, baseline, groups, n_resamples=n_resamples, seed=seed),
    }
    ordered = {k: model[k] for k in ("auc", "sensitivity", "specificity", "brier", "ece")}
    pooled_y, pooled_p = np.tile(y, p.shape[0]), p.reshape(-1)
    keep = ~np.isnan(pooled_p) & ~np.isnan(pooled_y)
    present = ~np.isnan(p).all(axis=0)
    known = present & ~np.isnan(y)
    notes = dict.fromkeys(e.note for e in ordered.values() if e.note is not None and not e.defined)
    return LabelResult(
        label=name,
        n=int(known.sum()),
        patients=len({groups[int(i)] for i in np.flatnonzero(known)}),
        positives=int((y[known] == 1.0).sum()),
        negatives=int((y[known] == 0.0).sum()),
        unknown=int((present & np.isnan(y)).sum()),
        model=ordered,
        baseline=base,
        reliability=tuple(reliability_table(pooled_y[keep], pooled_p[keep])) if keep.any() else (),
        notes=tuple(notes),
    )


# --- fitting and predicting one fold ----------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What every fold of one evaluation shares."""

    store: Store
    samples: SampleSet
    labels: NDArray[np.float64]  # N x L
    groups: Sequence[str]  # N patients
    fit: FitFunction
    seed: int
    n_resamples: int
    cache_dir: CacheDir
    batch_size: int
    say: Progress

    def patients(self, indices: Iterable[int]) -> int:
        """How many patients these samples belong to."""
        return len({self.samples.samples[i].patient for i in indices})

    def score(self, collector: _Collector) -> tuple[LabelResult, ...]:
        """:func:`score_labels` on a collector's predictions."""
        return score_labels(
            self.samples.label_names,
            self.labels,
            collector.probabilities,
            collector.thresholds,
            collector.baseline,
            self.groups,
            n_resamples=self.n_resamples,
            seed=self.seed,
        )


class _Collector:
    """Out-of-fold predictions over repeats (R x N x L; NaN = not predicted)."""

    def __init__(
        self, repeats: int, n: int, n_labels: int, lung_masks: LungMasks | None = None
    ) -> None:
        shape = (repeats, n, n_labels)
        self.n_labels = n_labels
        self.lung_masks = lung_masks
        variants = AUDIT_VARIANTS if lung_masks is not None else ()
        self.variants = variants
        self.probabilities: NDArray[np.float64] = np.full(shape, np.nan)
        self.thresholds: NDArray[np.float64] = np.full(shape, np.nan)
        self.baseline: NDArray[np.float64] = np.full(shape, np.nan)
        self.audit: dict[str, NDArray[np.float64]] = {v: np.full(shape, np.nan) for v in variants}
        # Per image: "" not predicted yet, else its mask's provenance (audit_masks).
        self.provenance: NDArray[np.str_] = np.full(n, "", dtype="<U9")


def _thresholds(model: EvaluationModel, n_labels: int) -> NDArray[np.float64]:
    values = np.asarray(model.thresholds, dtype=np.float64).reshape(-1)
    if values.size != n_labels:
        raise MetadataError(
            f"evaluate: the model gives {values.size} thresholds for {n_labels} labels"
        )
    return values


def _prevalence(labels: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per label, the share of positives among known labels (0.5 when none is known)."""
    known = ~np.isnan(labels)
    counts = known.sum(axis=0)
    with np.errstate(invalid="ignore"):
        share = np.nansum(labels, axis=0) / np.maximum(counts, 1)
    return np.where(counts > 0, share, 0.5)


def _fit_and_predict(
    run: _Run,
    collector: _Collector,
    repeat: int,
    train: Sequence[int],
    test: Sequence[int],
    *,
    scheme: str,
    test_fold: str,
    fit_seed: int,
) -> FoldRecord:
    """Train on ``train``, predict ``test`` into ``collector`` (and the audit variants
    when it has any); the fold's record."""
    samples = run.samples
    test_patients = frozenset(samples.samples[i].patient for i in test)
    shared = test_patients & {samples.samples[i].patient for i in train}
    if shared:
        raise MetadataError(
            f"evaluate: patients {sorted(shared)[:5]} are on both sides of a fold; "
            "the split is broken (covidcxr split --verify)"
        )
    model = run.fit(samples, list(train), seed=fit_seed, exclude_patients=test_patients)
    pixels = load_pixels(
        samples, test, model.input_size, cache_dir=run.cache_dir, masks=bool(collector.variants)
    )
    probabilities = predict_batches(model.predict_findings, pixels.images, run.batch_size)
    if probabilities.shape != (len(test), collector.n_labels):
        raise MetadataError(
            f"evaluate: predict_findings gave shape {probabilities.shape}, expected "
            f"({len(test)}, {collector.n_labels})"
        )
    rows = np.asarray(test, dtype=np.intp)
    thresholds = _thresholds(model, collector.n_labels)
    collector.probabilities[repeat, rows] = probabilities
    collector.thresholds[repeat, rows] = thresholds
    collector.baseline[repeat, rows] = _prevalence(run.labels[np.asarray(train, dtype=np.intp)])
    if collector.variants:
        _predict_variants(run, collector, repeat, rows, model, pixels)
    return FoldRecord(
        scheme, repeat, test_fold, fit_seed, len(train), run.patients(train), len(test),
        run.patients(test), tuple(float(t) for t in thresholds),
    )  # fmt: skip


def _predict_variants(
    run: _Run,
    collector: _Collector,
    repeat: int,
    rows: NDArray[np.intp],
    model: EvaluationModel,
    pixels: Pixels,
) -> None:
    """The audit's predictions of the test images with a lung mask, reference or
    segmented (``full`` is the plain one)."""
    assert collector.lung_masks is not None
    # The model's input square is segmented, not the whole image: an evaluation from a
    # prepared cache alone (no blobs) must give the same report as one with the blobs.
    masks, provenance = collector.lung_masks.masks_for(pixels.images, pixels.masks)
    collector.provenance[rows] = provenance
    masked = np.flatnonzero(provenance != NONE)
    if not masked.size:
        return
    for variant in collector.variants:
        if variant == "full":
            continue
        changed = audit_module.apply_variant(variant, pixels.images[masked], masks[masked])
        collector.audit[variant][repeat, rows[masked]] = predict_batches(
            model.predict_findings, changed, run.batch_size
        )


# --- the schemes ----------------------------------------------------------------------


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


def _undefined_lines(prefix: str, results: Iterable[LabelResult]) -> list[str]:
    return [f"{prefix}, {r.label}: {_joined(r)}" for r in results if r.notes]


def _run_kfold(
    run: _Run, folds: int, repeats: int, lung_masks: LungMasks | None
) -> tuple[SchemeResult, _Collector]:
    """Every fold of every repeat trained and predicted, then scored (and predicted for
    the audit when ``lung_masks`` is given)."""
    with run.store.read() as conn:
        splits = [
            make_split(run.samples, conn, scheme="kfold", folds=folds, seed=run.seed + r)
            for r in range(repeats)
        ]
    collector = _Collector(
        repeats, len(run.samples.samples), len(run.samples.label_names), lung_masks
    )
    records = []
    for r, split in enumerate(splits):
        for k, (train_folds, test_fold) in enumerate(split.cross_validation()):
            train = split.indices(run.samples, train_folds)
            test = split.indices(run.samples, test_fold)
            run.say(
                f"kfold repeat {r + 1}/{repeats} fold {k + 1}/{folds}: training on "
                f"{len(train)} images, testing on {len(test)}"
            )
            records.append(
                _fit_and_predict(run, collector, r, train, test, scheme="kfold",
                                 test_fold=test_fold, fit_seed=run.seed * 1000 + 100 * r + k)
            )  # fmt: skip
    if collector.variants:
        collector.audit["full"] = collector.probabilities.copy()
    run.say("kfold: scoring (patient bootstrap)")
    description = (
        f"{folds}-fold cross-validation x {repeats} repeat(s) (split seeds "
        f"{run.seed}..{run.seed + repeats - 1}), patient-grouped and duplicate-aware, "
        "stratified; metrics averaged over repeats, 95% patient-bootstrap intervals "
        f"({run.n_resamples} resamples)"
    )
    result = SchemeResult("kfold", description, labels=run.score(collector), folds=tuple(records))
    return result, collector


def _audit_kfold(run: _Run, collector: _Collector) -> tuple[AuditResult, list[str]]:
    """The shortcut audit of the k-fold models on the images with a lung mask
    (reference or segmented), and what it cannot see."""
    assert collector.lung_masks is not None
    rows = np.flatnonzero((collector.provenance != "") & (collector.provenance != NONE))
    masks = collector.lung_masks.provenance(collector.provenance[rows])
    without = int((collector.provenance == NONE).sum())
    run.say(f"shortcut audit on {rows.size} images ({masks.text(without)})")
    result = audit_module.audit_predictions(
        run.samples.label_names,
        run.labels[rows],
        [run.groups[int(i)] for i in rows],
        {v: collector.audit[v][:, rows] for v in collector.variants},
        n_without_mask=without,
        masks=masks,
        n_resamples=run.n_resamples,
        seed=run.seed,
    )
    audited_sources = {run.samples.samples[int(i)].source for i in rows}
    unmasked = sorted({s.source for s in run.samples.samples} - audited_sources)
    if not unmasked:
        return result, []
    why = masks.note or f"no reference mask, and {masks.segmenter} found no lung in them"
    covered = ", ".join(sorted(audited_sources)) or "no source"
    return result, [
        f"shortcut audit: no lung masks for source(s) {', '.join(unmasked)} ({why}), so "
        f"the audit covers only {covered} and cannot "
        "see a shortcut that tells the sources apart (compare the k-fold and "
        "leave-one-source-out results for that)"
    ]


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


def _heldout_split(run: _Run, scheme: str) -> Split | str:
    """The source or region split, or why there is none."""
    try:
        with run.store.read() as conn:
            return make_split(run.samples, conn, scheme=scheme)  # type: ignore[arg-type]
    except MetadataError as exc:
        present = sorted({s.source for s in run.samples.samples})
        hint = ""
        if scheme == "source" and len(present) == 1:
            hint = (
                f" Only {present[0]} carries this task's labels in the selection, so there "
                "is no other source to hold out. Ingest a second source (e.g. the NIH "
                "subset) and evaluate with both to expose the source shortcut."
            )
        return f"not computable: {exc}.{hint}"


def _evaluate_heldout(run: _Run, scheme: str, min_heldout_samples: int) -> SchemeResult:
    """Leave-one-source-out or leave-one-region-out."""
    what = "source" if scheme == "source" else "region (country from location)"
    description = (
        f"leave-one-{what}-out: each {scheme} with >= {min_heldout_samples} images is "
        f"predicted by a model trained on all other {scheme}s; patient-bootstrap intervals"
    )
    split = _heldout_split(run, scheme)
    if isinstance(split, str):
        run.say(f"{scheme}: {split}")
        return SchemeResult(scheme, description, note=split)
    evaluated, skipped = _heldout_groups(split, run.samples, min_heldout_samples)
    if not evaluated:
        reason = f"not computable: no {scheme} has >= {min_heldout_samples} images to hold out"
        return SchemeResult(scheme, description, skipped=skipped, note=reason)
    shape = (1, len(run.samples.samples), len(run.samples.label_names))
    pooled = _Collector(*shape)
    records, heldout = [], {}
    for i, group in enumerate(evaluated):
        test = split.indices(run.samples, group)
        train = split.indices(run.samples, [f for f in split.folds if f != group])
        run.say(f"{scheme} {group}: training on {len(train)} images, testing on {len(test)}")
        single = _Collector(*shape)
        records.append(
            _fit_and_predict(run, single, 0, train, test, scheme=scheme, test_fold=group,
                             fit_seed=run.seed * 1000 + 500 + i)
        )  # fmt: skip
        rows = np.asarray(test, dtype=np.intp)
        for name in ("probabilities", "thresholds", "baseline"):
            getattr(pooled, name)[0, rows] = getattr(single, name)[0, rows]
        heldout[group] = run.score(single)
    note = None
    if split.excluded:
        note = "left out of every fold: " + "; ".join(
            f"{n} patient(s): {reason}" for reason, n in split.excluded_counts.items()
        )
    return SchemeResult(scheme, description, run.score(pooled), heldout, tuple(records),
                        skipped, note)  # fmt: skip


# --- the evaluation -------------------------------------------------------------------


def _findings_samples(
    store: Store, task: str | Task, selection: Selection | None
) -> tuple[Task, SampleSet]:
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
    return resolved, samples


def _label_matrix(samples: SampleSet) -> NDArray[np.float64]:
    labels = [s.labels for s in samples.samples]
    matrix: NDArray[np.float64] = np.array(labels, dtype=np.float64).reshape(
        len(samples.samples), len(samples.label_names)
    )
    return matrix


def _describe(summary: Mapping[str, Any]) -> str:
    sources = ", ".join(f"{k} {v}" for k, v in sorted(summary["sources"].items()))
    return f"{summary['samples']} images of {summary['patients']} patients from {sources}"


def _check_request(schemes: Sequence[str], repeats: int) -> None:
    unknown = sorted(set(schemes) - set(DEFAULT_SCHEMES))
    if unknown:
        raise MetadataError(
            f"evaluate: unknown scheme(s) {unknown}; use {', '.join(DEFAULT_SCHEMES)}"
        )
    if repeats < 1:
        raise MetadataError(f"evaluate: repeats must be >= 1, got {repeats}")


def _kfold_and_audit(
    run: _Run,
    schemes: Sequence[str],
    folds: int,
    repeats: int,
    audit: bool,
    lung_masks: LungMasks | None,
) -> tuple[dict[str, SchemeResult], AuditResult | None, list[str]]:
    """The k-fold results (when asked for), the audit of its models, and what could
    not be computed."""
    if "kfold" not in schemes:
        lines = ["shortcut audit: it audits the k-fold models; kfold was not run"]
        return {}, None, lines if audit else []
    if audit and lung_masks is None:
        lung_masks = shipped_lung_masks()
    result, collector = _run_kfold(run, folds, repeats, lung_masks if audit else None)
    lines = _undefined_lines("kfold", result.labels)
    audit_result = None
    if audit:
        audit_result, audit_lines = _audit_kfold(run, collector)
        lines += audit_lines
    return {"kfold": result}, audit_result, lines


def _heldout_lines(scheme: str, result: SchemeResult) -> list[str]:
    lines = [f"{scheme}: {result.note}"] if result.note else []
    for group, group_results in result.heldout.items():
        lines += _undefined_lines(f"{scheme} {group}", group_results)
    return lines


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
    lung_masks: LungMasks | None = None,
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
        lung_masks: the audit's masks for images without a reference mask (default:
            :func:`~covidcxr.models.audit_masks.shipped_lung_masks`, the shipped lung
            segmenter, or none with the reason when it cannot be loaded).
        severity_splits: random 50/50 splits of the severity protocol.
        severity_selection: the scored images (default: frontal X-rays with scores).
        regressor: the severity regression (default:
            :func:`~covidcxr.models.eval_severity.ridge_regressor`).
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
    _check_request(schemes, repeats)
    resolved, samples = _findings_samples(store, task, selection)
    run = _Run(
        store, samples, _label_matrix(samples), [s.patient for s in samples.samples], fit,
        seed, n_resamples, cache_dir, batch_size,
        progress or (lambda line: log.info("%s", line)),
    )  # fmt: skip
    summary = samples.summary()
    run.say(f"{resolved.name}: {_describe(summary)}")
    results, audit_result, not_computable = _kfold_and_audit(
        run, schemes, folds, repeats, audit, lung_masks
    )
    for scheme in ("source", "region"):
        if scheme in schemes:
            results[scheme] = _evaluate_heldout(run, scheme, min_heldout_samples)
            not_computable += _heldout_lines(scheme, results[scheme])
    severity_result: SeverityResult | None = None
    if severity:
        severity_result = evaluate_severity(
            store, fit, samples, selection=severity_selection, splits=severity_splits,
            seed=seed, regressor=regressor, n_resamples=n_resamples, say=run.say,
            cache_dir=cache_dir, batch_size=batch_size,
        )  # fmt: skip
    recorded = {
        "folds": folds,
        "repeats": repeats,
        "seed": seed,
        "schemes": list(schemes),
        "severity_splits": severity_splits if severity else None,
        "min_heldout_samples": min_heldout_samples,
        "bootstrap_resamples": n_resamples,
        "calibration_bins": CALIBRATION_BINS,
    }
    return EvaluationReport(
        task=resolved.as_dict(),
        selection=samples.selection.as_dict(),
        samples=summary,
        settings={**recorded, **dict(settings or {})},
        schemes=results,
        severity=severity_result,
        audit=audit_result,
        not_computable=tuple(not_computable),
    )
