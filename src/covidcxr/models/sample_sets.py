"""The sample sets training reads from a store: findings, input-gate and severity images,
and which side of a split each gate-only image and held-out patient falls on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.splits import linked_patients
from covidcxr.dataset.tasks import Labels, Task, get_task
from covidcxr.models.bundle import GATE_CLASSES
from covidcxr.models.config import DEFAULT_SOURCES
from covidcxr.schema.values import FRONTAL_VIEWS
from covidcxr.store.db import Store
from covidcxr.store.duplicates import duplicate_groups

FINDINGS_TASK: Final = "second-opinion"
SEVERITY_TASK: Final = "severity"

FRONTAL, LATERAL, CT, INVERTED, NOT_MEDICAL = range(5)
assert GATE_CLASSES[FRONTAL] == "frontal_xray" and GATE_CLASSES[NOT_MEDICAL] == "not_medical"
assert GATE_CLASSES[LATERAL] == "lateral_xray" and GATE_CLASSES[CT] == "ct"
assert GATE_CLASSES[INVERTED] == "inverted"

#: Share of the patients outside the findings split whose gate images validate.
GATE_VAL_SHARE: Final = 0.15
GATE_UNKNOWN_VIEW = "view unknown (no input-gate class)"


def gate_class_of(view: str | None, modality: str | None) -> int | None:
    """The gate class of a stored image from its view and modality (None: unknown)."""
    if modality == "CT":
        return CT
    if modality != "X-ray" or view is None:
        return None
    if view in FRONTAL_VIEWS:
        return FRONTAL
    if view == "L":
        return LATERAL
    return None


def _gate_labels(record: Mapping[str, Any]) -> tuple[Labels | None, str | None]:
    gate_class = gate_class_of(record.get("view"), record.get("modality"))
    if gate_class is None:
        return None, GATE_UNKNOWN_VIEW
    return tuple(1.0 if i == gate_class else 0.0 for i in range(len(GATE_CLASSES))), None


#: Every stored image with a known gate class, labelled one-hot over GATE_CLASSES.
GATE_TASK: Final = Task(
    "input-gate",
    "multilabel",
    GATE_CLASSES,
    "input gate: frontal X-ray, lateral X-ray, CT (inverted and not-medical are drawn)",
    _gate_labels,
)


def gate_samples(store: Store) -> SampleSet:
    """Every stored image of every source with a gate class (frontal, lateral, CT)."""
    return build_samples(
        store, GATE_TASK, Selection(views=("any",), modalities=("any",), one_per_image=True)
    )


def findings_samples(store: Store, sources: Sequence[str] = DEFAULT_SOURCES) -> SampleSet:
    """The findings head's samples: frontal X-rays of ``sources``, second-opinion labels."""
    return build_samples(store, get_task(FINDINGS_TASK), Selection(sources=tuple(sources)))


def severity_samples(store: Store) -> SampleSet:
    """The expert-scored frontal X-rays (severity task)."""
    return build_samples(store, get_task(SEVERITY_TASK), Selection(has_severity=True))


@dataclass(frozen=True)
class GateSamples:
    """Gate-only images and their folds (images already in the findings set are not
    repeated here: they come with their findings labels).

    Attributes:
        samples: from :func:`gate_samples`.
        train_indices: positions used for training.
        val_indices: positions used for validation.
    """

    samples: SampleSet
    train_indices: tuple[int, ...]
    val_indices: tuple[int, ...]


def _stable_fraction(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_gate_samples(
    store: Store,
    gate: SampleSet,
    findings: SampleSet,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    *,
    exclude_patients: Iterable[str] = (),
    seed: int = 0,
) -> GateSamples:
    """Put gate-only images on the same side as their patients' findings images.

    Patients are joined into groups by duplicate pictures (as splits do). A group with
    a patient whose findings images are held out (a test fold, another CV fold, or
    ``exclude_patients``) gives nothing; a group with validation patients validates; a
    group with training patients trains; a group unknown to the findings set (lateral-
    or CT-only patients, other sources) validates with probability
    :data:`GATE_VAL_SHARE` (a hash of the group and ``seed``, so the same on every run).
    Images that are also in the findings set are left out (they come from there).
    """
    train_patients = {findings.samples[i].patient for i in train_indices}
    val_patients = {findings.samples[i].patient for i in val_indices}
    findings_patients = set(findings.patients)
    held = (findings_patients - train_patients - val_patients) | set(exclude_patients)
    with store.read() as conn:
        groups = linked_patients(set(gate.patients) | findings_patients, duplicate_groups(conn))
    role: dict[str, str] = {}
    for group in groups:
        members = set(group)
        if members & held:
            side = "held"
        elif members & val_patients:
            side = "val"
        elif members & train_patients:
            side = "train"
        else:
            side = "val" if _stable_fraction(group[0], seed) < GATE_VAL_SHARE else "train"
        role.update(dict.fromkeys(group, side))
    findings_images = {s.image_sha256 for s in findings.samples}
    sides = [
        "held" if s.image_sha256 in findings_images else role.get(s.patient, "held")
        for s in gate.samples
    ]
    return GateSamples(
        gate,
        tuple(i for i, side in enumerate(sides) if side == "train"),
        tuple(i for i, side in enumerate(sides) if side == "val"),
    )


def linked_exclusions(store: Store, patients: Iterable[str], universe: Iterable[str]) -> set[str]:
    """``patients`` and every patient of ``universe`` linked to one by a duplicate
    picture (so a held-out image cannot come back under another patient's name)."""
    wanted = set(patients)
    if not wanted:
        return set()
    with store.read() as conn:
        groups = linked_patients(set(universe) | wanted, duplicate_groups(conn))
    result = set(wanted)
    for group in groups:
        if wanted & set(group):
            result |= set(group)
    return result


@dataclass(frozen=True)
class SeverityData:
    """The scored images for the severity head.

    Attributes:
        samples: from :func:`severity_samples`.
        indices: positions to fit on.
        groups: per position in ``indices``, the patient group (duplicate-linked
            patients share one), for grouped cross-validation.
        out_of_sample: whether the backbone never trained on these images (then the
            reference protocol is run and the interval is honest).
    """

    samples: SampleSet
    indices: tuple[int, ...]
    groups: tuple[str, ...]
    out_of_sample: bool

    def without(self, patients: set[str]) -> SeverityData:
        """The same data less the images of ``patients``."""
        keep = [
            k for k, i in enumerate(self.indices) if self.samples.samples[i].patient not in patients
        ]
        return SeverityData(
            self.samples,
            tuple(self.indices[k] for k in keep),
            tuple(self.groups[k] for k in keep),
            self.out_of_sample,
        )


def severity_data(store: Store, samples: SampleSet, *, out_of_sample: bool) -> SeverityData:
    """All scored images with their duplicate-aware patient groups."""
    with store.read() as conn:
        groups = linked_patients(samples.patients, duplicate_groups(conn))
    group_of = {patient: group[0] for group in groups for patient in group}
    indices = tuple(range(len(samples.samples)))
    return SeverityData(
        samples,
        indices,
        tuple(group_of[samples.samples[i].patient] for i in indices),
        out_of_sample,
    )
