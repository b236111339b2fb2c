"""Dataset commands: ``covidcxr split`` (make a split file, or ``--verify`` one)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from covidcxr.cli.collection import add_store_options, store_from
from covidcxr.cli.output import write_rows
from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.split_file import SCHEMES
from covidcxr.dataset.splits import (
    DEFAULT_FRACTIONS,
    Split,
    load_split,
    make_split,
    verify_split,
)
from covidcxr.dataset.tasks import TASKS, get_task
from covidcxr.errors import MetadataError

DEFAULT_TASK = "covid-vs-other-pneumonia"
DEFAULT_FOLDS = 5


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give three numbers for train, val and test, e.g. 0.7,0.15,0.15"
        ) from None


def _print_summary(sample_set: SampleSet, split: Split) -> None:
    out = sys.stdout
    summary = sample_set.summary()
    out.write(
        f"task {summary['task']}; {summary['samples']} samples of {summary['patients']} "
        f"patients; sources: "
        + ", ".join(f"{name} {n}" for name, n in sorted(summary["sources"].items()))
        + "\n"
    )
    for name, counts in summary["labels"].items():
        detail = ", ".join(f"{key} {value}" for key, value in counts.items())
        out.write(f"  {name}: {detail}\n")
    if summary["excluded"]:
        out.write("records excluded, by reason:\n")
        for reason, count in summary["excluded"].items():
            out.write(f"  {count:6d}  {reason}\n")
    if split.excluded:
        out.write("patients left out of the split, by reason:\n")
        for reason, count in split.excluded_counts.items():
            out.write(f"  {count:6d}  {reason}\n")
    out.write(
        f"{split.scheme} split, seed {split.seed}: {len(split.assignment)} patients "
        f"in {len(split.folds)} folds\n"
    )
    rows = split.fold_table(sample_set)
    write_rows(rows, list(rows[0]), "table", max_width=60)


def cmd_split(args: argparse.Namespace) -> int:
    """covidcxr split: make a patient-level split file, or verify one (exit 1 if broken)."""
    if args.verify is not None:
        if args.out is not None:
            raise MetadataError("split: give --out FILE to make a split or --verify FILE, not both")
        split = load_split(args.verify)
        with store_from(args) as store:
            problems = verify_split(store, split)
        if problems:
            print(f"split NOT verified: {args.verify}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  {problem}")
            return 1
        print(
            f"split verified: {args.verify}: {len(split.assignment)} patients in "
            f"{len(split.folds)} {split.scheme} folds ({', '.join(split.folds)}), task "
            f"{split.task.get('name')}, seed {split.seed}; no patient and no duplicate "
            f"picture on two sides; membership sha256 {split.membership_sha256[:16]}…"
        )
        return 0
    if args.out is None:
        raise MetadataError("split: give --out FILE to make a split, or --verify FILE")
    if args.folds is not None and args.scheme != "kfold":
        raise MetadataError(f"split: --folds applies to --scheme kfold, not {args.scheme}")
    if args.fractions is not None and args.scheme != "holdout":
        raise MetadataError(f"split: --fractions applies to --scheme holdout, not {args.scheme}")
    selection = Selection(
        views=tuple(args.view) or ("frontal",),
        modalities=tuple(args.modality) or ("X-ray",),
        findings=tuple(args.finding),
        sources=tuple(args.source),
        has_severity=args.has_severity,
    )
    task = get_task(args.task)
    with store_from(args) as store:
        sample_set = build_samples(store, task, selection)
        with store.read() as conn:
            split = make_split(
                sample_set,
                conn,
                scheme=args.scheme,
                folds=args.folds if args.folds is not None else DEFAULT_FOLDS,
                seed=args.seed,
                fractions=args.fractions if args.fractions is not None else DEFAULT_FRACTIONS,
            )
    _print_summary(sample_set, split)
    try:
        path = split.save(args.out)
    except OSError as exc:
        raise MetadataError(f"split: cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {path} (membership sha256 {split.membership_sha256[:16]}…)")
    return 0


def register(subparsers: Any) -> None:
    """Add the dataset commands."""
    parser = subparsers.add_parser(
        "split",
        help="patient-level train/val/test, k-fold or leave-one-source/region-out split",
        description="Assign every patient of a task's samples to one fold and write the "
        "split file (patient,fold rows after '#' lines with the seed, task, selection and "
        "a hash of the membership). Patients whose images are duplicates of each other "
        "stay in one fold. With --verify FILE, check a split file against the store: "
        "exit 0 if it still holds, 1 with the problems if not.",
    )
    parser.add_argument("--out", metavar="FILE", help="where to write the split file")
    parser.add_argument(
        "--verify", metavar="FILE", help="check this split file against the store instead"
    )
    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        choices=tuple(TASKS),
        help=f"the task whose samples are split (default {DEFAULT_TASK})",
    )
    parser.add_argument(
        "--scheme",
        choices=SCHEMES,
        default="kfold",
        help="kfold (stratified), holdout (train/val/test, stratified), source "
        "(leave-one-source-out) or region (leave-one-country-out, from location)",
    )
    parser.add_argument(
        "--folds", type=int, metavar="N", help=f"folds for kfold (default {DEFAULT_FOLDS})"
    )
    parser.add_argument(
        "--fractions",
        type=_fractions,
        metavar="TRAIN,VAL,TEST",
        help="shares for holdout (default " + ",".join(map(str, DEFAULT_FRACTIONS)) + ")",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the tie-breaking order (default 0)"
    )
    group = parser.add_argument_group("selection (repeat an option to allow several values)")
    group.add_argument(
        "--view",
        action="append",
        default=[],
        help="frontal (default: PA, AP, AP Supine, AP Erect), a view name, or any",
    )
    group.add_argument("--modality", action="append", default=[], help="X-ray (default), CT or any")
    group.add_argument(
        "--finding", action="append", default=[], metavar="NODE", help="keep these findings"
    )
    group.add_argument("--source", action="append", default=[], metavar="NAME")
    group.add_argument(
        "--has-severity", action="store_true", help="only images with severity scores"
    )
    add_store_options(parser)
    parser.set_defaults(handler=cmd_split)
