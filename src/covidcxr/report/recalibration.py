"""A site's recalibration file (Platt scaling per label), as ``predict`` applies it."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from covidcxr.errors import MetadataError
from covidcxr.models.bundle import ModelBundle
from covidcxr.models.rows import PredictionRow
from covidcxr.serialise import read_json_object

FORMAT: Final = "covidcxr-recalibration/1"


def load_recalibration(
    path: str | os.PathLike[str], bundle: ModelBundle
) -> dict[str, tuple[float, float]]:
    """Label -> (a, b) from a file ``validate-model`` wrote for this model.

    Raises:
        MetadataError: unreadable file, another format, another model, an unknown label
            or a slope that is not positive.
    """
    file = Path(path)
    doc = read_json_object(file, "predict: recalibration file")
    if doc.get("format") != FORMAT:
        raise MetadataError(
            f"predict: {file} is not a recalibration file (format {FORMAT}); write one with "
            "covidcxr validate-model"
        )
    if doc.get("model_id") != bundle.model_id or doc.get("weights_sha256") not in (
        None,
        bundle.weights_sha256,
    ):
        raise MetadataError(
            f"predict: {file} recalibrates model {doc.get('model_id')!r}, not "
            f"{bundle.model_id!r} (weights {bundle.weights_sha256[:12]}); validate this model "
            "to make its own"
        )
    fits: dict[str, tuple[float, float]] = {}
    for label, fit in (doc.get("labels") or {}).items():
        if label not in bundle.findings:
            raise MetadataError(f"predict: {file}: label {label!r} is not one of the model's")
        a, b = float(fit["a"]), float(fit["b"])
        if not (a > 0 and math.isfinite(b)):
            raise MetadataError(f"predict: {file}: {label} has a = {a}, b = {b}; a must be > 0")
        fits[label] = (a, b)
    return fits


def _platt(p: float, a: float, b: float) -> float:
    q = min(max(p, 1e-6), 1 - 1e-6)
    return 1.0 / (1.0 + math.exp(-(a * math.log(q / (1 - q)) + b)))


def recalibrate(
    rows: Sequence[PredictionRow], fits: Mapping[str, tuple[float, float]]
) -> list[PredictionRow]:
    """Rows with recalibrated probabilities.

    The positive findings stay those of the model's stored operating points: the map is
    increasing, so the operating point moves with the probabilities.
    """
    return [
        dataclasses.replace(
            row,
            probabilities={
                label: p if p is None or label not in fits else _platt(p, *fits[label])
                for label, p in row.probabilities.items()
            },
        )
        for row in rows
    ]
