"""Local validation of any model on a site's labelled images: every number of the
report as one JSON-ready dict (rendered by :mod:`covidcxr.report.html`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Final

import numpy as np

from covidcxr import RESEARCH_USE_ONLY, __version__
from covidcxr.errors import MetadataError
from covidcxr.ingest.mapping import SourceMapping
from covidcxr.models.audit_masks import LungMasks, shipped_lung_masks
from covidcxr.models.runtime import InferenceEngine
from covidcxr.report import sections, stats
from covidcxr.report.evidence import evidence_items, sample_size_text
from covidcxr.report.labels import BINARY_LABEL, Case, read_labels, read_predictions

FORMAT: Final = "covidcxr-validation/1"
GALLERY_SIZE: Final = 6
#: The image shortcut audit's resamples (its bootstrap is slower than ours).
AUDIT_RESAMPLES: Final = 300
_LISTED: Final = 20

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ValidationRequest:
    """What to validate, on what.

    Attributes:
        images: the folder of the site's images.
        labels: the labels CSV.
        out_dir: where the report goes (heatmaps are written under it).
        model: our model id or bundle folder (``None``: the shipped one) when
            ``predictions`` is not given.
        predictions: another tool's CSV of file name and probability per label.
        thresholds: operating points for ``predictions`` (default 0.5).
        model_card: a model card file for ``predictions`` (Markdown, shown as HTML).
        engine: our model's engine (``onnx``, ``torch``, ``auto``).
        masks: a folder of reference lung masks (``<stem>_mask.png`` or ``<stem>.png``)
            for the image shortcut audit (our model only); images without one get the
            lung segmenter's mask.
        mapping: the labels file's mapping (columns, value maps).
        columns: ``--column`` choices, our name -> header.
        n_resamples: bootstrap resamples per interval.
        seed: the bootstrap's seed.
        batch_size: images per forward pass.
    """

    images: Path
    labels: Path
    out_dir: Path
    model: str | None = None
    predictions: Path | None = None
    thresholds: Mapping[str, float] = field(default_factory=dict)
    model_card: Path | None = None
    engine: str = "auto"
    masks: Path | None = None
    mapping: SourceMapping = field(default_factory=SourceMapping)
    columns: Mapping[str, str] = field(default_factory=dict)
    n_resamples: int = stats.DEFAULT_RESAMPLES
    seed: int = 0
    batch_size: int = 16


@dataclass
class _Scored:
    """The cases left after matching, duplicates and input checks, with scores."""

    cases: list[Case]
    paths: list[Path]
    probabilities: list[dict[str, float]]
    severity: dict[str, list[float | None]]
    heatmaps: list[list[str]]
    rejected: list[dict[str, str]]


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def match_images(cases: Sequence[Case], images: Path, labels: Path) -> list[Path]:
    """Each case's image file; every file must be labelled and every label have a file.

    Raises:
        MetadataError: listing the labelled names without a file and the files
            without a label.
    """
    if not images.is_dir():
        raise MetadataError(f"validate-model: --images {str(images)!r} is not a folder")
    files = {
        p.relative_to(images).as_posix(): p
        for p in sorted(images.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(images).parts)
    }
    by_name = {p.name: p for p in files.values()}
    paths = [files.get(c.filename) or by_name.get(c.filename) for c in cases]
    missing = [c.filename for c, p in zip(cases, paths, strict=True) if p is None]
    used = {p for p in paths if p is not None}
    unlabelled = [name for name, p in files.items() if p not in used]
    if missing or unlabelled:
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} labelled image(s) not in {images}: {_listing(missing)}"
            )
        if unlabelled:
            problems.append(
                f"{len(unlabelled)} image(s) with no row in {labels}: {_listing(unlabelled)}"
            )
        raise MetadataError(
            "validate-model: labels and images do not match: "
            + "; ".join(problems)
            + ". Add the rows or files, or remove them, so that each image has one label"
        )
    return [p for p in paths if p is not None]


def find_duplicates(
    cases: Sequence[Case], paths: Sequence[Path]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Indices to keep (the first of each picture) and the duplicate groups found."""
    from PIL import Image

    from covidcxr.imaging.duplicates import find_duplicates as clusters_of
    from covidcxr.imaging.hashing import image_hashes

    items = []
    for index, path in enumerate(paths):
        data = path.read_bytes()
        try:
            with Image.open(path) as image:
                hashes = image_hashes(image.convert("L"))
        except (OSError, ValueError):
            continue  # not an image: the input check reports it
        items.append(
            (str(index), hashlib.sha256(data).hexdigest(), hashes.phash, hashes.phash_detail)
        )
    dropped: set[int] = set()
    groups = []
    for cluster in clusters_of(items):
        members = sorted(int(key) for key in cluster.members)
        dropped.update(members[1:])
        references = {cases[i].reference for i in members}
        groups.append(
            {
                "kind": cluster.kind,
                "files": [cases[i].filename for i in members],
                "kept": cases[members[0]].filename,
                "labels_agree": len(references) == 1,
                "references": sorted(references),
            }
        )
    return [i for i in range(len(cases)) if i not in dropped], groups


def _score_ours(
    request: ValidationRequest, cases: list[Case], paths: list[Path], progress: Progress
) -> tuple[_Scored, dict[str, Any], InferenceEngine]:
    from covidcxr.models.bundle import load_bundle
    from covidcxr.models.engines import make_engine

    bundle = load_bundle(request.model)
    engine = make_engine(bundle, request.engine)
    rows = []
    for start in range(0, len(paths), request.batch_size):
        rows += engine.predict_files(
            paths[start : start + request.batch_size], batch_size=request.batch_size
        )
        progress(f"predicted {len(rows)}/{len(paths)} images")
    scored = _Scored([], [], [], {name: [] for name in bundle.severity}, [], [])
    for case, path, row in zip(cases, paths, rows, strict=True):
        if row.input_check != "pass":
            scored.rejected.append({"file": case.filename, "reason": row.reason})
            continue
        scored.cases.append(case)
        scored.paths.append(path)
        scored.probabilities.append({k: v for k, v in row.probabilities.items() if v is not None})
        scored.heatmaps.append(list(row.heatmap_files))
        for name, score in row.severity.items():
            scored.severity[name].append(None if score is None else score.mean)
    card = bundle.path / "MODEL_CARD.md"
    model = {
        "source": "covidcxr",
        "model_id": bundle.model_id,
        "weights_sha256": bundle.weights_sha256,
        "engine": engine.engine,
        "labels": list(bundle.findings),
        "thresholds": dict(zip(bundle.findings, bundle.thresholds, strict=True)),
        "no_call": list(bundle.uncalled_findings),
        "card": card.read_text(encoding="utf-8") if card.is_file() else "",
    }
    return scored, model, engine


def add_heatmaps(
    gallery: list[dict[str, Any]], engine: InferenceEngine, folder: Path, side: int = 384
) -> None:
    """Write a small heatmap overlay per gallery image (the finding the model called, or
    its most probable one) and name it in the entry's ``heatmap``."""
    from PIL import Image

    from covidcxr.models.saliency import overlay

    folder.mkdir(parents=True, exist_ok=True)
    rows = engine.predict_files([entry["path"] for entry in gallery], heatmaps=True)
    for entry, row in zip(gallery, rows, strict=True):
        for label, heat in list(row.heatmaps.items())[:1]:
            with Image.open(entry["path"]) as image:
                grey = image.convert("L")
                grey.thumbnail((side, side))
            small = Image.fromarray(heat.astype(np.float32)).resize(
                grey.size, Image.Resampling.BILINEAR
            )
            target = folder / f"{Path(entry['path']).stem}.{label.replace(' ', '_')}.png"
            Image.fromarray(overlay(np.asarray(grey), np.asarray(small))).save(target)
            entry["heatmap"] = str(target)
            entry["heatmap_label"] = label


def _score_external(
    request: ValidationRequest, cases: list[Case], paths: list[Path], labels: Sequence[str]
) -> tuple[_Scored, dict[str, Any]]:
    assert request.predictions is not None
    given = read_predictions(request.predictions, labels)
    missing = [
        c.filename for c in cases if c.filename not in given and Path(c.filename).name not in given
    ]
    if missing:
        raise MetadataError(
            f"validate-model: {request.predictions} has no row for {len(missing)} labelled "
            f"image(s): {_listing(missing)}; add them or remove their labels"
        )
    scored = _Scored([], [], [], {}, [], [])
    for case, path in zip(cases, paths, strict=True):
        scored.cases.append(case)
        scored.paths.append(path)
        scored.probabilities.append(given.get(case.filename) or given[Path(case.filename).name])
        scored.heatmaps.append([])
    found = sorted({k for probs in scored.probabilities for k in probs}, key=list(labels).index)
    card = request.model_card
    model = {
        "source": "external",
        "model_id": request.predictions.name,
        "weights_sha256": None,
        "engine": "predictions file",
        "labels": found,
        "thresholds": {label: request.thresholds.get(label, 0.5) for label in found},
        "no_call": [],
        "card": card.read_text(encoding="utf-8") if card else "",
    }
    return scored, model


def _cohort(cases: Sequence[Case], patients_given: bool, labels: Sequence[str]) -> dict[str, Any]:
    def counts(values: Sequence[str | None]) -> dict[str, int]:
        found: dict[str, int] = {}
        for value in values:
            found[value or "unknown"] = found.get(value or "unknown", 0) + 1
        return dict(sorted(found.items(), key=lambda kv: -kv[1]))

    ages = [c.age_years for c in cases if c.age_years is not None]
    return {
        "images": len(cases),
        "patients": len({c.patient_id for c in cases}),
        "patients_given": patients_given,
        "references": counts([c.reference for c in cases]),
        "label_counts": {
            label: {
                "positive": sum(c.labels.get(label) == 1.0 for c in cases),
                "negative": sum(c.labels.get(label) == 0.0 for c in cases),
                "unknown": sum(math.isnan(c.labels.get(label, math.nan)) for c in cases),
            }
            for label in labels
        },
        "sex": counts([c.sex for c in cases]),
        "age_band": {
            band: n
            for band in [name for *_, name in sections.AGE_BANDS] + ["80+", "unknown"]
            if (n := sum((sections.age_band(c.age_years) or "unknown") == band for c in cases))
        },
        "age_years": {
            "known": len(ages),
            "min": min(ages, default=None),
            "median": float(np.median(ages)) if ages else None,
            "max": max(ages, default=None),
        },
        "view": counts([c.view for c in cases]),
        "site": counts([c.site for c in cases]),
        "fields_known": {
            name: sum(getattr(c, name) is not None for c in cases)
            for name in ("age_years", "sex", "view", "site", "acquired_on", "severity")
        },
    }


def _label_section(
    label: str, scored: _Scored, threshold: float, request: ValidationRequest, primary: bool
) -> dict[str, Any] | None:
    keep = [
        i
        for i, (c, probs) in enumerate(zip(scored.cases, scored.probabilities, strict=True))
        if not math.isnan(c.labels.get(label, math.nan)) and label in probs
    ]
    y = np.asarray([scored.cases[i].labels[label] for i in keep], dtype=np.float64)
    p = np.asarray([scored.probabilities[i][label] for i in keep], dtype=np.float64)
    if len(np.unique(y)) < 2:
        return None
    cases = [scored.cases[i] for i in keep]
    groups = [c.patient_id for c in cases]
    options = {"n_resamples": request.n_resamples, "seed": request.seed}
    stored = sections.operating_point(y, p, groups, threshold, **options)
    rechosen = sections.operating_point(y, p, groups, stats.youden_threshold(y, p), **options)
    discrimination = sections.discrimination(y, p, groups, **options)
    section: dict[str, Any] = {
        "n": len(y),
        "positives": int(y.sum()),
        "negatives": int(len(y) - y.sum()),
        "discrimination": discrimination,
        "stored_operating_point": stored,
        "rechosen_operating_point": {**rechosen, "optimistic": True},
        "calibration": sections.calibration_section(y, p, discrimination["auc"]["low"]),
    }
    auc, sens, spec = (
        discrimination["auc"]["value"],
        stored["sensitivity"]["value"],
        stored["specificity"]["value"],
    )
    size = sections.sample_size(y, auc, sens, spec)
    widths = {
        name: (estimate["high"] - estimate["low"]) / 2
        for name, estimate in (
            ("AUC", discrimination["auc"]),
            ("sensitivity", stored["sensitivity"]),
            ("specificity", stored["specificity"]),
        )
        if estimate["low"] is not None and estimate["high"] is not None
    }
    section["sample_size"] = size
    section["sample_size_text"] = sample_size_text(label, size, widths)
    if primary:
        section["subgroups"] = sections.subgroups(cases, y, p, threshold, **options)
        section["metadata_shortcut"] = sections.metadata_shortcut(cases, y, **options)
        section["gallery"] = _gallery(label, cases, keep, scored, y, p, threshold)
    return section


def _gallery(
    label: str,
    cases: Sequence[Case],
    keep: Sequence[int],
    scored: _Scored,
    y: np.ndarray[Any, Any],
    p: np.ndarray[Any, Any],
    threshold: float,
) -> list[dict[str, Any]]:
    """The most confident errors: false positives with the highest probability and
    false negatives with the lowest, alternately."""
    fp = sorted((i for i in range(len(y)) if y[i] == 0 and p[i] >= threshold), key=lambda i: -p[i])
    fn = sorted((i for i in range(len(y)) if y[i] == 1 and p[i] < threshold), key=lambda i: p[i])
    chosen = [i for pair in zip_longest(fp, fn) for i in pair if i is not None]
    gallery = []
    for i in chosen[:GALLERY_SIZE]:
        gallery.append(
            {
                "file": cases[i].filename,
                "path": str(scored.paths[keep[i]]),
                "error": "false positive" if y[i] == 0 else "false negative",
                "probability": float(p[i]),
                "reference": cases[i].reference,
                "heatmap": None,
                "heatmap_label": None,
            }
        )
    return gallery


def _reference_masks(folder: Path | None, paths: Sequence[Path], size: int) -> np.ndarray:
    """Each image's reference lung mask from ``folder`` (all zero where it has none)."""
    from covidcxr.dataset.loading import load_mask

    masks = np.zeros((len(paths), size, size), np.uint8)
    if folder is None:
        return masks
    for i, path in enumerate(paths):
        candidates = [folder / f"{path.stem}_mask.png", folder / f"{path.stem}.png"]
        mask = next((m for m in candidates if m.is_file()), None)
        if mask is not None:
            masks[i] = load_mask(mask, size)
    return masks


def _image_audit(
    request: ValidationRequest,
    scored: _Scored,
    labels: Sequence[str],
    engine: InferenceEngine | None,
    lung_masks: LungMasks | None,
) -> dict[str, Any]:
    if engine is None:
        why = "it needs the model's network, which a predictions file does not give"
        return {"status": "not run", "reason": why}
    lung_masks = lung_masks if lung_masks is not None else shipped_lung_masks()
    if request.masks is None and lung_masks.segmenter is None:
        why = f"no lung masks given (--masks DIR) and {lung_masks.note}"
        return {"status": "not run", "reason": why}
    from covidcxr.dataset.loading import load_image
    from covidcxr.models.audit import shortcut_audit
    from covidcxr.models.rows import calibrated_probabilities
    from covidcxr.serialise import to_dict

    bundle = engine.bundle
    images = np.stack([load_image(path, bundle.input_size) for path in scored.paths])

    def predict(batch: Any) -> Any:
        assert engine is not None
        return calibrated_probabilities(engine.forward(batch).findings, bundle.temperatures)

    y = [[c.labels.get(label, math.nan) for label in bundle.findings] for c in scored.cases]
    result = shortcut_audit(
        predict,
        images,
        _reference_masks(request.masks, scored.paths, bundle.input_size),
        bundle.findings,
        y,
        [c.patient_id for c in scored.cases],
        lung_masks=lung_masks,
        originals=scored.paths,
        n_resamples=min(request.n_resamples, AUDIT_RESAMPLES),
        seed=request.seed,
    )
    found = to_dict(result)
    found["labels"] = [a for a in found["labels"] if a["label"] in labels]
    return {"status": "run", "verdict": result.verdict, **found}


def validate(
    request: ValidationRequest,
    progress: Progress | None = None,
    *,
    lung_masks: LungMasks | None = None,
) -> dict[str, Any]:
    """Validate a model on a site's labelled images; returns every number of the report.

    Args:
        request: what to validate, on what.
        progress: called with a line at each step.
        lung_masks: the image shortcut audit's masks for images without a reference
            mask (default: :func:`~covidcxr.models.audit_masks.shipped_lung_masks`).

    Raises:
        MetadataError: labels and images do not match, a label or prediction cannot be
            read (the message lists which and says how to fix it).
    """
    from covidcxr.dataset.tasks import SECOND_OPINION_LABELS

    say = progress or (lambda _message: None)
    definitions = {
        d.name: {"include": d.include, "exclude": d.exclude} for d in SECOND_OPINION_LABELS
    }
    cases = read_labels(
        request.labels, definitions, mapping=request.mapping, columns=request.columns
    )
    paths = match_images(cases, request.images, request.labels)
    say(f"read {len(cases)} labels, matched to images")
    keep, duplicates = find_duplicates(cases, paths)
    say(f"{len(duplicates)} duplicate group(s); {len(keep)} distinct images")
    cases, paths = [cases[i] for i in keep], [paths[i] for i in keep]
    names = [d.name for d in SECOND_OPINION_LABELS]
    engine: InferenceEngine | None = None
    if request.predictions is None:
        scored, model, engine = _score_ours(request, cases, paths, say)
    else:
        scored, model = _score_external(request, cases, paths, names)
    labels = model["labels"]
    patients_given = any(c.patient_id != c.filename for c in cases)
    report: dict[str, Any] = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "covidcxr_version": __version__,
        "note": RESEARCH_USE_ONLY,
        "model": model,
        "inputs": {
            "images": str(request.images),
            "labels": str(request.labels),
            "predictions": str(request.predictions) if request.predictions else None,
            "n_resamples": request.n_resamples,
            "seed": request.seed,
        },
        "cohort": _cohort(scored.cases, patients_given, labels),
        "input_checks": {
            "labelled_images": len(keep) + sum(len(g["files"]) - 1 for g in duplicates),
            "distinct_images": len(keep),
            "accepted": len(scored.cases),
            "rejected": scored.rejected,
            "duplicates": duplicates,
        },
    }
    thresholds = model["thresholds"]
    evaluable = [
        label for label in labels if label not in model["no_call"] or label == BINARY_LABEL
    ]
    primary = next((name for name in [BINARY_LABEL, *evaluable] if _has_both(scored, name)), None)
    report["primary_label"] = primary
    report["labels"] = {}
    for label in labels:
        section = _label_section(label, scored, thresholds[label], request, label == primary)
        if section is not None:
            report["labels"][label] = section
        say(f"computed the metrics of {label}")
    if engine is not None and primary is not None:
        add_heatmaps(report["labels"][primary]["gallery"], engine, request.out_dir / "heatmaps")
    report["not_evaluable"] = [label for label in labels if label not in report["labels"]]
    report["severity"] = sections.severity_section(scored.cases, scored.severity)
    report["outcomes"] = _outcomes(request, scored, model["model_id"])
    say("computed the outcome section")
    report["shortcut_audit"] = _image_audit(request, scored, labels, engine, lung_masks)
    report["cases"] = _case_rows(scored)
    report["evidence"] = evidence_items(report)
    return report


def _outcomes(request: ValidationRequest, scored: _Scored, model_id: str) -> dict[str, Any]:
    """The shipped prognosis models on the site's patients (:mod:`covidcxr.report.outcomes`)."""
    from covidcxr.report.outcomes import image_inputs_of, outcome_section

    images = [
        image_inputs_of(probs, {name: values[i] for name, values in scored.severity.items()})
        for i, probs in enumerate(scored.probabilities)
    ]
    return outcome_section(
        request.labels,
        {**request.mapping.columns, **request.columns},
        request.mapping.delimiter,
        scored.cases,
        images,
        model_id,
        n_resamples=request.n_resamples,
        seed=request.seed,
    )


def _has_both(scored: _Scored, label: str) -> bool:
    values = {
        c.labels.get(label)
        for c, probs in zip(scored.cases, scored.probabilities, strict=True)
        if label in probs
    }
    return {0.0, 1.0} <= values


def _case_rows(scored: _Scored) -> list[dict[str, Any]]:
    return [
        {
            "file": case.filename,
            "patient_id": case.patient_id,
            "reference": case.reference,
            "labels": {k: (None if math.isnan(v) else v) for k, v in case.labels.items()},
            "probabilities": probs,
            "heatmaps": maps,
        }
        for case, probs, maps in zip(
            scored.cases, scored.probabilities, scored.heatmaps, strict=True
        )
    ]


def recalibration(report: Mapping[str, Any]) -> dict[str, Any]:
    """The Platt fits of a report as the file ``predict --recalibration`` reads."""
    labels = {
        label: {
            "method": "platt",
            "a": section["calibration"]["platt"]["a"],
            "b": section["calibration"]["platt"]["b"],
            "n": section["n"],
        }
        for label, section in report["labels"].items()
        if section["calibration"]["platt"] and section["calibration"]["platt"]["usable"]
    }
    return {
        "format": "covidcxr-recalibration/1",
        "model_id": report["model"]["model_id"],
        "weights_sha256": report["model"]["weights_sha256"],
        "formula": "p' = 1 / (1 + exp(-(a * logit(p) + b)))",
        "fitted_on": report["inputs"]["labels"],
        "labels": labels,
    }


__all__ = ["FORMAT", "ValidationRequest", "match_images", "recalibration", "validate"]
