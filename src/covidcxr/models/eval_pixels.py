"""Images and lung masks for evaluation, from the preprocessed-pixel cache, and batched
prediction over them (no torch: the model is any function of normalised images)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from covidcxr.dataset.cache import PreprocessCache
from covidcxr.dataset.loading import (
    DEFAULT_CACHE_DIR,
    CacheDir,
    Crop,
    load_image,
    load_mask,
    normalise,
    resolve_cache_dir,
)
from covidcxr.dataset.samples import SampleSet


@dataclass(frozen=True)
class Pixels:
    """Images (and lung masks) of some samples, as the model's input grey levels.

    Attributes:
        images: N x S x S ``uint8``.
        masks: N x S x S ``uint8`` (1 = lung; zeros where no mask is known).
        has_mask: N booleans.
    """

    images: NDArray[np.uint8]
    masks: NDArray[np.uint8]
    has_mask: NDArray[np.bool_]


def load_pixels(
    samples: SampleSet,
    indices: Sequence[int],
    size: int,
    *,
    crop: Crop = "center",
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    masks: bool = True,
    threads: int = 2,
) -> Pixels:
    """Load samples' pixels from the preprocessed cache, decoding (and caching) misses.

    The cache is the one :class:`~covidcxr.dataset.torch_dataset.CollectionDataset`
    fills (same folder, same keys), so a cache prepared once serves training and
    evaluation, and the blobs are not read for cached images.

    Raises:
        ImageError: an uncached image or mask is missing from the blobs or undecodable.
    """
    root = resolve_cache_dir(cache_dir, samples.blob_root.parent)
    images_cache = None if root is None else PreprocessCache(root, size, crop)
    masks_cache = None if root is None else PreprocessCache(root, size, crop, kind="mask")
    chosen = [samples.samples[i] for i in indices]

    def one_image(i: int) -> NDArray[np.uint8]:
        sample = chosen[i]

        def load() -> NDArray[np.uint8]:
            return load_image(samples.image_path(sample), size, crop=crop)

        if images_cache is None:
            return load()
        return images_cache.get_or_load(sample.image_sha256, load)

    def one_mask(i: int) -> NDArray[np.uint8] | None:
        sample = chosen[i]
        path = samples.mask_path(sample)
        if not masks or path is None or sample.mask_sha256 is None:
            return None

        def load() -> NDArray[np.uint8]:
            return load_mask(path, size, crop=crop)

        if masks_cache is None:
            return load()
        return masks_cache.get_or_load(sample.mask_sha256, load)

    n = len(chosen)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        image_list = list(pool.map(one_image, range(n)))
        mask_list = list(pool.map(one_mask, range(n)))
    images = np.zeros((n, size, size), dtype=np.uint8)
    mask_array = np.zeros((n, size, size), dtype=np.uint8)
    has_mask = np.zeros(n, dtype=bool)
    for i, (image, mask) in enumerate(zip(image_list, mask_list, strict=True)):
        images[i] = image
        if mask is not None and mask.any():
            mask_array[i] = mask
            has_mask[i] = True
    return Pixels(images, mask_array, has_mask)


def predict_batches(
    function: Callable[[NDArray[np.float32]], NDArray[np.float64]],
    images: NDArray[np.uint8],
    batch_size: int = 32,
) -> NDArray[np.float64]:
    """Run a model function over ``uint8`` images in batches (normalised to
    [-1024, 1024], N x 1 x S x S)."""
    parts = [
        np.asarray(function(normalise(images[i : i + batch_size])[:, None]), dtype=np.float64)
        for i in range(0, len(images), batch_size)
    ]
    if not parts:
        return np.zeros((0, 0))
    return np.concatenate(parts)
