"""``covidcxr train-lungs``: train the lung U-Net on the store's lung masks.

torch is imported when the command runs, so the rest of the command line works
without it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

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
    _register_evaluate(subparsers)
    _register_gate(subparsers)
    _register_lung_model(subparsers)


def _register_evaluate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate-lungs",
        help="score a lung segmenter on the held-out patients of its own split",
        description="Dice of a lung segmenter (default: the shipped one) at each image's "
        "full size, on the patients its split.csv holds out, over all reference masks and "
        "per annotator (V7 Labs' masks are drawn by people, lungVAE's by a model), and "
        "the two annotators' agreement with each other. Patients ingested after the "
        "split was made are left out and counted.",
    )
    add_store_options(parser)
    parser.add_argument(
        "--weights", metavar="DIR", help="a folder train-lungs wrote (default: the shipped one)"
    )
    parser.add_argument("--fold", default="test", help="the split's fold to score (test)")
    parser.add_argument(
        "--all-frontal",
        action="store_true",
        help="also segment every labelled frontal X-ray of every source (no mask needed) "
        "and count, per source, the masks that are not two lungs, one on each side",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=cmd_evaluate_lungs)


def cmd_evaluate_lungs(args: argparse.Namespace) -> int:
    """covidcxr evaluate-lungs: Dice on the weights' own held-out patients."""
    from covidcxr.dataset.split_file import load_split
    from covidcxr.models import lung_dice, lungs, lungs_training

    segmenter = lungs.LungSegmenter.load(args.weights, backend="onnx")
    folder = Path(args.weights) if args.weights else lungs.WEIGHTS_DIR
    split = load_split(folder / "split.csv")
    with store_from(args) as store:
        sample_set = lungs_training.masked_sample_set(store)
        chosen, unknown = lung_dice.held_out(sample_set, split, args.fold)
        if not chosen:
            print(
                f"covidcxr evaluate-lungs: error: no image of the store's masked frontal "
                f"X-rays belongs to a {args.fold!r} patient of {folder / 'split.csv'}; "
                "ingest the source it was trained on",
                file=sys.stderr,
            )
            return 2
        agreement = lung_dice.reference_agreement(store, sample_set)
        frontal = lungs_training.frontal_sample_set(store) if args.all_frontal else None
    scores = lung_dice.dice_by_reference(segmenter, sample_set, chosen)
    plausibility = None if frontal is None else lung_dice.not_two_lungs(segmenter, frontal)
    model_id = str(segmenter.card.get("model_id", folder.name))
    report = {
        "model_id": model_id,
        "fold": args.fold,
        "left_out_unknown_patients": unknown,
        **scores,
        "reference_agreement": agreement,
        **({"not_two_lungs": plausibility} if plausibility is not None else {}),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(render_dice(model_id, args.fold, scores, agreement, unknown))
    for source, row in (plausibility or {}).items():
        print(
            f"{source}: {row['not_two_lungs']} of {row['images']} frontal X-rays "
            f"({row['share']:.1%}) segmented as something other than two lungs, one on "
            f"each side, each >= {lungs.MIN_LUNG_SHARE:.0%} of the image"
            + (f"; first: {', '.join(row['examples'])}" if row["examples"] else "")
        )
    return 0


def render_dice(
    model_id: str,
    fold: str,
    scores: dict[str, Any],
    agreement: dict[str, dict[str, float]],
    unknown: int = 0,
) -> str:
    """The Dice table of ``evaluate-lungs`` and ``train-lungs``."""
    from covidcxr.models.lung_dice import GOAL, MADE_BY

    rows = [("all references", scores["all"])]
    rows += [
        (f"{name} ({MADE_BY.get(name, 'unknown maker')})", values)
        for name, values in scores["by_reference"].items()
    ]
    lines = [
        f"{model_id}: Dice at each image's full size, {fold} patients of its split",
        f"{'reference masks':<44} {'images':>6} {'mean':>6} {'median':>6} {'p10':>6} "
        f"{'min':>6} {'>=' + str(GOAL):>7}  mean's 95% interval (patients resampled)",
    ]
    for name, v in rows:
        low, high = v.get("mean_ci95", ("nan", "nan"))
        lines.append(
            f"{name:<44} {v['n']:>6} {v['mean']:>6.3f} {v['median']:>6.3f} {v['p10']:>6.3f} "
            f"{v['min']:>6.3f} {v['share_at_goal']:>7.0%}  [{low}, {high}]"
        )
    for pair, v in agreement.items():
        lines.append(
            f"the annotators against each other, {pair} ({v['n']} images with both): "
            f"Dice mean {v['mean']:.3f}, median {v['median']:.3f}"
        )
    if unknown:
        lines.append(f"left out: {unknown} image(s) of patients the split does not know")
    return "\n".join(lines)


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
    parser.add_argument(
        "--segmenter",
        metavar="ID",
        help="the shipped lung segmenter to measure with (default: the default one, "
        "lungs.MODEL_ID); gate-lungs-v1 was made with lungs-unet-v1",
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
    given += [] if args.segmenter is None else ["--segmenter", args.segmenter]
    options = ["--out", str(out), *given, "--seed", str(args.seed)]
    folder = None if args.segmenter is None else lungs.WEIGHTS_ROOT / args.segmenter
    if folder is not None and ("/" in args.segmenter or not (folder / "model.json").is_file()):
        print(
            f"covidcxr train-gate: error: no shipped lung segmenter {args.segmenter!r}",
            file=sys.stderr,
        )
        return 2
    command = "covidcxr " + shlex.join(["train-gate", *options])
    with store_from(args) as store:
        card = lung_gate_train.train_gate(
            store,
            lungs.LungSegmenter.load(folder),
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
    from covidcxr.models import lung_dice, lungs, lungs_training

    settings = lungs_training.TrainSettings(
        base_channels=args.base_channels,
        batch_size=args.batch_size,
        minutes=args.minutes,
        max_epochs=args.epochs,
        seed=args.seed,
        threads=args.threads,
    )
    with store_from(args) as store:
        sample_set, split = lungs_training.masked_samples(store)
        agreement = lung_dice.reference_agreement(store, sample_set)
        cached = Path(args.arrays) if args.arrays else None
        if cached is not None and cached.is_file():
            data = lungs_training.LungData.load(cached)
        else:
            data = lungs_training.prepare_lung_data(store, args.size)
            if cached is not None:
                data.save(cached)
    if data.split_sha256 != split.membership_sha256 or data.images.shape[1] != args.size:
        print(
            f"covidcxr train-lungs: error: {args.arrays} is from another store, split or "
            "size; delete it",
            file=sys.stderr,
        )
        return 2
    model, result = lungs_training.train_lungs(data, settings)
    test, _ = lung_dice.held_out(sample_set, split, "test")
    scores = lung_dice.dice_by_reference(lungs.LungSegmenter(model, args.size), sample_set, test)
    test_images, test_targets = data.subset("test")
    small = lungs_training.mean_dice(lungs.predict_probability(model, test_images), test_targets)
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
        "test_dice_full_size": scores["all"],
        "test_dice_full_size_by_reference": scores["by_reference"],
        "reference_agreement": agreement,
        "test_dice_input_size": round(small, 4),
        "command": _command(args),
    }
    lungs_training.save_weights(model, out, card)
    print(
        f"wrote {out}: {result.epochs} epochs in {result.seconds:.0f} s (best {result.best_epoch})"
    )
    print(render_dice(card["model_id"], "test", scores, agreement))
    return 0


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
