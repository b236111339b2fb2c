"""Tasks as data: which labels a study learns, and how each record is labelled.

A task turns one record (a row of :func:`covidcxr.store.queries.list_records`, plus
its severity scores) into a float32 label vector, or says why the record has no
label for it. ``NaN`` in a vector means *unknown*: it is masked in the loss and never
counted as a negative.

Finding labels come from the parsed hierarchy tokens with
:func:`covidcxr.schema.findings.is_under`, never from substring matching. A finding
less specific than a label (``Pneumonia`` for the label ``Pneumonia/Viral``) makes
that label unknown, not negative: the record says "pneumonia", not "not viral".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from covidcxr.errors import MetadataError
from covidcxr.schema.findings import get_node, is_under, resolve_node
from covidcxr.serialise import to_dict

TaskKind = Literal["multilabel", "binary", "regression"]
Labels = tuple[float, ...]
UNKNOWN = math.nan

# Exclusion reasons a task can give (the dataset summary counts them).
NO_FINDING_ASSIGNED = "finding not assigned (todo, Unknown, blank or invalid)"
TOO_UNSPECIFIC = "finding too unspecific for this task"
NEITHER_CLASS = "finding in neither class of this task"
BOTH_CLASSES = "finding in both classes of this task"
NO_SEVERITY = "no severity scores"
NO_OUTCOME = "no outcome known"


@dataclass(frozen=True)
class Task:
    """A learning task: its label names (in order) and how to label a record.

    Attributes:
        name: the task's name (``covidcxr split --task NAME``).
        kind: ``multilabel``, ``binary`` or ``regression``.
        labels: the output names, in the order of the label vector.
        description: one line for help texts and model cards.
        label_record: record dict -> (labels, None) or (None, exclusion reason).
        ranges: for regression, each output's (minimum, maximum).
    """

    name: str
    kind: TaskKind
    labels: tuple[str, ...]
    description: str
    label_record: Callable[[Mapping[str, Any]], tuple[Labels | None, str | None]]
    ranges: tuple[tuple[float, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The task as data (stored with splits, datasets and models)."""
        return {k: v for k, v in to_dict(self).items() if k != "label_record"}


def _assigned(record: Mapping[str, Any]) -> bool:
    return record.get("finding_status") == "ok" and bool(record.get("findings"))


def _finding_label(findings: Sequence[str], node: str) -> float:
    """1 if a finding is ``node`` or below it; unknown if a finding is above it; else 0."""
    if any(is_under(f, node) for f in findings):
        return 1.0
    if any(node != f and is_under(node, f) for f in findings):
        return UNKNOWN
    return 0.0


@dataclass(frozen=True)
class LabelDefinition:
    """A finding label as data: positive under ``include``, except under ``exclude``.

    ``Other viral pneumonia`` is ``include=("Pneumonia/Viral",),
    exclude=("Pneumonia/Viral/COVID-19",)``.
    """

    name: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    def value(self, findings: Sequence[str]) -> float:
        """1, 0, or unknown when a finding is too unspecific to tell."""
        values = []
        for finding in findings:
            if any(is_under(finding, node) for node in self.include):
                if any(is_under(finding, node) for node in self.exclude):
                    values.append(0.0)
                elif any(node != finding and is_under(node, finding) for node in self.exclude):
                    values.append(UNKNOWN)  # "Pneumonia/Viral": COVID-19 or another virus?
                else:
                    values.append(1.0)
            elif any(node != finding and is_under(node, finding) for node in self.include):
                values.append(UNKNOWN)  # "Pneumonia" for a viral label
            else:
                values.append(0.0)
        return _max(values)


@dataclass(frozen=True)
class GroupsSpec:
    """Multi-label findings over label definitions."""

    definitions: tuple[LabelDefinition, ...]

    def __call__(self, record: Mapping[str, Any]) -> tuple[Labels | None, str | None]:
        if not _assigned(record):
            return None, NO_FINDING_ASSIGNED
        return tuple(d.value(record["findings"]) for d in self.definitions), None


@dataclass(frozen=True)
class FindingsSpec:
    """Multi-label findings: one label per vocabulary node."""

    nodes: tuple[str, ...]

    def __call__(self, record: Mapping[str, Any]) -> tuple[Labels | None, str | None]:
        if not _assigned(record):
            return None, NO_FINDING_ASSIGNED
        return tuple(_finding_label(record["findings"], n) for n in self.nodes), None


@dataclass(frozen=True)
class BinarySpec:
    """Positive if a finding is under a positive node, negative if under a negative one."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]

    def __call__(self, record: Mapping[str, Any]) -> tuple[Labels | None, str | None]:
        if not _assigned(record):
            return None, NO_FINDING_ASSIGNED
        findings = record["findings"]
        positive = _max(_finding_label(findings, n) for n in self.positive)
        negative = _max(_finding_label(findings, n) for n in self.negative)
        if positive == 1.0:
            # The negative node may contain the positive one ("any other pneumonia"
            # vs COVID-19): only findings outside the positive nodes can conflict.
            others = [f for f in findings if not any(is_under(f, p) for p in self.positive)]
            if any(is_under(f, n) for f in others for n in self.negative):
                return None, BOTH_CLASSES
            return (1.0,), None
        if negative == 1.0 and positive == 0.0:
            return (0.0,), None
        if math.isnan(positive) or math.isnan(negative):
            return None, TOO_UNSPECIFIC
        return None, NEITHER_CLASS


def _max(values: Any) -> float:
    """Max where 1 beats unknown beats 0."""
    result = 0.0
    for value in values:
        if value == 1.0:
            return 1.0
        if math.isnan(value):
            result = UNKNOWN
    return result


@dataclass(frozen=True)
class SeveritySpec:
    """Severity scores (mean of the experts) as regression targets."""

    keys: tuple[str, ...] = ("geographic_mean", "opacity_mean")

    def __call__(self, record: Mapping[str, Any]) -> tuple[Labels | None, str | None]:
        severity = record.get("severity")
        if not severity:
            return None, NO_SEVERITY
        return tuple(float(severity[k]) for k in self.keys), None


@dataclass(frozen=True)
class OutcomeSpec:
    """Outcome flags; unknown stays unknown."""

    fields: tuple[str, ...] = ("survival", "went_icu", "intubated", "needed_supplemental_o2")

    def __call__(self, record: Mapping[str, Any]) -> tuple[Labels | None, str | None]:
        values = tuple(
            UNKNOWN if record.get(f) is None else float(bool(record[f])) for f in self.fields
        )
        if all(math.isnan(v) for v in values):
            return None, NO_OUTCOME
        return values, None


FINDING_NODES: tuple[str, ...] = (
    "Pneumonia",
    "Pneumonia/Viral",
    "Pneumonia/Viral/COVID-19",
    "Pneumonia/Viral/SARS",
    "Pneumonia/Viral/MERS-CoV",
    "Pneumonia/Bacterial",
    "Pneumonia/Fungal",
    "Pneumonia/Lipoid",
    "Tuberculosis",
    "ARDS",
    "No Finding",
)


# The labels of the second-opinion model: what the collection supports.
SECOND_OPINION_LABELS: tuple[LabelDefinition, ...] = (
    LabelDefinition("COVID-19", ("Pneumonia/Viral/COVID-19",)),
    LabelDefinition("Other viral pneumonia", ("Pneumonia/Viral",), ("Pneumonia/Viral/COVID-19",)),
    LabelDefinition("Bacterial pneumonia", ("Pneumonia/Bacterial",)),
    LabelDefinition("Fungal pneumonia", ("Pneumonia/Fungal",)),
    LabelDefinition("No finding", ("No Finding",)),
)


def _build_tasks() -> dict[str, Task]:
    for node in FINDING_NODES + tuple(
        n for d in SECOND_OPINION_LABELS for n in d.include + d.exclude
    ):
        get_node(node)  # the vocabulary must know every node (fails at import otherwise)
    outcomes = OutcomeSpec()
    tasks = [
        Task(
            "findings",
            "multilabel",
            FINDING_NODES,
            "findings from the hierarchy (unknown where the finding is less specific)",
            FindingsSpec(FINDING_NODES),
        ),
        Task(
            "covid-vs-other-pneumonia",
            "binary",
            ("Pneumonia/Viral/COVID-19",),
            "COVID-19 (1) vs any other pneumonia (0)",
            BinarySpec(("Pneumonia/Viral/COVID-19",), ("Pneumonia",)),
        ),
        Task(
            "viral-vs-bacterial",
            "binary",
            ("Pneumonia/Viral",),
            "viral (1) vs bacterial (0) pneumonia",
            BinarySpec(("Pneumonia/Viral",), ("Pneumonia/Bacterial",)),
        ),
        Task(
            "second-opinion",
            "multilabel",
            tuple(d.name for d in SECOND_OPINION_LABELS),
            "COVID-19, other viral, bacterial, fungal pneumonia, no finding "
            "(unknown where the finding is less specific)",
            GroupsSpec(SECOND_OPINION_LABELS),
        ),
        Task(
            "severity",
            "regression",
            ("geographic_extent", "opacity"),
            "pneumonia severity: geographic extent 0-8, opacity 0-6 (mean of 3 experts)",
            SeveritySpec(),
            ranges=((0.0, 8.0), (0.0, 6.0)),
        ),
        Task(
            "outcomes",
            "multilabel",
            outcomes.fields,
            "survival, ICU, intubation, supplemental O2 (unknown kept unknown)",
            outcomes,
        ),
    ]
    return {task.name: task for task in tasks}


TASKS: Mapping[str, Task] = _build_tasks()


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        MetadataError: no such task (the message lists them).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise MetadataError(
            f"get_task: unknown task {name!r}; choose one of {', '.join(TASKS)}"
        ) from None


def findings_task(nodes: Sequence[str], name: str = "findings-custom") -> Task:
    """A multi-label findings task over chosen nodes (any level of the hierarchy).

    Raises:
        MetadataError: a node is not in the vocabulary.
    """
    resolved = tuple(resolve_node(n) for n in nodes)
    return Task(
        name, "multilabel", resolved, "findings: " + ", ".join(resolved), FindingsSpec(resolved)
    )


def task_of(data: Mapping[str, Any]) -> Task:
    """The task a split (or model) recorded: a built-in task by name, or a custom
    findings task rebuilt from its labels.

    Raises:
        MetadataError: the task is neither.
    """
    name = str(data.get("name"))
    if name in TASKS:
        return get_task(name)
    if data.get("kind") == "multilabel" and isinstance(data.get("labels"), list):
        return findings_task([str(label) for label in data["labels"]], name=name)
    raise MetadataError(
        f"task_of: task {name!r} is not a built-in task ({', '.join(TASKS)}) "
        "nor a custom findings task"
    )


@dataclass
class LabelCounts:
    """Positive, negative and unknown counts per label (for summaries and strata)."""

    names: tuple[str, ...]
    positive: list[int] = field(default_factory=list)
    negative: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, names: tuple[str, ...], vectors: Sequence[Labels]) -> LabelCounts:
        """Count label values over many records."""
        counts = cls(names, [0] * len(names), [0] * len(names), [0] * len(names))
        for vector in vectors:
            for i, value in enumerate(vector):
                if math.isnan(value):
                    counts.unknown[i] += 1
                elif value >= 0.5:
                    counts.positive[i] += 1
                else:
                    counts.negative[i] += 1
        return counts
