"""The model card (MODEL_CARD.md), rendered from a bundle's ``model.json``.

The card is for people; ``model.json`` stays the source of truth (the card is rendered
from it whenever the bundle is written, e.g. after ``covidcxr evaluate --update-card``
adds metrics). Sections: intended use, data (version hash, sources, counts), split,
training (command, seed, epochs), calibration and operating points, validation and
held-out numbers, evaluation metrics with intervals, severity, input gate, known
failure modes, how to reproduce.

This module needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from covidcxr import RESEARCH_USE_ONLY
from covidcxr.models.bundle import MIN_OPERATING_SUPPORT, ModelBundle


def data_membership_sha256(entries: Iterable[tuple[str, Sequence[float] | str]]) -> str:
    """The data version of a model: sha256 over its training images and their labels.

    One line per entry, ``<image sha256><TAB><labels>``, where labels are a label
    vector written as JSON (unknown = ``null``, values rounded to 6 decimals) or a
    text (a gate class); lines are sorted, so the order of samples does not matter.
    """
    lines = []
    for image, labels in entries:
        if isinstance(labels, str):
            text = labels
        else:
            text = json.dumps(
                [None if math.isnan(float(v)) else round(float(v), 6) for v in labels]
            )
        lines.append(f"{image}\t{text}\n")
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode())
    return digest.hexdigest()


FAILURE_MODES = (
    "**Shortcuts.** Models trained on this collection are known to learn the source, "
    "text markers, arrows, positioning and image processing instead of the lungs "
    "(DeGrave et al. 2021). Training the findings head on one source removes the "
    "largest shortcut (which hospital or data set), not the others: within the "
    "collection the classes still differ in where their images come from (papers, case "
    "sites, years). The evaluation's shortcut audit (lungs masked out) measures this.",
    "**Small classes.** Other viral, bacterial, fungal pneumonia and no finding have "
    "tens of images each; their AUROCs have wide intervals and their operating points "
    "rest on a handful of validation positives.",
    "**No external validation.** Every number here comes from images of the same "
    "collection (other patients). Performance at another hospital is unknown: run a "
    "local validation before any use.",
    "**Children.** The collection holds few paediatric images; predictions for children "
    "are untested.",
    "**Crops and screenshots.** Many images are figures cut from papers (cropped, "
    "resized, annotated, sometimes photographed screens). The model saw these; it may "
    "behave differently on clean DICOM exports, and vice versa.",
    "**Views.** Findings were trained on frontal views (PA, AP, AP supine); lateral "
    "views, CT and non-radiographs are meant to be refused by the input gate, which "
    "itself was trained on few lateral and CT images (counts above) and on drawn, not "
    "photographed, non-radiographs.",
    "**Severity.** Fitted on about 90 expert-scored COVID-19 images; scores of other "
    "diseases, of mild cases and of other scanners are extrapolations.",
    "**Labels.** Findings come from the papers the images were taken from, not from a "
    "re-read; unknowns (a finding less specific than a label) are masked, not negative.",
)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _interval(pair: Any) -> str:
    if not isinstance(pair, list | tuple) or len(pair) != 2 or None in pair:
        return "n/a"
    return f"{_fmt(pair[0])}-{_fmt(pair[1])}"


def _auroc_table(report: Mapping[str, Any], labels: Sequence[str]) -> list[str]:
    aurocs = report.get("auroc", {})
    intervals = report.get("auroc_95ci_patient_bootstrap", {})
    counts = report.get("labels", {})
    positives = report.get("positives", {})
    sensitivity = report.get("sensitivity_at_operating_point", {})
    specificity = report.get("specificity_at_operating_point", {})
    lines = [
        "| label | positives | AUROC | 95% interval | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        count = counts.get(label, {}).get("positive", positives.get(label))
        lines.append(
            f"| {label} | {_fmt(count)} | {_fmt(aurocs.get(label))} | "
            f"{_interval(intervals.get(label))} | {_fmt(sensitivity.get(label))} | "
            f"{_fmt(specificity.get(label))} |"
        )
    return lines


def _estimate(data: Any, digits: int = 2) -> str:
    """``0.56 [0.50, 0.63]`` from ``{"value": ..., "ci95": [...]}``."""
    if not isinstance(data, Mapping) or data.get("value") is None:
        return "n/a"
    text = f"{data['value']:.{digits}f}"
    interval = data.get("ci95")
    if interval:
        text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return text


def _findings_table(labels: Mapping[str, Any]) -> list[str]:
    lines = [
        "| label | n (positives) | AUC [95% CI] | sensitivity | specificity | Brier "
        "(prevalence baseline) | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, result in labels.items():
        baseline = result.get("baseline", {})
        lines.append(
            f"| {label} | {result.get('n')} ({result.get('positives')}) | "
            f"{_estimate(result.get('auc'))} | {_estimate(result.get('sensitivity'))} | "
            f"{_estimate(result.get('specificity'))} | {_estimate(result.get('brier'), 3)} "
            f"({_estimate(baseline.get('brier'), 3)}) | {_estimate(result.get('ece'), 3)} |"
        )
    return lines


def _evaluation_section(evaluation: Mapping[str, Any]) -> list[str]:
    """Readable tables from :meth:`EvaluationReport.to_card_metrics` (model.json has all)."""
    about = evaluation.get("evaluation", {})
    settings = about.get("settings", {})
    findings = evaluation.get("findings", {})
    lines = [
        f"Evaluated {about.get('created', '')} on {about.get('samples')} images of "
        f"{about.get('patients')} patients (task `{about.get('task')}`); "
        f"{settings.get('folds')} folds x {settings.get('repeats')} repeats, seed "
        f"{settings.get('seed')}, {settings.get('bootstrap_resamples')} patient-bootstrap "
        "resamples. Every number is in model.json (`metrics.evaluation`).",
        "",
    ]
    kfold = findings.get("kfold")
    if kfold:
        lines += [
            f"**Cross-validation** ({kfold.get('protocol', '')}):",
            "",
            *_findings_table(kfold.get("labels", {})),
            "",
        ]
    for scheme, title in (("source", "Leave-one-source-out"), ("region", "Leave-one-region-out")):
        result = findings.get(scheme)
        if not result:
            continue
        lines.append(f"**{title}** ({result.get('protocol', '')}).")
        if result.get("note"):
            lines.append(f"Note: {str(result['note']).rstrip('.')}.")
        heldout = result.get("heldout", {})
        if heldout:
            names = sorted({label for per in heldout.values() for label in per})
            lines += [
                "",
                "| held out | " + " | ".join(f"AUC {n}" for n in names) + " |",
                "|---" * (len(names) + 1) + "|",
            ]
            for group, per in heldout.items():
                cells = [_estimate(per.get(n, {}).get("auc")) for n in names]
                lines.append(f"| {group} | " + " | ".join(cells) + " |")
        lines.append("")
    severity = evaluation.get("severity", {})
    if severity.get("targets"):
        lines += [
            f"**Severity** ({severity.get('protocol', '')}; {severity.get('n_images')} images):",
            "",
            "| score | MAE [95% CI] | R^2 | r | mean-baseline MAE | literature MAE |",
            "|---|---|---|---|---|---|",
        ]
        for name, target in severity["targets"].items():
            literature = target.get("literature", {})
            lines.append(
                f"| {name} | {_estimate(target.get('mae'))} | {_estimate(target.get('r2'))} | "
                f"{_estimate(target.get('pearson_r'))} | "
                f"{_estimate(target.get('baseline', {}).get('mae'))} | "
                f"{literature.get('mae', 'n/a')} |"
            )
        if severity.get("reason"):
            lines += ["", severity["reason"]]
        lines.append("")
    audit = evaluation.get("shortcut_audit")
    if audit:
        lines += [
            f"**Shortcut audit** ({audit.get('n_images')} images with lung masks): "
            f"{audit.get('verdict')}.",
            "",
            "| label | AUC full | AUC lungs masked out | AUC lungs only | flagged |",
            "|---|---|---|---|---|",
        ]
        for label, result in audit.get("labels", {}).items():
            lines.append(
                f"| {label} | {_estimate(result.get('full'))} | "
                f"{_estimate(result.get('no_lungs'))} | {_estimate(result.get('lungs_only'))} | "
                f"{'yes' if result.get('flagged') else 'no'} |"
            )
        lines.append("")
    skipped = evaluation.get("not_computable", [])
    if skipped:
        lines += [
            f"Not computable ({len(skipped)} items, each with its reason in model.json), "
            f"e.g.: {skipped[0]}",
            "",
        ]
    return lines


def _metrics_section(metrics: Mapping[str, Any]) -> list[str]:
    metrics = {k: v for k, v in metrics.items() if k != "prognosis"}  # its own section
    if not metrics:
        return [
            "Not evaluated. `covidcxr evaluate --update-card` adds cross-validated metrics "
            "with intervals here.",
        ]
    if isinstance(metrics.get("evaluation"), Mapping) and "findings" in metrics["evaluation"]:
        return _evaluation_section(metrics["evaluation"])
    return [
        "As recorded in model.json (`metrics`):",
        "",
        "```json",
        json.dumps(metrics, indent=2, sort_keys=True),
        "```",
    ]


def _no_call_line(bundle: ModelBundle) -> str:
    uncalled = bundle.uncalled_findings
    if not uncalled:
        return (
            f"every label's operating point rests on at least {MIN_OPERATING_SUPPORT} "
            "validation positives and negatives: `predict` calls them all"
        )
    support = bundle.operating_support
    return (
        "`predict` gives a probability but no call for "
        + ", ".join(
            f"{label} ({support[label][0]} validation positives, {support[label][1]} negatives)"
            for label in uncalled
        )
        + f": an operating point needs at least {MIN_OPERATING_SUPPORT} of each. The "
        "evaluation below still reports sensitivity and specificity at those stored "
        "thresholds, which shows why."
    )


def _header_lines(bundle: ModelBundle) -> list[str]:
    return [
        f"# Model card: {bundle.model_id}",
        "",
        f"**{RESEARCH_USE_ONLY.capitalize()}.** Not a medical device; not for clinical decisions.",
        "",
        "## Intended use",
        "",
        "A digital second opinion for research on chest X-rays of the COVID-19 image data "
        "collection: probabilities for "
        + ", ".join(bundle.findings)
        + "; pneumonia severity (geographic extent 0-8, opacity 0-6) with an interval; "
        "and an input gate that flags images that are not usable frontal chest X-rays "
        "(lateral views, CT slices, inverted images, non-radiographs, tiny or colour "
        "images). Use it to study methods, shortcuts and evaluation, and as a baseline; "
        "validate it locally before drawing any conclusion about patients.",
        "",
        "## Model",
        "",
        f"- backbone: `{bundle.backbone.get('spec', 'n/a')}`"
        + (f" (width {bundle.backbone['width']})" if "width" in bundle.backbone else "")
        + (
            f", {bundle.backbone['channels']} pooled features"
            if "channels" in bundle.backbone
            else ""
        ),
        f"- input: {bundle.input_size}x{bundle.input_size} px grayscale, centre crop, "
        "values in [-1024, 1024] (torchxrayvision's convention)",
        f"- weights sha256: `{bundle.files.get('weights.pt', 'see model.json')}`",
        "- files: weights.pt (torch), model.onnx (onnxruntime), model.json (everything "
        "below, machine-readable)",
        "",
    ]


def _data_lines(training: Mapping[str, Any]) -> list[str]:
    data = training.get("data", {})
    config = training.get("config", {})
    lines: list[str] = [
        "## Data",
        "",
        f"- data version (sha256 over the training and validation images and their "
        f"labels): `{data.get('membership_sha256', 'n/a')}`",
        f"- findings task: `{training.get('task', {}).get('name', 'n/a')}`; training "
        f"sources: {', '.join(config.get('sources', [])) or 'n/a'} (frontal X-rays only; "
        "other sources train the input gate only, so the findings head cannot learn the "
        "source)",
    ]
    for fold in ("findings_train", "findings_val", "findings_test"):
        part = data.get(fold)
        if isinstance(part, Mapping):
            lines.append(
                f"- {fold.replace('findings_', '')}: {part.get('images', 'n/a')} images of "
                f"{part.get('patients', 'n/a')} patients"
            )
    train_labels = data.get("findings_train", {}).get("labels", {})
    if train_labels:
        lines.append(
            "- training positives: "
            + ", ".join(f"{k} {v.get('positive', 0)}" for k, v in train_labels.items())
        )
    excluded = data.get("excluded_patients", {})
    if excluded:
        lines.append(
            "- patients held out of training: "
            + "; ".join(f"{n} ({reason})" for reason, n in excluded.items())
        )
    if data.get("gate_train"):
        lines.append(
            "- gate training images: "
            + ", ".join(f"{k} {v}" for k, v in data["gate_train"].items())
        )
    return lines


def _split_training_lines(bundle: ModelBundle) -> list[str]:
    training = bundle.training
    data = training.get("data", {})
    split = training.get("split", {})
    calibration = training.get("calibration", {})
    config = training.get("config", {})
    command = training.get("command", "n/a")
    return [
        "",
        "## Split",
        "",
        f"- scheme: {split.get('scheme', 'n/a')} (patient-grouped; patients sharing a "
        f"duplicate picture kept together), seed {split.get('seed', 'n/a')}, fractions "
        f"{split.get('fractions', 'n/a')}",
        f"- split file: `{split.get('file', 'n/a')}` (in this bundle)",
        f"- split membership sha256: `{split.get('membership_sha256', 'n/a')}`",
        f"- split file content sha256: `{split.get('content_sha256', 'n/a')}`",
        "",
        "## Training",
        "",
        f"- command: `{command}`",
        f"- seed {training.get('seed', 'n/a')}; epochs run {training.get('epochs_run', 'n/a')} "
        f"of {config.get('epochs', 'n/a')} (best validation loss at epoch "
        f"{training.get('best_epoch', 'n/a')}); {training.get('seconds_per_epoch', 'n/a')} s "
        f"per epoch on {training.get('device', 'n/a')} with {training.get('threads', 'n/a')} "
        f"thread(s); covidcxr {training.get('covidcxr_version', 'n/a')}, torch "
        f"{training.get('torch_version', 'n/a')}",
        f"- loss: masked binary cross-entropy (unknown labels ignored, pos_weight "
        f"{data.get('pos_weight', 'n/a')}) + {config.get('gate_weight', 'n/a')} x gate "
        "cross-entropy; AdamW, cosine schedule, light augmentation; early stopping on the "
        "validation loss",
        "",
        "## Calibration and operating points",
        "",
        f"- {calibration.get('method', 'n/a')}",
        "- temperatures: "
        + ", ".join(
            f"{n} {_fmt(t)}" for n, t in zip(bundle.findings, bundle.temperatures, strict=True)
        ),
        "- thresholds (calibrated probability): "
        + ", ".join(
            f"{n} {_fmt(t)}" for n, t in zip(bundle.findings, bundle.thresholds, strict=True)
        ),
        f"- {bundle.operating_point}",
        f"- {_no_call_line(bundle)}",
        "",
    ]


def _metrics_lines(bundle: ModelBundle) -> list[str]:
    validation = bundle.training.get("validation", {})
    holdout = bundle.training.get("holdout_test", {})
    lines: list[str] = [
        "## Metrics",
        "",
        "### Evaluation",
        "",
        *_metrics_section(bundle.metrics),
        "",
        "### Validation fold (used for early stopping, calibration and thresholds: optimistic)",
        "",
        *_auroc_table(validation, bundle.findings),
        *(
            ["", f"No finding: on {validation['no_finding_from']} (its operating point's data)."]
            if validation.get("no_finding_from")
            else []
        ),
        "",
        "### Held-out test fold of the model's own split (untouched by training)",
        "",
    ]
    if holdout.get("images"):
        lines += [
            f"{holdout['images']} images of {holdout.get('patients', 'n/a')} patients; "
            "AUROC with 95% patient-bootstrap intervals; sensitivity and specificity at "
            "the stored operating points.",
            "",
            *_auroc_table(holdout, bundle.findings),
        ]
    else:
        lines.append("Not measured.")
    return lines


def _severity_lines(bundle: ModelBundle) -> list[str]:
    sev = bundle.training.get("severity", {})
    lines: list[str] = ["", "## Severity", ""]
    interval = bundle.severity_interval
    if interval.get("half_width") is not None:
        lines += [
            f"- outputs: {', '.join(bundle.severity)} (ranges "
            + ", ".join(f"{lo:g}-{hi:g}" for lo, hi in bundle.severity_ranges)
            + ")",
            f"- method: {sev.get('features', 'ridge on pooled features')}, alpha "
            f"{_fmt(sev.get('alpha'))}, fitted on {sev.get('images', 'n/a')} scored images",
            f"- interval: mean +- {interval.get('half_width')} at level "
            f"{interval.get('level')} ({interval.get('method', '')})",
        ]
        protocol = sev.get("protocol")
        if isinstance(protocol, Mapping):
            labels = protocol.get("labels", [])
            lines += [
                f"- reference protocol ({protocol.get('protocol', '')}):",
                "",
                "| output | MAE | sd | baseline MAE (training mean) | Pearson r | R^2 |",
                "|---|---|---|---|---|---|",
            ]
            for k, label in enumerate(labels):
                lines.append(
                    f"| {label} | {_fmt(protocol['mae'][k])} | {_fmt(protocol['mae_sd'][k])} | "
                    f"{_fmt(protocol['baseline_mae'][k])} | {_fmt(protocol['pearson_r'][k])} | "
                    f"{_fmt(protocol['r2'][k])} |"
                )
            lines += [
                "",
                "  For comparison, Cohen et al. 2020 (features of a DenseNet pretrained on "
                "~200k chest X-rays): geographic extent MAE 1.14, opacity 0.78; baseline "
                "2.07.",
            ]
        elif protocol:
            lines.append(f"- reference protocol: {protocol}")
    else:
        lines.append("Not fitted: severity outputs are not meaningful.")
    return lines


MEANINGS = (
    "**P(pneumonia)**: the probability that the chest shows pneumonia of any kind (1 - "
    "P(No finding)). The first question: is there an abnormality at all?",
    "**P(viral pneumonia)** and **P(COVID-19)**: probabilities of the image showing "
    "viral pneumonia, and COVID-19 pneumonia, among all chests like the training ones. "
    "They always satisfy P(COVID-19) <= P(viral pneumonia) <= P(pneumonia), so a chest "
    "the model calls normal gets a low P(COVID-19).",
    "**P(COVID-19 | pneumonia)**: if there is pneumonia, how likely it is COVID-19.",
    "**Prevalence**: the probabilities assume the COVID-19 prevalence stated with them "
    "(the training data's unless `predict --prevalence P` re-states them for yours, by "
    "Bayes' rule). A clinic's prevalence is rarely the collection's ~80%: re-state.",
    "**Calls** (`positive_findings`): labels at or above their operating point (below); "
    "labels whose operating point rests on too few validation images get no call, only "
    "a probability. Calls are made at the training prevalence.",
    "**Severity**: geographic extent (0-8) and opacity (0-6) of the lungs, as the "
    "collection's radiologists scored them, with an interval at the stated level.",
    "**Input check**: pass, or a refusal naming the check that failed, its score and "
    "what would make the image usable.",
)


def _meaning_lines() -> list[str]:
    return ["", "## What each number means", "", *(f"- {m}" for m in MEANINGS)]


def _lung_model_lines(bundle: ModelBundle) -> list[str]:
    """The lungs-first parts of a bundle made by ``covidcxr train-lung-model``."""
    lung = bundle.metrics.get("lung_model")
    if not isinstance(lung, Mapping):
        return []
    from covidcxr.models.abnormality import ZONE_MAP_FULL_LOGIT, ZONE_MAP_LABEL
    from covidcxr.models.abnormality_train import summary_lines
    from covidcxr.models.gate import EQUALISED_MAX_FLATNESS

    base = bundle.training.get("base_model", {})
    lines = [
        "",
        "## Lungs first",
        "",
        f"The network (kinds of pneumonia, severity) is {base.get('model_id', 'n/a')}'s, "
        "unchanged (same weights sha256). Two models that look at the segmented lungs "
        "answer the first questions:",
        "",
        f"- **Input check**: the lung gate `{bundle.extra['lung_gate']['gate_id']}` "
        "(its card: weights/" + f"{bundle.extra['lung_gate']['gate_id']}/MODEL_CARD.md); "
        "then images whose grey-level histogram is as flat as after histogram equalisation "
        f"(flatness < {EQUALISED_MAX_FLATNESS:g}) are refused: 0.4% of NIH's and 0.5% of the "
        "collection's frontal images, 85-88% of their equalised copies; then images in "
        "which the gate's lung segmenter does not find two lung fields, one on each side, "
        "are refused, because the pneumonia model judges only the lungs it finds: 0.9% "
        "of NIH's frontal images (6 of those 9 with a whited-out hemithorax, which it had "
        "called normal), none of the collection's.",
        "- **Pneumonia at all?**: a logistic regression on standardised grey levels, "
        "blob and edge strength in six lung zones, fitted on "
        f"{bundle.extra['abnormality']['train_source']} (normal and pneumonia frontal "
        "X-rays of one hospital, so the source cannot tell them apart). P(No finding) is "
        "1 - its P(pneumonia); each kind of pneumonia gets the network's share of it.",
        f"- COVID-19 prevalence these probabilities carry: "
        f"{bundle.training.get('covid_prevalence', 'n/a')} "
        f"({bundle.training.get('covid_prevalence_how', '')}).",
        f"- **Heatmaps**: the first, `{ZONE_MAP_LABEL}`, colours each of the six lung zones "
        "by how much its measurements raised P(pneumonia) (full colour: the odds times "
        f"e^{ZONE_MAP_FULL_LOGIT:g}, about 7; zones that lowered it stay uncoloured; the four "
        "whole-lung measures have no place on it). The others show where the network "
        "looked for the kind of pneumonia it called.",
        "- **Image processing moves P(pneumonia)**: see 'Processing only' below. Check "
        "it on your own exports (`covidcxr validate-model`) before use.",
        "",
        "### The pneumonia model, measured",
        "",
        *summary_lines(lung["pneumonia_model"]),
        "",
        "### Held-out test patients of the base's split (all their frontal images in the "
        "store it was built from), combined probabilities",
        "",
        "| label | AUROC [95% CI] | positives | negatives |",
        "|---|---|---|---|",
    ]
    for label, row in lung.get("holdout_test_combined", {}).items():
        lines.append(
            f"| {label} | {_fmt(row['auc'], 2)} [{_fmt(row['low'], 2)}, {_fmt(row['high'], 2)}] "
            f"| {row['positives']} | {row['negatives']} |"
        )
    oof = lung.get("out_of_fold_on_training_source")
    if isinstance(oof, Mapping):
        auc = oof["pneumonia_auc"]
        lines += [
            "",
            f"### {oof['source']}, every image scored by a pneumonia model that never saw "
            "its patient",
            "",
            f"- {oof['images']} images ({oof['refused_by_base_gate']} refused by the base "
            f"network's gate and not scored): P(pneumonia) AUC {_fmt(auc['value'], 2)} "
            f"[{_fmt(auc['low'], 2)}, {_fmt(auc['high'], 2)}]",
            f"- its {oof['normal_images']} normal chests: P(COVID-19) median "
            f"{_fmt(oof['normal_covid_median'], 2)}, 90th percentile "
            f"{_fmt(oof['normal_covid_p90'], 2)}; called COVID-19 "
            f"{100 * oof['normal_called_covid']:.0f}%",
            f"- hierarchy check (P(COVID-19) <= P(viral) <= P(pneumonia)): "
            f"{oof['hierarchy_violations']} violations",
            f"- the base network alone ({base.get('model_id', 'n/a')}, coherent summary), "
            f"same images: P(pneumonia) AUC {_fmt(oof.get('base_pneumonia_auc'), 2)}; "
            f"normal chests' P(COVID-19) median {_fmt(oof.get('base_normal_covid_median'), 2)}",
        ]
    lung_dice = lung_dice_line(_gate_segmenter(bundle))
    return [*lines, "", lung_dice, ""] if lung_dice else [*lines, ""]


def _gate_segmenter(bundle: ModelBundle) -> str | None:
    """The lung segmenter id the bundle's lung gate names (None: unknown)."""
    from covidcxr.models.lung_gate import WEIGHTS_DIR

    gate_id = bundle.extra.get("lung_gate", {}).get("gate_id")
    try:
        card = json.loads((WEIGHTS_DIR.parent / str(gate_id) / "model.json").read_text("utf-8"))
        return str(card["segmenter"]["model_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lung_dice_line(model_id: str | None = None) -> str:
    """What the lung segmenter ``model_id`` (default: the shipped default) measured on
    its held-out patients, over all reference masks and per annotator; ``""`` when its
    ``model.json`` cannot be read."""
    from covidcxr.dataset.samples import MASK_PREFERENCE
    from covidcxr.models.lung_dice import MADE_BY
    from covidcxr.models.lungs import WEIGHTS_DIR, WEIGHTS_ROOT

    folder = WEIGHTS_DIR if model_id is None else WEIGHTS_ROOT / model_id
    try:
        card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        dice = card["test_dice_full_size"]
    except (OSError, ValueError, KeyError):
        return ""
    by_reference = card.get("test_dice_full_size_by_reference", {})
    order = [*(n for n in MASK_PREFERENCE if n in by_reference), *sorted(by_reference)]
    per_annotator = [
        f"{name} masks ({MADE_BY.get(name, 'unknown maker')}, {v['n']} images) mean "
        f"{_fmt(v['mean'], 3)}"
        for name, v in ((n, by_reference[n]) for n in dict.fromkeys(order))
    ]
    agreement = [
        f"the two annotators agree with each other at Dice {_fmt(v['mean'], 3)} ({pair}, "
        f"{v['n']} images with both)"
        for pair, v in card.get("reference_agreement", {}).items()
    ]
    return (
        f"Lung segmenter {card.get('model_id')}: Dice on {dice['n']} images of held-out "
        f"patients mean {_fmt(dice['mean'], 3)}, median {_fmt(dice['median'], 3)}, 10th "
        f"percentile {_fmt(dice['p10'], 3)} (goal 0.95)"
        + "".join(f"; against {part}" for part in per_annotator)
        + "".join(f"; {part}" for part in agreement)
        + "."
    )


def _lung_gate_lines(gate_id: str) -> list[str]:
    from covidcxr.models.lung_gate import WEIGHTS_DIR

    card = WEIGHTS_DIR.parent / gate_id / "MODEL_CARD.md"
    if not card.is_file():
        return ["", "## Input gate", "", f"- lung gate {gate_id}: its card is missing"]
    body = card.read_text(encoding="utf-8").splitlines()[1:]
    return ["", f"## Input gate: {gate_id}", *("#" + b if b.startswith("## ") else b for b in body)]


def _gate_lines(bundle: ModelBundle) -> list[str]:
    spec = bundle.extra.get("lung_gate")
    if isinstance(spec, Mapping):
        failures = ["", "## Known failure modes", "", *(f"- {m}" for m in FAILURE_MODES)]
        return _lung_gate_lines(str(spec["gate_id"])) + failures
    gate = bundle.training.get("validation", {}).get("gate", {})
    lines: list[str] = [
        "",
        "## Input gate",
        "",
        f"- classes: {', '.join(bundle.gate_classes)}",
        f"- rules: shorter side >= {bundle.gate.min_side_px} px; colourfulness <= "
        f"{bundle.gate.max_colourfulness}; frontal_xray probability >= "
        f"{bundle.gate.min_frontal_probability}",
    ]
    if gate:
        lines.append(
            f"- validation accuracy {_fmt(gate.get('accuracy'))}; recall per class: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in gate.get("recall", {}).items())
        )
    lines += ["", "## Known failure modes", ""]
    lines += [f"- {mode}" for mode in FAILURE_MODES]
    return lines


def _reproduce_lines(bundle: ModelBundle) -> list[str]:
    split = bundle.training.get("split", {})
    command = bundle.training.get("command", "n/a")
    base = bundle.training.get("base_model", {}).get("model_id")
    if base:
        split = {}  # train-lung-model takes the base bundle's split as it is
    return [
        "",
        "## How to reproduce",
        "",
        "1. Build a store with the same data (for the shipped model: the collection "
        "snapshot in `../shared/datasets/covid-chestxray` ingested with its "
        "`metadata-latest.csv`, and the NIH subset, as `scripts/run.sh` does).",
        f"2. Run `{command}`"
        + (
            f" (add `--split <bundle folder of {bundle.model_id}>/split.csv` to pin the split)"
            if split.get("file")
            else ""
        )
        + ".",
        "3. Check that the data version printed matches the one above; the validation "
        "and test numbers then fall within the intervals stated here (the same seed, "
        "data and thread count give the same weights)."
        + (
            f" The base network is {base}'s, copied unchanged; the lung gate is its own "
            "bundle (`covidcxr train-gate`)."
            if base
            else ""
        ),
        "",
    ]


OUTCOME_MEANING = (
    "What the numbers mean: each row is a penalised logistic regression on the named "
    "inputs, cross-validated with every patient on one side of each fold. AUROC is the "
    "chance that a patient with the event gets a higher risk than one without (0.5 = "
    "chance); Brier is the mean squared error of the risk (lower is better); a "
    "calibration slope below 1 means risks too extreme, an intercept above 0 risks too "
    "low; NB@t is the net benefit of treating patients whose risk reaches t, to compare "
    "with treating everyone. The outcomes come from published case reports, not a "
    "consecutive series: these are research estimates, not a diagnosis, and say nothing "
    "yet about patients at another hospital (`covidcxr validate-model` with outcome "
    "columns measures that)."
)


SHIPPED_OUTCOMES = (
    "The shipped prognosis models (`prognosis-v1`: death, ICU admission, intubation; "
    "their card is `models/weights/prognosis-v1/README.md`) are the `all` rows below, "
    "fitted on every patient. Data: a store of the collection with its newest metadata "
    "(`covidcxr ingest ../shared/datasets/covid-chestxray --metadata metadata-latest.csv`)."
)


def _outcome_lines(evaluations: Sequence[Mapping[str, Any]], shipped: bool = False) -> list[str]:
    """The "Outcomes (prognosis)" section from prognosis evaluations (``to_dict`` of
    :class:`covidcxr.models.prognosis.PrognosisEvaluation`); ``shipped``: they are
    those of the shipped prognosis models."""
    lines = ["", "## Outcomes (prognosis)", ""]
    if not evaluations:
        return [
            *lines,
            "Not evaluated. `covidcxr prognosis evaluate --image-model ID --out DIR` "
            "measures how well this model's outputs, with the clinical values, predict "
            "death, ICU admission and intubation.",
        ]
    from covidcxr.models.prognosis import PrognosisEvaluation, markdown_section
    from covidcxr.serialise import from_dict

    parsed = [from_dict(PrognosisEvaluation, e) for e in evaluations]
    body = markdown_section(parsed).splitlines()[1:]  # its own heading replaced
    return [
        *lines,
        f"**{RESEARCH_USE_ONLY.capitalize()}.** Risks of death, ICU admission and "
        "intubation from the clinical values and this model's outputs "
        "(`covidcxr predict --age ...`); not for triage decisions.",
        "",
        OUTCOME_MEANING,
        *(["", SHIPPED_OUTCOMES] if shipped else []),
        *body,
    ]


def prognosis_evaluations(bundle: ModelBundle) -> list[dict[str, Any]]:
    """The bundle's prognosis evaluations: ``metrics["prognosis"]``, else the shipped
    prognosis models' evaluations of this image model (none: empty)."""
    given = bundle.metrics.get("prognosis")
    if isinstance(given, list):
        return [dict(e) for e in given]
    from covidcxr.models.prognosis_risk import shipped_evaluations

    # A lungs-first bundle shares its base's network, whose outputs the models read.
    base = bundle.training.get("base_model", {}).get("model_id")
    return shipped_evaluations(bundle.model_id) or (shipped_evaluations(base) if base else [])


def _of_base_network(bundle: ModelBundle, lines: list[str]) -> list[str]:
    """A lungs-first bundle's sections that describe the network it shares with its base
    say so in their headings (their numbers are the base network's own outputs)."""
    base = bundle.training.get("base_model", {}).get("model_id")
    if not base:
        return lines
    return [
        f"{line} (the base network, {base})"
        if line.startswith("## ") and not line.startswith("## Calibration")
        else line
        for line in lines
    ]


def render_card(bundle: ModelBundle, prognosis: Sequence[Mapping[str, Any]] | None = None) -> str:
    """MODEL_CARD.md for a bundle (Markdown).

    Args:
        bundle: the bundle.
        prognosis: prognosis evaluations for the outcome section (default:
            :func:`prognosis_evaluations`).
    """
    evaluations = prognosis_evaluations(bundle) if prognosis is None else prognosis
    shipped = prognosis is None and "prognosis" not in bundle.metrics
    inherited = [
        *_data_lines(bundle.training),
        *_split_training_lines(bundle),
        *_metrics_lines(bundle),
        *_severity_lines(bundle),
    ]
    lines = [
        *_header_lines(bundle),
        *_meaning_lines(),
        *_lung_model_lines(bundle),
        *_of_base_network(bundle, inherited),
        *_outcome_lines(evaluations, shipped),
        *_gate_lines(bundle),
        *_reproduce_lines(bundle),
    ]
    return "\n".join(lines)
