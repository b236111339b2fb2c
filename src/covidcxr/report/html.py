"""Rendering reports as one self-contained HTML file (Jinja2 templates, inline PNG plots)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from covidcxr.errors import MissingExtraError
from covidcxr.markdown_html import markdown_html
from covidcxr.report import plots


def _environment() -> Any:
    try:
        from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
    except ImportError as exc:
        raise MissingExtraError("jinja2", "report") from exc

    environment = Environment(
        loader=PackageLoader("covidcxr.report", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = _number
    environment.filters["est"] = _estimate
    environment.filters["markdown"] = _markdown
    return environment


def _markdown(text: str) -> Any:
    """Markdown as HTML the template inserts unescaped (raw HTML in it is escaped)."""
    from markupsafe import Markup

    return Markup(markdown_html(text, extra="report"))


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _estimate(estimate: Mapping[str, Any] | None, digits: int = 2) -> str:
    """``0.81 [0.72, 0.90]`` from an estimate dict (``n/a`` when undefined)."""
    if not estimate or estimate.get("value") is None:
        return "n/a"
    value, low, high = estimate["value"], estimate.get("low"), estimate.get("high")
    if low is None or high is None:
        return f"{value:.{digits}f} (no interval)"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _gallery(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    items = []
    for entry in section.get("gallery", []):
        items.append({**entry, "image": plots.thumbnail(entry["heatmap"] or entry["path"])})
    return items


def _cohort_plots(cohort: Mapping[str, Any]) -> list[str]:
    found = []
    references = cohort["references"]
    found.append(plots.bars("Reference labels", references))
    for field, title in (
        ("sex", "Sex"),
        ("age_band", "Age band"),
        ("view", "View"),
        ("site", "Site"),
    ):
        counts = cohort[field]
        if set(counts) != {"unknown"}:
            found.append(plots.bars(title, counts, ordered=field == "age_band"))
    return found


def render_validation(report: Mapping[str, Any], recalibration_file: str | None = None) -> str:
    """The validation report as one HTML document (opens with no network)."""
    primary = report["labels"].get(report["primary_label"] or "")
    figures = {
        label: {
            "roc": plots.roc(label, section),
            "reliability": plots.reliability(label, section["calibration"]),
        }
        for label, section in report["labels"].items()
    }
    context: dict[str, Any] = {
        "r": report,
        "primary": primary,
        "primary_ok": bool(primary) and (primary["discrimination"]["auc"]["low"] or 0) > 0.7,
        "plots": figures,
        "cohort_plots": _cohort_plots(report["cohort"]),
        "severity_plots": {
            name: plots.bland_altman(name, found) for name, found in report["severity"].items()
        },
        "subgroup_plot": plots.intervals(
            f"{report['primary_label']}: AUC by subgroup",
            [
                (f"{g['field'].replace('_', ' ')} = {g['value']} (n={g['n']})", g["auc"])
                for g in primary["subgroups"]
            ],
            "AUC (95% interval); dotted: chance",
        )
        if primary and primary["subgroups"]
        else None,
        "shortcut_plot": plots.intervals(
            f"{report['primary_label']} predicted from one metadata field",
            [(m["field"].replace("_", " "), m["auc"]) for m in primary["metadata_shortcut"]],
            "AUC of the field alone (95% interval); dotted: chance",
        )
        if primary
        else None,
        "gallery": _gallery(primary) if primary else [],
        "recalibration_file": recalibration_file,
        "toc": [
            ("cohort", "Cohort"),
            ("checks", "Input checks"),
            ("discrimination", "Discrimination"),
            ("calibration", "Calibration"),
            ("severity", "Severity"),
            ("outcomes", "Outcomes"),
            ("subgroups", "Subgroups"),
            ("shortcuts", "Shortcuts"),
            ("gallery", "Errors"),
            ("card", "Model card"),
            ("evidence", "Evidence"),
        ],
    }
    return str(_environment().get_template("validation.html.j2").render(**context))


def render_datasheet(sheet: Mapping[str, Any]) -> str:
    """The datasheet as one HTML document (opens with no network)."""
    figures = {name: plot(sheet) for name, plot in _DATASHEET_PLOTS.items()}
    figures.update(_finding_levels(sheet))
    template = _environment().get_template("datasheet.html.j2")
    return str(template.render(d=sheet, plots=figures))


def _finding_levels(sheet: Mapping[str, Any]) -> dict[str, str]:
    composition = sheet["composition"]
    return {
        f"findings, level {level}": plots.bars(
            f"Findings, hierarchy level {level}", counts, "records"
        )
        for level, counts in composition["findings_by_level"].items()
    }


_DATASHEET_PLOTS: dict[str, Any] = {
    "views": lambda d: plots.bars("Views", d["composition"]["view"], "records"),
    "modalities": lambda d: plots.bars("Modalities", d["composition"]["modality"], "records"),
    "sex": lambda d: plots.bars("Sex", d["composition"]["sex"], "records"),
    "age": lambda d: plots.histogram("Age", d["composition"]["ages_years"], "age (years)"),
    "regions": lambda d: plots.bars(
        "Regions (last part of location)", d["composition"]["regions"], "records"
    ),
    "sources": lambda d: plots.bars("Sources", d["composition"]["sources"], "records"),
    "images_per_patient": lambda d: plots.bars(
        "Images per patient", d["composition"]["images_per_patient"], "patients"
    ),
    "offsets": lambda d: plots.histogram(
        "Day offsets (days since symptom onset or admission)",
        d["composition"]["offsets_days"],
        "days",
    ),
    "missingness": lambda d: plots.bars(
        "Missing values per clinical field (%)",
        d["composition"]["missing_percent"],
        "% of records missing",
    ),
    "licences": lambda d: plots.bars("Licences", d["distribution"]["licenses"], "records"),
}
