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

import csv
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import warnings
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
from sqlalchemy import Connection

from covidcxr import __version__
from covidcxr.atomic import atomic_output
from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.tasks import task_of
from covidcxr.errors import MetadataError
from covidcxr.store.db import Store
from covidcxr.store.duplicates import DuplicateGroup, duplicate_groups

log = logging.getLogger(__name__)

Scheme = Literal["kfold", "holdout", "source", "region"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
HOLDOUT_FOLDS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
REGRESSION_BINS = 4
FORMAT = "covidcxr-split/1"
HEADER = ("patient", "fold")
UNKNOWN_REGION = "unknown"

# Reasons a patient is left out of a split (counted in Split.excluded).
SPANS_SOURCES = "duplicate images link it to patients of another source"
SPANS_REGIONS = "its records or its duplicate group span several regions"

# The comment keys of a split file, in the order they are written; all are required.
FILE_KEYS = (
    "format",
    "covidcxr_version",
    "created",
    "scheme",
    "folds",
    "seed",
    "fractions",
    "task",
    "selection",
    "duplicate_max_distance",
    "excluded",
    "membership_sha256",
    "content_sha256",
)

# --- regions -----------------------------------------------------------------------

_US_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "district of columbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi",
    "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "new hampshire": "nh", "new jersey": "nj",
    "new mexico": "nm", "new york": "ny", "north carolina": "nc", "north dakota": "nd",
    "ohio": "oh", "oklahoma": "ok", "oregon": "or", "pennsylvania": "pa",
    "rhode island": "ri", "south carolina": "sc", "south dakota": "sd", "tennessee": "tn",
    "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va", "washington": "wa",
    "west virginia": "wv", "wisconsin": "wi", "wyoming": "wy",
}  # fmt: skip

# Written forms of one country -> one name. Hong Kong and Macao count as China because
# the collection itself writes "Macao, China" and "..., Hong Kong, China".
_COUNTRY_ALIASES = {
    **{name: "USA" for name in ("us", "u.s.", "u.s.a.", "united states", "america")},
    **{name: "USA" for name in ("united states of america", *_US_STATES)},
    **{code: "USA" for code in _US_STATES.values() if code not in ("in", "or", "me", "ok")},
    **{
        name: "United Kingdom"
        for name in ("uk", "u.k.", "england", "scotland", "wales", "northern ireland")
    },
    "great britain": "United Kingdom",
    "korea": "South Korea",
    "republic of korea": "South Korea",
    "hong kong": "China",
    "macao": "China",
    "macau": "China",
}
_UNKNOWN_TEXTS = {"", "unknown", "n/a", "na", "none", "-"}


def region_of(location: str | None) -> str:
    """The region (country) of a ``location`` value, for leave-one-region-out.

    Rule: the last comma-separated part, with whitespace collapsed and a trailing
    ``.`` removed ("Wuhan, China" -> "China", "Barcelona, Spain " -> "Spain"). Names
    of one country are merged: "USA", "US", "United States" and the US states and
    their postal codes -> "USA" ("Seattle, Washington" -> "USA"); "UK", "England",
    "Scotland", "Wales" -> "United Kingdom"; "Korea" -> "South Korea"; "Hong Kong"
    and "Macao" -> "China" (as the collection writes them). Blank, ``?`` and
    "unknown" -> :data:`UNKNOWN_REGION`. Anything else is kept as written.
    """
    if location is None:
        return UNKNOWN_REGION
    last = " ".join(location.split(",")[-1].split()).rstrip(".").strip()
    lowered = last.lower()
    if lowered in _UNKNOWN_TEXTS or not lowered.strip("?"):
        return UNKNOWN_REGION
    return _COUNTRY_ALIASES.get(lowered, last)


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


# --- the split ---------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class SplitMismatchWarning(UserWarning):
    """A sample set was built with another task or selection than the split it uses."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass(frozen=True)
class Split:
    """Patients assigned to folds, with everything needed to rebuild and check them.

    Attributes:
        scheme: ``kfold``, ``holdout``, ``source`` or ``region``.
        folds: the fold names, in order.
        seed: the seed of the generator that broke ties (unused by source/region).
        task: the task as data (:meth:`Task.as_dict`).
        selection: the selection as data (:meth:`Selection.as_dict`).
        assignment: patient -> fold, sorted by patient.
        excluded: reason -> patients left out of every fold (sorted).
        membership_sha256: hash of every (patient, fold, images of the patient).
        fractions: the holdout fractions (None for other schemes).
        duplicate_max_distance: the near-duplicate threshold used (None: default).
        covidcxr_version: the version that made the split.
        created: when it was made (ISO 8601, UTC); not part of any hash.
    """

    scheme: Scheme
    folds: tuple[str, ...]
    seed: int | None
    task: Mapping[str, Any]
    selection: Mapping[str, Any]
    assignment: Mapping[str, str]
    excluded: Mapping[str, tuple[str, ...]]
    membership_sha256: str
    fractions: tuple[float, ...] | None = None
    duplicate_max_distance: int | None = None
    covidcxr_version: str = __version__
    created: str = field(default_factory=_now)

    @property
    def excluded_counts(self) -> dict[str, int]:
        """How many patients were left out, by reason."""
        return {reason: len(patients) for reason, patients in self.excluded.items()}

    def fold_of(self, patient: str) -> str:
        """The fold of a patient.

        Raises:
            MetadataError: the patient was left out (the message says why) or is unknown.
        """
        fold = self.assignment.get(patient)
        if fold is not None:
            return fold
        for reason, patients in self.excluded.items():
            if patient in patients:
                raise MetadataError(f"Split.fold_of: {patient!r} is in no fold: {reason}")
        raise MetadataError(
            f"Split.fold_of: {patient!r} is not in this split; "
            "verify the split against the store (covidcxr split --verify FILE)"
        )

    def patients_in(self, folds: str | Iterable[str]) -> list[str]:
        """The patients of some folds, sorted."""
        wanted = self._fold_set(folds)
        return [p for p, f in self.assignment.items() if f in wanted]

    def indices(self, sample_set: SampleSet, folds: str | Iterable[str]) -> list[int]:
        """Indices of the samples in ``folds``, in sample order.

        Raises:
            MetadataError: a fold name is unknown, or the sample set holds a patient
                this split does not know (it was made from another store or selection).
        """
        wanted = self._fold_set(folds)
        left_out = {p for patients in self.excluded.values() for p in patients}
        result = []
        for index, sample in enumerate(sample_set.samples):
            fold = self.assignment.get(sample.patient)
            if fold is None:
                if sample.patient in left_out:
                    continue
                raise MetadataError(
                    f"Split.indices: patient {sample.patient!r} of the sample set is not in "
                    "this split; it was made from another store or selection "
                    "(covidcxr split --verify FILE tells what changed)"
                )
            if fold in wanted:
                result.append(index)
        self._warn_on_mismatch(sample_set)
        return result

    def _warn_on_mismatch(self, sample_set: SampleSet) -> None:
        """Warn, with counts, when the samples were built otherwise than the split."""
        ours = _canonical(sample_set.selection.as_dict()), sample_set.task.name
        theirs = _canonical(self.selection), self.task.get("name")
        if ours == theirs:
            return
        present = {s.patient for s in sample_set.samples}
        missing = sum(1 for p in self.assignment if p not in present)
        changed = {
            key: (sample_set.selection.as_dict().get(key), value)
            for key, value in self.selection.items()
            if _canonical(sample_set.selection.as_dict().get(key)) != _canonical(value)
        }
        detail = "; ".join(f"{k} {a!r} here, {b!r} in the split" for k, (a, b) in changed.items())
        if ours[1] != theirs[1]:
            detail = f"task {ours[1]!r} here, {theirs[1]!r} in the split; " + detail
        warnings.warn(
            SplitMismatchWarning(
                f"Split.indices: these {len(sample_set.samples)} samples were not built "
                f"as the split was ({detail.rstrip('; ')}): {missing} of the split's "
                f"{len(self.assignment)} patients have no sample here, so each fold is "
                "smaller than the split says; build the samples with the split's selection "
                "(Selection.from_dict(split.selection))"
            ),
            stacklevel=3,
        )

    def cross_validation(self) -> list[tuple[tuple[str, ...], str]]:
        """(training folds, test fold) for each fold: k-fold or leave-one-out.

        Raises:
            MetadataError: the split is a holdout split (use its train/val/test folds).
        """
        if self.scheme == "holdout":
            raise MetadataError(
                "Split.cross_validation: a holdout split has no rounds; "
                "use indices(samples, 'train') / 'val' / 'test'"
            )
        return [(tuple(f for f in self.folds if f != test), test) for test in self.folds]

    def fold_table(self, sample_set: SampleSet) -> list[dict[str, Any]]:
        """Per fold: patients, samples, and positives per label (mean per target for
        regression), for printing."""
        labels = sample_set.task.labels
        regression = sample_set.task.kind == "regression"
        rows: list[dict[str, Any]] = []
        for fold in self.folds:
            members = [sample_set.samples[i] for i in self.indices(sample_set, fold)]
            row: dict[str, Any] = {
                "fold": fold,
                "patients": len(self.patients_in(fold)),
                "samples": len(members),
            }
            for position, name in enumerate(labels):
                values = [s.labels[position] for s in members if not math.isnan(s.labels[position])]
                if regression:
                    row[f"mean {name}"] = round(sum(values) / len(values), 3) if values else None
                else:
                    row[f"positive {name}"] = sum(1 for v in values if v >= 0.5)
            rows.append(row)
        return rows

    def header(self) -> dict[str, Any]:
        """The comment values of the file, in order (content_sha256 included)."""
        values = self._hashed_header()
        values["content_sha256"] = _content_sha256(values, self.assignment)
        return values

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the split file atomically (a crash leaves the old file or the new one).

        Raises:
            OSError: the file cannot be written.
        """
        target = Path(path)
        lines = [f"# {key}: {_json(value)}\n" for key, value in self.header().items()]
        with (
            atomic_output(target) as temporary,
            temporary.open("w", encoding="utf-8", newline="") as handle,
        ):
            handle.writelines(lines)
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(HEADER)
            writer.writerows(sorted(self.assignment.items()))
        return target

    def _hashed_header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "covidcxr_version": self.covidcxr_version,
            "created": self.created,
            "scheme": self.scheme,
            "folds": list(self.folds),
            "seed": self.seed,
            "fractions": list(self.fractions) if self.fractions is not None else None,
            "task": dict(self.task),
            "selection": dict(self.selection),
            "duplicate_max_distance": self.duplicate_max_distance,
            "excluded": {reason: list(p) for reason, p in sorted(self.excluded.items())},
            "membership_sha256": self.membership_sha256,
        }

    def _fold_set(self, folds: str | Iterable[str]) -> set[str]:
        wanted = {folds} if isinstance(folds, str) else set(folds)
        unknown = sorted(wanted - set(self.folds))
        if unknown:
            raise MetadataError(
                f"Split: unknown fold(s) {unknown}; this split has {list(self.folds)}"
            )
        return wanted


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _content_sha256(header: Mapping[str, Any], assignment: Mapping[str, str]) -> str:
    """sha256 of the header values (but created) and the rows, in canonical text."""
    digest = hashlib.sha256()
    for key in FILE_KEYS:
        if key not in ("created", "content_sha256"):
            digest.update(f"{key}\t{_json(header[key])}\n".encode())
    for patient, fold in sorted(assignment.items()):
        digest.update(f"{patient}\t{fold}\n".encode())
    return digest.hexdigest()


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


# --- reading split files -----------------------------------------------------------

_COMMENT = re.compile(r"# ([a-z0-9_]+): (.*)")


class _SplitFileError:
    """Makes the errors of one split file: ``split file FILE:LINE: reason``."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def __call__(self, line: int | None, reason: str) -> MetadataError:
        where = f"{self.source}:{line}" if line is not None else str(self.source)
        return MetadataError(f"split file {where}: {reason}")


@dataclass
class _SplitFile:
    """A split file as read, before its values are checked."""

    values: dict[str, Any] = field(default_factory=dict)
    key_lines: dict[str, int] = field(default_factory=dict)
    assignment: dict[str, str] = field(default_factory=dict)
    row_lines: dict[str, int] = field(default_factory=dict)


def load_split(path: str | os.PathLike[str]) -> Split:
    """Read a split file, refusing anything that is not exactly what :meth:`Split.save`
    writes.

    Raises:
        MetadataError: naming the file, the line and the reason: an unreadable file,
            an unknown or repeated comment key, a bad value, a bad header, a duplicate
            patient, a fold not declared, or a content hash that does not match (the
            file was edited).
    """
    source = Path(path)
    fail = _SplitFileError(source)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise fail(None, f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise fail(None, f"cannot read: {exc.strerror or exc}") from None
    parsed = _parse_split_file(text, fail)
    _check_split_values(parsed, fail)
    _check_split_rows(parsed, fail)
    values = parsed.values
    fractions = values["fractions"]
    return Split(
        scheme=cast(Scheme, values["scheme"]),
        folds=tuple(values["folds"]),
        seed=values["seed"],
        task=values["task"],
        selection=values["selection"],
        assignment=dict(sorted(parsed.assignment.items())),
        excluded={reason: tuple(p) for reason, p in sorted(values["excluded"].items())},
        membership_sha256=values["membership_sha256"],
        fractions=tuple(float(f) for f in fractions) if fractions is not None else None,
        duplicate_max_distance=values["duplicate_max_distance"],
        covidcxr_version=values["covidcxr_version"],
        created=values["created"],
    )


def _parse_split_file(text: str, fail: _SplitFileError) -> _SplitFile:
    """The comment keys (JSON values) and ``patient,fold`` rows, with their lines."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    parsed = _SplitFile()
    header_seen = False
    for number, line in enumerate(lines, start=1):
        if not header_seen and line.startswith("#"):
            _parse_comment(parsed, number, line, fail)
        elif not header_seen:
            if line != ",".join(HEADER):
                raise fail(number, f"header {line[:60]!r}, expected {','.join(HEADER)!r}")
            header_seen = True
        else:
            _parse_row(parsed, number, line, fail)
    if not header_seen:
        raise fail(None, f"no {','.join(HEADER)!r} header line; is this a split file?")
    missing = [key for key in FILE_KEYS if key not in parsed.values]
    if missing:
        raise fail(None, f"missing comment key(s) {', '.join(missing)}")
    return parsed


def _parse_comment(parsed: _SplitFile, number: int, line: str, fail: _SplitFileError) -> None:
    match = _COMMENT.fullmatch(line)
    if match is None:
        raise fail(number, f"comment line {line[:60]!r} is not '# key: value'")
    key, raw = match.groups()
    if key not in FILE_KEYS:
        raise fail(number, f"unknown key {key!r}; a split file has {', '.join(FILE_KEYS)}")
    if key in parsed.values:
        raise fail(number, f"key {key!r} given twice (first on line {parsed.key_lines[key]})")
    try:
        parsed.values[key] = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise fail(number, f"value of {key!r} is not JSON: {exc.msg}") from None
    parsed.key_lines[key] = number


def _parse_row(parsed: _SplitFile, number: int, line: str, fail: _SplitFileError) -> None:
    cells = next(csv.reader([line]), [])
    if len(cells) != 2 or not cells[0] or not cells[1]:
        raise fail(number, f"row {line[:60]!r} is not 'patient,fold'")
    patient, fold = cells
    if patient in parsed.assignment:
        first = parsed.row_lines[patient]
        raise fail(number, f"patient {patient!r} again (first on line {first})")
    parsed.assignment[patient] = fold
    parsed.row_lines[patient] = number


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Each comment key's check: (accepts the JSON value, what was expected).
_VALUE_CHECKS: dict[str, tuple[Any, str]] = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "covidcxr_version": (lambda v: isinstance(v, str), "a string"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "scheme": (lambda v: v in SCHEMES, f"one of {', '.join(SCHEMES)}"),
    "folds": (
        lambda v: (
            isinstance(v, list)
            and len(v) >= 2
            and all(isinstance(f, str) and f for f in v)
            and len(set(v)) == len(v)
        ),
        "a list of two or more distinct fold names",
    ),
    "seed": (lambda v: v is None or _is_int(v), "int"),
    "fractions": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(f, int | float) for f in v)),
        "null or a list of numbers",
    ),
    "task": (
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("name"), str)
            and isinstance(v.get("labels"), list)
        ),
        "a task object with name and labels",
    ),
    "selection": (lambda v: isinstance(v, dict), "a selection object"),
    "duplicate_max_distance": (lambda v: v is None or isinstance(v, int), "null or int"),
    "excluded": (
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(p, list) and all(isinstance(x, str) for x in p) for p in v.values())
        ),
        "an object: reason -> list of patients",
    ),
    "membership_sha256": (
        lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
        "64 hex digits",
    ),
}
_VALUE_CHECKS["content_sha256"] = _VALUE_CHECKS["membership_sha256"]


def _check_split_values(parsed: _SplitFile, fail: _SplitFileError) -> None:
    values, key_lines = parsed.values, parsed.key_lines
    for key in FILE_KEYS:
        accepts, expected = _VALUE_CHECKS[key]
        if not accepts(values[key]):
            raise fail(key_lines[key], f"{key} is {_json(values[key])[:80]}, expected {expected}")
        if key == "selection":
            try:
                Selection.from_dict(values["selection"])
            except (MetadataError, TypeError) as exc:
                raise fail(key_lines["selection"], f"bad selection: {exc}") from None


def _check_split_rows(parsed: _SplitFile, fail: _SplitFileError) -> None:
    folds = parsed.values["folds"]
    declared = set(folds)
    for patient, fold in parsed.assignment.items():
        if fold not in declared:
            raise fail(
                parsed.row_lines[patient], f"fold {fold!r} of {patient!r} is not one of {folds}"
            )
    for patients in parsed.values["excluded"].values():
        for patient in patients:
            if patient in parsed.assignment:
                raise fail(
                    parsed.row_lines[patient], f"patient {patient!r} is both in a fold and excluded"
                )
    if _content_sha256(parsed.values, parsed.assignment) != parsed.values["content_sha256"]:
        raise fail(
            parsed.key_lines["content_sha256"],
            "content_sha256 does not match the file's values and rows: it was edited "
            "after it was written; make the split again (covidcxr split) instead of editing it",
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
