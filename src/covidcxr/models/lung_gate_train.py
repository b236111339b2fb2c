"""Fit the lung gate (:mod:`covidcxr.models.lung_gate`) and measure it where it matters:
on sources and kinds of picture it never trained on.

- :func:`measure` measures every stored image with a gate class (frontal, lateral,
  CT), an inverted copy of every frontal one, and drawn pictures that are not medical.
- :func:`leave_one_source_out` trains without one source and reports how many of that
  source's frontal X-rays are refused (the goal: at most 1%) and how many of their
  inverted copies are caught.
- :func:`grouped_cv` reports, by patient-grouped cross-validation (patients that share
  a picture kept together), the recall of lateral views, CT slices and inverted images,
  and the frontal refusals within the training sources.
- :func:`leave_one_kind_out` reports the recall of each kind of non-medical picture by
  a gate that never saw that kind.

Why these choices: ``docs/decisions/0071-lung-gate.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.atomic import atomic_output
from covidcxr.dataset.splits import linked_patients
from covidcxr.models import gate_data
from covidcxr.models.lung_gate import (
    CLASSES,
    FEATURE_NAMES,
    FORMAT,
    GATE_ID,
    BoostedTrees,
)
from covidcxr.models.lung_gate import measure as lung_measure
from covidcxr.models.lungs import LungSegmenter, found_two_lungs, segmenter_record
from covidcxr.models.sample_sets import gate_samples
from covidcxr.store.db import Store
from covidcxr.store.duplicates import duplicate_groups

log = logging.getLogger(__name__)

FRONTAL, LATERAL, CT, INVERTED, NOT_MEDICAL = range(len(CLASSES))
#: Drawn non-medical pictures measured (an equal share of each kind).
NOT_MEDICAL_COUNT: Final = 600
#: The classifier's settings (scikit-learn ``GradientBoostingClassifier``).
BOOSTING: Final[dict[str, Any]] = {
    "n_estimators": 150,
    "learning_rate": 0.1,
    "max_depth": 3,
    "subsample": 0.8,
    "init": "zero",
}


@dataclass
class GateData:
    """Feature rows with their class, source, patient group and (drawn pictures) kind.

    ``group`` joins patients that share a picture; drawn pictures have source
    ``drawn`` and their own group each. ``two_lungs``, when measured: whether the
    segmenter found two lung fields, one on each side (:func:`lungs.found_two_lungs`),
    the check lungs-first bundles make after the gate; inverted copies are not
    measured and hold True, so no figure counts them as caught by it.
    """

    x: NDArray[np.float64]
    y: NDArray[np.int64]
    source: NDArray[np.str_]
    group: NDArray[np.str_]
    kind: NDArray[np.str_]
    two_lungs: NDArray[np.bool_] | None = None

    def take(self, rows: NDArray[np.intp]) -> GateData:
        """The rows at ``rows`` (of every field)."""
        two = None if self.two_lungs is None else self.two_lungs[rows]
        return GateData(
            self.x[rows], self.y[rows], self.source[rows], self.group[rows], self.kind[rows], two
        )


def swap_views(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """The features of the negatives of the images whose features are ``x`` (the image
    and negative halves trade places), without measuring again."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, half:], x[:, :half]], axis=1)


def measure(store: Store, segmenter: LungSegmenter, seed: int = 0) -> GateData:
    """Measure the store's gate images, their inverted copies and drawn pictures."""
    samples = gate_samples(store)
    with store.read() as conn:
        groups = linked_patients(samples.patients, duplicate_groups(conn))
    group_of = {patient: members[0] for members in groups for patient in members}
    rows, classes, sources, patient_groups, two = [], [], [], [], []
    for number, sample in enumerate(samples.samples, 1):
        with Image.open(samples.image_path(sample)) as image:
            image.load()
            row, probability = lung_measure(segmenter, image)
            rows.append(row)
            two.append(found_two_lungs(probability, image.width, image.height))
        classes.append(int(np.nanargmax(np.asarray(sample.labels, dtype=float))))
        sources.append(sample.source)
        patient_groups.append(group_of.get(sample.patient, sample.patient))
        if number % 250 == 0:
            log.info("lung gate: measured %d of %d images", number, len(samples.samples))
    measured = GateData(
        np.asarray(rows),
        np.asarray(classes),
        np.asarray(sources),
        np.asarray(patient_groups),
        np.full(len(rows), ""),
        np.asarray(two, dtype=bool),
    )
    frontal = np.flatnonzero(measured.y == FRONTAL)
    inverted = measured.take(frontal)
    inverted.x, inverted.y = swap_views(inverted.x), np.full(len(frontal), INVERTED)
    inverted.two_lungs = np.ones(len(frontal), dtype=bool)  # not measured
    return _join([measured, inverted, _drawn(segmenter, seed)])


def _drawn(segmenter: LungSegmenter, seed: int) -> GateData:
    kinds = gate_data.NOT_MEDICAL_KINDS
    pictures = gate_data.not_medical_images(NOT_MEDICAL_COUNT, 128, np.random.default_rng(seed))
    measured = [lung_measure(segmenter, Image.fromarray(p)) for p in pictures]
    x = np.asarray([row for row, _ in measured])
    two = [
        found_two_lungs(lungs, p.shape[1], p.shape[0])
        for (_, lungs), p in zip(measured, pictures, strict=True)
    ]
    kind = np.asarray([kinds[i % len(kinds)] for i in range(len(pictures))])
    return GateData(
        x,
        np.full(len(pictures), NOT_MEDICAL),
        np.full(len(pictures), "drawn"),
        np.asarray([f"drawn:{i}" for i in range(len(pictures))]),
        kind,
        np.asarray(two, dtype=bool),
    )


def _join(parts: Sequence[GateData]) -> GateData:
    return GateData(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.source for p in parts]).astype(str),
        np.concatenate([p.group for p in parts]).astype(str),
        np.concatenate([p.kind for p in parts]).astype(str),
        None
        if any(p.two_lungs is None for p in parts)
        else np.concatenate([p.two_lungs for p in parts if p.two_lungs is not None]),
    )


def fit_classifier(data: GateData, seed: int = 0) -> BoostedTrees:
    """Fit the boosted trees, each class weighted equally (rare lateral and CT images
    count as much as the many frontal ones).

    Raises:
        ValueError: a class of :data:`CLASSES` has no row.
    """
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.utils.class_weight import compute_sample_weight

    missing = [CLASSES[k] for k in range(len(CLASSES)) if not (data.y == k).any()]
    if missing:
        raise ValueError(f"fit_classifier: no training rows of class {', '.join(missing)}")
    model = GradientBoostingClassifier(random_state=seed, **BOOSTING)
    model.fit(data.x, data.y, sample_weight=compute_sample_weight("balanced", data.y))
    return BoostedTrees.from_sklearn(model)


def _refused(trees: BoostedTrees, x: NDArray[np.float64], threshold: float) -> NDArray[np.bool_]:
    if len(x) == 0:
        return np.zeros(0, dtype=bool)
    refused: NDArray[np.bool_] = trees.predict_proba(x)[:, FRONTAL] < threshold
    return refused


def _share(flags: NDArray[np.bool_]) -> dict[str, float | int]:
    return {"share": float(flags.mean()) if len(flags) else float("nan"), "n": len(flags)}


def leave_one_source_out(
    data: GateData, source: str, threshold: float, seed: int = 0
) -> dict[str, Any]:
    """Train without ``source`` (and its inverted copies); refusals of its frontal
    X-rays, and the share of their inverted copies caught."""
    held = data.source == source
    trees = fit_classifier(data.take(np.flatnonzero(~held)), seed)
    frontal = held & (data.y == FRONTAL)
    inverted = held & (data.y == INVERTED)
    refused = _refused(trees, data.x[frontal], threshold)
    return {
        "held_out_source": source,
        "frontal_refused": _share(refused),
        "inverted_caught": _share(_refused(trees, data.x[inverted], threshold)),
        **_with_two_lungs("frontal_refused", refused, data, frontal),
    }


def _with_two_lungs(
    name: str, refused: NDArray[np.bool_], data: GateData, rows: NDArray[np.bool_]
) -> dict[str, Any]:
    """``{name}_with_two_lungs_check``: the share refused by the gate or by the
    two-lungs check after it (empty when ``data`` did not measure it)."""
    if data.two_lungs is None:
        return {}
    return {f"{name}_with_two_lungs_check": _share(refused | ~data.two_lungs[rows])}


def grouped_cv_scores(
    data: GateData, sources: Sequence[str], folds: int = 5, seed: int = 0
) -> NDArray[np.float64]:
    """Out-of-fold P(frontal) of the rows of ``sources`` by patient-grouped
    cross-validation (drawn pictures and other sources always train); NaN elsewhere."""
    from sklearn.model_selection import GroupKFold

    inside = np.flatnonzero(np.isin(data.source, sources))
    outside = np.flatnonzero(~np.isin(data.source, sources))
    scores = np.full(len(data.y), np.nan)
    for train, test in GroupKFold(folds).split(inside, groups=data.group[inside]):
        trees = fit_classifier(data.take(np.concatenate([inside[train], outside])), seed)
        rows = inside[test]
        scores[rows] = trees.predict_proba(data.x[rows])[:, FRONTAL]
    return scores


def grouped_cv(
    data: GateData,
    sources: Sequence[str],
    threshold: float,
    folds: int = 5,
    seed: int = 0,
    scores: NDArray[np.float64] | None = None,
) -> dict[str, Any]:
    """Patient-grouped cross-validation within ``sources`` (:func:`grouped_cv_scores`,
    or ``scores`` from it): frontal refusals and the recall of lateral, CT and inverted
    images at ``threshold``."""
    if scores is None:
        scores = grouped_cv_scores(data, sources, folds, seed)
    inside = np.isin(data.source, sources)
    refused = scores[inside] < threshold
    result: dict[str, Any] = {"sources": list(sources), "folds": folds}
    names = (("frontal_refused", FRONTAL), ("lateral_caught", LATERAL), ("ct_caught", CT))
    for name, k in (*names, ("inverted_caught", INVERTED)):
        result[name] = _share(refused[data.y[inside] == k])
    return result


#: Thresholds :func:`choose_threshold` considers, lowest first.
CANDIDATE_THRESHOLDS: Final = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
#: The recall of every non-frontal class the chosen threshold must reach in CV.
TARGET_RECALL: Final = 0.95


def choose_threshold(data: GateData, scores: NDArray[np.float64]) -> float:
    """The lowest of :data:`CANDIDATE_THRESHOLDS` at which lateral, CT and inverted
    images each reach :data:`TARGET_RECALL` in the cross-validation ``scores`` (else the
    one with the best worst recall). Chosen on the training sources only, so the
    leave-one-source-out refusal rate stays an honest test."""
    known = ~np.isnan(scores)

    def worst_recall(threshold: float) -> float:
        recalls = [
            float((scores[known & (data.y == k)] < threshold).mean())
            for k in (LATERAL, CT, INVERTED)
            if (known & (data.y == k)).any()
        ]
        return min(recalls, default=0.0)

    for threshold in CANDIDATE_THRESHOLDS:
        if worst_recall(threshold) >= TARGET_RECALL:
            return threshold
    return max(CANDIDATE_THRESHOLDS, key=worst_recall)


def leave_one_kind_out(data: GateData, threshold: float, seed: int = 0) -> dict[str, Any]:
    """Per kind of drawn picture: the share caught by a gate trained without that kind
    (and, when measured, by it or the two-lungs check after it)."""
    result = {}
    for kind in gate_data.NOT_MEDICAL_KINDS:
        held = data.kind == kind
        trees = fit_classifier(data.take(np.flatnonzero(~held)), seed)
        caught = _refused(trees, data.x[held], threshold)
        result[kind] = {**_share(caught), **_with_two_lungs("caught", caught, data, held)}
    return result


def evaluate_gate(data: GateData, threshold: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Every measurement of the module, for the gate's card. Without ``threshold``, it
    is chosen by :func:`choose_threshold` on the cross-validation of the sources that
    hold lateral and CT images."""
    sources = sorted({str(s) for s in data.source} - {"drawn"})
    lateral_ct_sources = sorted({str(s) for s in data.source[np.isin(data.y, (LATERAL, CT))]})
    scores = grouped_cv_scores(data, lateral_ct_sources, seed=seed)
    chosen = choose_threshold(data, scores) if threshold is None else threshold
    loso = [
        leave_one_source_out(data, source, chosen, seed)
        for source in sources
        if set(lateral_ct_sources) - {source}
    ]
    skipped = [s for s in sources if not set(lateral_ct_sources) - {s}]
    return {
        "threshold": chosen,
        "threshold_rule": (
            "given"
            if threshold is not None
            else f"the lowest of {list(CANDIDATE_THRESHOLDS)} at which lateral, CT and inverted "
            f"images each reach {TARGET_RECALL:g} recall in patient-grouped CV of "
            f"{', '.join(lateral_ct_sources)} (the held-out sources never choose it)"
        ),
        "leave_one_source_out": loso,
        "leave_one_source_out_not_run": {
            s: "the only source of lateral and CT images: without it the gate has no "
            "examples of them"
            for s in skipped
        },
        "grouped_cv": grouped_cv(data, lateral_ct_sources, chosen, scores=scores),
        "leave_one_kind_out": leave_one_kind_out(data, chosen, seed),
    }


def counts(data: GateData) -> dict[str, dict[str, int]]:
    """Rows per source and class."""
    table: dict[str, dict[str, int]] = {}
    for source, k in zip(data.source, data.y, strict=True):
        row = table.setdefault(str(source), {})
        row[CLASSES[k]] = row.get(CLASSES[k], 0) + 1
    return table


def save_gate(
    trees: BoostedTrees,
    out_dir: Path,
    card: dict[str, Any],
) -> Path:
    """Write ``trees.json``, ``model.json`` (``card`` plus the trees' sha256) and
    ``MODEL_CARD.md`` into ``out_dir``; returns the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(trees.as_dict(), separators=(",", ":")).encode()
    with atomic_output(out_dir / "trees.json") as tmp:
        tmp.write_bytes(data)
    card = {**card, "trees_sha256": hashlib.sha256(data).hexdigest()}
    with atomic_output(out_dir / "model.json") as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    with atomic_output(out_dir / "MODEL_CARD.md") as tmp:
        tmp.write_text(render_card(card), encoding="utf-8")
    return out_dir


def train_gate(
    store: Store,
    segmenter: LungSegmenter,
    out_dir: Path,
    *,
    threshold: float | None = None,
    seed: int = 0,
    gate_id: str = GATE_ID,
    command: str = "",
) -> dict[str, Any]:
    """Measure, evaluate, fit on everything and save; returns the card (model.json).
    Without ``threshold`` it is chosen as :func:`evaluate_gate` says."""
    data = measure(store, segmenter, seed)
    evaluation = evaluate_gate(data, threshold, seed)
    trees = fit_classifier(data, seed)
    card = {
        "format": FORMAT,
        "gate_id": gate_id,
        "intended_use": "research use only, not a diagnosis",
        "classes": list(CLASSES),
        "features": list(FEATURE_NAMES),
        "threshold": evaluation["threshold"],
        "segmenter": segmenter_record(segmenter),
        "classifier": {"kind": "GradientBoostingClassifier", **BOOSTING, "random_state": seed},
        "data": counts(data),
        "evaluation": evaluation,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_gate(trees, out_dir, card)
    return card


def _pct(share: Mapping[str, Any]) -> str:
    value = share["share"]
    return "n/a" if value != value else f"{100 * value:.1f}% of {share['n']}"


def evaluation_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """:func:`evaluate_gate`'s measurements as Markdown."""
    cv = evaluation["grouped_cv"]
    both = "with_two_lungs_check"
    lines = [
        "## Frontal X-rays of a source the gate never trained on",
        "",
        "| held-out source | frontal refused | inverted copies caught | frontal refused by "
        "the gate or the two-lungs check after it (lungs-first bundles) |",
        "|---|---|---|---|",
    ]
    for row in evaluation["leave_one_source_out"]:
        lines.append(
            f"| {row['held_out_source']} | {_pct(row['frontal_refused'])} | "
            f"{_pct(row['inverted_caught'])} | {_pct_or_na(row, f'frontal_refused_{both}')} |"
        )
    for source, why in evaluation["leave_one_source_out_not_run"].items():
        lines.append(f"| {source} | not run: {why} | | |")
    return [
        *lines,
        "",
        f"## Patient-grouped {cv['folds']}-fold cross-validation ({', '.join(cv['sources'])})",
        "",
        f"- frontal refused: {_pct(cv['frontal_refused'])}",
        f"- lateral views caught: {_pct(cv['lateral_caught'])}",
        f"- CT slices caught: {_pct(cv['ct_caught'])}",
        f"- inverted images caught: {_pct(cv['inverted_caught'])}",
        "",
        "## Pictures that are not medical, each kind unseen in training",
        "",
        "| kind | caught | caught by the gate or the two-lungs check after it |",
        "|---|---|---|",
        *(
            f"| {k} | {_pct(v)} | {_pct_or_na(v, f'caught_{both}')} |"
            for k, v in evaluation["leave_one_kind_out"].items()
        ),
    ]


def _pct_or_na(row: Mapping[str, Any], key: str) -> str:
    return _pct(row[key]) if key in row else "not measured"


def render_card(card: Mapping[str, Any]) -> str:
    """The gate's MODEL_CARD.md from its model.json."""
    lines = [
        f"# Input gate {card['gate_id']}",
        "",
        "Research use only, not a diagnosis. Decides whether an image is a usable frontal "
        "chest X-ray before any finding is predicted, from the lung segmenter's output "
        f"({card['segmenter']['model_id']}) on the image and on its negative "
        f"({len(card['features'])} features) and a boosted tree ensemble. An image passes "
        f"when P(frontal chest X-ray) >= {card['threshold']:g} "
        f"({card['evaluation'].get('threshold_rule', 'given')}); otherwise the most likely "
        "other class is named.",
        "",
        *evaluation_lines(card["evaluation"]),
        "",
        "## Training data (rows per source and class)",
        "",
        *(f"- {source}: {dict(row)}" for source, row in card["data"].items()),
        "",
        f"Command: `{card['command']}`",
        "",
    ]
    return "\n".join(lines)
