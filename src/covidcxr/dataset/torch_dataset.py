"""A torch Dataset over a :class:`~covidcxr.dataset.samples.SampleSet`, in
torchxrayvision's conventions (a user of its ``COVID19_Dataset`` can swap this in).

Items are decoded once (:mod:`covidcxr.dataset.loading`) and then read from the on-disk
cache (:mod:`covidcxr.dataset.cache`); parallel loading is DataLoader's
(``num_workers``, ``prefetch_factor``). An image and its mask get the same random
transform, drawn from torch's and Python's generators (which DataLoader seeds per
worker). This is the only module of :mod:`covidcxr.dataset` that imports torch.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from covidcxr.dataset.cache import PreprocessCache
from covidcxr.dataset.loading import (
    DEFAULT_CACHE_DIR,
    CacheDir,
    Crop,
    check_request,
    load_image,
    load_mask,
    normalise,
    resolve_cache_dir,
)
from covidcxr.dataset.samples import METADATA_KEYS, Sample, SampleSet, Selection, build_samples
from covidcxr.dataset.tasks import Task, get_task
from covidcxr.errors import MissingExtraError
from covidcxr.store.blobs import blob_path
from covidcxr.store.db import Store

if TYPE_CHECKING:
    import pandas as pd

try:
    import torch
    from torch.utils.data import Dataset
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise MissingExtraError("torch", "ml") from exc

__all__ = ["CollectionDataset", "ImageTransform", "normalise_batch"]

#: A transform as torchxrayvision applies them: it gets the numpy (or, for
#: ``data_aug``, torch) 1 x H x W float32 image and returns an array or tensor.
ImageTransform = Callable[[Any], Any]

#: Metadata returned with every sample (strings: ``""`` when unknown; numbers: NaN).
SAMPLE_METADATA = ("view", "modality", "sex", "age_years", "offset_days", "finding")
_NUMERIC_METADATA = frozenset({"age_years", "offset_days"})


def _codes(items: Sequence[Any]) -> tuple[NDArray[np.int32], list[str]]:
    """A string column as a code per sample into its distinct values (-1: unknown).

    Numpy codes, not a Python string per sample: DataLoader workers share these pages
    with the parent (reading a Python object writes its reference count).
    """
    index: dict[str, int] = {}
    codes = [-1 if v is None else index.setdefault(str(v), len(index)) for v in items]
    return np.array(codes, dtype=np.int32), list(index)


def _numbers(items: Sequence[Any]) -> NDArray[np.float64]:
    return np.array([math.nan if v is None else float(v) for v in items], dtype=np.float64)


def _order(
    indices: Sequence[int] | NDArray[np.integer[Any]] | None, total: int
) -> NDArray[np.int64]:
    """The dataset's positions in the SampleSet, checked.

    Raises:
        ValueError: an index that is not an integer or is outside the samples.
    """
    if indices is None:
        return np.arange(total, dtype=np.int64)
    given = np.asarray(indices).reshape(-1)
    if given.size and given.dtype.kind not in "iu":
        raise ValueError(f"CollectionDataset: indices must be integers, got {given.dtype} values")
    order = given.astype(np.int64)
    bad = order[(order < 0) | (order >= total)]
    if bad.size:
        raise ValueError(
            f"CollectionDataset: indices {bad[:5].tolist()} are outside the "
            f"{total} samples (0..{total - 1})"
        )
    return order


#: normalise's value for each grey level, computed once on the CPU.
_LEVELS: NDArray[np.float32] = normalise(np.arange(256, dtype=np.uint8))
_level_tables: dict[torch.device, torch.Tensor] = {}


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` grey levels (items of a ``normalise=False`` dataset, batched, on any
    device) as float32 in torchxrayvision's [-1024, 1024]: to the bit the values of
    ``normalise=True`` items.

    A lookup in :func:`covidcxr.dataset.loading.normalise`'s table of the 256 levels,
    not the arithmetic again: CUDA divides by a constant as a multiplication by its
    reciprocal, which lands one unit in the last place off for some levels.

    Raises:
        TypeError: ``images`` is not ``uint8``.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalise_batch: expected uint8 grey levels, got {images.dtype}")
    table = _level_tables.get(images.device)
    if table is None:
        table = _level_tables[images.device] = torch.from_numpy(_LEVELS).to(images.device)
    return table[images.long()]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with torch's and Python's generators seeded, then restore both."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


class CollectionDataset(Dataset[dict[str, Any]]):
    """The samples of a task and selection as torchxrayvision-style dicts.

    Each item is a dict:

    - ``img``: float32 tensor 1 x size x size in [-1024, 1024] (torchxrayvision's
      ``normalize(img, 255)`` of the grayscale image, cropped and resized), or what
      ``transform``/``data_aug`` make of it;
    - ``lab``: float32 tensor of the task's labels (NaN = unknown);
    - ``idx``: the item's position in this dataset;
    - ``mask``: float32 tensor like ``img``, 1 on the lungs, zeros when no lung mask is
      known; ``has_mask``: whether one is (both only when ``masks`` is True);
    - ``severity``: float32 tensor (geographic extent 0-8, opacity 0-6), NaN when
      unscored;
    - ``patient`` (``source:patient_id``), ``image_id`` (sha256), ``record_id``,
      ``source``;
    - ``view``, ``modality``, ``sex``, ``finding`` (``""`` when unknown) and
      ``age_years``, ``offset_days`` (NaN when unknown).

    Every value batches with ``default_collate``.

    Attributes:
        pathologies: the label names, in the order of ``lab`` (torchxrayvision's name).
        labels: N x L float32 array of the labels (NaN = unknown).
        task: the task's description (:meth:`Task.as_dict`).
        selection: the selection the samples came from.
        views: the selected views (torchxrayvision's attribute).
        size: output side in pixels.
        crop: ``center`` or ``pad`` (see :func:`covidcxr.dataset.loading.load_image`).
        cache_dir: the preprocessed-pixel cache, or None.
        masks: whether items carry ``mask`` and ``has_mask``.
        transform: applied to the numpy image (and mask), as torchxrayvision does.
        data_aug: applied to the tensor image (and mask) after ``transform``.
        sample_indices: for each item, its position in the SampleSet.
    """

    def __init__(
        self,
        samples: SampleSet,
        *,
        size: int = 224,
        crop: Crop = "center",
        cache_dir: CacheDir = DEFAULT_CACHE_DIR,
        indices: Sequence[int] | NDArray[np.integer[Any]] | None = None,
        transform: ImageTransform | None = None,
        data_aug: ImageTransform | None = None,
        masks: bool = True,
        normalise: bool = True,
    ) -> None:
        """Hold the samples (as compact arrays) and how to load them.

        Args:
            samples: from :func:`~covidcxr.dataset.samples.build_samples`.
            size: output side in pixels.
            crop: ``center`` (torchxrayvision's ``XRayCenterCrop``) or ``pad``.
            cache_dir: where preprocessed pixels are kept; default ``cache`` beside the
                store's ``blobs`` folder (``<data dir>/cache``); None: no cache.
            indices: positions in ``samples`` to use, in this order (a split's fold).
            transform: as torchxrayvision's ``transform`` (numpy 1 x H x W in, array
                or tensor out); applied to the mask too.
            data_aug: as torchxrayvision's ``data_aug``, on the tensor; applied to the
                mask too, with the same random draw.
            masks: load lung masks (``mask``, ``has_mask``).
            normalise: True: ``img`` is float32 in [-1024, 1024] (torchxrayvision's
                range). False: ``img`` is the ``uint8`` grey levels and ``mask`` is
                ``uint8`` 0/1, a quarter of the bytes for DataLoader workers to hand
                over; apply :func:`normalise_batch` to the batch on the accelerator
                (same values). Transforms need normalised images, so False refuses
                ``transform`` and ``data_aug``.

        Raises:
            ValueError: a bad size, crop or index, or transforms with
                ``normalise=False``.
        """
        check_request("CollectionDataset", size, crop)
        if not normalise and (transform is not None or data_aug is not None):
            raise ValueError(
                "CollectionDataset: normalise=False hands out uint8 pixels, and transform "
                "and data_aug work on normalised images; apply them after normalise_batch "
                "or keep normalise=True"
            )
        order = _order(indices, len(samples.samples))
        self.size = size
        self.crop: Crop = crop
        self.masks = masks
        self.transform = transform
        self.data_aug = data_aug
        self.normalise = normalise
        self.sample_indices = order
        self.pathologies: list[str] = list(samples.label_names)
        self.task: dict[str, Any] = samples.task.as_dict()
        self.selection: Selection = samples.selection
        self.views: list[str] = list(samples.selection.views)
        self._excluded = dict(samples.excluded.most_common())
        self._set_summary = samples.summary()
        self._blob_root = samples.blob_root
        self.cache_dir = resolve_cache_dir(cache_dir, samples.blob_root.parent)
        self._image_cache = (
            None if self.cache_dir is None else PreprocessCache(self.cache_dir, size, crop)
        )
        self._mask_cache = (
            None
            if self.cache_dir is None
            else PreprocessCache(self.cache_dir, size, crop, kind="mask")
        )
        self._hold([samples.samples[i] for i in order.tolist()])

    def _hold(self, chosen: Sequence[Sample]) -> None:
        """Keep the chosen samples' labels and metadata as numpy columns."""
        n_labels = len(self.pathologies)
        self.labels: NDArray[np.float32] = np.array(
            [s.labels for s in chosen], dtype=np.float32
        ).reshape(len(chosen), n_labels)
        self._record_ids = np.array([s.record_id for s in chosen], dtype=np.int64)
        self._image_sha = np.array([s.image_sha256 for s in chosen], dtype="S64")
        self._mask_sha = np.array([s.mask_sha256 or "" for s in chosen], dtype="S64")
        self._severity = np.array(
            [s.severity if s.severity is not None else (math.nan, math.nan) for s in chosen],
            dtype=np.float32,
        ).reshape(len(chosen), 2)
        self._strings = {
            "patient": _codes([s.patient for s in chosen]),
            "source": _codes([s.source for s in chosen]),
        }
        self._numbers: dict[str, NDArray[np.float64]] = {}
        for key in METADATA_KEYS:
            column = [s.metadata.get(key) for s in chosen]
            if key in _NUMERIC_METADATA:
                self._numbers[key] = _numbers(column)
            else:
                self._strings[key] = _codes(column)

    @classmethod
    def from_store(
        cls,
        store: Store,
        task: str | Task = "findings",
        selection: Selection | None = None,
        **options: Any,
    ) -> CollectionDataset:
        """Select and label samples from a store and make a dataset of them.

        Args:
            store: the open store (only read here; the dataset keeps no handle).
            task: a task name (see :data:`covidcxr.dataset.tasks.TASKS`) or a Task.
            selection: which records (default: frontal X-rays, one record per image).
            **options: passed to :class:`CollectionDataset` (``size``, ``cache_dir``,
                ``indices``, ``transform``, ...).

        Raises:
            MetadataError: unknown task or bad selection.
        """
        resolved = get_task(task) if isinstance(task, str) else task
        return cls(build_samples(store, resolved, selection), **options)

    # -- size and items ------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _position(self, index: int) -> int:
        position = operator.index(index)
        length = len(self)
        if position < 0:
            position += length
        if not 0 <= position < length:
            raise IndexError(f"CollectionDataset: index {index} out of range for {length} samples")
        return position

    def image_sha256(self, index: int) -> str:
        """The sha256 (blob name) of an item's image."""
        return str(self._image_sha[self._position(index)].decode("ascii"))

    def mask_sha256(self, index: int) -> str | None:
        """The sha256 of an item's lung mask, None when it has none."""
        sha = self._mask_sha[self._position(index)].decode("ascii")
        return sha or None

    def _string(self, key: str, position: int) -> str | None:
        codes, values = self._strings[key]
        code = int(codes[position])
        return None if code < 0 else values[code]

    def _pixels(self, kind: str, sha256: str) -> NDArray[np.uint8]:
        """An image's or mask's pixels, from the cache where it holds them (decoded and
        stored there where it does not)."""
        cache = self._image_cache if kind == "image" else self._mask_cache
        load = load_image if kind == "image" else load_mask
        path = blob_path(self._blob_root, sha256)

        def decode() -> NDArray[np.uint8]:
            return load(path, self.size, crop=self.crop)

        return decode() if cache is None else cache.get_or_load(sha256, decode)

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self._position(index)
        image = self._pixels("image", self._image_sha[position].decode("ascii"))
        mask = None
        if self.masks and self._mask_sha[position]:
            mask = self._pixels("mask", self._mask_sha[position].decode("ascii"))
        return self._item(position, image, mask)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items, as ``[self[i] for i in indices]`` (DataLoader's batch call)."""
        return [self[i] for i in indices]

    def _transformed(
        self, function: ImageTransform, image: Any, mask: Any | None
    ) -> tuple[Any, Any | None]:
        """Apply a transform to the image and the mask with the same random draw."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        with _seeded(seed):
            image = function(image)
        if mask is not None:
            with _seeded(seed):
                mask = function(mask)
        return image, mask

    def _item(
        self, position: int, pixels: NDArray[np.uint8], mask_pixels: NDArray[np.uint8] | None
    ) -> dict[str, Any]:
        image: Any
        mask: Any
        if self.normalise:
            image, mask = self._normalised(pixels, mask_pixels)
        else:
            # uint8 tensors that own their pixels, as normalised ones do (a cached array
            # can be shared by two items of a batch).
            image = torch.from_numpy(np.array(pixels[None]))
            mask = None if mask_pixels is None else torch.from_numpy(np.array(mask_pixels[None]))
        item: dict[str, Any] = {
            "idx": position,
            "img": image,
            # float32 also after torchxrayvision's relabel_dataset (which sets float64)
            "lab": torch.from_numpy(np.array(self.labels[position], dtype=np.float32)),
        }
        if self.masks:
            item["mask"] = torch.zeros_like(image) if mask is None else mask
            item["has_mask"] = mask is not None
        item["severity"] = torch.from_numpy(self._severity[position].copy())
        item["patient"] = self._string("patient", position) or ""
        item["image_id"] = self._image_sha[position].decode("ascii")
        item["record_id"] = int(self._record_ids[position])
        item["source"] = self._string("source", position) or ""
        for key in SAMPLE_METADATA:
            if key in self._numbers:
                item[key] = float(self._numbers[key][position])
            else:
                item[key] = self._string(key, position) or ""
        return item

    def _normalised(
        self, pixels: NDArray[np.uint8], mask_pixels: NDArray[np.uint8] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image in [-1024, 1024] and float mask, through ``transform`` and ``data_aug``."""
        image: Any = normalise(pixels)[None]
        mask: Any = None if mask_pixels is None else mask_pixels.astype(np.float32)[None]
        if self.transform is not None:
            image, mask = self._transformed(self.transform, image, mask)
        image = _as_tensor(image)
        if mask is not None:
            mask = _as_tensor(mask)
        if self.data_aug is not None:
            image, mask = self._transformed(self.data_aug, image, mask)
        return image, mask

    # -- torchxrayvision compatibility and summaries -------------------------------

    @property
    def csv(self) -> pd.DataFrame:
        """The items' metadata as torchxrayvision's ``.csv``: a pandas DataFrame with
        one row per item, in item order, so ``.iloc`` works and torchxrayvision's
        ``SubsetDataset``, ``FilterDataset`` and ``MergeDataset`` accept this dataset.

        Columns: ``record_id``, ``image_id`` (sha256), ``patient``, ``source``, the
        metadata (``view``, ``modality``, ``sex``, ``age_years``, ``offset_days``,
        ``finding``, ``location``, ``license``, ``doi``, ``filename``), ``has_mask``,
        ``geographic_mean`` and ``opacity_mean``; then torchxrayvision's common fields
        ``patientid``, ``offset_day_int``, ``sex_male`` and ``sex_female`` (and
        ``age_years``, already there). Unknown values are missing (NaN or None). Built
        on each access, not stored.
        """
        import pandas as pd

        columns: dict[str, list[Any]] = {
            "record_id": [int(v) for v in self._record_ids],
            "image_id": [sha.decode("ascii") for sha in self._image_sha],
            "patient": [self._string("patient", i) for i in range(len(self))],
            "source": [self._string("source", i) for i in range(len(self))],
        }
        for key in METADATA_KEYS:
            if key in self._numbers:
                columns[key] = self._numbers[key].tolist()
            else:
                columns[key] = [self._string(key, i) for i in range(len(self))]
        columns["has_mask"] = [bool(sha) for sha in self._mask_sha]
        columns["geographic_mean"] = self._severity[:, 0].tolist()
        columns["opacity_mean"] = self._severity[:, 1].tolist()
        columns["patientid"] = columns["patient"]
        columns["offset_day_int"] = columns["offset_days"]
        columns["sex_male"] = [sex == "M" for sex in columns["sex"]]
        columns["sex_female"] = [sex == "F" for sex in columns["sex"]]
        return pd.DataFrame(columns)

    @property
    def patients(self) -> list[str]:
        """Each item's patient (``source:patient_id``)."""
        return [self._string("patient", i) or "" for i in range(len(self))]

    def totals(self) -> dict[str, dict[float, int]]:
        """Label value counts per pathology (torchxrayvision's ``totals()``)."""
        result: dict[str, dict[float, int]] = {}
        for column, name in enumerate(self.pathologies):
            values = self.labels[:, column]
            known = values[~np.isnan(values)]
            distinct, counts = np.unique(known, return_counts=True)
            result[name] = {float(v): int(c) for v, c in zip(distinct, counts, strict=True)}
        return result

    def summary(self) -> dict[str, Any]:
        """This dataset's counts and settings, with the SampleSet's summary (its
        exclusion counts say what the selection and the task left out)."""
        return {
            "dataset": type(self).__name__,
            "task": self.task["name"],
            "samples": len(self),
            "patients": len(self._strings["patient"][1]),
            "with_mask": int(np.count_nonzero(self._mask_sha)),
            "with_severity": int(np.count_nonzero(~np.isnan(self._severity[:, 0]))),
            "size": self.size,
            "crop": self.crop,
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
            "excluded": dict(self._excluded),
            "sample_set": self._set_summary,
        }

    def string(self) -> str:
        """A one-line description (torchxrayvision's ``string()``)."""
        excluded = ", ".join(f"{reason}: {n}" for reason, n in self._excluded.items())
        return (
            f"{type(self).__name__} task={self.task['name']} num_samples={len(self)} "
            f"patients={len(self._strings['patient'][1])} views={self.views} size={self.size} "
            f"crop={self.crop} data_aug={self.data_aug} "
            f"excluded={{{excluded}}}"
        )

    def __repr__(self) -> str:
        return self.string()
