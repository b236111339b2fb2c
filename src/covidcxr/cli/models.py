"""Model commands: ``covidcxr train`` (train the second-opinion model, write a bundle).

torch is imported when the command runs, so the rest of the command line works
without it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from covidcxr import config as covidcxr_config
from covidcxr.cli.collection import add_store_options, store_from
from covidcxr.errors import MetadataError, MissingExtraError
from covidcxr.progress import counter, note

DEFAULT_SOURCE = "covid-chestxray"


def _default_model_id(args: argparse.Namespace) -> str:
    kind = str(args.backbone).partition(":")[0]
    return f"covidcxr-{kind}-{args.size}px-seed{args.seed}"


def _auroc_cell(report: dict[str, Any], name: str) -> str:
    value = report.get("auroc", {}).get(name)
    low, high = report.get("auroc_95ci_patient_bootstrap", {}).get(name, [None, None])
    if value is None:
        return "n/a".ljust(26)
    interval = f"({low:.2f}-{high:.2f})" if low is not None and high is not None else ""
    return f"{value:.3f} {interval}".ljust(26)


def _print_report(model: Any, bundle: Any, command: str) -> None:
    out = sys.stdout
    training = bundle.training
    validation = training.get("validation", {})
    test = training.get("holdout_test", {})
    out.write(f"wrote model {bundle.model_id} to {bundle.path}\n")
    out.write(
        f"  epochs run {training.get('epochs_run')} (best {training.get('best_epoch')}), "
        f"{training.get('seconds_per_epoch')} s per epoch, data version "
        f"{training.get('data', {}).get('membership_sha256', '')[:16]}…, split membership "
        f"{training.get('split', {}).get('membership_sha256', '')[:16]}…\n"
    )
    out.write("  label                    val AUROC (95% CI)        test AUROC (95% CI)\n")
    for name in bundle.findings:
        out.write(f"  {name:<24} {_auroc_cell(validation, name)}{_auroc_cell(test, name)}\n")
    gate = validation.get("gate", {})
    if gate:
        out.write(f"  input gate validation accuracy {gate.get('accuracy')}\n")
    severity = training.get("severity", {})
    protocol = severity.get("protocol")
    if isinstance(protocol, dict):
        pairs = ", ".join(
            f"{label} MAE {mae:.2f} (baseline {base:.2f})"
            for label, mae, base in zip(
                protocol["labels"], protocol["mae"], protocol["baseline_mae"], strict=True
            )
        )
        out.write(f"  severity, {severity.get('images')} scored images, 50/50 splits: {pairs}\n")
    if bundle.severity_interval.get("half_width") is not None:
        out.write(
            f"  severity interval: +-{bundle.severity_interval['half_width']} at level "
            f"{bundle.severity_interval['level']}\n"
        )
    out.write(f"reproduce with: {command}\n")
    out.write("research use only, not a diagnosis\n")


def cmd_train(args: argparse.Namespace) -> int:
    """covidcxr train: train the second-opinion model on the store and write its bundle."""
    try:
        from covidcxr.dataset.splits import load_split
        from covidcxr.models.config import TrainConfig
        from covidcxr.models.train import canonical_command, train_model
    except MissingExtraError:
        raise
    except ImportError as exc:  # torch missing
        raise MissingExtraError("torch", "ml") from exc
    model_id = args.model_id or _default_model_id(args)
    if not model_id or "/" in model_id or model_id.startswith("."):
        raise MetadataError(f"train: model id {model_id!r} must be a plain folder name")
    out = (
        Path(args.out).expanduser()
        if args.out
        else covidcxr_config.data_dir(args.data_dir) / "models" / model_id
    )
    if out.exists():
        raise MetadataError(
            f"train: {out} already exists; remove it or pick another --model-id / --out"
        )
    settings = TrainConfig(
        size=args.size,
        epochs=args.epochs,
        width=args.width,
        backbone=args.backbone,
        seed=args.seed,
        sources=tuple(args.source) or (DEFAULT_SOURCE,),
        device=args.device,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    split = load_split(args.split) if args.split else None
    command = canonical_command(settings, model_id=model_id, split_file=args.split)
    if args.batch_size != TrainConfig.batch_size:
        command += f" --batch-size {args.batch_size}"
    if args.threads != TrainConfig.threads:
        command += f" --threads {args.threads}"
    exact = command
    for flag, value in (("--db", args.db), ("--data-dir", args.data_dir), ("--out", args.out)):
        if value:
            exact += f" {flag} {shlex.quote(str(value))}"

    with store_from(args) as store, counter("train", total=args.epochs) as advance:

        def progress(record: dict[str, Any]) -> None:
            note(
                f"epoch {record['epoch']}: train loss {record['train_loss']}, val loss "
                f"{record['val_loss']}, val AUROC {record['val_findings_auroc']}, gate "
                f"accuracy {record['val_gate_accuracy']} ({record['seconds']} s)"
            )
            advance(1)

        model = train_model(store, settings, split=split, progress=progress)
    bundle = model.save(out, model_id, {"command": command})
    _print_report(model, bundle, exact)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``train`` command."""
    parser = subparsers.add_parser(
        "train",
        help="train the second-opinion model (findings, severity, input gate) and write a "
        "model bundle",
        description="Train one network on the store: finding probabilities (COVID-19, "
        "other viral, bacterial, fungal pneumonia, no finding) from frontal X-rays of "
        "the training sources, an input gate (frontal/lateral/CT/inverted/not medical) "
        "from every source, and severity (ridge on the network's features, fitted on "
        "the expert-scored images, which are held out of the network's training). "
        "Patient-grouped holdout split (train/val/test; duplicates kept together), early "
        "stopping, temperature calibration and Youden operating points on the validation "
        "fold, AUROC with intervals on the untouched test fold. Writes weights.pt, "
        "model.onnx, model.json, MODEL_CARD.md and split.csv, and prints the command that "
        "reproduces them. Research use only, not a diagnosis.",
    )
    parser.add_argument(
        "--size", type=int, default=224, metavar="N", help="input side (px) (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs", type=int, default=30, metavar="N", help="maximum epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--width",
        type=int,
        default=24,
        metavar="N",
        help="width of the small backbone (default: %(default)s)",
    )
    parser.add_argument(
        "--backbone",
        default="small",
        metavar="SPEC",
        help="small (built in), torchscript:PATH or xrv-densenet121:PATH (your weights on "
        "disk; nothing is downloaded; default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="the one seed (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="images per step (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads while training (default 1: reproducible, and fastest on a busy "
        "or small machine)",
    )
    parser.add_argument(
        "--split",
        metavar="FILE",
        help="a holdout split file (covidcxr split --task second-opinion --scheme holdout); "
        "default: made from the seed",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME",
        help=f"source whose frontal X-rays train the findings head (repeatable; default "
        f"{DEFAULT_SOURCE}: mixing sources teaches the source, not the disease)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)", metavar="DEVICE")
    parser.add_argument("--model-id", metavar="ID", help="the model's id (default from options)")
    parser.add_argument(
        "--out", metavar="DIR", help="bundle folder (default <data dir>/models/<model id>)"
    )
    add_store_options(parser)
    parser.set_defaults(handler=cmd_train)
