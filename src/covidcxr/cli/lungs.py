"""``covidcxr train-lungs``: train the lung U-Net on the store's lung masks.

torch is imported when the command runs, so the rest of the command line works
without it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr import __version__
from covidcxr.cli.collection import add_store_options, store_from
from covidcxr.cli.output import positive_int
from covidcxr.serialise import to_dict


def register(subparsers: Any) -> None:
    """Add ``train-lungs`` to the command line."""
    parser = subparsers.add_parser(
        "train-lungs",
        help="train the lung segmentation U-Net on the store's lung masks",
        description="Train the lung U-Net on the frontal X-rays with lung masks (patient "
        "split, duplicates kept together), report Dice on the held-out patients and "
        "write weights.pt, model.json and the split into --out.",
    )
    add_store_options(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the weights")
    parser.add_argument("--size", type=positive_int, default=128, help="input side in px")
    parser.add_argument("--base-channels", type=positive_int, default=8)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs (at most)")
    parser.add_argument(
        "--minutes", type=float, default=25.0, help="stop after the epoch that passes this"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--arrays",
        metavar="NPZ",
        help="reuse (or write) the letterboxed images and masks here, e.g. /tmp/lungs.npz",
    )
    parser.set_defaults(handler=cmd_train_lungs)
    _register_gate(subparsers)
    _register_lung_model(subparsers)


def _register_gate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train-gate",
        help="train the lung input gate and measure it on sources it never saw",
        description="Measure every stored image with a known view and modality (and "
        "inverted copies and drawn non-medical pictures) with the lung segmenter, report "
        "leave-one-source-out refusals, patient-grouped recall of lateral, CT and "
        "inverted images and leave-one-kind-out recall of non-medical pictures, then fit "
        "on everything and write model.json, trees.json and MODEL_CARD.md into --out.",
    )
    add_store_options(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the gate")
    parser.add_argument(
        "--threshold",
        type=float,
        help="pass when P(frontal chest X-ray) reaches this (default: the lowest at which "
        "lateral, CT and inverted images each reach 95%% recall in patient-grouped CV)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=cmd_train_gate)


def cmd_train_gate(args: argparse.Namespace) -> int:
    """covidcxr train-gate: measure, evaluate, fit, save."""
    from covidcxr.models import lung_gate_train, lungs

    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        print(
            f"covidcxr train-gate: error: --threshold {args.threshold} must lie strictly "
            "between 0 and 1",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    given = [] if args.threshold is None else ["--threshold", str(args.threshold)]
    options = ["--out", str(out), *given, "--seed", str(args.seed)]
    command = "covidcxr " + shlex.join(["train-gate", *options])
    with store_from(args) as store:
        card = lung_gate_train.train_gate(
            store,
            lungs.LungSegmenter.load(),
            out,
            threshold=args.threshold,
            seed=args.seed,
            gate_id=out.name,
            command=command,
        )
    print(lung_gate_train.render_card(card))
    print(f"wrote {out}")
    return 0


def cmd_train_lungs(args: argparse.Namespace) -> int:
    """covidcxr train-lungs: train, measure Dice on held-out patients, save."""
    from covidcxr.models import lungs

    settings = lungs.TrainSettings(
        base_channels=args.base_channels,
        batch_size=args.batch_size,
        minutes=args.minutes,
        max_epochs=args.epochs,
        seed=args.seed,
        threads=args.threads,
    )
    with store_from(args) as store:
        sample_set, split = lungs.masked_samples(store)
        cached = Path(args.arrays) if args.arrays else None
        if cached is not None and cached.is_file():
            data = lungs.LungData.load(cached)
        else:
            data = lungs.prepare_lung_data(store, args.size)
            if cached is not None:
                data.save(cached)
    if data.split_sha256 != split.membership_sha256 or data.images.shape[1] != args.size:
        print(
            f"covidcxr train-lungs: error: {args.arrays} is from another store, split or "
            "size; delete it",
            file=sys.stderr,
        )
        return 2
    model, result = lungs.train_lungs(data, settings)
    test = [s for s in sample_set.samples if split.fold_of(s.patient) == "test"]
    segmenter = lungs.LungSegmenter(model, args.size)
    full = lungs.full_size_dice(segmenter, sample_set, test)
    test_images, test_targets = data.subset("test")
    small = lungs.mean_dice(lungs.predict_probability(model, test_images), test_targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split.save(out / "split.csv")
    card = {
        "model_id": out.name,
        "covidcxr_version": __version__,
        "input_size": args.size,
        "base_channels": settings.base_channels,
        "levels": settings.levels,
        "parameters": sum(int(p.numel()) for p in model.parameters()),
        "settings": to_dict(settings),
        "training": to_dict(result),
        "split_membership_sha256": split.membership_sha256,
        "images": {fold: int((data.folds == fold).sum()) for fold in split.folds},
        "patients": {fold: len(split.patients_in(fold)) for fold in split.folds},
        "test_dice_full_size": _stats(full),
        "test_dice_input_size": round(small, 4),
        "command": _command(args),
    }
    lungs.save_weights(model, out, card)
    summary = card["test_dice_full_size"]
    print(
        f"wrote {out}: {result.epochs} epochs in {result.seconds:.0f} s "
        f"(best {result.best_epoch}); "
        f"held-out patients {card['patients']['test']} ({card['images']['test']} images): "
        f"Dice mean {summary['mean']:.4f}, median {summary['median']:.4f}, "
        f"min {summary['min']:.4f}"
    )
    return 0


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "n": len(values),
        "mean": round(float(array.mean()), 4),
        "median": round(float(np.median(array)), 4),
        "p10": round(float(np.percentile(array, 10)), 4),
        "min": round(float(array.min()), 4),
    }


def _command(args: argparse.Namespace) -> str:
    """The command that makes the same weights (the store and --arrays aside)."""
    options = ["train-lungs", "--out", str(args.out), "--size", str(args.size)]
    options += ["--base-channels", str(args.base_channels), "--batch-size", str(args.batch_size)]
    options += ["--epochs", str(args.epochs)]
    options += ["--minutes", str(args.minutes), "--seed", str(args.seed)]
    options += ["--threads", str(args.threads)]
    return "covidcxr " + shlex.join(options)


def _register_lung_model(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train-lung-model",
        help="build a second-opinion model that looks at the lungs first",
        description="Fit the lung-zone pneumonia model on the NIH subset (normal and "
        "pneumonia from one hospital), measure it (within-source CV, transfer to the "
        "other source, source probe), and write a bundle that uses it with the lung gate "
        "and the base bundle's network (copied unchanged) into --out.",
    )
    add_store_options(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="the new bundle's folder")
    parser.add_argument("--base", default="covidcxr-small-v1", help="the network's bundle")
    parser.add_argument("--gate", default="gate-lungs-v1", help="the lung gate's id")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=cmd_train_lung_model)


def cmd_train_lung_model(args: argparse.Namespace) -> int:
    """covidcxr train-lung-model: measure, fit, evaluate, write the bundle."""
    from covidcxr.models import lung_gate, lung_model
    from covidcxr.models.bundle import load_bundle

    out = Path(args.out)
    options = ["--out", str(out), "--base", args.base, "--gate", args.gate]
    command = "covidcxr " + shlex.join(["train-lung-model", *options, "--seed", str(args.seed)])
    base = load_bundle(args.base)
    gate_card = lung_gate.WEIGHTS_DIR.parent / args.gate / "model.json"
    if "/" in args.gate or not gate_card.is_file():
        print(f"covidcxr train-lung-model: error: no lung gate {args.gate!r}", file=sys.stderr)
        return 2
    with store_from(args) as store:
        bundle = lung_model.build(
            store, base, out, gate_id=args.gate, model_id=out.name, command=command, seed=args.seed
        )
    print(f"wrote {bundle.path} ({bundle.model_id})")
    return 0
