"""What evaluation needs from training (:class:`FitFunction`, :class:`EvaluationModel`)
and the real fit, :func:`training_fit`, which wraps
:func:`covidcxr.models.train.fit_on_indices` (torch is imported only when it is called)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from covidcxr.dataset.loading import DEFAULT_CACHE_DIR, CacheDir
from covidcxr.dataset.samples import SampleSet
from covidcxr.dataset.splits import make_split
from covidcxr.errors import MissingExtraError
from covidcxr.store.db import Store

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class EvaluationModel(Protocol):
    """A trained model as evaluation uses it (the real one wraps ``TrainedModel``).

    Images are N x 1 x S x S float32 in [-1024, 1024] (``S = input_size``, centre
    crop), exactly what :class:`~covidcxr.dataset.torch_dataset.CollectionDataset`
    gives for ``img``.
    """

    @property
    def input_size(self) -> int:
        """The side S of the square input."""
        ...

    @property
    def thresholds(self) -> Sequence[float]:
        """Per finding label, the operating point on the calibrated probability."""
        ...

    def predict_findings(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        """N x L calibrated finding probabilities."""
        ...

    def features(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        """N x C pooled backbone features (for the severity regression)."""
        ...


class FitFunction(Protocol):
    """Train a model on some samples of a set.

    ``fit`` sees only ``train_indices``; it must make any validation split it needs
    (calibration, early stopping, operating point) from those samples' patients, and
    must use no image of ``exclude_patients`` for anything (they are the test fold, or
    the severity-scored patients; an auxiliary objective such as the input gate must
    not see them either).
    """

    def __call__(
        self,
        samples: SampleSet,
        train_indices: Sequence[int],
        *,
        seed: int,
        exclude_patients: frozenset[str],
    ) -> EvaluationModel: ...


#: Inner validation share of each training set: one fold of a k-fold split of the
#: training patients (k = 6: 17 %, close to train_model's 0.15 / 0.85).
INNER_VALIDATION_FOLDS = 6


class _TrainedAdapter:
    """A :class:`~covidcxr.models.train.TrainedModel` as an :class:`EvaluationModel`."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    def input_size(self) -> int:
        return int(self.model.config.size)

    @property
    def thresholds(self) -> Sequence[float]:
        return tuple(float(t) for t in self.model.thresholds)

    def _predict(self, images: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        result: dict[str, NDArray[Any]] = self.model.predict(
            batch, batch_size=self.model.config.batch_size
        )
        return result

    def predict_findings(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        return np.asarray(self._predict(images)["findings"], dtype=np.float64)

    def features(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        return np.asarray(self._predict(images)["pooled"], dtype=np.float64)


def _recipe(model: str | os.PathLike[str] | None, overrides: Mapping[str, Any]) -> tuple[Any, str]:
    """The training config (a bundle's recorded one, or the defaults) with ``overrides``,
    and where it came from in words."""
    from covidcxr.models.config import TrainConfig

    base = TrainConfig()
    recipe = "covidcxr.models.train.TrainConfig defaults"
    if model is not None:
        from covidcxr.models.bundle import load_bundle

        bundle = load_bundle(model)
        recorded = dict(bundle.training.get("config", {}))
        recorded.update(
            backbone=str(bundle.backbone.get("spec", base.backbone)),
            width=int(bundle.backbone.get("width", base.width)),
            size=bundle.input_size,
        )
        base = TrainConfig.from_dict(recorded)
        recipe = f"the training config recorded in {bundle.model_id}"
    return dataclasses.replace(base, **overrides), recipe


def _inner_split(
    store: Store, samples: SampleSet, train_indices: Sequence[int], seed: int
) -> tuple[list[int], list[int]]:
    """Fold ``0`` of a duplicate-aware k-fold split of the training patients validates."""
    subset = SampleSet(
        samples.task,
        samples.selection,
        [samples.samples[i] for i in train_indices],
        Counter(),
        samples.blob_root,
    )
    with store.read() as conn:
        inner = make_split(subset, conn, scheme="kfold", folds=INNER_VALIDATION_FOLDS, seed=seed)
    val_positions = set(inner.indices(subset, "0"))
    train = [i for k, i in enumerate(train_indices) if k not in val_positions]
    val = [i for k, i in enumerate(train_indices) if k in val_positions]
    return train, val


def training_fit(
    store: Store,
    *,
    model: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    size: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    progress: Progress | None = None,
) -> tuple[FitFunction, dict[str, Any]]:
    """The real :class:`FitFunction`: :func:`covidcxr.models.train.fit_on_indices` with
    the recipe of ``model`` (its recorded training config) or the default config, and
    ``epochs``, ``size``, ``device``, ``threads`` overriding it.

    Each call splits the training patients once more (stratified, duplicate-aware
    k-fold with k = :data:`INNER_VALIDATION_FOLDS`, seed = the fit's seed; fold ``0``
    validates: early stopping, temperatures, thresholds), puts the store's gate-only
    images (laterals, CT, other sources' frontals) on the side of their patients with
    :func:`~covidcxr.models.sample_sets.assign_gate_samples` (``exclude_patients`` and
    the held-out folds give none), and trains. Severity is not fitted here (evaluation
    runs its own protocol on the pooled features).

    Returns:
        The fit function and the settings to record in the report.

    Raises:
        MissingExtraError: torch is not installed.
        MetadataError: a bad option or an unreadable bundle.
    """
    try:
        from covidcxr.models.sample_sets import assign_gate_samples, gate_samples
        from covidcxr.models.train import fit_on_indices
    except ImportError as exc:
        raise MissingExtraError("torch", "ml") from exc
    say = progress or (lambda line: log.info("%s", line))
    overrides = {"device": device, "epochs": epochs, "size": size, "threads": threads}
    config, recipe = _recipe(model, {k: v for k, v in overrides.items() if v is not None})
    gate_set = gate_samples(store)

    def epoch_line(record: Mapping[str, Any]) -> None:
        say(
            f"  epoch {record.get('epoch')}: train loss {record.get('train_loss')}, "
            f"val loss {record.get('val_loss')}, val AUROC "
            f"{record.get('val_findings_auroc')} ({record.get('seconds')} s)"
        )

    def fit(
        samples: SampleSet,
        train_indices: Sequence[int],
        *,
        seed: int,
        exclude_patients: frozenset[str],
    ) -> EvaluationModel:
        train, val = _inner_split(store, samples, train_indices, seed)
        gate = assign_gate_samples(
            store, gate_set, samples, train, val, exclude_patients=exclude_patients, seed=seed
        )
        sources = tuple(sorted({s.source for s in samples.samples}))
        seeded = dataclasses.replace(config, seed=seed, sources=sources)
        trained = fit_on_indices(
            samples, train, val, seeded, gate=gate, severity_fit=None,
            cache_dir=cache_dir, progress=epoch_line,
        )  # fmt: skip
        return _TrainedAdapter(trained)

    settings = {
        "fit": "covidcxr.models.train.fit_on_indices",
        "recipe": recipe,
        "train_config": {k: v for k, v in config.as_dict().items() if k != "seed"},
        "inner_validation": (
            f"fold 0 of a stratified, duplicate-aware {INNER_VALIDATION_FOLDS}-fold split "
            "of each training set's patients (seed = the fit's seed)"
        ),
        "gate_images": "laterals, CT and other sources' frontals, assigned by patient",
    }
    return fit, settings
