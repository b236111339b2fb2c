"""What a local validation can and cannot support, item by item (TRIPOD+AI, CLAIM)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _item(guideline: str, item: str, status: str, detail: str) -> dict[str, str]:
    return {"guideline": guideline, "item": item, "status": status, "detail": detail}


def sample_size_text(label: str, size: Mapping[str, Any], half_widths: Mapping[str, float]) -> str:
    """One paragraph: how wide the intervals are and how many cases would narrow them."""
    auc = size["auc_cases"]
    widths = ", ".join(f"{name} +/-{width:.2f}" for name, width in half_widths.items())
    return (
        f"{label}: {size['positives']} positive and {size['negatives']} negative cases give "
        f"95% intervals of about {widths}. Intervals of +/-{size['target_half_width']:.2f} "
        f"need about {auc['positives']} positives and {auc['negatives']} negatives for the "
        f"AUC (same proportion), {size['sensitivity_positives']} positives for sensitivity "
        f"and {size['specificity_negatives']} negatives for specificity."
    )


def evidence_items(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """The reporting items this validation informs, each with what it supports.

    ``status`` is ``reported`` (the report gives it), ``partly`` (given, with a caveat)
    or ``not supported`` (this evidence cannot speak to it).
    """
    cohort = report["cohort"]
    primary = report["labels"].get(report["primary_label"] or "", {})
    has_patients = cohort["patients_given"]
    has_dates = cohort["fields_known"].get("acquired_on", 0) > 0
    size = primary.get("sample_size_text", "no label with both classes: no sample size")
    dates = (
        "site and acquisition dates from labels.csv"
        if has_dates
        else "no acquisition dates given: the period the cases cover is unknown"
    )
    level = "patient-level" if has_patients else "image-level"
    rows = [
        ("TRIPOD+AI", "Data sources and dates", "reported" if has_dates else "partly", dates),
        ("TRIPOD+AI", "Participants: characteristics", "reported",
         "cohort table: sex, age bands, views, sites, label counts"),
        ("TRIPOD+AI", "Outcome (reference standard)", "partly",
         "labels as supplied by the site; the site states how they were established "
         "(RT-PCR, radiologist consensus...)"),
        ("TRIPOD+AI", "Sample size", "reported", size),
        ("TRIPOD+AI", "Missing data", "reported",
         "images failing the input check, duplicates and unknown labels are counted and "
         "left out (input checks section)"),
        ("TRIPOD+AI", "Model performance: discrimination and calibration", "reported",
         f"AUC with 95% {level} bootstrap intervals; Brier score, ECE, reliability diagram"),
        ("TRIPOD+AI", "Performance in subgroups (fairness)", "partly",
         "subgroup table with intervals; small groups are flagged and cannot show equal "
         "performance"),
        ("TRIPOD+AI", "Model updating (recalibration)", "partly",
         "Platt recalibration fitted on these cases: its in-sample numbers are optimistic "
         "until checked on new cases"),
        ("CLAIM", "Failure analysis", "reported",
         "gallery of the most confident errors (with heatmaps for our model)"),
        ("CLAIM", "External testing", "partly",
         "valid only if none of these patients trained or tuned the model: the site must "
         "confirm it (the model card names the training data)"),
        ("CLAIM", "Robustness and shortcuts", "partly",
         "metadata shortcut check always; image shortcut audit with reference lung masks "
         "or the lung segmenter's (the report says how many of each)"),
        ("TRIPOD+AI / CLAIM", "Clinical utility, prospective use", "not supported",
         "a retrospective set cannot show benefit to patients or workflow; the re-chosen "
         "operating point is optimistic and needs confirmation on new cases"),
    ]  # fmt: skip
    return [_item(*row) for row in rows]
