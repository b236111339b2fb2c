"""``covidcxr validate-model`` and ``covidcxr datasheet``: HTML + JSON reports."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from covidcxr.atomic import atomic_output
from covidcxr.errors import MetadataError
from covidcxr.models.engines import ENGINES


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def register(subparsers: Any) -> None:
    """Add ``validate-model`` and ``datasheet`` to the command line."""
    from covidcxr.cli.collection import add_store_options

    parser = subparsers.add_parser(
        "validate-model",
        help="how a model does on your own labelled images: HTML + JSON report",
        description="Validate our model (--model) or any model's predictions "
        "(--predictions) on a local labelled folder: discrimination with intervals, "
        "operating points, calibration (and a recalibration file for predict), severity "
        "agreement, subgroups, shortcut checks, the most confident errors, and what the "
        "evidence supports. The data never leaves this machine.",
    )
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of the images")
    parser.add_argument(
        "--labels",
        required=True,
        metavar="CSV",
        help="file name and reference label per image (positive/negative or a finding of "
        "the hierarchy); optional patient id, age, sex, view, site, date, severity",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="ID|PATH", help="our model (default: the shipped one)")
    which.add_argument(
        "--predictions",
        metavar="CSV",
        help="another model's predictions: a file column and p_<label> (or probability) columns",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where the report goes")
    parser.add_argument(
        "--mapping", metavar="TOML", help="mapping file for the labels' columns and values"
    )
    parser.add_argument(
        "--column",
        type=_pair,
        action="append",
        default=[],
        metavar="OURS=HEADER",
        help="the labels file's header for one of our columns, e.g. filename=imagename",
    )
    parser.add_argument(
        "--threshold",
        type=_pair,
        action="append",
        default=[],
        metavar="LABEL=P",
        help="with --predictions: the model's operating point for a label (default 0.5)",
    )
    parser.add_argument("--model-card", metavar="FILE", help="with --predictions: its model card")
    parser.add_argument("--masks", metavar="DIR", help="lung masks for the image shortcut audit")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="our model's engine")
    parser.add_argument(
        "--resamples", type=int, default=1000, metavar="N", help="bootstrap resamples (1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    parser.set_defaults(handler=cmd_validate_model)

    sheet = subparsers.add_parser(
        "datasheet",
        help="a datasheet (Gebru et al.) of what is in the store: HTML + JSON",
        description="A datasheet for the records in the store, every number computed "
        "from the store now: motivation, composition (with plots), collection, "
        "preprocessing, uses, distribution, maintenance; duplicates, pediatric cases and "
        "curation warnings.",
    )
    add_store_options(sheet)
    sheet.add_argument("--out", required=True, metavar="DIR", help="where the datasheet goes")
    sheet.set_defaults(handler=cmd_datasheet)


def _write(folder: Path, name: str, text: str) -> Path:
    target = folder / name
    with atomic_output(target) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
    return target


def _progress(message: str) -> None:
    print(f"validate-model: {message}", file=sys.stderr, flush=True)


def cmd_validate_model(args: argparse.Namespace) -> int:
    """covidcxr validate-model: write report.html, report.json (and recalibration.json)."""
    from covidcxr.ingest.mapping import SourceMapping, load_mapping
    from covidcxr.report.html import render_validation
    from covidcxr.report.validation import ValidationRequest, recalibration, validate

    if (args.threshold or args.model_card) and not args.predictions:
        raise MetadataError(
            "validate-model: --threshold and --model-card go with --predictions; our "
            "model's operating points and card come from its bundle"
        )
    if args.resamples < 100:
        raise MetadataError(f"validate-model: --resamples {args.resamples}: use at least 100")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    request = ValidationRequest(
        images=Path(args.images),
        labels=Path(args.labels),
        out_dir=out,
        model=args.model,
        predictions=Path(args.predictions) if args.predictions else None,
        thresholds={label: float(value) for label, value in args.threshold},
        model_card=Path(args.model_card) if args.model_card else None,
        engine=args.engine,
        masks=Path(args.masks) if args.masks else None,
        mapping=load_mapping(args.mapping) if args.mapping else SourceMapping(),
        columns=dict(args.column),
        n_resamples=args.resamples,
        seed=args.seed,
    )
    report = validate(request, progress=_progress)
    recalibration_file = None
    fits = recalibration(report)
    if fits["labels"] and not args.predictions:
        recalibration_file = str(_write(out, "recalibration.json", json.dumps(fits, indent=2)))
    _write(out, "report.json", json.dumps(report, indent=2, allow_nan=False))
    html = _write(out, "report.html", render_validation(report, recalibration_file))
    primary = report["labels"].get(report["primary_label"] or "")
    summary = (
        f"{report['primary_label']} AUC {primary['discrimination']['auc']['value']:.2f}"
        if primary
        else "no label had both classes: no discrimination measured"
    )
    print(f"{summary}; report: {html} (and report.json)")
    return 0


def cmd_datasheet(args: argparse.Namespace) -> int:
    """covidcxr datasheet: write datasheet.html and datasheet.json from the store."""
    from covidcxr.cli.collection import store_from
    from covidcxr.report.datasheet import datasheet
    from covidcxr.report.html import render_datasheet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with store_from(args) as store:
        sheet = datasheet(store)
    _write(out, "datasheet.json", json.dumps(sheet, indent=2, allow_nan=False))
    html = _write(out, "datasheet.html", render_datasheet(sheet))
    composition = sheet["composition"]
    print(
        f"{composition['records']} records, {composition['images']} images, "
        f"{composition['patients']} patients; datasheet: {html} (and datasheet.json)"
    )
    return 0
