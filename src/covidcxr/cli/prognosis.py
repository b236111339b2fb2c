"""``covidcxr prognosis``: outcome models (death, ICU, intubation) from the clinical
values and the image model's outputs; research estimates, not a diagnosis.

``evaluate`` prints the comparison table (age, severity, clinical, image, all) under
patient-grouped repeated CV; ``fit`` saves the model on all inputs; ``risk`` gives one
patient's risk with its interval and the model's measured AUROC.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from covidcxr.atomic import atomic_output
from covidcxr.cli.collection import add_store_options, store_from
from covidcxr.cli.output import positive_int
from covidcxr.errors import MetadataError
from covidcxr.models import prognosis, prognosis_cohort, prognosis_risk, prognosis_values
from covidcxr.models.bundle import ModelBundle, load_bundle
from covidcxr.serialise import to_dict
from covidcxr.store.db import Store
from covidcxr.store.queries import annotations_for, list_records

#: ``risk`` options: option -> input name (the store's column names).
CLINICAL_OPTIONS: Final = prognosis_values.CLINICAL_OPTIONS
COMMAND: Final = "prognosis risk"
SEEN_FOLDS: Final = frozenset({"train", "val"})


def register(subparsers: Any) -> None:
    """Add ``prognosis evaluate|fit|risk`` to the command line."""
    parser = subparsers.add_parser(
        "prognosis",
        help="outcome risk (death, ICU, intubation) from clinical values and the image: "
        "evaluate, fit, risk (research estimates)",
        description="Penalised logistic regression of an outcome on age, sex, the "
        "clinical values and the image model's severity and finding outputs, compared "
        "with baselines under patient-grouped repeated CV. Research estimates, not a "
        "diagnosis.",
    )
    commands = parser.add_subparsers(dest="prognosis_command", required=True, metavar="STEP")
    evaluate = commands.add_parser("evaluate", help="print the comparison table")
    _add_data_options(evaluate)
    evaluate.add_argument(
        "--outcome", choices=(*prognosis_cohort.OUTCOMES, "all"), default="all", help="default: all"
    )
    evaluate.add_argument("--out", metavar="DIR", help="write prognosis-OUTCOME.json and .md here")
    evaluate.set_defaults(handler=run_evaluate)
    fit = commands.add_parser("fit", help="fit the all-inputs model and save it")
    _add_data_options(fit)
    fit.add_argument("--outcome", choices=tuple(prognosis_cohort.OUTCOMES), default="survival")
    fit.add_argument("--out", metavar="MODEL.json", required=True, help="the model file")
    fit.add_argument(
        "--refits", type=positive_int, default=200, help="bootstrap refits (default 200)"
    )
    fit.add_argument("--model-id", metavar="ID", help="the model's id (default: the file name)")
    fit.set_defaults(handler=run_fit)
    risk = commands.add_parser("risk", help="one patient's risk with its interval")
    _add_risk_options(risk)
    risk.set_defaults(handler=run_risk)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    add_store_options(parser)
    parser.add_argument("--folds", type=positive_int, default=5, help="default 5")
    parser.add_argument("--repeats", type=positive_int, default=5, help="default 5")
    parser.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument(
        "--c",
        type=_positive_float,
        default=prognosis.DEFAULT_C,
        help=f"inverse strength of the L2 penalty (default {prognosis.DEFAULT_C:g})",
    )
    parser.add_argument(
        "--image-model", metavar="ID", help="the image model (default: the shipped one)"
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number, e.g. 0.1")
    return value


def _add_risk_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="MODEL.json",
        action="append",
        help="a model from `fit` (repeatable; default: the shipped death, ICU and "
        "intubation models)",
    )
    prognosis_values.add_value_options(parser)
    parser.add_argument("--image", metavar="FILE", help="the patient's frontal chest X-ray")
    parser.add_argument(
        "--csv",
        metavar="FILE",
        help="patients, one a row: columns age_years, sex, temperature_c, po2_saturation_pct, "
        "the counts (or their upstream names), and optionally image",
    )


# ---------------------------------------------------------------- evaluate and fit


def _command(args: argparse.Namespace, outcome: str) -> str:
    parts = [f"covidcxr prognosis {args.prognosis_command} --outcome {outcome}"]
    parts.append(f"--folds {args.folds} --repeats {args.repeats} --resamples {args.resamples}")
    parts.append(f"--seed {args.seed} --c {args.c:g}")
    if args.image_model:
        parts.append(f"--image-model {args.image_model}")
    if args.prognosis_command == "fit":
        parts.append(f"--refits {args.refits} --out {Path(args.out).name}")
        if args.model_id:
            parts.append(f"--model-id {args.model_id}")
    return " ".join(parts)


def _seen_patients(
    store: Store, bundle: ModelBundle, records: Sequence[Mapping[str, Any]]
) -> frozenset[str]:
    """Patients the image model trained on: its split's train and validation folds, and
    the patients of images with severity scores (its severity head was fitted on them)."""
    seen: set[str] = set()
    split_file = bundle.path / "split.csv"
    if split_file.is_file():
        from covidcxr.dataset.splits import load_split

        seen |= {p for p, fold in load_split(split_file).assignment.items() if fold in SEEN_FOLDS}
    shas = {r["image_sha256"] for r in records if r["image_sha256"]}
    with store.read() as conn:
        annotated = annotations_for(conn, shas)
    scored = {
        sha for sha, items in annotated.items() if any(a["kind"] == "severity" for a in items)
    }
    seen |= {f"{r['source']}:{r['patient_id']}" for r in records if r["image_sha256"] in scored}
    return frozenset(seen)


def _image_scorer(store: Store, bundle: ModelBundle) -> prognosis_cohort.ImageScorer:
    from covidcxr.models.engines import make_engine

    engine = make_engine(bundle, "onnx")

    def score(paths: Sequence[str]) -> dict[str, dict[str, float]]:
        return {row.file: prognosis_cohort.image_inputs(row) for row in engine.predict_files(paths)}

    weights = bundle.files.get("model.onnx", "unhashed")[:12]
    cache = store.data_dir / "prognosis" / f"image-inputs-{bundle.model_id}-{weights}.csv"
    return prognosis_cohort.cached_scorer(score, cache, store.blobs.path)


def _cohorts(
    args: argparse.Namespace, outcomes: Sequence[str]
) -> tuple[dict[str, prognosis_cohort.Cohort], ModelBundle]:
    bundle = load_bundle(args.image_model)
    with store_from(args) as store:
        with store.read() as conn:
            records = list_records(conn)
        seen = _seen_patients(store, bundle, records)
        scorer = _image_scorer(store, bundle)
        cohorts = {
            name: prognosis_cohort.build_cohort(
                records, prognosis_cohort.OUTCOMES[name], scorer, seen
            )
            for name in outcomes
        }
    return cohorts, bundle


def _evaluate(
    args: argparse.Namespace,
    cohort: prognosis_cohort.Cohort,
    bundle: ModelBundle,
    only: str | None = None,
) -> prognosis.PrognosisEvaluation:
    sets = prognosis_cohort.input_sets(bundle.findings)
    if only is not None:
        sets = {only: sets[only]}
    return prognosis.evaluate(
        cohort,
        sets,
        folds=args.folds,
        repeats=args.repeats,
        resamples=args.resamples,
        seed=args.seed,
        c=args.c,
        image_model=bundle.model_id,
        command=_command(args, args.outcome),
    )


def run_evaluate(args: argparse.Namespace) -> int:
    """``prognosis evaluate``: print (and write) the comparison table per outcome."""
    names = tuple(prognosis_cohort.OUTCOMES) if args.outcome == "all" else (args.outcome,)
    cohorts, bundle = _cohorts(args, names)
    evaluations = [_evaluate(args, cohort, bundle) for cohort in cohorts.values()]
    section = prognosis.markdown_section(evaluations)
    print(section)
    if args.out:
        folder = Path(args.out)
        for evaluation in evaluations:
            _write_json(folder / f"prognosis-{evaluation.outcome}.json", to_dict(evaluation))
        with atomic_output(folder / "prognosis.md") as tmp:
            tmp.write_text(section, encoding="utf-8")
        print(f"wrote {folder}/prognosis-*.json and prognosis.md", file=sys.stderr)
    return 0


def run_fit(args: argparse.Namespace) -> int:
    """``prognosis fit``: cross-validate the all-inputs model, fit it and save it."""
    cohorts, bundle = _cohorts(args, (args.outcome,))
    cohort = cohorts[args.outcome]
    evaluation = _evaluate(args, cohort, bundle, only="all")
    model = prognosis.fit_model(
        cohort,
        prognosis_cohort.input_sets(bundle.findings)["all"],
        evaluation,
        refits=args.refits,
        seed=args.seed,
        command=_command(args, args.outcome),
        model_id=args.model_id or Path(args.out).name,
    )
    _write_json(Path(args.out), to_dict(model))
    print(
        f"saved {args.out}: {model.outcome} ({model.event}), {model.patients} patients, "
        f"{model.events} events; cross-validated AUROC {model.auroc.text()}"
    )
    return 0


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- risk


def load_model(path: str) -> prognosis.PrognosisModel:
    """Read a model file written by ``prognosis fit``.

    Raises:
        MetadataError: the file cannot be read or is not a prognosis model.
    """
    return prognosis_risk.load_model(path, COMMAND)


def _patient_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"values": prognosis_values.values_from_args(args, COMMAND), "image": args.image}


def _patients_from_csv(path: str) -> list[dict[str, Any]]:
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MetadataError(f"{COMMAND}: cannot read {path!r}: {exc}") from None
    patients = []
    for line, row in enumerate(rows, start=2):
        image = (row.pop("image", "") or "").strip() or None
        values = prognosis_values.row_values(row, f"{path}:{line}", COMMAND)
        patients.append({"values": values, "image": image})
    return patients


def _add_image_inputs(model: prognosis.PrognosisModel, patients: list[dict[str, Any]]) -> None:
    files = [p["image"] for p in patients if p.get("image")]
    if not files:
        return
    if not model.image_model:
        raise MetadataError(f"{COMMAND}: this model has no image inputs; leave out --image")
    from covidcxr.models.engines import predict

    rows = predict(files, model=model.image_model, engine="onnx")
    by_file = dict(zip(files, rows, strict=True))
    for patient in patients:
        if patient.get("image"):
            row = by_file[patient["image"]]
            if row.input_check != "pass":
                print(
                    f"{COMMAND}: {patient['image']}: the image failed the input check "
                    f"({row.reason}); its inputs are replaced by the training median",
                    file=sys.stderr,
                )
            patient["image_features"] = prognosis_cohort.image_inputs(row)


def run_risk(args: argparse.Namespace) -> int:
    """``prognosis risk``: each patient's risk with its interval, as a research estimate."""
    models = [load_model(path) for path in args.model] if args.model else None
    if models is None:
        models = prognosis_risk.shipped_models()
    patients = _patients_from_csv(args.csv) if args.csv else [_patient_from_args(args)]
    for model in models:
        _add_image_inputs(model, patients)
    for number, patient in enumerate(patients, start=1):
        if len(patients) > 1:
            print(f"patient {number}:")
        found = prognosis_risk.outcome_risks(
            patient["values"], patient.get("image_features"), models=models
        )
        for model, estimate in zip(models, found, strict=True):
            print(_risk_text(model, estimate))
    return 0


def _risk_text(model: prognosis.PrognosisModel, estimate: prognosis_risk.OutcomeRisk) -> str:
    lines = [f"risk ({model.event}): {estimate.text()}"]
    if estimate.value is not None:
        lines[0] += (
            f" (95% interval over {len(model.bootstrap)} bootstrap refits on "
            f"{model.patients} training patients)"
        )
    lines.append(f"model AUROC {model.auroc.text()} ({model.auroc_how}; {model.model_id})")
    if estimate.value is not None and estimate.missing:
        lines.append("not given, replaced by the training median: " + ", ".join(estimate.missing))
    lines.append(f"{prognosis.RESEARCH_ESTIMATE}.")
    return "\n".join(lines)
