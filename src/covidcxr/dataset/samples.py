"""From the store to ML samples: a selection, a task, and a count of everything left out.

:func:`build_samples` reads the records once, applies the selection and the task, and
returns a :class:`SampleSet`: plain, picklable samples (no database handle) that the
torch Dataset, the splits and the exports share. Nothing is dropped silently: every
record left out is counted under its reason (image missing, CT in an X-ray task,
lateral view in a frontal task, no label for the task, ...).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from covidcxr.dataset.tasks import LabelCounts, Labels, Task
from covidcxr.errors import MetadataError
from covidcxr.schema.findings import is_under, resolve_node
from covidcxr.schema.values import FRONTAL_VIEWS, parse_modality, parse_view
from covidcxr.store import queries
from covidcxr.store.db import Store

IMAGE_MISSING = "image missing"
IMAGE_REJECTED = "image rejected (undecodable or unsafe)"
MODALITY_NOT_SELECTED = "modality not selected (e.g. CT in an X-ray task)"
VIEW_NOT_SELECTED = "view not selected (e.g. lateral or unknown view in a frontal task)"
FINDING_NOT_SELECTED = "finding not selected"
SOURCE_NOT_SELECTED = "source not selected"
SEVERITY_NOT_SELECTED = "no severity scores (has_severity selected)"
SAME_IMAGE = "same image as an earlier record (identical bytes)"

# Preferred lung mask annotators, best first (V7's are hand-drawn; lungVAE's predicted).
MASK_PREFERENCE = ("v7labs", "lungVAE")


@dataclass(frozen=True)
class Selection:
    """Which records a study uses.

    Attributes:
        views: view names, ``frontal`` (PA, AP, AP Supine, AP Erect) or ``any``.
        modalities: ``X-ray``, ``CT`` or ``any``.
        findings: keep records with a finding under one of these nodes (empty: all).
        sources: source names (empty: all).
        has_severity: keep only records whose image has severity scores.
        one_per_image: keep the first record of an image referenced by several rows.
    """

    views: tuple[str, ...] = ("frontal",)
    modalities: tuple[str, ...] = ("X-ray",)
    findings: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    has_severity: bool = False
    one_per_image: bool = True

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in split files)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        """Inverse of :meth:`as_dict`.

        Raises:
            MetadataError: unknown keys.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise MetadataError(f"Selection: unknown key(s) {sorted(unknown)}")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**values)

    def allowed_views(self) -> set[str] | None:
        """The normalised views to keep, None for any."""
        views: set[str] = set()
        for view in self.views:
            if view.lower() == "any":
                return None
            if view.lower() == "frontal":
                views |= FRONTAL_VIEWS
                continue
            parsed, problem = parse_view(view)
            if parsed is None:
                raise MetadataError(
                    f"Selection: view {view!r}: {problem.message if problem else ''}"
                )
            views.add(parsed)
        return views

    def allowed_modalities(self) -> set[str] | None:
        """The normalised modalities to keep, None for any."""
        modalities: set[str] = set()
        for modality in self.modalities:
            if modality.lower() == "any":
                return None
            parsed, problem = parse_modality(modality)
            if parsed is None:
                raise MetadataError(
                    f"Selection: modality {modality!r}: {problem.message if problem else ''}"
                )
            modalities.add(parsed)
        return modalities


@dataclass(frozen=True)
class Sample:
    """One image with its labels, ready to load (no database needed).

    Attributes:
        record_id: the record in the store.
        image_sha256: the image (also its blob file name).
        patient: ``source:patient_id``, the unit of splitting.
        source: the source name.
        labels: the task's label vector (NaN = unknown).
        severity: (geographic extent 0-8, opacity 0-6) when scored.
        mask_sha256: the preferred lung mask's blob, when there is one.
        metadata: view, modality, sex, age, offset, finding, location, license, doi.
    """

    record_id: int
    image_sha256: str
    patient: str
    source: str
    labels: Labels
    severity: tuple[float, float] | None = None
    mask_sha256: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


METADATA_KEYS = (
    "view",
    "modality",
    "sex",
    "age_years",
    "offset_days",
    "finding",
    "location",
    "license",
    "doi",
    "filename",
)


@dataclass
class SampleSet:
    """The samples of a task and selection, with what was left out and why."""

    task: Task
    selection: Selection
    samples: list[Sample]
    excluded: Counter[str]
    blob_root: Path

    @property
    def label_names(self) -> tuple[str, ...]:
        """The label names, in the order of each sample's label vector."""
        return self.task.labels

    @property
    def patients(self) -> list[str]:
        """The distinct patients, in first-seen order."""
        return list(dict.fromkeys(s.patient for s in self.samples))

    def image_path(self, sample: Sample) -> Path:
        """Where the sample's image bytes are."""
        return self.blob_root / sample.image_sha256[:2] / sample.image_sha256

    def mask_path(self, sample: Sample) -> Path | None:
        """Where the sample's lung mask is, if any."""
        if sample.mask_sha256 is None:
            return None
        return self.blob_root / sample.mask_sha256[:2] / sample.mask_sha256

    def summary(self) -> dict[str, Any]:
        """Counts: samples, patients, labels, and every exclusion reason."""
        counts = LabelCounts.of(self.task.labels, [s.labels for s in self.samples])
        labels: dict[str, Any]
        if self.task.kind == "regression":
            labels = {
                name: _describe([s.labels[i] for s in self.samples])
                for i, name in enumerate(self.task.labels)
            }
        else:
            labels = {
                name: {
                    "positive": counts.positive[i],
                    "negative": counts.negative[i],
                    "unknown": counts.unknown[i],
                }
                for i, name in enumerate(self.task.labels)
            }
        return {
            "task": self.task.name,
            "selection": self.selection.as_dict(),
            "samples": len(self.samples),
            "patients": len(self.patients),
            "sources": dict(Counter(s.source for s in self.samples)),
            "labels": labels,
            "excluded": dict(self.excluded.most_common()),
        }

    def summary_text(self) -> str:
        """The summary as a short readable text."""
        return json.dumps(self.summary(), indent=2)


def _describe(values: Sequence[float]) -> dict[str, float | int]:
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return {"n": 0}
    mean = sum(known) / len(known)
    return {"n": len(known), "mean": round(mean, 3), "min": min(known), "max": max(known)}


def _severity(annotations: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    scores = [a for a in annotations if a["kind"] == "severity"]
    if not scores:
        return None
    return {
        key: sum(float(a[key]) for a in scores) / len(scores)
        for key in ("geographic_mean", "opacity_mean")
    }


def _mask(annotations: Sequence[Mapping[str, Any]]) -> str | None:
    masks = {a["annotator"]: a["mask_sha256"] for a in annotations if a["kind"] == "lung_mask"}
    for annotator in MASK_PREFERENCE:
        if annotator in masks:
            return str(masks[annotator])
    return str(next(iter(sorted(masks.items())))[1]) if masks else None


def _records_with_annotations(
    conn: Connection,
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every record with its image's annotations, in listing order, read a page at a
    time: memory holds one page of full rows, not every column of every record."""
    for page in queries.iter_records(conn):
        annotations = queries.annotations_for(
            conn, {r["image_sha256"] for r in page if r["image_sha256"]}
        )
        for row in page:
            sha = row["image_sha256"]
            yield row, annotations.get(sha, []) if sha else []


def build_samples(store: Store, task: Task, selection: Selection | None = None) -> SampleSet:
    """Select records, label them for ``task``, and count what was left out.

    Records come in source/line order; the order of the samples is therefore
    the same on every machine.

    Raises:
        MetadataError: a selection value is not valid.
    """
    selection = selection or Selection()
    views = selection.allowed_views()
    modalities = selection.allowed_modalities()
    finding_nodes = [resolve_node(f) for f in selection.findings]
    excluded: Counter[str] = Counter()
    samples: list[Sample] = []
    seen_images: set[str] = set()
    with store.read() as conn:
        for row, found in _records_with_annotations(conn):
            sha = row["image_sha256"]
            severity = _severity(found)
            if selection.sources and row["source"] not in selection.sources:
                reason: str | None = SOURCE_NOT_SELECTED
            elif row["image_status"] == "missing":
                reason = IMAGE_MISSING
            elif row["image_status"] != "stored" or sha is None:
                reason = IMAGE_REJECTED
            elif modalities is not None and row["modality"] not in modalities:
                reason = MODALITY_NOT_SELECTED
            elif views is not None and row["view"] not in views:
                reason = VIEW_NOT_SELECTED
            elif finding_nodes and not any(
                is_under(f, n) for f in row["findings"] for n in finding_nodes
            ):
                reason = FINDING_NOT_SELECTED
            elif selection.has_severity and severity is None:
                reason = SEVERITY_NOT_SELECTED
            elif selection.one_per_image and sha in seen_images:
                reason = SAME_IMAGE
            else:
                labels, reason = task.label_record({**row, "severity": severity})
                if labels is not None and sha is not None:
                    seen_images.add(sha)
                    samples.append(
                        Sample(
                            record_id=row["record_id"],
                            image_sha256=sha,
                            patient=f"{row['source']}:{row['patient_id']}",
                            source=row["source"],
                            labels=labels,
                            severity=(severity["geographic_mean"], severity["opacity_mean"])
                            if severity
                            else None,
                            mask_sha256=_mask(found),
                            metadata={k: row[k] for k in METADATA_KEYS},
                        )
                    )
            if reason is not None:
                excluded[reason] += 1
    return SampleSet(task, selection, samples, excluded, store.blobs.root)
