"""Patient-grouped splits that cannot leak, kept as files that can be verified.

A split assigns every *patient* (``source:patient_id``) of a :class:`SampleSet` to one
fold. Patients are not independent units: when the same picture (exact copy or near
duplicate, see :func:`covidcxr.store.duplicates.duplicate_groups`) is filed under two
patients, they may be one person, so they are joined into one *group* (union-find over
the duplicate groups of the whole store, not only of the selection) and a group always
lands in one fold.

Schemes:

* ``kfold``: folds ``"0"`` .. ``"k-1"``, stratified;
* ``holdout``: folds ``train``, ``val``, ``test`` in the given fractions, stratified;
* ``source``: leave-one-source-out, the fold is the source's name;
* ``region``: leave-one-region-out, the fold is the country from ``location``
  (see :func:`region_of`).

Stratification (kfold, holdout) is greedy: groups, largest first (ties in the order of
a permutation drawn from ``np.random.default_rng(seed)``), each go to the fold where
they bring the per-label positive counts and the sample counts closest to the fold's
target share; equal choices are drawn from the same generator. Binary and multi-label
tasks stratify on positives per label (unknowns ignored), regression tasks on the
quartile of the first target. Costs are exact fractions, so the same seed gives the
same split on any machine.

For ``source`` and ``region`` a group that spans two folds cannot be placed: its
patients are left out and listed under the reason (never dropped silently). A group
with known and unknown locations counts as the known region.

A split file is CSV with ``# key: value`` comment lines (values in JSON) and one
``patient,fold`` row per patient, sorted by patient. ``membership_sha256`` hashes every
patient, its fold and its images (checked against the store by :func:`verify_split`);
``content_sha256`` hashes everything in the file but the ``created`` line (checked by
:func:`load_split`, so a hand-edited file is refused).
"""

from __future__ import annotations

import hashlib
import logging
import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from sqlalchemy import Connection

from covidcxr.dataset.regions import UNKNOWN_REGION, region_of
from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.split_file import SCHEMES, Scheme, Split, load_split
from covidcxr.dataset.tasks import task_of
from covidcxr.errors import MetadataError
from covidcxr.store.db import Store
from covidcxr.store.duplicates import DuplicateGroup, duplicate_groups

__all__ = [
    "DEFAULT_FRACTIONS",
    "HOLDOUT_FOLDS",
    "REGRESSION_BINS",
    "SPANS_REGIONS",
    "SPANS_SOURCES",
    "Split",
    "SplitProblem",
    "linked_patients",
    "load_split",
    "make_split",
    "membership_sha256",
    "verify_split",
]

log = logging.getLogger(__name__)

HOLDOUT_FOLDS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
REGRESSION_BINS = 4

# Reasons a patient is left out of a split (counted in Split.excluded).
SPANS_SOURCES = "duplicate images link it to patients of another source"
SPANS_REGIONS = "its records or its duplicate group span several regions"

# --- patient groups ----------------------------------------------------------------


def linked_patients(
    patients: Iterable[str], groups: Sequence[DuplicateGroup]
) -> list[tuple[str, ...]]:
    """Join patients that share a picture (transitively) into groups.

    Args:
        patients: the patients to split (``source:patient_id``).
        groups: duplicate groups of the whole store; patients outside ``patients``
            still link the ones inside (A ~ B ~ C puts A and C together).

    Returns:
        One sorted tuple per group, restricted to ``patients``, sorted by first patient.
    """
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def join(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            # The smaller name becomes the root: the result does not depend on order.
            parent[max(ra, rb)] = min(ra, rb)

    wanted = sorted(set(patients))
    for patient in wanted:
        root(patient)
    for group in groups:
        members = group.patients
        for other in members[1:]:
            join(members[0], other)
    components: dict[str, list[str]] = defaultdict(list)
    for patient in wanted:
        components[root(patient)].append(patient)
    return sorted((tuple(members) for members in components.values()), key=lambda m: m[0])


# --- membership --------------------------------------------------------------------


def membership_sha256(assignment: Mapping[str, str], images: Mapping[str, Iterable[str]]) -> str:
    """sha256 over ``patient<TAB>fold<TAB>sorted image sha256s`` lines, by patient.

    Args:
        assignment: patient -> fold.
        images: patient -> the image sha256s of its samples (missing: none).
    """
    digest = hashlib.sha256()
    for patient, fold in sorted(assignment.items()):
        shas = " ".join(sorted(set(images.get(patient, ()))))
        digest.update(f"{patient}\t{fold}\t{shas}\n".encode())
    return digest.hexdigest()


def _images_by_patient(sample_set: SampleSet) -> dict[str, set[str]]:
    images: dict[str, set[str]] = defaultdict(set)
    for sample in sample_set.samples:
        images[sample.patient].add(sample.image_sha256)
    return images


# --- making splits -----------------------------------------------------------------


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(HOLDOUT_FOLDS):
        raise MetadataError(
            f"make_split: fractions {list(values)}: give three, for train, val and test"
        )
    if any(not (0.0 <= v <= 1.0) for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise MetadataError(f"make_split: fractions {list(values)} must lie in [0, 1] and sum to 1")
    if values[0] == 0.0 or values[2] == 0.0:
        raise MetadataError(f"make_split: fractions {list(values)}: train and test need a share")
    return values


def _strata(sample_set: SampleSet) -> list[tuple[int, ...]]:
    """Per sample, its contribution to each stratum (positives per label, or the bin
    of the first regression target)."""
    task = sample_set.task
    if task.kind == "regression":
        known = sorted(s.labels[0] for s in sample_set.samples if not math.isnan(s.labels[0]))
        bins = min(REGRESSION_BINS, len(set(known))) or 1
        edges = sorted({known[len(known) * i // bins] for i in range(1, bins)}) if known else []
        strata = []
        for sample in sample_set.samples:
            vector = [0] * (len(edges) + 1)
            if not math.isnan(sample.labels[0]):
                vector[bisect_right(edges, sample.labels[0])] = 1
            strata.append(tuple(vector))
        return strata
    return [
        tuple(0 if math.isnan(value) or value < 0.5 else 1 for value in sample.labels)
        for sample in sample_set.samples
    ]


def _assign_stratified(
    sizes: Sequence[int],
    vectors: Sequence[Sequence[int]],
    targets: Sequence[Fraction],
    rng: np.random.Generator,
) -> list[int]:
    """Greedy: largest group first, to the fold whose counts it brings closest to
    the target shares (squared deviation, each stratum normalised by its total)."""
    n_folds = len(targets)
    n_strata = len(vectors[0]) if vectors else 0
    stratum_totals = [sum(v[s] for v in vectors) for s in range(n_strata)]
    total = sum(sizes)
    fold_sizes = [0] * n_folds
    fold_counts = [[0] * n_strata for _ in range(n_folds)]
    order = [int(i) for i in rng.permutation(len(sizes))]
    order.sort(key=lambda i: -sizes[i])  # stable: equal sizes keep the seeded order
    result = [0] * len(sizes)
    for group in order:
        size, vector = sizes[group], vectors[group]
        costs = []
        for fold in range(n_folds):
            target = targets[fold]
            cost = (
                Fraction(size * (2 * fold_sizes[fold] + size), total**2)
                - Fraction(2 * size, total) * target
            )
            for s in range(n_strata):
                if vector[s]:
                    cost += (
                        Fraction(
                            vector[s] * (2 * fold_counts[fold][s] + vector[s]),
                            stratum_totals[s] ** 2,
                        )
                        - Fraction(2 * vector[s], stratum_totals[s]) * target
                    )
            costs.append(cost)
        best = min(costs)
        ties = [fold for fold, cost in enumerate(costs) if cost == best]
        chosen = ties[int(rng.integers(len(ties)))] if len(ties) > 1 else ties[0]
        result[group] = chosen
        fold_sizes[chosen] += size
        for s in range(n_strata):
            fold_counts[chosen][s] += vector[s]
    return result


def _group_keys(
    scheme: str, sample_set: SampleSet, groups: Sequence[tuple[str, ...]]
) -> tuple[dict[tuple[str, ...], str], dict[str, list[str]]]:
    """For source/region: each placeable group's fold, and the patients left out."""
    keys_of_patient: dict[str, set[str]] = defaultdict(set)
    for sample in sample_set.samples:
        if scheme == "source":
            keys_of_patient[sample.patient].add(sample.source)
        else:
            keys_of_patient[sample.patient].add(region_of(sample.metadata.get("location")))
    placed: dict[tuple[str, ...], str] = {}
    excluded: dict[str, list[str]] = defaultdict(list)
    for group in groups:
        keys = set().union(*(keys_of_patient[p] for p in group))
        if scheme == "region" and len(keys) > 1:
            keys.discard(UNKNOWN_REGION)  # an unknown location does not contradict a known one
        if len(keys) == 1:
            placed[group] = next(iter(keys))
        else:
            excluded[SPANS_SOURCES if scheme == "source" else SPANS_REGIONS].extend(group)
    return placed, {reason: sorted(p) for reason, p in excluded.items()}


def _fold_names(keys: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(keys), key=lambda k: (k == UNKNOWN_REGION, k)))


def make_split(
    sample_set: SampleSet,
    conn: Connection,
    *,
    scheme: Scheme = "kfold",
    folds: int = 5,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    duplicate_max_distance: int | None = None,
) -> Split:
    """Split the patients of a sample set; duplicate-linked patients stay together.

    Args:
        sample_set: the samples (from :func:`build_samples`).
        conn: a connection to the store they came from (for its duplicate groups).
        scheme: ``kfold``, ``holdout``, ``source`` or ``region``.
        folds: the number of folds for ``kfold``.
        seed: seeds ``np.random.default_rng`` for the tie-breaking order.
        fractions: train, val, test shares of the samples for ``holdout`` (k-fold
            folds also aim at equal numbers of samples, not of patients).
        duplicate_max_distance: near-duplicate threshold (bits of 128; None: the
            default of :func:`duplicate_groups`).

    Raises:
        MetadataError: an unknown scheme, bad fractions or fold count, no samples,
            fewer groups than folds, or a single source/region for leave-one-out.
    """
    if scheme not in SCHEMES:
        raise MetadataError(f"make_split: unknown scheme {scheme!r}; use one of {SCHEMES}")
    if not sample_set.samples:
        raise MetadataError(
            f"make_split: the selection has no samples for task {sample_set.task.name!r}; "
            "widen the selection (covidcxr split prints what was excluded)"
        )
    groups = linked_patients(
        sample_set.patients, duplicate_groups(conn, max_distance=duplicate_max_distance)
    )
    assignment: dict[str, str] = {}
    excluded: dict[str, list[str]] = {}
    kept_fractions: tuple[float, ...] | None = None
    if scheme in ("kfold", "holdout"):
        if scheme == "kfold":
            if folds < 2:
                raise MetadataError(f"make_split: folds={folds}; k-fold needs at least 2")
            names = tuple(str(i) for i in range(folds))
            targets = [Fraction(1, folds)] * folds
        else:
            kept_fractions = _check_fractions(fractions)
            names = HOLDOUT_FOLDS
            targets = [Fraction(f) for f in kept_fractions]
            targets = [t / sum(targets) for t in targets]
        if len(groups) < len(names):
            raise MetadataError(
                f"make_split: {len(groups)} patient group(s) cannot fill {len(names)} folds"
            )
        strata = _strata(sample_set)
        of_patient: dict[str, list[int]] = defaultdict(list)
        for index, sample in enumerate(sample_set.samples):
            of_patient[sample.patient].append(index)
        members = [[i for p in group for i in of_patient[p]] for group in groups]
        sizes = [len(m) for m in members]
        vectors = [[sum(strata[i][s] for i in m) for s in range(len(strata[0]))] for m in members]
        chosen = _assign_stratified(sizes, vectors, targets, np.random.default_rng(seed))
        for group, fold in zip(groups, chosen, strict=True):
            for patient in group:
                assignment[patient] = names[fold]
    else:
        placed, excluded = _group_keys(scheme, sample_set, groups)
        names = _fold_names(placed.values())
        if len(names) < 2:
            raise MetadataError(
                f"make_split: leave-one-{scheme}-out needs at least two {scheme}s; "
                f"the selection has {list(names)}"
            )
        for group, key in placed.items():
            for patient in group:
                assignment[patient] = key
        for reason, patients in excluded.items():
            log.warning("make_split: %d patient(s) left out: %s", len(patients), reason)
    assignment = dict(sorted(assignment.items()))
    return Split(
        scheme=scheme,
        folds=names,
        seed=seed,
        task=sample_set.task.as_dict(),
        selection=sample_set.selection.as_dict(),
        assignment=assignment,
        excluded={reason: tuple(p) for reason, p in sorted(excluded.items())},
        membership_sha256=membership_sha256(assignment, _images_by_patient(sample_set)),
        fractions=kept_fractions,
        duplicate_max_distance=duplicate_max_distance,
    )


# --- verifying ---------------------------------------------------------------------


@dataclass(frozen=True)
class SplitProblem:
    """One reason a split no longer holds.

    Attributes:
        code: ``task_changed``, ``not_selected``, ``missing``, ``leak``, ``wrong_fold``,
            ``cannot_place`` or ``membership_changed``.
        message: what is wrong, for people.
        patients: the patients concerned (sorted).
    """

    code: str
    message: str
    patients: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def _listing(patients: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(patients[:limit])
    return shown + (f" and {len(patients) - limit} more" if len(patients) > limit else "")


def verify_split(store: Store, split: Split) -> list[SplitProblem]:
    """Check a split against the store as it is now.

    Rebuilds the samples from the recorded task and selection and the duplicate groups
    from the whole store, then reports: patients no longer selected or newly selected
    (``not_selected``, ``missing``), patients linked by duplicate pictures that sit in
    different folds (``leak``), a source/region fold that no longer matches the patient
    (``wrong_fold``) or a patient that can no longer be placed (``cannot_place``),
    images changed under the same patients (``membership_changed``), and a built-in
    task whose labels changed (``task_changed``).

    Returns:
        The problems; an empty list means the split is verified.

    Raises:
        MetadataError: the recorded task or selection cannot be rebuilt.
    """
    problems: list[SplitProblem] = []
    task = task_of(split.task)
    recorded = (split.task.get("kind"), list(split.task.get("labels", [])))
    if (task.kind, list(task.labels)) != recorded:
        problems.append(
            SplitProblem(
                "task_changed",
                f"task {task.name!r} now has {task.kind} labels {list(task.labels)}, "
                f"the split recorded {recorded[0]} labels {recorded[1]}",
            )
        )
    sample_set = build_samples(store, task, Selection.from_dict(split.selection))
    with store.read() as conn:
        groups = linked_patients(
            sample_set.patients,
            duplicate_groups(conn, max_distance=split.duplicate_max_distance),
        )
    selected = set(sample_set.patients)
    in_file = set(split.assignment)
    expected_excluded: dict[str, str] = {}
    placed: dict[tuple[str, ...], str] = {}
    if split.scheme in ("source", "region"):
        placed, excluded = _group_keys(split.scheme, sample_set, groups)
        expected_excluded = {p: reason for reason, ps in excluded.items() for p in ps}

    gone = sorted(in_file - selected)
    if gone:
        problems.append(
            SplitProblem(
                "not_selected",
                f"{len(gone)} patient(s) of the file are no longer selected "
                f"(removed from the store or without usable samples): {_listing(gone)}",
                tuple(gone),
            )
        )
    new = sorted(selected - in_file - set(expected_excluded))
    if new:
        problems.append(
            SplitProblem(
                "missing",
                f"{len(new)} selected patient(s) are in no fold of the file: {_listing(new)}",
                tuple(new),
            )
        )
    for group in groups:
        folds = {p: split.assignment[p] for p in group if p in split.assignment}
        if len(set(folds.values())) > 1:
            where = ", ".join(f"{p} in fold {f}" for p, f in folds.items())
            problems.append(
                SplitProblem(
                    "leak",
                    f"patients linked by duplicate pictures sit in different folds: {where}",
                    tuple(folds),
                )
            )
    if split.scheme in ("source", "region"):
        for group, key in placed.items():
            wrong = [p for p in group if split.assignment.get(p, key) != key]
            if wrong:
                problems.append(
                    SplitProblem(
                        "wrong_fold",
                        f"the {split.scheme} of {_listing(wrong)} is now {key!r}, the file "
                        f"puts them in {sorted({split.assignment[p] for p in wrong})}",
                        tuple(wrong),
                    )
                )
        stuck = sorted(p for p in expected_excluded if p in in_file)
        if stuck:
            problems.append(
                SplitProblem(
                    "cannot_place",
                    f"{_listing(stuck)} cannot be in a leave-one-{split.scheme}-out fold: "
                    f"{expected_excluded[stuck[0]]}",
                    tuple(stuck),
                )
            )
    now = membership_sha256(split.assignment, _images_by_patient(sample_set))
    if now != split.membership_sha256:
        cause = (
            "the patients above changed"
            if gone or new
            else "the same patients, but their images or folds differ from those recorded"
        )
        problems.append(
            SplitProblem(
                "membership_changed",
                f"membership_sha256 is now {now[:16]}…, the file recorded "
                f"{split.membership_sha256[:16]}…: {cause}",
            )
        )
    return problems
