"""``covidcxr predict``: a second opinion on chest X-ray images (research use only).

One row per image: the input check (pass/fail and why), every finding's calibrated
probability, the findings positive at the model's operating point, the severity scores
with their intervals, and the provenance (model id, weights sha256, engine, the note
"research use only, not a diagnosis"). Images that fail the input check are reported,
not predicted on; the exit code is still 0. Exit 2: no such model, no such path, no
files, or an engine that is not installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from covidcxr import RESEARCH_USE_ONLY
from covidcxr.cli import predict_outcomes
from covidcxr.cli.output import FORMATS, escape_text, positive_int, write_rows
from covidcxr.errors import MetadataError
from covidcxr.models.bundle import MIN_OPERATING_SUPPORT, ModelBundle, load_bundle
from covidcxr.models.engines import ENGINES, covid_at_chance, make_engine, quality_note, restate
from covidcxr.models.inputs import expand_inputs
from covidcxr.models.rows import PredictionRow, record_columns
from covidcxr.models.runtime import DEFAULT_BATCH_SIZE
from covidcxr.progress import counter
from covidcxr.report.recalibration import load_recalibration, recalibrate


def register(subparsers: Any) -> None:
    """Add ``predict`` to the command line."""
    parser = subparsers.add_parser(
        "predict",
        help="input check, finding probabilities, severity and heatmaps for chest X-ray "
        "images (research use only, not a diagnosis)",
        description="A second opinion on chest X-ray images: one row per image with the "
        "input check (pass/fail and why), every finding's probability, the positive "
        "findings at the model's operating point, severity scores with intervals, and "
        "the model's id and weights hash. Research use only, not a diagnosis.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="FILE_OR_DIR",
        help="PNG/JPEG/DICOM files, or folders (every file under them; non-images are reported)",
    )
    parser.add_argument(
        "--model",
        metavar="ID|PATH",
        help="a model id (see the models folder) or a bundle folder; default: the shipped model",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="torch, onnx (onnxruntime, no torch needed), or auto: torch when it is "
        "installed, else onnx (default: auto)",
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format")
    parser.add_argument(
        "--heatmaps",
        metavar="DIR",
        help="write a heatmap overlay PNG per explained finding (<file stem>.<finding>.png)",
    )
    parser.add_argument(
        "--raw-maps",
        action="store_true",
        help="with --heatmaps: also write each raw map as .npy (network resolution)",
    )
    parser.add_argument(
        "--saliency",
        choices=("gradcam", "cam"),
        default="gradcam",
        help="torch engine's heatmap method: Grad-CAM by captum, or CAM (same map, no "
        "gradients); the onnx engine always uses CAM (default: gradcam)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--threads", type=positive_int, metavar="N", help="CPU threads for the network"
    )
    parser.add_argument(
        "--recalibration",
        metavar="FILE",
        help="a site's recalibration (Platt per label) written by validate-model; the "
        "positive findings stay those of the stored operating points",
    )
    parser.add_argument(
        "--prevalence",
        type=_prevalence,
        metavar="P",
        help="your COVID-19 prevalence (0-1) among the patients you image: P(COVID-19) is "
        "re-stated for it by Bayes' rule (default: the training prevalence, about 0.78, "
        "far above any clinic's)",
    )
    predict_outcomes.add_outcome_options(parser)
    parser.set_defaults(handler=cmd_predict)


def _prevalence(text: str) -> float:
    """argparse type: a probability strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a prevalence strictly between 0 and 1")
    return value


# The coherent answer first, in the order a clinician asks (models/coherence.py).
SUMMARY_TABLE = ("P(pneumonia)", "P(COVID-19 | pneumonia)", "P(COVID-19)")


def _probability(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _table_rows(rows: Sequence[PredictionRow]) -> list[dict[str, str]]:
    table: list[dict[str, str]] = []
    for row in rows:
        line = {"file": row.file, "input_check": row.input_check, "reason": row.reason}
        summary = row.summary
        for column, value in (
            ("P(pneumonia)", None if summary is None else summary.pneumonia),
            ("P(COVID-19 | pneumonia)", None if summary is None else summary.covid_if_pneumonia),
            ("P(COVID-19)", None if summary is None else summary.covid),
        ):
            line[column] = _probability(value)
        for label, p in row.probabilities.items():
            line[f"p_{label}"] = _probability(p)
        line["positive"] = "" if row.positive is None else (", ".join(row.positive) or "none")
        for name, score in row.severity.items():
            line[name] = (
                "" if score is None else f"{score.mean:.1f} [{score.low:.1f}, {score.high:.1f}]"
            )
        table.append(line)
    return table


def cmd_predict(args: argparse.Namespace) -> int:
    """covidcxr predict: one row per image; exit 0 even when images fail the check."""
    if args.raw_maps and not args.heatmaps:
        raise MetadataError("predict: --raw-maps needs --heatmaps DIR (where to write them)")
    files = expand_inputs(args.inputs)
    if not files:
        raise MetadataError(
            f"predict: no files in {', '.join(map(repr, args.inputs))}; give PNG or JPEG "
            "files or folders that hold them"
        )
    clinical = predict_outcomes.clinical_inputs(args, files)
    bundle = load_bundle(args.model)
    fits = load_recalibration(args.recalibration, bundle) if args.recalibration else None
    engine = make_engine(bundle, args.engine, saliency_method=args.saliency, threads=args.threads)
    with counter("predict", total=len(files)) as advance:
        rows = engine.predict_files(
            files,
            heatmaps_dir=args.heatmaps,
            raw_maps=args.raw_maps,
            batch_size=args.batch_size,
            progress=advance,
        )
    risks = (
        None if clinical is None else predict_outcomes.outcome_risks(args, clinical, rows, bundle)
    )
    if fits is not None:
        rows = recalibrate(rows, fits)
    if fits is not None or args.prevalence is not None:
        rows = restate(rows, bundle, args.prevalence)
    out = sys.stdout
    if args.format == "table":
        _write_table(rows, bundle, engine.engine, args.heatmaps, out)
        if risks is not None:
            predict_outcomes.write_risk_table(risks, out)
    else:
        records, columns = [row.record() for row in rows], record_columns(bundle)
        if risks is not None:
            records, columns = predict_outcomes.with_risk_columns(records, columns, risks)
        write_rows(records, columns, args.format, out=out)
    if rows and all("decodable" in row.gate.checks_failed for row in rows):
        print(
            f"covidcxr predict: none of the {len(rows)} input file(s) is a PNG or JPEG image "
            "that could be read",
            file=sys.stderr,
        )
        return 1
    return 0


def _write_table(
    rows: Sequence[PredictionRow],
    bundle: ModelBundle,
    engine: str,
    heatmaps: str | None,
    out: TextIO,
) -> None:
    """The table format: one line per image, or one block when there is one image."""
    lines = _table_rows(rows)
    columns = ["file", "input_check", "reason", *SUMMARY_TABLE]
    columns += [f"p_{label}" for label in bundle.findings]
    columns += ["positive", *bundle.severity]
    if len(lines) == 1:
        width = max(len(c) for c in columns)
        for column in columns:
            out.write(f"{column:<{width}}  {escape_text(lines[0].get(column, ''))}\n")
    else:
        write_rows(lines, columns, "table", max_width=60, out=out)
    if bundle.uncalled_findings:
        support = bundle.operating_support
        out.write(
            "\nNo call (probability only) for "
            + ", ".join(
                f"{label} ({support[label][0]} validation positives, {support[label][1]} negatives)"
                for label in bundle.uncalled_findings
            )
            + f": an operating point needs at least {MIN_OPERATING_SUPPORT} of each; "
            "choose a threshold on local data.\n"
        )
    passed = sum(row.input_check == "pass" for row in rows)
    level = bundle.severity_interval.get("level", 0.9)
    out.write(
        f"\n{len(rows)} image(s): {passed} passed the input check, "
        f"{len(rows) - passed} failed (no findings for those). Severity: score "
        f"[{float(level):.0%} interval].\n"
        f"{_summary_note(rows)}"
        f"{quality_note(bundle)}\n"
        + _chance_warning(bundle)
        + f"weights sha256 {bundle.weights_sha256 or 'unknown'}, engine {engine}"
        + (f", heatmaps in {heatmaps}" if heatmaps else "")
        + f".\n{RESEARCH_USE_ONLY[0].upper()}{RESEARCH_USE_ONLY[1:]}.\n"
    )


def _chance_warning(bundle: ModelBundle) -> str:
    """A line saying the COVID-19 answer must not be used, when it is no better than
    chance by the model's own measurement."""
    measured = covid_at_chance(bundle)
    if measured is None:
        return ""
    return (
        f"WARNING: this model's COVID-19 answer is no better than chance ({measured}); "
        "do not use P(COVID-19) to decide anything.\n"
    )


def _summary_note(rows: Sequence[PredictionRow]) -> str:
    """What the three P(...) columns mean, and the prevalence they assume."""
    prevalence = next((row.summary.prevalence for row in rows if row.summary), None)
    if prevalence is None:
        return ""
    return (
        "P(pneumonia), P(COVID-19 | pneumonia) and P(COVID-19) read the labels as one "
        f"distribution, at a COVID-19 prevalence of {prevalence:.2f} (--prevalence P for "
        "yours); p_<label> are the separate outputs the operating points use.\n"
    )
