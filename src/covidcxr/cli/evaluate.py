"""``covidcxr evaluate``: cross-validated metrics with intervals, external folds,
severity against the literature, and the shortcut audit.

Prints one table per scheme (label, n, AUC [95% CI], sensitivity and specificity at
the stored operating point, Brier, ECE, and the prevalence baseline), the severity
table next to the predict-the-mean baseline and the published numbers, the audit's
verdict, and what could not be computed and why. ``--out FILE`` writes the whole
report as JSON; ``--update-card`` writes the metrics into the named model's bundle.

Exit codes: 0 done (even when the audit flags the model, unless ``--fail-on-flag``);
1 the audit flagged the model and ``--fail-on-flag`` was given; 2 an error (no samples,
a bad option, training not available).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from covidcxr.atomic import atomic_output
from covidcxr.cli.collection import add_store_options, store_from
from covidcxr.cli.output import positive_int, write_rows
from covidcxr.dataset.cache import CACHE_VERSION, stale_folders
from covidcxr.dataset.loading import (
    DEFAULT_CACHE_DIR,
    fill_cache,
    resolve_cache_dir,
)
from covidcxr.dataset.samples import Selection, build_samples
from covidcxr.dataset.tasks import TASKS, get_task
from covidcxr.errors import MetadataError, MissingExtraError
from covidcxr.models.eval_fit import FitFunction, training_fit
from covidcxr.models.eval_report import EvaluationReport, LabelResult
from covidcxr.models.eval_severity import LITERATURE_SOURCE, SEVERITY_SPLITS
from covidcxr.models.evaluate import DEFAULT_MIN_HELDOUT, DEFAULT_SCHEMES, evaluate
from covidcxr.models.metrics import DEFAULT_RESAMPLES, Estimate
from covidcxr.progress import step
from covidcxr.store.db import Store

DEFAULT_TASK: Final = "second-opinion"
DEVICES: Final = ("cpu", "cuda")

#: ``--quick``: a smoke test of the whole pipeline in minutes on a CPU, not a result.
QUICK: Final[Mapping[str, Any]] = {
    "size": 64,
    "epochs": 1,
    "folds": 2,
    "repeats": 1,
    "severity_splits": 5,
    "resamples": 200,
}

#: Builds the training function from the parsed options and the open store; returns
#: it and the settings to record in the report. Replaced in tests by a fake.
FitFactory = Callable[[argparse.Namespace, Store], tuple[FitFunction, dict[str, Any]]]


def make_fit(args: argparse.Namespace, store: Store) -> tuple[FitFunction, dict[str, Any]]:
    """The real training function (:func:`covidcxr.models.eval_fit.training_fit`).

    Raises:
        MissingExtraError: torch is not installed.
    """
    if args.device == "cuda":
        try:
            import torch
        except ImportError as exc:
            raise MissingExtraError("torch", "ml") from exc
        if not torch.cuda.is_available():
            raise MetadataError("evaluate: --device cuda, but torch sees no CUDA device")
    return training_fit(
        store,
        model=args.model,
        epochs=args.epochs,
        size=args.size,
        device=args.device,
        threads=args.threads,
        cache_dir=args.cache_dir if args.cache_dir else DEFAULT_CACHE_DIR,
        progress=_progress,
    )


def _progress(line: str) -> None:
    step(f"  .. {line}", "evaluate")


def _schemes(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in DEFAULT_SCHEMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown scheme(s) {unknown}; use a comma-separated list of "
            f"{', '.join(DEFAULT_SCHEMES)}"
        )
    return names


def register(subparsers: Any) -> None:
    """Add ``evaluate`` to the command line."""
    parser = subparsers.add_parser(
        "evaluate",
        help="cross-validated metrics with 95%% intervals, leave-one-source/region-out, "
        "severity vs the literature, shortcut audit",
        description="Train and evaluate the second-opinion model under patient-grouped, "
        "duplicate-aware, repeated k-fold cross-validation; hold out each source and "
        "region; run the severity protocol of Cohen et al. 2020 (50 random 50/50 "
        "splits); audit for shortcuts by masking the lungs. Prints AUC, sensitivity "
        "and specificity at the stored operating point, Brier score and calibration "
        "error with 95% patient-bootstrap intervals next to the baselines. Research "
        "use only.",
    )
    add_store_options(parser)
    parser.add_argument(
        "--model",
        metavar="ID",
        help="a model bundle: its training recipe is re-used for every fold, and "
        "--update-card writes the results into it",
    )
    parser.add_argument(
        "--task", default=DEFAULT_TASK, choices=tuple(TASKS), help=f"default {DEFAULT_TASK}"
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME",
        help="train and evaluate on this source (repeat for several; default: the "
        "training recipe's sources, covid-chestxray). Two sources make "
        "leave-one-source-out computable (and expose the source shortcut)",
    )
    parser.add_argument("--folds", type=positive_int, metavar="K", help="k-fold folds (5)")
    parser.add_argument("--repeats", type=positive_int, metavar="N", help="k-fold repeats (2)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--epochs", type=positive_int, metavar="N", help="training epochs")
    parser.add_argument("--size", type=positive_int, metavar="PX", help="input side")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="default cpu")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        metavar="N",
        help="CPU threads while training (default 1, as covidcxr train: reproducible)",
    )
    parser.add_argument(
        "--prepare-cache",
        action="store_true",
        help="only decode every image and lung mask the run will read (the selection, "
        "the store's input-gate images, the scored images) into the cache at --size, "
        "then exit: afterwards the evaluation needs the database and the cache folder, "
        "not the image blobs",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: "
        + ", ".join(f"{k} {v}" for k, v in QUICK.items())
        + " (explicit options win)",
    )
    parser.add_argument(
        "--schemes",
        type=_schemes,
        default=DEFAULT_SCHEMES,
        metavar="LIST",
        help="comma-separated: kfold,source,region (default all)",
    )
    parser.add_argument("--skip-severity", action="store_true", help="no severity protocol")
    parser.add_argument("--skip-audit", action="store_true", help="no shortcut audit")
    parser.add_argument(
        "--severity-splits",
        type=positive_int,
        metavar="N",
        help=f"random 50/50 splits (default {SEVERITY_SPLITS})",
    )
    parser.add_argument(
        "--resamples",
        type=positive_int,
        metavar="N",
        help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})",
    )
    parser.add_argument(
        "--min-heldout",
        type=positive_int,
        default=DEFAULT_MIN_HELDOUT,
        metavar="N",
        help=f"hold out a source/region only with >= N images (default {DEFAULT_MIN_HELDOUT})",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="preprocessed-pixel cache (default: cache/ in the data directory)",
    )
    parser.add_argument("--out", metavar="FILE", help="write the full report as JSON")
    parser.add_argument(
        "--update-card",
        action="store_true",
        help="write the metrics into the --model bundle's model.json and MODEL_CARD.md",
    )
    parser.add_argument(
        "--fail-on-flag",
        action="store_true",
        help="exit 1 when the shortcut audit flags the model",
    )
    parser.add_argument(
        "--lungs",
        action="store_true",
        help="instead of training the network: measure the lungs-first parts (the lung "
        "gate leave-one-source-out, the lung-zone pneumonia model within NIH and across "
        "sources, the source probe, lung Dice); about 5 minutes on 2 cores",
    )
    parser.set_defaults(handler=cmd_evaluate)


def evaluate_lungs(args: argparse.Namespace) -> int:
    """covidcxr evaluate --lungs: the measurements of ``train-gate`` and
    ``train-lung-model``, without writing a model."""
    from covidcxr.models import abnormality_train, lung_gate_train
    from covidcxr.models.card import lung_dice_line
    from covidcxr.models.lung_gate import LungGate

    shipped = LungGate.load()  # the shipped gate's own segmenter and threshold
    segmenter, threshold = shipped.segmenter, shipped.threshold
    with store_from(args) as store:
        _progress("measuring the gate's images with the lung segmenter")
        gate = lung_gate_train.evaluate_gate(
            lung_gate_train.measure(store, segmenter, args.seed), threshold, args.seed
        )
        _progress("measuring the lung zones of every labelled frontal X-ray")
        zones = abnormality_train.evaluate(
            abnormality_train.measure(store, segmenter), seed=args.seed, segmenter=segmenter
        )
    print(f"\n== input gate (pass at P(frontal) >= {threshold:g})\n")
    print("\n".join(lung_gate_train.evaluation_lines(gate)))
    print("\n== pneumonia at all? (lung-zone model)\n")
    print("\n".join(abnormality_train.summary_lines(zones)))
    print("\n" + lung_dice_line(str(segmenter.card.get("model_id"))))
    if args.out:
        data = {"format": "covidcxr-lung-evaluation/1", "gate": gate, "pneumonia_model": zones}
        try:
            with atomic_output(args.out) as tmp:
                tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            raise MetadataError(
                f"evaluate: cannot write {args.out}: {exc.strerror or exc}"
            ) from None
        print(f"\nwrote {args.out}")
    return 0


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from --quick or the defaults."""
    defaults = {
        "size": None,
        "epochs": None,
        "folds": 5,
        "repeats": 2,
        "severity_splits": SEVERITY_SPLITS,
        "resamples": DEFAULT_RESAMPLES,
    }
    resolved = argparse.Namespace(**vars(args))
    for key, default in defaults.items():
        if getattr(resolved, key, None) is None:
            setattr(resolved, key, QUICK[key] if args.quick else default)
    return resolved


def cmd_evaluate(args: argparse.Namespace, fit_factory: FitFactory | None = None) -> int:
    """covidcxr evaluate."""
    args = _resolve(args)
    if args.update_card and not args.model:
        raise MetadataError("evaluate: --update-card needs --model ID (the bundle to update)")
    if args.prepare_cache:
        return prepare_cache(args)
    if args.lungs:
        return evaluate_lungs(args)
    with store_from(args) as store:
        fit, fit_settings = (fit_factory or make_fit)(args, store)
        # Default: the sources the training recipe learns findings from.
        recipe_sources = fit_settings.get("train_config", {}).get("sources", ())
        selection = Selection(sources=tuple(args.source) or tuple(recipe_sources))
        report = evaluate(
            store,
            fit,
            task=args.task,
            selection=selection,
            folds=args.folds,
            repeats=args.repeats,
            seed=args.seed,
            schemes=args.schemes,
            severity=not args.skip_severity,
            audit=not args.skip_audit and "kfold" in args.schemes,
            severity_splits=args.severity_splits,
            min_heldout_samples=args.min_heldout,
            n_resamples=args.resamples,
            cache_dir=args.cache_dir if args.cache_dir else DEFAULT_CACHE_DIR,
            settings={**fit_settings, "quick": bool(args.quick), "device": args.device},
            progress=_progress,
        )
    print_report(report)
    if args.out:
        try:
            path = report.save(args.out)
        except OSError as exc:
            raise MetadataError(
                f"evaluate: cannot write {args.out}: {exc.strerror or exc}"
            ) from None
        print(f"\nwrote {path}")
    if args.update_card:
        update_card(args.model, report)
    if args.fail_on_flag and report.audit is not None and report.audit.flagged:
        return 1
    return 0


def prepare_cache(args: argparse.Namespace) -> int:
    """Fill the preprocessed-pixel cache with everything an evaluation reads."""
    from covidcxr.models.config import TrainConfig
    from covidcxr.models.sample_sets import gate_samples, severity_samples

    size = args.size or TrainConfig().size
    cache_dir = args.cache_dir if args.cache_dir else DEFAULT_CACHE_DIR
    with store_from(args) as store:
        sources = tuple(args.source) or tuple(TrainConfig().sources)
        sets = {
            "selection": build_samples(store, get_task(args.task), Selection(sources=sources)),
            "input-gate images": gate_samples(store),
            "severity-scored images": severity_samples(store),
        }
        root = resolve_cache_dir(cache_dir, sets["selection"].blob_root.parent)
        for name, samples in sets.items():
            decoded = fill_cache(samples, size=size, cache_dir=cache_dir, masks=True)
            print(f"{name}: {len(samples.samples)} images, {decoded} files decoded")
    print(
        f"cache ready in {root} (v{CACHE_VERSION}-{size}-center and "
        f"v{CACHE_VERSION}-{size}-center-mask): evaluate --size {size} now needs the "
        "database and this folder, not the blobs"
    )
    stale = stale_folders(root) if root is not None else []
    if stale:
        print(
            f"{len(stale)} folder(s) of an older cache version in {root} "
            f"({', '.join(folder.name for folder in stale)}): nothing reads them now; "
            "delete them to free the space"
        )
    return 0


# --- printing -------------------------------------------------------------------------


def _text(estimate: Estimate | None, digits: int = 2) -> str:
    return "" if estimate is None else estimate.text(digits)


def _label_rows(results: Sequence[LabelResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        rows.append(
            {
                "label": r.label,
                "n": r.n,
                "pos": r.positives,
                "AUC [95% CI]": _text(r.model.get("auc")),
                "sensitivity": _text(r.model.get("sensitivity")),
                "specificity": _text(r.model.get("specificity")),
                "Brier": _text(r.model.get("brier"), 3),
                "ECE": _text(r.model.get("ece"), 3),
                "baseline Brier": _text(r.baseline.get("brier"), 3),
                "baseline ECE": _text(r.baseline.get("ece"), 3),
            }
        )
    return rows


def _table(rows: list[dict[str, Any]]) -> None:
    if rows:
        write_rows(rows, list(rows[0]), "table", max_width=80)


def print_report(report: EvaluationReport) -> None:
    """Print the report's tables (the CLI's output)."""
    out = sys.stdout
    samples = report.samples
    out.write(
        f"task {report.task.get('name')}: {samples.get('samples')} images of "
        f"{samples.get('patients')} patients; sources: "
        + ", ".join(f"{k} {v}" for k, v in sorted(samples.get("sources", {}).items()))
        + "\nResearch use only, not a diagnosis. AUC: a constant predictor (the "
        "prevalence baseline) scores 0.50.\n"
    )
    for name, scheme in report.schemes.items():
        out.write(f"\n== {name}: {scheme.description}\n")
        if scheme.note:
            out.write(f"   note: {scheme.note}\n")
        for group, results in scheme.heldout.items():
            out.write(f"\n-- held out: {group}\n")
            _table(_label_rows(results))
        if scheme.labels:
            if scheme.heldout:
                out.write(
                    f"\n-- pooled over the held-out {name}s (one model per {name}, different "
                    "prevalences: read the tables above first)\n"
                )
            _table(_label_rows(scheme.labels))
        for group, reason in scheme.skipped.items():
            out.write(f"   not held out: {group}: {reason}\n")
    if report.severity is not None:
        severity = report.severity
        out.write(
            f"\n== severity: {severity.protocol}\n   {severity.n_images} images of "
            f"{severity.n_patients} patients ("
            + ", ".join(f"{k} {v}" for k, v in sorted(severity.views.items()))
            + f"); backbone trained on {severity.backbone.get('train_samples')} images\n"
        )
        rows = []
        for target in severity.targets:
            literature = target.literature
            rows.append(
                {
                    "score": target.target,
                    "MAE [95% CI]": _text(target.model.get("mae")),
                    "R^2": _text(target.model.get("r2")),
                    "r": _text(target.model.get("pearson_r")),
                    "mean-baseline MAE": _text(target.baseline.get("mae")),
                    "mean-baseline R^2": _text(target.baseline.get("r2")),
                    "literature MAE": literature.get("mae"),
                    "literature r": literature.get("pearson_r"),
                    "literature baseline MAE": literature.get("baseline_mae"),
                }
            )
        _table(rows)
        for target in severity.targets:
            out.write(f"   {target.verdict}\n")
        if severity.reason:
            out.write(f"   why: {severity.reason}\n")
        out.write(f"   literature: {LITERATURE_SOURCE}\n")
    if report.audit is not None:
        audit = report.audit
        out.write(
            f"\n== shortcut audit ({audit.n_images} images with lung masks; "
            f"{audit.n_without_mask} without a mask not audited)\n"
        )
        _table(
            [
                {
                    "label": a.label,
                    "AUC full": _text(a.auc["full"]),
                    "AUC no lungs": _text(a.auc["no_lungs"]),
                    "AUC lungs only": _text(a.auc["lungs_only"]),
                    "flagged": a.flagged,
                }
                for a in audit.labels
            ]
        )
        out.write(f"   verdict: {audit.verdict}\n")
    if report.not_computable:
        out.write("\n== not computable\n")
        for line in report.not_computable:
            out.write(f"   {line}\n")


# --- the model card -------------------------------------------------------------------


def update_card(model: str, report: EvaluationReport) -> None:
    """Write the report's card metrics into a bundle (model.json and MODEL_CARD.md).

    Raises:
        MetadataError: no such model, or no card renderer (models/card.py).
    """
    from covidcxr.models.bundle import CARD_FILE, CONFIG_FILE, load_bundle, write_bundle

    bundle = load_bundle(model)
    try:
        card_module = importlib.import_module("covidcxr.models.card")
    except ImportError:
        raise MetadataError(
            "evaluate: --update-card needs the card renderer covidcxr.models.card, "
            "which is not installed; the report is printed (and written with --out)"
        ) from None
    render = getattr(card_module, "render_card", None)
    if render is None:
        raise MetadataError("evaluate: covidcxr.models.card has no render_card(bundle)")
    updated = dataclasses.replace(
        bundle, metrics={**bundle.metrics, "evaluation": report.to_card_metrics()}
    )
    written = write_bundle(updated, render)
    print(f"updated {written.path / CONFIG_FILE} and its {CARD_FILE}")
