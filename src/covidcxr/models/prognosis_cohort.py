"""Prognosis cohorts: one row per patient with a known outcome, joined with image inputs."""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray

from covidcxr.atomic import atomic_output
from covidcxr.errors import MetadataError
from covidcxr.schema.values import FRONTAL_VIEWS

if TYPE_CHECKING:
    from covidcxr.models.runtime import PredictionRow

# The logger keeps the name it had before this module was split out of prognosis.py.
log = logging.getLogger("covidcxr.models.prognosis")

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Outcome:
    """An outcome to predict.

    Attributes:
        name: the command-line name (``survival``, ``icu``, ``intubation``).
        field: the store's outcome field.
        event_value: the field's value that counts as the event (death: survival N).
        event: the event in words (``died``).
    """

    name: str
    field: str
    event_value: bool
    event: str


OUTCOMES: Final[Mapping[str, Outcome]] = {
    "survival": Outcome("survival", "survival", False, "died"),
    "icu": Outcome("icu", "went_icu", True, "admitted to ICU"),
    "intubation": Outcome("intubation", "intubated", True, "intubated"),
}

#: Clinical inputs: the store's columns, plus ``sex_male`` (1 for M, 0 for F).
CLINICAL_FEATURES: Final = (
    "age_years",
    "sex_male",
    "temperature_c",
    "po2_saturation_pct",
    "leukocyte_count_k_per_ul",
    "neutrophil_count_k_per_ul",
    "lymphocyte_count_k_per_ul",
)
SEVERITY_FEATURES: Final = ("geographic_extent", "opacity")

AGGREGATION: Final = (
    "one row per patient (source, patient id): the outcome is the event if any of the "
    "patient's records states it; each clinical value is the one on the earliest record "
    "that has it (by offset_days, then metadata line); the image inputs come from the "
    "earliest stored frontal X-ray; patients without a stored frontal X-ray are left out"
)


def finding_feature(label: str) -> str:
    """The input name of a finding probability: ``COVID-19`` -> ``p_covid_19``."""
    return "p_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def input_sets(finding_labels: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The compared inputs: the baselines (age, severity, clinical, image) and all together.

    ``severity`` is the image model's predicted severity; ``image`` adds its finding
    probabilities.
    """
    image = SEVERITY_FEATURES + tuple(finding_feature(label) for label in finding_labels)
    return {
        "age": ("age_years",),
        "severity": SEVERITY_FEATURES,
        "clinical": CLINICAL_FEATURES,
        "image": image,
        "all": CLINICAL_FEATURES + image,
    }


# ---------------------------------------------------------------- one row per patient


@dataclass(frozen=True)
class Cohort:
    """The patients of one outcome, one row each.

    Attributes:
        outcome: what is predicted.
        patients: ``source:patient_id`` per row.
        groups: the CV grouping key per row: the patient, or for patients whose image
            is the same file, the first of them (so a shared image is never on both
            sides of a fold).
        events: 1 where the event happened, else 0.
        values: input name -> one value per row (``NaN`` = missing).
        images: sha256 of the image the image inputs come from, per row.
        image_seen: per row, whether the image model trained on (or fitted its severity
            head on) this patient, so that its image inputs may be optimistic.
        excluded: reason -> patients with a known outcome left out.
    """

    outcome: Outcome
    patients: tuple[str, ...]
    groups: tuple[str, ...]
    events: NDArray[np.int64]
    values: Mapping[str, Array]
    images: tuple[str, ...]
    image_seen: NDArray[np.bool_]
    excluded: Mapping[str, int] = field(default_factory=dict)

    def matrix(self, features: Sequence[str]) -> Array:
        """The rows x features matrix (``NaN`` = missing)."""
        n = len(self.patients)
        return np.column_stack([self.values.get(f, np.full(n, math.nan)) for f in features])


def _time_order(record: Mapping[str, Any]) -> tuple[float, int]:
    offset = record.get("offset_days")
    return (math.inf if offset is None else float(offset), int(record.get("line") or 0))


def _is_frontal_image(record: Mapping[str, Any]) -> bool:
    return (
        record.get("image_status") == "stored"
        and record.get("modality") == "X-ray"
        and record.get("view") in FRONTAL_VIEWS
    )


def patient_rows(
    records: Sequence[Mapping[str, Any]], outcome: Outcome
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Fold a store listing into one row per patient with a known outcome (see
    :data:`AGGREGATION`).

    Args:
        records: rows of :func:`covidcxr.store.queries.list_records`.
        outcome: the outcome.

    Returns:
        The rows (``patient``, ``event``, ``image_sha256``, the clinical inputs) in
        listing order of their patients, and reason -> patients left out.
    """
    by_patient: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_patient[f"{record['source']}:{record['patient_id']}"].append(record)
    rows: list[dict[str, Any]] = []
    excluded: dict[str, int] = defaultdict(int)
    for patient, items in by_patient.items():
        known = [r[outcome.field] for r in items if r.get(outcome.field) is not None]
        if not known:
            continue
        ordered = sorted(items, key=_time_order)
        frontal = [r for r in ordered if _is_frontal_image(r)]
        if not frontal:
            excluded["no stored frontal X-ray"] += 1
            continue
        row: dict[str, Any] = {
            "patient": patient,
            "event": int(outcome.event_value in known),
            "image_sha256": frontal[0]["image_sha256"],
        }
        for name in CLINICAL_FEATURES:
            column = "sex" if name == "sex_male" else name
            value = next((r[column] for r in ordered if r.get(column) is not None), None)
            row[name] = (value == "M") if name == "sex_male" and value is not None else value
        rows.append(row)
    return rows, dict(excluded)


#: Scores images: sha256s in, per sha256 the image inputs (``NaN`` when the image
#: failed the input check) out.
ImageScorer = Callable[[Sequence[str]], Mapping[str, Mapping[str, float]]]


def build_cohort(
    records: Sequence[Mapping[str, Any]],
    outcome: Outcome,
    score_images: ImageScorer,
    seen_patients: frozenset[str] = frozenset(),
) -> Cohort:
    """The cohort of one outcome: patient rows joined with their image inputs.

    Args:
        records: rows of :func:`covidcxr.store.queries.list_records`.
        outcome: the outcome.
        score_images: gives the image inputs of each image (see :class:`ImageScorer`).
        seen_patients: ``source:patient_id`` keys the image model trained on.

    Raises:
        MetadataError: no patient has the outcome and a stored frontal X-ray.
    """
    rows, excluded = patient_rows(records, outcome)
    if not rows:
        raise MetadataError(
            f"prognosis: no patient has a known {outcome.field!r} and a stored frontal "
            "X-ray; ingest a source with outcomes (e.g. metadata-latest.csv)"
        )
    images = tuple(row["image_sha256"] for row in rows)
    scores = score_images(images)
    names = sorted({name for per_image in scores.values() for name in per_image})
    values: dict[str, Array] = {
        name: np.array([math.nan if row[name] is None else float(row[name]) for row in rows])
        for name in CLINICAL_FEATURES
    }
    for name in names:
        values[name] = np.array([scores.get(sha, {}).get(name, math.nan) for sha in images])
    patients = tuple(row["patient"] for row in rows)
    first_with_image: dict[str, str] = {}
    return Cohort(
        outcome=outcome,
        patients=patients,
        groups=tuple(
            first_with_image.setdefault(s, p) for s, p in zip(images, patients, strict=True)
        ),
        events=np.array([row["event"] for row in rows], dtype=np.int64),
        values=values,
        images=images,
        image_seen=np.array([p in seen_patients for p in patients], dtype=np.bool_),
        excluded=excluded,
    )


# ---------------------------------------------------------------- image inputs


def image_inputs(row: PredictionRow) -> dict[str, float]:
    """The image inputs of one :class:`~covidcxr.models.runtime.PredictionRow`: the
    predicted severity and finding probabilities (``NaN`` when the image failed the
    input check)."""
    values = {
        name: math.nan if score is None else float(score.mean)
        for name, score in row.severity.items()
    }
    for label, probability in row.probabilities.items():
        values[finding_feature(label)] = math.nan if probability is None else float(probability)
    return values


def cached_scorer(
    score: ImageScorer, cache_file: Path, blob_path: Callable[[str], Path]
) -> ImageScorer:
    """Wrap a scorer with a CSV cache keyed by image sha256 (only new images are scored).

    Args:
        score: scores image files: takes paths as strings, returns inputs by path.
        cache_file: the CSV (created with its folder; one file per image model).
        blob_path: where the image with a sha256 lives.
    """

    def scorer(shas: Sequence[str]) -> Mapping[str, Mapping[str, float]]:
        cached = _read_cache(cache_file)
        todo = sorted(set(shas) - set(cached))
        if todo:
            log.info("prognosis: scoring %d images with the image model", len(todo))
            by_path = score([str(blob_path(sha)) for sha in todo])
            for sha in todo:
                cached[sha] = dict(by_path[str(blob_path(sha))])
            _write_cache(cache_file, cached)
        return {sha: cached[sha] for sha in shas}

    return scorer


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        return {
            row.pop("image_sha256"): {k: float(v) if v else math.nan for k, v in row.items()}
            for row in csv.DictReader(handle)
        }


def _write_cache(path: Path, scores: Mapping[str, Mapping[str, float]]) -> None:
    names = sorted({name for values in scores.values() for name in values})
    with atomic_output(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_sha256", *names])
        for sha, values in sorted(scores.items()):
            cells = [values.get(n, math.nan) for n in names]
            writer.writerow([sha, *("" if math.isnan(v) else repr(v) for v in cells)])
