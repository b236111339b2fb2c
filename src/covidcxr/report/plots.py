"""The report's plots as ``data:`` PNG URIs (matplotlib, no network to view them)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import MissingExtraError

_SIZE = (4.8, 3.4)


def _figure(size: tuple[float, float] = _SIZE) -> tuple[Any, Any]:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError("matplotlib", "report") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=size, dpi=100)
    return figure, axes


def _uri(figure: Any) -> str:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def roc(label: str, section: Mapping[str, Any]) -> str:
    """The ROC curve with the stored and re-chosen operating points."""
    figure, axes = _figure()
    curve = section["discrimination"]["roc"]
    auc = section["discrimination"]["auc"]
    axes.plot(curve["fpr"], curve["tpr"], color="#1f4e79", label="ROC")
    axes.plot([0, 1], [0, 1], color="#999", linestyle=":", label="chance")
    for key, marker, name in (
        ("stored_operating_point", "o", "stored operating point"),
        ("rechosen_operating_point", "s", "re-chosen here (optimistic)"),
    ):
        point = section[key]
        sens, spec = point["sensitivity"]["value"], point["specificity"]["value"]
        if sens is not None and spec is not None:
            axes.plot([1 - spec], [sens], marker, markersize=8, label=name)
    low, high = auc["low"], auc["high"]
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    axes.set_title(f"{label}: AUC {auc['value']:.2f}{interval}", fontsize=10)
    axes.set_xlabel("1 - specificity (false positive rate)")
    axes.set_ylabel("sensitivity")
    axes.legend(fontsize=7, loc="lower right")
    return _uri(figure)


def reliability(label: str, calibration: Mapping[str, Any]) -> str:
    """Observed rate against mean predicted probability per bin (dot area ~ cases)."""
    figure, axes = _figure()
    axes.plot([0, 1], [0, 1], color="#999", linestyle=":", label="perfect calibration")
    series = [("as given", calibration["as_given"], "#1f4e79")]
    if calibration.get("platt"):
        series.append(("recalibrated (in-sample)", calibration["platt"]["in_sample"], "#c55a11"))
    for name, found, colour in series:
        bins = found["bins"]
        axes.plot(
            [b["mean_p"] for b in bins], [b["observed"] for b in bins], "-", color=colour, alpha=0.6
        )
        axes.scatter(
            [b["mean_p"] for b in bins],
            [b["observed"] for b in bins],
            s=[12 + 4 * b["n"] for b in bins],
            color=colour,
            label=f"{name}: Brier {found['brier']:.3f}, ECE {found['ece']:.3f}",
        )
    axes.set(xlim=(0, 1), ylim=(-0.02, 1.02))
    axes.set_title(f"{label}: reliability", fontsize=10)
    axes.set_xlabel("mean predicted probability")
    axes.set_ylabel("observed proportion positive")
    axes.legend(fontsize=7, loc="upper left")
    return _uri(figure)


def bland_altman(name: str, found: Mapping[str, Any]) -> str:
    """Difference (model - reference) against the mean of the two, with the limits."""
    figure, axes = _figure()
    truth, guess = np.asarray(found["truth"]), np.asarray(found["predicted"])
    axes.scatter((truth + guess) / 2, guess - truth, s=14, color="#1f4e79")
    for value, style, text in (
        (found["bias"], "-", "bias"),
        (found["loa_low"], "--", "-1.96 SD"),
        (found["loa_high"], "--", "+1.96 SD"),
    ):
        if value is not None and math.isfinite(value):
            axes.axhline(value, color="#c55a11", linestyle=style)
            axes.annotate(
                f"{text} {value:.2f}",
                (axes.get_xlim()[1], value),
                fontsize=7,
                ha="right",
                va="bottom",
            )
    axes.set_title(f"{name}: Bland-Altman (n = {found['n']})", fontsize=10)
    axes.set_xlabel("mean of model and reference score")
    axes.set_ylabel("model - reference")
    return _uri(figure)


def bars(
    title: str,
    counts: Mapping[str, float],
    xlabel: str = "images",
    top: int = 20,
    ordered: bool = False,
) -> str:
    """Horizontal bars of counts, largest first (or in the given order when
    ``ordered``); past ``top`` bars the rest are summed as ``other``."""
    items = list(counts.items()) if ordered else sorted(counts.items(), key=lambda kv: -kv[1])
    if len(items) > top:
        items = [
            *items[: top - 1],
            (f"other ({len(items) - top + 1})", sum(v for _, v in items[top - 1 :])),
        ]
    height = max(2.2, 0.28 * len(items) + 1.0)
    figure, axes = _figure((5.6, height))
    names = [str(k)[:40] for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    axes.barh(names, values, color="#1f4e79")
    for y, value in enumerate(values):
        axes.annotate(
            f"{value:g}",
            (value, y),
            fontsize=7,
            va="center",
            xytext=(2, 0),
            textcoords="offset points",
        )
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.tick_params(axis="y", labelsize=7)
    return _uri(figure)


def histogram(title: str, values: Sequence[float], xlabel: str, bins: int = 20) -> str:
    """A histogram (``no data`` when empty)."""
    figure, axes = _figure()
    if values:
        axes.hist(values, bins=bins, color="#1f4e79")
    else:
        axes.text(0.5, 0.5, "no data", ha="center", transform=axes.transAxes)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("count")
    return _uri(figure)


def intervals(title: str, rows: Sequence[tuple[str, Mapping[str, Any] | None]], xlabel: str) -> str:
    """A forest plot: one estimate with its interval per row, chance at 0.5."""
    height = max(2.2, 0.3 * len(rows) + 1.0)
    figure, axes = _figure((5.6, height))
    for y, (_, estimate) in enumerate(reversed(rows)):
        value = estimate and estimate.get("value")
        if value is None:
            continue
        low, high = estimate.get("low"), estimate.get("high")
        if low is not None and high is not None:
            axes.plot([low, high], [y, y], color="#1f4e79")
        axes.plot([value], [y], "o", color="#1f4e79")
    axes.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)], fontsize=7)
    axes.axvline(0.5, color="#999", linestyle=":")
    axes.set_xlim(0, 1)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    return _uri(figure)


def thumbnail(path: str | Path, side: int = 256) -> str | None:
    """A PNG thumbnail of an image file, or ``None`` when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
