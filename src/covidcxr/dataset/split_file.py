"""A split and its file: the Split record, and writing, reading and hashing split files."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from covidcxr import __version__
from covidcxr.atomic import atomic_output
from covidcxr.dataset.samples import SampleSet, Selection
from covidcxr.errors import MetadataError

Scheme = Literal["kfold", "holdout", "source", "region"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
FORMAT = "covidcxr-split/1"
HEADER = ("patient", "fold")

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
