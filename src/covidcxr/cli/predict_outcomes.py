"""``covidcxr predict``'s outcome risks: clinical values from the options or a CSV,
joined to the images, and the prognosis models' research estimates for each."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from covidcxr.cli.output import write_rows
from covidcxr.errors import MetadataError
from covidcxr.models import prognosis, prognosis_cohort, prognosis_risk, prognosis_values
from covidcxr.models.bundle import ModelBundle
from covidcxr.models.prognosis_risk import OutcomeRisk
from covidcxr.models.rows import PredictionRow

COMMAND = "predict"
NO_ROW = "no row for this image in the --clinical file"

#: Per input file (as given to predict): its clinical values, or ``None`` (no row).
Clinical = dict[str, prognosis_values.Values | None]


def add_outcome_options(parser: argparse.ArgumentParser) -> None:
    """Add the clinical value options, ``--clinical FILE`` and ``--prognosis MODEL.json``."""
    group = parser.add_argument_group(
        "outcome risk (research estimates, not a diagnosis)",
        "Give clinical values to add the risk of death, ICU admission and intubation, "
        "with an interval and the model's measured AUROC. Without them, predict's "
        "output is unchanged.",
    )
    prognosis_values.add_value_options(group)  # type: ignore[arg-type]
    group.add_argument(
        "--clinical",
        metavar="FILE.csv",
        help="values per image: a file column (file, filename or image: the image's name "
        "or path) and columns age_years, sex, temperature_c, po2_saturation_pct, the "
        "counts (or their upstream names); images without a row get no risk",
    )
    group.add_argument(
        "--prognosis",
        metavar="MODEL.json",
        action="append",
        help="a model from `covidcxr prognosis fit` (repeatable; default: the shipped "
        "prognosis-v1 models)",
    )


def _given_options(args: argparse.Namespace) -> list[str]:
    names = [*prognosis_values.CLINICAL_OPTIONS, "sex"]
    return [f"--{name}" for name in names if getattr(args, name, None) is not None]


def clinical_inputs(args: argparse.Namespace, files: Sequence[Path]) -> Clinical | None:
    """Each file's clinical values, or ``None`` when none were given (no risk asked).

    Raises:
        MetadataError: both options and a file, options with several images, a bad
            value, or a file row that names no input image (file, line, name, why).
    """
    options = _given_options(args)
    if options and args.clinical:
        raise MetadataError(f"{COMMAND}: give {', '.join(options)} or --clinical FILE, not both")
    if options:
        if len(files) != 1:
            raise MetadataError(
                f"{COMMAND}: {', '.join(options)} describe one patient, but {len(files)} "
                "images were given; give one image, or --clinical FILE with a row per image"
            )
        return {str(files[0]): prognosis_values.values_from_args(args, COMMAND)}
    if args.clinical:
        return _join(args.clinical, files)
    if args.prognosis:
        raise MetadataError(
            f"{COMMAND}: --prognosis needs clinical values (--age, --sex, --spo2... or "
            "--clinical FILE)"
        )
    return None


def _join(path: str, files: Sequence[Path]) -> Clinical:
    rows = prognosis_values.read_values_file(path, COMMAND)
    joined: Clinical = {str(f): None for f in files}
    for line, name, values in rows:
        matches = [f for f in files if _names(f, name)]
        if len(matches) != 1:
            why = (
                f"matches none of the {len(files)} input image(s)"
                if not matches
                else f"matches {len(matches)} input images ({', '.join(map(str, matches[:3]))})"
                "; write the path as given to predict"
            )
            raise MetadataError(f"{COMMAND}: {path} line {line}: file {name!r} {why}")
        if joined[str(matches[0])] is not None:
            raise MetadataError(
                f"{COMMAND}: {path} line {line}: {name!r} names {matches[0]}, which an "
                "earlier row already gave values for; keep one row per image"
            )
        joined[str(matches[0])] = values
    return joined


def _names(file: Path, name: str) -> bool:
    """Whether a values file's name denotes ``file``: the path as given, its file name,
    or a trailing part of its path."""
    wanted = Path(name)
    return str(file) == name or (
        len(wanted.parts) <= len(file.parts) and file.parts[-len(wanted.parts) :] == wanted.parts
    )


def _image_features(
    model: prognosis.PrognosisModel,
    bundle: ModelBundle,
    rows: Sequence[PredictionRow],
    engine: str,
    cache: dict[str, dict[str, dict[str, float]]],
) -> dict[str, dict[str, float]]:
    """Per file, the outputs of the image model the prognosis model names."""
    if not model.image_model:
        return {}
    if model.image_model not in cache:
        if model.image_model == bundle.model_id:
            found = rows
        else:
            from covidcxr.models.engines import predict

            found = predict([row.file for row in rows], model=model.image_model, engine=engine)
        cache[model.image_model] = {row.file: prognosis_cohort.image_inputs(row) for row in found}
    return cache[model.image_model]


def _models(paths: Sequence[str] | None) -> list[prognosis.PrognosisModel]:
    if not paths:
        return prognosis_risk.shipped_models()
    models = [prognosis_risk.load_model(p, COMMAND) for p in paths]
    outcomes = [m.outcome for m in models]
    twice = sorted({o for o in outcomes if outcomes.count(o) > 1})
    if twice:
        raise MetadataError(
            f"{COMMAND}: --prognosis gives {', '.join(twice)} more than once; give one model "
            "per outcome"
        )
    return models


def outcome_risks(
    args: argparse.Namespace,
    clinical: Clinical,
    rows: Sequence[PredictionRow],
    bundle: ModelBundle,
) -> dict[str, list[OutcomeRisk]]:
    """File -> one risk per prognosis model (rows as the image model gave them, before
    any recalibration: the prognosis models were fitted on those outputs)."""
    models = _models(args.prognosis)
    wanted = [row for row in rows if clinical.get(row.file) is not None]
    cache: dict[str, dict[str, dict[str, float]]] = {}
    found: dict[str, list[OutcomeRisk]] = {row.file: [] for row in rows}
    for model in models:
        features = _image_features(model, bundle, wanted, args.engine, cache)
        for row in rows:
            values = clinical.get(row.file)
            if values is None:
                found[row.file].append(prognosis_risk.no_estimate(model, NO_ROW))
                continue
            found[row.file] += prognosis_risk.outcome_risks(
                values, features.get(row.file), models=[model]
            )
    return found


def with_risk_columns(
    records: Sequence[dict[str, Any]],
    columns: Sequence[str],
    risks: Mapping[str, Sequence[OutcomeRisk]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Records and columns with the risk columns added (after the row's own)."""
    first = next(iter(risks.values()), [])
    extra = prognosis_risk.risk_columns([risk.outcome for risk in first])
    merged = [
        {**record, **prognosis_risk.risk_record(risks.get(record["file"]))} for record in records
    ]
    return merged, [*columns, *extra]


def write_risk_table(risks: Mapping[str, Sequence[OutcomeRisk]], out: TextIO) -> None:
    """The table format's outcome section: one line per image and outcome."""
    lines = []
    for file, found in risks.items():
        for risk in found:
            lines.append(
                {
                    "file": file,
                    "outcome": risk.event,
                    "risk [95% interval]": risk.text(),
                    "model AUROC [95% CI]": risk.auroc.text(),
                    "model": risk.model_id,
                    "not given (training median used)": ", ".join(risk.missing)
                    if risk.value is not None
                    else "",
                }
            )
    out.write(f"\nOutcome risk ({prognosis.RESEARCH_ESTIMATE}):\n")
    write_rows(lines, list(lines[0]) if lines else ["file"], "table", max_width=60, out=out)
    models = {r.model_id: r for found in risks.values() for r in found}
    out.write(
        "Risk: the model fitted on all its training patients, with the 2.5-97.5 "
        "percentiles over its bootstrap refits. Model AUROC, measured on the public "
        "collection, whose outcomes come from published case reports (not a consecutive "
        "series): validate on local patients (covidcxr validate-model) first.\n"
        + "".join(f"- {r.model_id}: {r.auroc.text()}, {r.auroc_how}\n" for r in models.values())
    )
