"""A torch Dataset over a :class:`~covidcxr.dataset.samples.SampleSet`, in
torchxrayvision's conventions.

A user of ``torchxrayvision.datasets.COVID19_Dataset`` can swap
:class:`CollectionDataset` in: samples are dicts with ``img`` (float32, 1 x H x W, in
[-1024, 1024]), ``lab`` (float32, NaN = unknown) and ``idx``; the dataset has
``pathologies``, ``labels``, ``csv`` (a pandas DataFrame with torchxrayvision's common
fields) and ``totals()``, ``transform``/``data_aug`` work as there, and so do
torchxrayvision's ``relabel_dataset``, ``SubsetDataset``, ``FilterDataset`` and
``MergeDataset``. It adds the lung ``mask`` (with ``has_mask``), ``severity``,
``patient``, ``image_id`` (sha256), ``record_id`` and metadata, and it is fast: pixels
are decoded once (reduced JPEG decoding, one resize, see
:mod:`covidcxr.dataset.loading`) and then read from an on-disk cache; batches fetched
by a DataLoader in the main process decode their uncached images on several threads,
and batches that come in order have the next batch decoded while they are used.

The per-sample data is held in numpy arrays (a few hundred bytes per sample), not in
Python objects, so memory stays small as the collection grows and DataLoader workers do
not copy it page by page as reference counts change. The dataset holds no database
handle and pickles.

Randomness: ``transform`` and ``data_aug`` draw from torch's (and Python's) generators,
which DataLoader seeds per worker from its own ``generator``; nothing here touches
numpy's global state. An image and its mask get the same random transform.

This is the only module of :mod:`covidcxr.dataset` that imports torch.
"""

from __future__ import annotations

import math
import operator
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from covidcxr.dataset.cache import PreprocessCache
from covidcxr.dataset.loading import (
    DEFAULT_CACHE_DIR,
    CacheDir,
    Crop,
    available_cpus,
    check_request,
    load_image,
    load_mask,
    normalise,
    resolve_cache_dir,
)
from covidcxr.dataset.samples import METADATA_KEYS, Sample, SampleSet, Selection, build_samples
from covidcxr.dataset.tasks import Task, get_task
from covidcxr.errors import MissingExtraError
from covidcxr.store.db import Store

if TYPE_CHECKING:
    import pandas as pd

try:
    import torch
    from torch.utils.data import Dataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise MissingExtraError("torch", "ml") from exc

__all__ = ["CollectionDataset", "ImageTransform", "normalise_batch"]

#: A transform as torchxrayvision applies them: it gets the numpy (or, for
#: ``data_aug``, torch) 1 x H x W float32 image and returns an array or tensor.
ImageTransform = Callable[[Any], Any]

#: Metadata returned with every sample (strings: ``""`` when unknown; numbers: NaN).
SAMPLE_METADATA = ("view", "modality", "sex", "age_years", "offset_days", "finding")
_NUMERIC_METADATA = frozenset({"age_years", "offset_days"})

_pools_lock = threading.Lock()
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool per size, made again after a fork (threads do not survive
    one: a DataLoader worker started by fork gets its own)."""
    key = (os.getpid(), threads)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="covidcxr-decode")
        return pool


class _ReadAhead:
    """Decodes started for the batch that sequential access will ask for next.

    When a batch's indices run on from the previous batch's (a DataLoader without
    shuffling: evaluation, inference), the images of the batch after it are queued on
    the decode threads behind the current batch's, so that they decode while the
    current batch is collated and used (images the cache is known to hold are left to
    be read when asked for); any other order reads nothing ahead. A fork
    (DataLoader workers) or a pickle starts from nothing: the futures belong to the
    threads of the process that made them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._expected: int | None = None  # the index a sequential next batch starts at
        self._futures: dict[tuple[str, str], Future[NDArray[np.uint8]]] = {}

    def take(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Future[Any]]:
        """The decodes already started for ``keys``; the others are given up."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._expected, self._futures = os.getpid(), None, {}
            taken = {key: self._futures.pop(key) for key in keys if key in self._futures}
            for future in self._futures.values():
                future.cancel()  # not started yet: never will be (running ones finish)
            self._futures = {}
            return taken

    def next_batch(self, indices: Sequence[int], length: int) -> range:
        """The indices to read ahead after a batch of ``indices`` (empty unless the
        batch runs on from the one before)."""
        start = operator.index(indices[0]) if len(indices) else -1
        consecutive = start >= 0 and all(
            operator.index(index) == start + i for i, index in enumerate(indices)
        )
        with self._lock:
            sequential = consecutive and start == self._expected
            self._expected = start + len(indices) if consecutive else None
        if not sequential:
            return range(0)
        end = start + len(indices)
        return range(end, min(end + len(indices), length))

    def add(self, key: tuple[str, str], future: Future[NDArray[np.uint8]]) -> None:
        with self._lock:
            self._futures[key] = future


@dataclass(frozen=True)
class _Strings:
    """A string column: per sample a code into the distinct values (-1 = unknown).

    The distinct values are packed into one UTF-8 buffer with offsets, not kept as
    Python strings: DataLoader workers share these pages with the parent as long as
    nothing writes to them, and reading a Python object writes its reference count.
    """

    codes: NDArray[np.int32]
    packed: bytes
    offsets: NDArray[np.int64]

    @classmethod
    def of(cls, items: Sequence[Any]) -> _Strings:
        index: dict[str, int] = {}
        codes = np.fromiter(
            (-1 if v is None else index.setdefault(str(v), len(index)) for v in items),
            dtype=np.int32,
            count=len(items),
        )
        encoded = [value.encode("utf-8") for value in index]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(codes, b"".join(encoded), offsets)

    @property
    def distinct(self) -> int:
        """How many distinct values there are."""
        return len(self.offsets) - 1

    def get(self, i: int) -> str | None:
        code = int(self.codes[i])
        if code < 0:
            return None
        return self.packed[self.offsets[code] : self.offsets[code + 1]].decode("utf-8")


def _numbers(items: Sequence[Any]) -> NDArray[np.float64]:
    return np.fromiter(
        (math.nan if v is None else float(v) for v in items), dtype=np.float64, count=len(items)
    )


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
        decode_threads: int | None = None,
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
            decode_threads: threads that decode the uncached images of a batch
                (``__getitems__``); default: all CPUs in the main process, 1 inside a
                DataLoader worker (the workers already use the CPUs).
            normalise: True: ``img`` is float32 in [-1024, 1024] (torchxrayvision's
                range). False: ``img`` is the ``uint8`` grey levels and ``mask`` is
                ``uint8`` 0/1, a quarter of the bytes for DataLoader workers to hand
                over; apply :func:`normalise_batch` to the batch on the accelerator
                (same values). Transforms need normalised images, so False refuses
                ``transform`` and ``data_aug``.

        Raises:
            ValueError: a bad size, crop, index or thread count, or transforms with
                ``normalise=False``.
        """
        check_request("CollectionDataset", size, crop)
        if not normalise and (transform is not None or data_aug is not None):
            raise ValueError(
                "CollectionDataset: normalise=False hands out uint8 pixels, and transform "
                "and data_aug work on normalised images; apply them after normalise_batch "
                "or keep normalise=True"
            )
        if decode_threads is not None and decode_threads < 1:
            raise ValueError(
                f"CollectionDataset: decode_threads must be >= 1, got {decode_threads}"
            )
        total = len(samples.samples)
        if indices is None:
            order = np.arange(total, dtype=np.int64)
        else:
            given = np.asarray(indices).reshape(-1)
            if given.size and given.dtype.kind not in "iu":
                raise ValueError(
                    f"CollectionDataset: indices must be integers, got {given.dtype} values"
                )
            order = given.astype(np.int64)
            bad = order[(order < 0) | (order >= total)]
            if bad.size:
                raise ValueError(
                    f"CollectionDataset: indices {bad[:5].tolist()} are outside the "
                    f"{total} samples (0..{total - 1})"
                )
        chosen: list[Sample] = [samples.samples[i] for i in order.tolist()]

        self.size = size
        self.crop: Crop = crop
        self.masks = masks
        self.transform = transform
        self.data_aug = data_aug
        self.decode_threads = decode_threads
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
        self._read_ahead = _ReadAhead()

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
        self._patients = _Strings.of([s.patient for s in chosen])
        self._sources = _Strings.of([s.source for s in chosen])
        self._strings: dict[str, _Strings] = {}
        self._numbers: dict[str, NDArray[np.float64]] = {}
        for key in METADATA_KEYS:
            column = [s.metadata.get(key) for s in chosen]
            if key in _NUMERIC_METADATA:
                self._numbers[key] = _numbers(column)
            else:
                self._strings[key] = _Strings.of(column)

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

    def _blob(self, sha256: str) -> Path:
        return self._blob_root / sha256[:2] / sha256

    def _decode(self, key: tuple[str, str]) -> NDArray[np.uint8]:
        """Decode an image or mask (``key``: kind and sha256) from its blob."""
        kind, sha = key
        load = load_image if kind == "image" else load_mask
        return load(self._blob(sha), self.size, crop=self.crop)

    def _cache(self, kind: str) -> PreprocessCache | None:
        return self._image_cache if kind == "image" else self._mask_cache

    def _indexed(self, key: tuple[str, str]) -> bool:
        """Whether the cache is known to hold an image or mask (reading it is cheap)."""
        cache = self._cache(key[0])
        return cache is not None and cache.indexed(key[1])

    def _pixels(self, key: tuple[str, str]) -> NDArray[np.uint8]:
        """An image's or mask's pixels, from the cache where it holds them."""
        cache = self._cache(key[0])
        if cache is None:
            return self._decode(key)
        return cache.get_or_load(key[1], lambda: self._decode(key))

    def _decode_and_store(self, key: tuple[str, str]) -> NDArray[np.uint8]:
        """Decode a file the cache was just found to lack, and store the result."""
        pixels = self._decode(key)
        cache = self._cache(key[0])
        if cache is not None:
            cache.put(key[1], pixels)
        return pixels

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self._position(index)
        image = self._pixels(("image", self._image_sha[position].decode("ascii")))
        mask = None
        if self.masks and self._mask_sha[position]:
            mask = self._pixels(("mask", self._mask_sha[position].decode("ascii")))
        return self._item(position, image, mask)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items; images missing from the cache are decoded in parallel.

        Used by DataLoader (and ``torch.utils.data.Subset``) instead of one
        ``__getitem__`` per index. Pillow and covidcxr's extensions release the GIL while
        decoding and resizing, so threads use the CPUs the main process would otherwise
        leave idle; when the batches come in order (no shuffling), the next batch's
        images are decoded meanwhile (:class:`_ReadAhead`). The items (and every random
        draw of the transforms) come in index order, exactly as with ``__getitem__``.
        """
        positions = [self._position(i) for i in indices]
        keys = self._keys(positions)
        decoding = self._read_ahead.take(keys)
        wanted: dict[tuple[str, str], NDArray[np.uint8] | None] = {}
        for kind, sha in keys:
            if (kind, sha) not in decoding:
                cache = self._cache(kind)
                wanted[kind, sha] = None if cache is None else cache.get(sha)
        missing = [key for key, pixels in wanted.items() if pixels is None]
        threads = self._threads()
        ahead: list[tuple[str, str]] = []
        if threads > 1:
            following = self._read_ahead.next_batch(indices, len(self))
            ahead = [
                key
                for key in self._keys([self._position(i) for i in following])
                if key not in decoding and key not in wanted and not self._indexed(key)
            ]
        if threads > 1 and (len(missing) + len(decoding) > 1 or ahead):
            # Largest files first: a batch is done when its last decode is, and a big
            # file started last would leave the other threads idle while it decodes.
            # The next batch's decodes queue behind this one's.
            pool = _thread_pool(threads)
            for key in sorted(missing, key=self._file_size, reverse=True):
                decoding[key] = pool.submit(self._decode_and_store, key)
            for key in sorted(ahead, key=self._file_size, reverse=True):
                self._read_ahead.add(key, pool.submit(self._pixels, key))
        else:
            for key in missing:
                wanted[key] = self._decode_and_store(key)

        def pixels(key: tuple[str, str]) -> NDArray[np.uint8]:
            found = wanted.get(key)
            if found is None:  # items are made while later images still decode
                found = wanted[key] = decoding[key].result()
            return found

        items = []
        for position in positions:
            image = pixels(("image", self._image_sha[position].decode("ascii")))
            mask = None
            if self.masks and self._mask_sha[position]:
                mask = pixels(("mask", self._mask_sha[position].decode("ascii")))
            items.append(self._item(position, image, mask))
        return items

    def _keys(self, positions: Sequence[int]) -> list[tuple[str, str]]:
        """The images (and masks) of these positions, each once, in order."""
        keys: dict[tuple[str, str], None] = {}
        for position in positions:
            keys["image", self._image_sha[position].decode("ascii")] = None
            if self.masks and self._mask_sha[position]:
                keys["mask", self._mask_sha[position].decode("ascii")] = None
        return list(keys)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_read_ahead"]  # futures and a lock of this process's threads
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._read_ahead = _ReadAhead()

    def _file_size(self, key: tuple[str, str]) -> int:
        """A blob's size in bytes (0 where it is missing: loading it says why)."""
        try:
            return self._blob(key[1]).stat().st_size
        except OSError:
            return 0

    def _threads(self) -> int:
        if self.decode_threads is not None:
            return self.decode_threads
        return 1 if get_worker_info() is not None else available_cpus()

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
        item["patient"] = self._patients.get(position) or ""
        item["image_id"] = self._image_sha[position].decode("ascii")
        item["record_id"] = int(self._record_ids[position])
        item["source"] = self._sources.get(position) or ""
        for key in SAMPLE_METADATA:
            if key in self._numbers:
                item[key] = float(self._numbers[key][position])
            else:
                item[key] = self._strings[key].get(position) or ""
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
            "patient": [self._patients.get(i) for i in range(len(self))],
            "source": [self._sources.get(i) for i in range(len(self))],
        }
        for key in METADATA_KEYS:
            if key in self._numbers:
                columns[key] = self._numbers[key].tolist()
            else:
                columns[key] = [self._strings[key].get(i) for i in range(len(self))]
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
        return [self._patients.get(i) or "" for i in range(len(self))]

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
            "patients": self._patients.distinct,
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
            f"patients={self._patients.distinct} views={self.views} size={self.size} "
            f"crop={self.crop} data_aug={self.data_aug} "
            f"excluded={{{excluded}}}"
        )

    def __repr__(self) -> str:
        return self.string()
