"""Choosing a prediction engine, and :func:`predict`: the one-call second opinion.

``predict(paths)`` loads the shipped model (or the one named), picks the torch engine
when torch is installed and the bundle has torch weights (else onnxruntime), and
returns one :class:`~covidcxr.models.runtime.PredictionRow` per image file. Every row
carries the input check, calibrated probabilities, severity with its interval, the
model id and weights hash, and "research use only, not a diagnosis".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Final

from covidcxr.errors import MetadataError, MissingExtraError
from covidcxr.models.bundle import ModelBundle, load_bundle
from covidcxr.models.coherence import COVID
from covidcxr.models.rows import PredictionRow, summarise_row
from covidcxr.models.runtime import DEFAULT_BATCH_SIZE, InferenceEngine, OnnxPredictor

ENGINES: Final = ("auto", "torch", "onnx")

__all__ = ["ENGINES", "make_engine", "predict", "quality_note", "restate"]


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def make_engine(
    bundle: ModelBundle,
    engine: str = "auto",
    *,
    saliency_method: str = "gradcam",
    threads: int | None = None,
) -> InferenceEngine:
    """The prediction engine for a bundle.

    Args:
        bundle: the model.
        engine: ``torch``, ``onnx`` or ``auto`` (torch when importable and the bundle
            has torch weights, else onnx).
        saliency_method: the torch engine's heatmap method (``gradcam`` or ``cam``).
        threads: CPU threads (torch: process-wide; onnx: the session's).

    Raises:
        MissingExtraError: the engine's package is not installed.
        MetadataError: an unknown engine, or the bundle lacks the engine's file.
    """
    if engine == "auto":
        engine = "torch" if bundle.weights_path.is_file() and _torch_importable() else "onnx"
    if engine == "onnx":
        return OnnxPredictor(bundle, threads=threads)
    if engine != "torch":
        raise MetadataError(f"predict: engine {engine!r} is not one of {', '.join(ENGINES)}")
    try:
        import torch

        from covidcxr.models.predict import Predictor
    except ImportError as exc:
        raise MissingExtraError("torch", "ml") from exc
    if threads is not None:
        torch.set_num_threads(threads)
    return Predictor(bundle, saliency_method="cam" if saliency_method == "cam" else "gradcam")


def predict(
    paths: Sequence[str | os.PathLike[str]],
    *,
    model: str | os.PathLike[str] | None = None,
    engine: str = "auto",
    heatmaps_dir: str | os.PathLike[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    prevalence: float | None = None,
) -> list[PredictionRow]:
    """A second opinion on image files and folders (research use only, not a diagnosis).

    Args:
        paths: PNG/JPEG files, or folders (every file under them).
        model: a model id or bundle folder; ``None``: the shipped default.
        engine: ``auto``, ``torch`` or ``onnx`` (see :func:`make_engine`).
        heatmaps_dir: where to write a heatmap overlay PNG per explained finding.
        batch_size: images per forward pass.
        prevalence: the local COVID-19 prevalence for each row's coherent summary
            (default: the model's training prevalence).

    Returns:
        One row per file, in input order; files that cannot be judged get a row with
        the failed check and its reason, and no findings.

    Raises:
        MetadataError: no such model or path.
        MissingExtraError: the engine's package is not installed.
    """
    bundle = load_bundle(model)
    rows = make_engine(bundle, engine).predict_files(
        paths, heatmaps_dir=heatmaps_dir, batch_size=batch_size
    )
    return rows if prevalence is None else restate(rows, bundle, prevalence)


def restate(
    rows: Sequence[PredictionRow], bundle: ModelBundle, prevalence: float | None = None
) -> list[PredictionRow]:
    """Rows whose coherent summary is recomputed from their (possibly recalibrated)
    probabilities, at ``prevalence`` (default: the model's training prevalence)."""
    return [
        dataclasses.replace(row, summary=summarise_row(row.probabilities, bundle, prevalence))
        if row.summary is not None
        else row
        for row in rows
    ]


def quality_note(bundle: ModelBundle, labels: Sequence[str] = ("COVID-19", "No finding")) -> str:
    """One line on the model's measured quality, from its stored evaluation.

    Names the model id, says it is a research baseline, and gives the cross-validated
    AUC with its 95% interval for ``labels`` (those the bundle's metrics hold); says so
    plainly when the bundle holds no evaluation.
    """
    lung = _lung_model_quality(bundle)
    if lung:
        return f"model {bundle.model_id}, a research baseline: {lung} (see its model card)."
    evaluation = bundle.metrics.get("evaluation") or {}
    kfold = (evaluation.get("findings") or {}).get("kfold") or {}
    parts = []
    for label in labels:
        auc = ((kfold.get("labels") or {}).get(label) or {}).get("auc") or {}
        value, interval = auc.get("value"), auc.get("ci95")
        if value is not None and interval:
            parts.append(f"{label} {value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]")
    quality = (
        "cross-validated AUC " + ", ".join(parts) + " (see its model card)"
        if parts
        else "no stored evaluation: its quality is unmeasured"
    )
    return f"model {bundle.model_id}, a research baseline: {quality}."


def _lung_model_quality(bundle: ModelBundle) -> str:
    """The measured quality of a lungs-first bundle (``train-lung-model``), else ''."""
    lung = bundle.metrics.get("lung_model")
    if not isinstance(lung, Mapping):
        return ""
    cv = lung["pneumonia_model"]["within_source_cv"]
    covid = lung.get("holdout_test_combined", {}).get("COVID-19", {})
    text = (
        f"pneumonia vs no finding AUC {cv['auc']:.2f} [{cv['low']:.2f}, {cv['high']:.2f}] "
        f"(cross-validated within {cv['source']})"
    )
    if covid:
        text += (
            f"; COVID-19 AUC {covid['auc']:.2f} [{covid['low']:.2f}, {covid['high']:.2f}] "
            "on held-out patients of the collection"
        )
    return text


def covid_at_chance(bundle: ModelBundle) -> str | None:
    """The model's measured COVID-19 AUC in words when its 95% interval reaches 0.5 (the
    COVID-19 answer is then no better than chance and must not be used), else None."""
    lung = bundle.metrics.get("lung_model")
    if isinstance(lung, Mapping):
        row = lung.get("holdout_test_combined", {}).get(COVID) or {}
        value, low, high = row.get("auc"), row.get("low"), row.get("high")
        where = "held-out patients"
    else:
        kfold = (bundle.metrics.get("evaluation") or {}).get("findings", {}).get("kfold", {})
        auc = (kfold.get("labels", {}).get(COVID) or {}).get("auc") or {}
        value, (low, high) = auc.get("value"), (auc.get("ci95") or (None, None))
        where = "cross-validation"
    if value is None or low is None or high is None or low > 0.5:
        return None
    return f"AUC {value:.2f} [{low:.2f}, {high:.2f}] in {where}"
