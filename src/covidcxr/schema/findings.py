"""The finding vocabulary (a hierarchy) and the one parser for every way findings are written.

Findings are a hierarchy, not a string. The collection has written them three ways:

* flat, comma-separated (the June 2020 ``metadata.csv``): ``COVID-19``,
  ``COVID-19, ARDS``, ``Streptococcus``, ``Mycoplasma Bacterial Pneumonia``;
* hierarchical paths (the newer ``metadata.csv``): ``Pneumonia/Viral/COVID-19``,
  ``Pneumonia/Bacterial/Staphylococcus/MRSA``;
* ``|``-separated label lists (NIH ChestX-ray14): ``Effusion|Pneumonia``.

:func:`parse_finding` turns any of these into explicit :class:`Finding` tokens, each a
canonical path in the vocabulary below. Labels for ML tasks come from those paths
(:func:`is_under`, :func:`pathogen`), never from substring matching.

Vocabulary decisions:

* ``todo`` means upstream has not assigned the finding yet: status ``"pending"``.
* ``Unknown`` means the curators looked and the diagnosis is not known: status
  ``"unknown"``. The two differ: a pending row may get a finding in a later release,
  an unknown one is a decision (upstream changed one COVID-19 row to ``Unknown``).
* A blank value: status ``"missing"``.
* ``No Finding`` is a real finding (a normal image) and cannot be combined with others.
* Tuberculosis stays top-level, where upstream files it, although it is a
  mycobacterial infection: its pathogen group is ``"bacterial"``, but it is not under
  ``Pneumonia/Bacterial``.
* With ``separator=None`` a value is split on both ``,`` (legacy flat lists) and ``|``
  (NIH); no name or alias in the vocabulary contains either.
* A token naming both a finding and one of its ancestors (``Pneumonia, COVID-19``)
  keeps only the most specific one; the ancestor is implied by the hierarchy.

This module is pure: no I/O, no database.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from covidcxr.errors import MappingError, MetadataError
from covidcxr.schema.values import Severity

__all__ = [
    "Finding",
    "FindingNode",
    "FindingProblem",
    "FindingStatus",
    "ParsedFinding",
    "Pathogen",
    "all_nodes",
    "ancestors",
    "check_value_map",
    "children",
    "format_finding",
    "get_node",
    "is_under",
    "parse_finding",
    "pathogen",
    "resolve_node",
]

Pathogen = Literal["viral", "bacterial", "fungal"]
FindingStatus = Literal["ok", "missing", "pending", "unknown", "invalid"]

PATH_SEPARATOR: Final = "/"

# The vocabulary: (canonical path, aliases, pathogen group), in canonical order. The
# order is the label order of ML tasks: append new nodes, do not reorder. A node's name
# (last path component) is always accepted; aliases are the other spellings seen in
# sources. Matching ignores case and everything except letters and digits, so
# "E.Coli", "E. coli" and "ecoli" are one spelling, as are "Pleural_Thickening" and
# "Pleural Thickening". "Coronavirus" is deliberately not an alias: SARS and MERS are
# coronaviruses too.
_VOCABULARY: Final[tuple[tuple[str, tuple[str, ...], Pathogen | None], ...]] = (
    ("No Finding", ("Normal", "No Findings"), None),
    ("Pneumonia", ("Pneumonias",), None),
    ("Pneumonia/Viral", ("Viral Pneumonia", "Virus"), "viral"),
    (
        "Pneumonia/Viral/COVID-19",
        ("COVID", "SARS-CoV-2", "2019-nCoV", "nCoV", "COVID-19 Pneumonia"),
        "viral",
    ),
    ("Pneumonia/Viral/SARS", ("SARS-CoV", "SARS-CoV-1"), "viral"),
    ("Pneumonia/Viral/MERS-CoV", ("MERS",), "viral"),
    ("Pneumonia/Viral/Influenza", ("Flu",), "viral"),
    ("Pneumonia/Viral/Influenza/H1N1", ("Influenza A H1N1",), "viral"),
    ("Pneumonia/Viral/Varicella", ("Varicella-zoster", "VZV", "Chickenpox"), "viral"),
    ("Pneumonia/Viral/Herpes", ("Herpes simplex", "HSV"), "viral"),
    ("Pneumonia/Bacterial", ("Bacterial Pneumonia",), "bacterial"),
    (
        "Pneumonia/Bacterial/Streptococcus",
        ("Streptococcus pneumoniae", "Pneumococcus"),
        "bacterial",
    ),
    ("Pneumonia/Bacterial/Klebsiella", ("Klebsiella pneumoniae",), "bacterial"),
    (
        "Pneumonia/Bacterial/Mycoplasma",
        ("Mycoplasma Bacterial Pneumonia", "Mycoplasma pneumoniae"),
        "bacterial",
    ),
    ("Pneumonia/Bacterial/Legionella", ("Legionella pneumophila",), "bacterial"),
    ("Pneumonia/Bacterial/E.Coli", ("Escherichia coli",), "bacterial"),
    (
        "Pneumonia/Bacterial/Chlamydophila",
        ("Chlamydophila pneumoniae", "Chlamydia pneumoniae"),
        "bacterial",
    ),
    ("Pneumonia/Bacterial/Nocardia", (), "bacterial"),
    ("Pneumonia/Bacterial/Staphylococcus", ("Staphylococcus aureus",), "bacterial"),
    ("Pneumonia/Bacterial/Staphylococcus/MRSA", (), "bacterial"),
    ("Pneumonia/Fungal", ("Fungal Pneumonia",), "fungal"),
    (
        "Pneumonia/Fungal/Pneumocystis",
        ("Pneumocystis jirovecii", "Pneumocystis pneumonia", "PCP"),
        "fungal",
    ),
    ("Pneumonia/Fungal/Aspergillosis", ("Aspergillus",), "fungal"),
    ("Pneumonia/Lipoid", ("Lipoid Pneumonia",), None),
    ("Pneumonia/Aspiration", ("Aspiration Pneumonia",), None),
    ("ARDS", ("Acute Respiratory Distress Syndrome",), None),
    # Mycobacterial infection, kept top-level as upstream files it (not a pneumonia
    # subtype there); its pathogen group is still bacterial.
    ("Tuberculosis", ("TB",), "bacterial"),
    # Thoracic findings of NIH ChestX-ray14: imaging signs, not diagnoses.
    ("Atelectasis", (), None),
    ("Cardiomegaly", (), None),
    ("Consolidation", (), None),
    ("Edema", ("Pulmonary Edema", "Oedema"), None),
    ("Effusion", ("Pleural Effusion",), None),
    ("Emphysema", (), None),
    ("Fibrosis", (), None),
    ("Hernia", (), None),
    ("Infiltration", ("Infiltrate",), None),
    ("Mass", (), None),
    ("Nodule", (), None),
    ("Pleural Thickening", (), None),
    ("Pneumothorax", (), None),
)

# Values that are statuses, not findings (compared by the same key as names).
_STATUS_MARKERS: Final[dict[str, FindingStatus]] = {"todo": "pending", "unknown": "unknown"}
_STATUS_TEXT: Final[dict[FindingStatus, str]] = {"pending": "todo", "unknown": "Unknown"}

_ACCEPTED: Final = (
    "accepted: a finding name or alias (see covidcxr.schema.findings.all_nodes()), "
    "a path such as 'Pneumonia/Viral/COVID-19', 'todo', 'Unknown' or blank"
)


@dataclass(frozen=True)
class FindingNode:
    """One node of the finding vocabulary.

    Attributes:
        path: canonical path components, e.g. ``("Pneumonia", "Viral", "COVID-19")``.
        aliases: other accepted spellings of the node's name.
        pathogen: ``"viral"``, ``"bacterial"``, ``"fungal"`` or ``None`` (not an
            infection, or the organism group is not known).
        index: position in the canonical order.
    """

    path: tuple[str, ...]
    aliases: tuple[str, ...]
    pathogen: Pathogen | None
    index: int

    @property
    def name(self) -> str:
        """The node's own name (last path component)."""
        return self.path[-1]

    @property
    def path_str(self) -> str:
        """The canonical path as text, e.g. ``"Pneumonia/Viral/COVID-19"``."""
        return PATH_SEPARATOR.join(self.path)


@dataclass(frozen=True)
class Finding:
    """One parsed finding token.

    Attributes:
        path: canonical path components. For an organism not (yet) in the vocabulary
            under a known branch (``Pneumonia/Viral/NewBug``) the unknown components
            are kept as written (stripped) and ``known`` is False.
        raw: the token as written in the source (not part of equality: the flat
            ``Streptococcus`` and ``Pneumonia/Bacterial/Streptococcus`` are equal).
        known: whether the whole path is a vocabulary node.
    """

    path: tuple[str, ...]
    raw: str = field(default="", compare=False)
    known: bool = True

    @property
    def label(self) -> str:
        """The leaf name, e.g. ``"COVID-19"``."""
        return self.path[-1]

    @property
    def path_str(self) -> str:
        """The path as text, e.g. ``"Pneumonia/Viral/COVID-19"``."""
        return PATH_SEPARATOR.join(self.path)


@dataclass(frozen=True)
class FindingProblem:
    """Why (part of) a finding value was not accepted as given.

    Attributes:
        code: ``unknown_finding`` (unknown name, not kept), ``unknown_leaf`` (unknown
            organism under a known node, kept), ``misplaced_finding`` (a known name
            under the wrong parent, not kept), ``malformed_path`` (empty path
            component), ``conflict`` (``No Finding``, ``todo`` or ``Unknown`` combined
            with something else), ``empty_token`` (an empty list element).
        token: the offending token as written.
        message: a sentence naming the value and what is accepted.
        severity: ``error`` makes the parse status ``"invalid"``; ``warning`` does not.
    """

    code: str
    token: str
    message: str
    severity: Severity = Severity.ERROR


@dataclass(frozen=True)
class ParsedFinding:
    """The result of :func:`parse_finding`.

    Attributes:
        findings: the findings, de-duplicated, in canonical vocabulary order.
        status: ``"ok"`` (at least one finding, no error), ``"missing"`` (blank),
            ``"pending"`` (``todo``), ``"unknown"`` (``Unknown``) or ``"invalid"``
            (some error problem; ``findings`` still holds what could be resolved).
        problems: what was not accepted as given.
    """

    findings: tuple[Finding, ...]
    status: FindingStatus
    problems: tuple[FindingProblem, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        """The findings' paths as text."""
        return tuple(finding.path_str for finding in self.findings)

    @property
    def labels(self) -> tuple[str, ...]:
        """The findings' leaf names."""
        return tuple(finding.label for finding in self.findings)


# ---------------------------------------------------------------------------------------
# The vocabulary index, built once from the table.


def _key(text: str) -> str:
    """The matching key of a spelling: case-folded letters and digits only."""
    return "".join(char for char in text.casefold() if char.isalnum())


def _build_index() -> tuple[
    dict[tuple[str, ...], FindingNode],
    dict[str, FindingNode],
    dict[tuple[str, ...], tuple[FindingNode, ...]],
]:
    nodes: dict[tuple[str, ...], FindingNode] = {}
    by_key: dict[str, FindingNode] = {}
    kids: dict[tuple[str, ...], list[FindingNode]] = {(): []}
    for index, (path_text, aliases, group) in enumerate(_VOCABULARY):
        path = tuple(path_text.split(PATH_SEPARATOR))
        node = FindingNode(path, aliases, group, index)
        parent = nodes.get(path[:-1])
        # A broken table is a programming error: fail at import, loudly.
        if path in nodes or (len(path) > 1 and parent is None):
            raise RuntimeError(f"finding vocabulary: {path_text!r} duplicated or orphaned")
        if parent is not None and parent.pathogen not in (None, group):
            raise RuntimeError(f"finding vocabulary: {path_text!r} pathogen differs from parent")
        for spelling in (node.name, *aliases):
            key = _key(spelling)
            if not key or re.search(r"[,|/]", spelling):
                raise RuntimeError(f"finding vocabulary: bad spelling {spelling!r}")
            other = by_key.setdefault(key, node)
            if other is not node or key in _STATUS_MARKERS:
                raise RuntimeError(f"finding vocabulary: {spelling!r} is ambiguous")
        nodes[path] = node
        kids[path] = []
        kids[path[:-1]].append(node)
    return nodes, by_key, {path: tuple(found) for path, found in kids.items()}


_NODES, _BY_KEY, _CHILDREN = _build_index()
_ROOTS: Final = tuple(node.name for node in _CHILDREN[()])
_NO_FINDING: Final = ("No Finding",)


def _child(parent: FindingNode, component: str) -> FindingNode | None:
    key = _key(component)
    for node in _CHILDREN[parent.path]:
        if key in (_key(node.name), *(_key(alias) for alias in node.aliases)):
            return node
    return None


def _suggest(text: str, among: Iterable[FindingNode] | None = None) -> str:
    """' (close matches: ...)' naming up to three vocabulary nodes near ``text``, or ''."""
    candidates = {
        _key(spelling): node
        for node in (_NODES.values() if among is None else among)
        for spelling in (node.name, *node.aliases)
    }
    seen: list[FindingNode] = []
    for match in difflib.get_close_matches(_key(text), list(candidates), n=6, cutoff=0.6):
        if candidates[match] not in seen:
            seen.append(candidates[match])
    if not seen:
        return ""
    names = ", ".join(f"{node.name!r} = {node.path_str!r}" for node in seen[:3])
    return f" (close matches: {names})"


# ---------------------------------------------------------------------------------------
# Resolving one token (a name, alias or path).


@dataclass(frozen=True)
class _Resolved:
    finding: Finding | None
    problem: FindingProblem | None


def _resolve_token(
    token: str, raw: str, where: str, note: str = "", accepted: str = _ACCEPTED
) -> _Resolved:
    """Resolve one stripped, non-empty token (no list separators) to a finding.

    The first path component may be any vocabulary name or alias (so a flat token is a
    one-component path); each further component must be a child of the previous node,
    or, once outside the vocabulary, is kept as written (an unknown organism).
    """
    components = [part.strip() for part in token.split(PATH_SEPARATOR)]
    if not all(components):
        return _Resolved(
            None,
            FindingProblem(
                "malformed_path",
                raw,
                f"{where}: {raw!r}{note} has an empty path component; "
                "write a path like 'Pneumonia/Viral/COVID-19'",
            ),
        )
    node = _BY_KEY.get(_key(components[0]))
    if node is None:
        return _Resolved(
            None,
            FindingProblem(
                "unknown_finding",
                raw,
                f"{where}: {components[0]!r}{note} is not a known finding"
                f"{_suggest(components[0])}; {accepted}",
            ),
        )
    path = list(node.path)
    for position, component in enumerate(components[1:], start=1):
        child = _child(node, component)
        if child is not None:
            node = child
            path = list(child.path)
            continue
        elsewhere = _BY_KEY.get(_key(component))
        if elsewhere is not None:
            return _Resolved(
                None,
                FindingProblem(
                    "misplaced_finding",
                    raw,
                    f"{where}: {token!r}{note} puts {component!r} under {node.path_str!r}, "
                    f"but the vocabulary files it as {elsewhere.path_str!r}; write that path",
                ),
            )
        path.extend(components[position:])
        known = ", ".join(child.name for child in _CHILDREN[node.path]) or "none"
        return _Resolved(
            Finding(tuple(path), raw, known=False),
            FindingProblem(
                "unknown_leaf",
                raw,
                f"{where}: {component!r}{note} is not a known finding under "
                f"{node.path_str!r}{_suggest(component, _CHILDREN[node.path])}; "
                f"known there: {known}; kept as "
                f"{PATH_SEPARATOR.join(path)!r}",
                Severity.WARNING,
            ),
        )
    return _Resolved(Finding(tuple(path), raw), None)


def _known_part(path: tuple[str, ...]) -> FindingNode:
    """The deepest vocabulary node on ``path`` (whose first component is known)."""
    for end in range(len(path), 0, -1):
        node = _NODES.get(path[:end])
        if node is not None:
            return node
    raise AssertionError(f"no known root in {path!r}")  # parse guarantees a known root


def _sort_key(finding: Finding) -> tuple[int, tuple[str, ...]]:
    node = _known_part(finding.path)
    return node.index, tuple(part.casefold() for part in finding.path[len(node.path) :])


def _split(value: str, separator: str | None) -> list[str]:
    if separator is None:
        return re.split(r"[,|]", value)
    return value.split(separator)


# ---------------------------------------------------------------------------------------
# Public API.


def parse_finding(
    value: str,
    *,
    separator: str | None = None,
    value_map: Mapping[str, str] | None = None,
) -> ParsedFinding:
    """Parse a finding value written in any of the collection's styles.

    Args:
        value: the cell text: a name (``COVID-19``), a path
            (``Pneumonia/Viral/COVID-19``), a list (``COVID-19, ARDS``,
            ``Effusion|Pneumonia``), ``todo``, ``Unknown`` or blank.
        separator: the list separator; ``None`` splits on both ``,`` and ``|``.
        value_map: a source's own spellings, ``raw -> canonical`` (keys compared
            case-insensitively after stripping), applied first to the whole value and
            otherwise to each token. A target may be a name, alias, path, a list,
            ``todo``, ``Unknown`` or blank (drop the token). Check a map once with
            :func:`check_value_map`.

    Returns:
        The findings (de-duplicated, redundant ancestors dropped, canonical order),
        the status and the problems. Unknown names are reported, never guessed.

    Raises:
        ValueError: ``separator`` is the empty string.
    """
    where = "parse_finding"
    if separator is not None and not separator:
        raise ValueError(f"{where}: separator must be None or a non-empty string")
    mapping = {key.strip().casefold(): target for key, target in (value_map or {}).items()}
    text = value.strip()
    if not text:
        return ParsedFinding((), "missing")

    # (token as resolved, token as written, note for messages)
    tokens: list[tuple[str, str, str]] = []
    whole = mapping.get(text.casefold())
    if whole is not None:
        note = f" (value_map maps {text!r} to {whole!r})"
        tokens.extend((part.strip(), text, note) for part in _split(whole, None))
    else:
        for part in _split(text, separator):
            raw = part.strip()
            target = mapping.get(raw.casefold()) if raw else None
            if target is None:
                tokens.append((raw, raw, ""))
            else:
                note = f" (value_map maps {raw!r} to {target!r})"
                tokens.extend((mapped.strip(), raw, note) for mapped in _split(target, None))

    findings: list[Finding] = []
    markers: dict[FindingStatus, str] = {}
    problems: list[FindingProblem] = []
    empty_seen = False
    for token, raw, note in tokens:
        if not token:
            # A value_map target of blank drops the token on purpose; an empty list
            # element in the source itself ("COVID-19,") is worth a warning.
            if not note and not empty_seen:
                empty_seen = True
                problems.append(
                    FindingProblem(
                        "empty_token",
                        value,
                        f"{where}: {value!r} has an empty list element; ignored",
                        Severity.WARNING,
                    )
                )
            continue
        marker = _STATUS_MARKERS.get(_key(token)) if PATH_SEPARATOR not in token else None
        if marker is not None:
            markers.setdefault(marker, raw)
            continue
        resolved = _resolve_token(token, raw, where, note)
        if resolved.problem is not None and resolved.problem not in problems:
            problems.append(resolved.problem)
        if resolved.finding is not None and resolved.finding not in findings:
            findings.append(resolved.finding)

    # Drop a finding implied by a more specific one ("Pneumonia" beside COVID-19).
    kept = [
        finding
        for finding in findings
        if not any(
            len(other.path) > len(finding.path) and other.path[: len(finding.path)] == finding.path
            for other in findings
        )
    ]
    kept.sort(key=_sort_key)

    exclusive = list(markers.values()) + [
        finding.raw for finding in kept if finding.path == _NO_FINDING
    ]
    if exclusive and len(markers) + len(kept) > 1:
        problems.append(
            FindingProblem(
                "conflict",
                value,
                f"{where}: {value!r} combines {', '.join(repr(raw) for raw in exclusive)} "
                "with other findings; 'No Finding', 'todo' and 'Unknown' must stand alone",
            )
        )

    status: FindingStatus
    if any(problem.severity == Severity.ERROR for problem in problems):
        status = "invalid"
    elif kept:
        status = "ok"
    elif markers:
        status = next(iter(markers))
    else:
        status = "missing"
    return ParsedFinding(tuple(kept), status, tuple(problems))


def check_value_map(value_map: Mapping[str, str]) -> None:
    """Check that every target of a source's value map parses without error.

    Call it once when a mapping file is loaded, so that a typo in the file is reported
    as a mapping error instead of once per row.

    Raises:
        MappingError: naming every bad ``raw -> target`` pair and why.
    """
    bad: list[str] = []
    for raw, target in value_map.items():
        parsed = parse_finding(target)
        errors = [p.message for p in parsed.problems if p.severity == Severity.ERROR]
        if errors:
            bad.append(f"{raw!r} -> {target!r}: {'; '.join(errors)}")
    if bad:
        raise MappingError("check_value_map: bad finding value_map targets: " + " | ".join(bad))


def resolve_node(name: str) -> str:
    """Resolve user input naming a vocabulary node to its canonical path.

    Accepts names, aliases and paths, in any case: ``"covid-19"``, ``"viral"``,
    ``"bacterial pneumonia"``, ``"Pneumonia/Viral"``.

    Raises:
        MetadataError: the name is not a vocabulary node (message names it and close
            matches), or is a status (``todo``, ``Unknown``) or blank.
    """
    where = "resolve_node"
    text = name.strip()
    if not text:
        raise MetadataError(
            f"{where}: blank finding name; expected a name, alias or path such as "
            "'COVID-19', 'viral' or 'Pneumonia/Viral'"
        )
    if _key(text) in _STATUS_MARKERS and PATH_SEPARATOR not in text:
        raise MetadataError(
            f"{where}: {name!r} is a finding status ({_STATUS_MARKERS[_key(text)]}), "
            "not a finding node; filter on ParsedFinding.status instead"
        )
    resolved = _resolve_token(
        text, name, where, accepted="known top-level findings: " + ", ".join(_ROOTS)
    )
    finding = resolved.finding
    if finding is None:
        assert resolved.problem is not None
        raise MetadataError(resolved.problem.message)
    if not finding.known:
        parent = _known_part(finding.path)
        unknown = PATH_SEPARATOR.join(finding.path[len(parent.path) :])
        known = ", ".join(child.name for child in _CHILDREN[parent.path]) or "none"
        raise MetadataError(
            f"{where}: {name!r} is not a finding node: no {unknown!r} under "
            f"{parent.path_str!r} (known there: {known})"
        )
    return finding.path_str


def get_node(name: str) -> FindingNode:
    """The vocabulary node for a name, alias or path (see :func:`resolve_node`).

    Raises:
        MetadataError: as :func:`resolve_node`.
    """
    return _NODES[tuple(resolve_node(name).split(PATH_SEPARATOR))]


def _normalise_path(path: str | Sequence[str], where: str) -> tuple[str, ...]:
    """Canonical components of a finding path; unknown leaves are kept as written."""
    text = path if isinstance(path, str) else PATH_SEPARATOR.join(path)
    resolved = _resolve_token(text.strip(), text, where)
    if resolved.finding is None:
        message = resolved.problem.message if resolved.problem is not None else text
        raise MetadataError(message)
    return resolved.finding.path


def ancestors(path: str | Sequence[str]) -> tuple[str, ...]:
    """All prefix paths of ``path``, from its root to itself.

    ``ancestors("Pneumonia/Viral/COVID-19")`` is ``("Pneumonia", "Pneumonia/Viral",
    "Pneumonia/Viral/COVID-19")``. A name or alias is resolved first; an unknown leaf
    under a known node is kept.

    Raises:
        MetadataError: the path's root is not a known finding.
    """
    parts = _normalise_path(path, "ancestors")
    return tuple(PATH_SEPARATOR.join(parts[:end]) for end in range(1, len(parts) + 1))


def is_under(path: str | Sequence[str], node: str) -> bool:
    """Whether finding ``path`` is ``node`` or below it.

    Compares path components, never substrings: ``Pneumonia/Viral2`` is not under
    ``Pneumonia/Viral``. ``node`` goes through :func:`resolve_node` (``"viral"`` works).

    Raises:
        MetadataError: ``node`` is not a vocabulary node, or ``path``'s root is unknown.
    """
    parts = _normalise_path(path, "is_under")
    target = tuple(resolve_node(node).split(PATH_SEPARATOR))
    return parts[: len(target)] == target


def children(node: str | None = None) -> tuple[str, ...]:
    """The canonical paths of ``node``'s children, in canonical order.

    Args:
        node: a name, alias or path; ``None`` gives the top-level findings.

    Raises:
        MetadataError: ``node`` is not a vocabulary node.
    """
    parent = () if node is None else tuple(resolve_node(node).split(PATH_SEPARATOR))
    return tuple(child.path_str for child in _CHILDREN[parent])


def all_nodes() -> tuple[str, ...]:
    """Every vocabulary node's canonical path, in canonical (label) order."""
    return tuple(node.path_str for node in _NODES.values())


def pathogen(path: str | Sequence[str]) -> Pathogen | None:
    """The pathogen group of a finding: ``"viral"``, ``"bacterial"``, ``"fungal"`` or None.

    An unknown organism inherits its known parent's group
    (``Pneumonia/Viral/NewBug`` is viral). Tuberculosis is ``"bacterial"``.

    Raises:
        MetadataError: the path's root is not a known finding.
    """
    return _known_part(_normalise_path(path, "pathogen")).pathogen


def format_finding(
    findings: ParsedFinding | Iterable[Finding | str],
    style: Literal["hierarchical", "flat"] = "hierarchical",
    *,
    separator: str = ", ",
) -> str:
    """Write findings back as text, e.g. for exports.

    Args:
        findings: a :class:`ParsedFinding` (its status is written as ``todo``,
            ``Unknown`` or blank when there are no findings), or findings / paths.
        style: ``"hierarchical"`` writes paths (``Pneumonia/Viral/COVID-19``);
            ``"flat"`` writes leaf names as the June 2020 file did (``COVID-19``),
            except for an unknown organism, whose path is written so that it parses
            back to the same finding.
        separator: between several findings.

    Returns:
        Text that :func:`parse_finding` parses back to the same findings.

    Raises:
        ValueError: ``style`` is not one of the two.
        MetadataError: a path string's root is not a known finding.
    """
    if style not in ("hierarchical", "flat"):
        raise ValueError(f"format_finding: style {style!r}; expected 'hierarchical' or 'flat'")
    if isinstance(findings, ParsedFinding):
        if not findings.findings:
            return _STATUS_TEXT.get(findings.status, "")
        items: Iterable[Finding | str] = findings.findings
    else:
        items = findings
    paths: list[tuple[str, ...]] = []
    for item in items:
        path = item.path if isinstance(item, Finding) else _normalise_path(item, "format_finding")
        if path not in paths:
            paths.append(path)
    texts = [
        path[-1] if style == "flat" and path in _NODES else PATH_SEPARATOR.join(path)
        for path in paths
    ]
    return separator.join(texts)
