"""From the store to ML samples: a selection, a task, and a count of everything left out.

:func:`build_samples` reads only the selected records, labels them for the task, and
returns a :class:`SampleSet`: plain, picklable samples (no database handle) that the
torch Dataset, the splits and the exports share. Nothing is dropped silently: every
record left out is counted under its reason (image missing, CT in an X-ray task,
lateral view in a frontal task, no label for the task, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from covidcxr.dataset.tasks import LabelCounts, Labels, Task
from covidcxr.errors import MetadataError
from covidcxr.serialise import from_dict, to_dict
from covidcxr.store import queries
from covidcxr.store.blobs import blob_path
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
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        """Inverse of :meth:`as_dict`.

        Raises:
            MetadataError: unknown keys.
        """
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise MetadataError(f"Selection: unknown key(s) {sorted(unknown)}")
        return from_dict(cls, data)

    def steps(self) -> list[tuple[str, queries.RecordFilter]]:
        """The selection as store filters, each with the reason a record failing it is
        left out, in the order they apply (a record is counted under the first)."""
        views = () if _any(self.views) else tuple(self.views)
        modalities = () if _any(self.modalities) else tuple(self.modalities)
        steps = [
            (SOURCE_NOT_SELECTED, queries.RecordFilter(sources=self.sources)),
            (IMAGE_MISSING, queries.RecordFilter(image_status=("stored", "rejected"))),
            (IMAGE_REJECTED, queries.RecordFilter(image_status=("stored",))),
            (MODALITY_NOT_SELECTED, queries.RecordFilter(modalities=modalities)),
            (VIEW_NOT_SELECTED, queries.RecordFilter(views=views)),
            (FINDING_NOT_SELECTED, queries.RecordFilter(findings=self.findings)),
            (SEVERITY_NOT_SELECTED, queries.RecordFilter(has_severity=self.has_severity or None)),
        ]
        return [(reason, step) for reason, step in steps if step != queries.RecordFilter()]

    def record_filter(self) -> queries.RecordFilter:
        """The store filter of the records this selection keeps (all steps at once)."""
        unset = queries.RecordFilter()
        merged = unset
        for _, step in self.steps():
            changed = {
                f.name: getattr(step, f.name)
                for f in dataclasses.fields(step)
                if getattr(step, f.name) != getattr(unset, f.name)
            }
            merged = dataclasses.replace(merged, **changed)
        return merged


def _any(values: Sequence[str]) -> bool:
    return any(v.strip().lower() == "any" for v in values)


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
        mask_annotator: who made that mask (``v7labs``, ``lungVAE``, ...), when there is
            one: V7 Labs' masks are drawn by people, lungVAE's by a segmentation model,
            and the two draw the lung behind the heart differently.
        metadata: view, modality, sex, age, offset, finding, location, license, doi.
    """

    record_id: int
    image_sha256: str
    patient: str
    source: str
    labels: Labels
    severity: tuple[float, float] | None = None
    mask_sha256: str | None = None
    mask_annotator: str | None = None
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

    def __len__(self) -> int:
        """The number of samples."""
        return len(self.samples)

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
        return blob_path(self.blob_root, sample.image_sha256)

    def mask_path(self, sample: Sample) -> Path | None:
        """Where the sample's lung mask is, if any."""
        if sample.mask_sha256 is None:
            return None
        return blob_path(self.blob_root, sample.mask_sha256)

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


def _mask(annotations: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """The preferred lung mask as ``(annotator, mask sha256)``, or None."""
    masks = {a["annotator"]: a["mask_sha256"] for a in annotations if a["kind"] == "lung_mask"}
    for annotator in (*MASK_PREFERENCE, *sorted(masks)):
        if annotator in masks:
            return str(annotator), str(masks[annotator])
    return None


def _records_with_annotations(
    conn: Connection, selection: queries.RecordFilter
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The selected records with their image's annotations, in listing order, read a
    page at a time: memory holds one page of full rows, not every record."""
    for page in queries.iter_records(conn, selection):
        annotations = queries.annotations_for(
            conn, {r["image_sha256"] for r in page if r["image_sha256"]}
        )
        for row in page:
            sha = row["image_sha256"]
            yield row, annotations.get(sha, []) if sha else []


def build_samples(store: Store, task: Task, selection: Selection | None = None) -> SampleSet:
    """Select records, label them for ``task``, and count what was left out.

    The store reads only the selected records (the exclusions of the selection are
    counted in the database); records come in source/line order, so the order of the
    samples is the same on every machine.

    Raises:
        MetadataError: a selection value is not valid.
    """
    selection = selection or Selection()
    samples: list[Sample] = []
    seen_images: set[str] = set()
    with store.read() as conn:
        excluded = queries.count_exclusions(conn, selection.steps())
        for row, found in _records_with_annotations(conn, selection.record_filter()):
            sha = row["image_sha256"]
            severity = _severity(found)
            if selection.one_per_image and sha in seen_images:
                excluded[SAME_IMAGE] += 1
                continue
            labels, reason = task.label_record({**row, "severity": severity})
            if labels is None or sha is None:
                excluded.update([reason] if reason is not None else [])
                continue
            seen_images.add(sha)
            samples.append(_sample(row, sha, labels, severity, found))
    return SampleSet(task, selection, samples, excluded, store.blobs.root)


def _sample(
    row: Mapping[str, Any],
    sha: str,
    labels: Labels,
    severity: Mapping[str, float] | None,
    annotations: Sequence[Mapping[str, Any]],
) -> Sample:
    annotator, mask = _mask(annotations) or (None, None)
    return Sample(
        record_id=row["record_id"],
        image_sha256=sha,
        patient=f"{row['source']}:{row['patient_id']}",
        source=row["source"],
        labels=labels,
        severity=(severity["geographic_mean"], severity["opacity_mean"]) if severity else None,
        mask_sha256=mask,
        mask_annotator=annotator,
        metadata={k: row[k] for k in METADATA_KEYS},
    )
