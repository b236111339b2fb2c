"""Fit the network's severity head: ridge regression (:mod:`covidcxr.models.severity`) on
the pooled features of the scored images, written into the head's weights, with its
split-conformal interval and, out of sample, the reference protocol."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from covidcxr.dataset.loading import CacheDir
from covidcxr.dataset.tasks import get_task
from covidcxr.dataset.torch_dataset import CollectionDataset
from covidcxr.models import severity
from covidcxr.models.config import TrainConfig
from covidcxr.models.network import CXRModel
from covidcxr.models.pools import Pool, forward_pool, load_pixels
from covidcxr.models.sample_sets import SEVERITY_TASK, SeverityData


def fit_severity_head(
    network: CXRModel,
    data: SeverityData,
    config: TrainConfig,
    device: torch.device,
    cache_dir: CacheDir,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the ridge on ``data``'s pooled features and write it into the severity head.

    Returns:
        (interval, record): the bundle's ``severity_interval`` (``level``,
        ``half_width`` per output, ``method``) and what training records about the fit
        (its size, penalty, cross-validated error and, out of sample with
        ``config.severity_splits`` > 0, the reference protocol).
    """
    task = get_task(SEVERITY_TASK)
    chosen = [data.samples.samples[i] for i in data.indices]
    targets = np.array([s.labels for s in chosen], dtype=np.float64)
    pixels = load_pixels(data.samples, data.indices, config.size, cache_dir)
    n_labels = len(network.heads.findings.weight)
    pool = Pool(
        pixels,
        np.zeros((len(chosen), n_labels), np.float32),
        np.zeros(len(chosen), np.int64),
        [s.patient for s in chosen],
    )
    features = forward_pool(network, pool, device, config.batch_size)["pooled"].astype(np.float64)
    fit = severity.fit_severity(
        features,
        targets,
        list(data.groups),
        ranges=task.ranges,
        level=config.severity_level,
        rng=rng,
    )
    weight, bias = severity.severity_head_parameters(fit)
    with torch.no_grad():
        network.heads.severity.weight.copy_(torch.from_numpy(weight).to(torch.float32))
        network.heads.severity.bias.copy_(torch.from_numpy(bias).to(torch.float32))
    record = _fit_record(fit, data.out_of_sample)
    if data.out_of_sample and config.severity_splits > 0 and fit.n_groups >= 4:
        record["protocol"] = _protocol(features, targets, data, config, rng).as_dict()
        study = _mask_feature_study(data, pixels, features, targets, config, cache_dir, rng)
        if study:
            record["mask_feature_study"] = study
    elif not data.out_of_sample:
        record["protocol"] = (
            "not measured: the backbone trained on the scored images "
            "(train with hold_out_severity to measure)"
        )
    return _interval(fit, config.severity_level, data.out_of_sample), record


def _interval(fit: severity.SeverityFit, level: float, out_of_sample: bool) -> dict[str, Any]:
    ranges = get_task(SEVERITY_TASK).ranges
    return {
        "level": level,
        # Too few images for the level give an infinite width: the whole range.
        "half_width": [
            round(float(min(h, high - low)), 4)
            for h, (low, high) in zip(fit.half_width, ranges, strict=True)
        ],
        "method": "split-conformal: the ceil((n+1)*level)-th smallest absolute residual of "
        f"patient-grouped 5-fold cross-validated ridge predictions on the {fit.n_images} "
        f"scored images ({fit.n_groups} patient groups); "
        + (
            "the backbone never trained on them"
            if out_of_sample
            else "the backbone trained on them, so the interval is optimistic"
        ),
    }


def _fit_record(fit: severity.SeverityFit, out_of_sample: bool) -> dict[str, Any]:
    return {
        "fitted": True,
        "images": fit.n_images,
        "patient_groups": fit.n_groups,
        "out_of_sample": out_of_sample,
        "alpha": fit.ridge.alpha,
        "features": "pooled backbone features (ridge, standardisation folded into the head)",
        "cross_validated_mae": [round(float(v), 4) for v in fit.cross_validated_mae],
        "residual_sd": [round(float(v), 4) for v in fit.residual_sd],
    }


def _protocol(
    features: NDArray[np.float64],
    targets: NDArray[np.float64],
    data: SeverityData,
    config: TrainConfig,
    rng: np.random.Generator,
) -> severity.ProtocolResult:
    task = get_task(SEVERITY_TASK)
    return severity.random_split_protocol(
        features,
        targets,
        list(data.groups),
        labels=task.labels,
        ranges=task.ranges,
        splits=config.severity_splits,
        rng=rng,
    )


def _mask_feature_study(
    data: SeverityData,
    pixels: NDArray[np.uint8],
    pooled: NDArray[np.float64],
    targets: NDArray[np.float64],
    config: TrainConfig,
    cache_dir: CacheDir,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The reference protocol on lung-zone features (from lung masks) alone and with the
    pooled features: a measurement only, as the shipped head cannot use masks."""
    rows = [k for k, i in enumerate(data.indices) if data.samples.samples[i].mask_sha256]
    if len(rows) < len(data.indices):
        return {"skipped": f"{len(data.indices) - len(rows)} scored image(s) have no lung mask"}
    dataset = CollectionDataset(
        data.samples, size=config.size, indices=list(data.indices), cache_dir=cache_dir, masks=True
    )
    zone = np.stack(
        [
            severity.lung_zone_features(pixels[k], dataset[k]["mask"][0].numpy().astype(np.uint8))
            for k in range(len(dataset))
        ]
    )
    result = {}
    for name, features in (
        ("lung_zones", zone),
        ("pooled_and_lung_zones", np.hstack([pooled, zone])),
    ):
        measured = _protocol(features, targets, data, config, rng).as_dict()
        result[name] = {key: measured[key] for key in ("mae", "mae_sd", "r2")}
    return result
