"""Image and mask loading for training: decode, grey, crop and resize once, with Pillow.

Why it is built this way (JPEG draft decoding, one resize, the cache) is in
``docs/decisions/0010-loader-library-code.md``. Nothing here imports torch.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from covidcxr import config
from covidcxr.dataset.cache import CROPS, PreprocessCache, check_request
from covidcxr.errors import ImageError
from covidcxr.imaging.decode import to_grayscale

if TYPE_CHECKING:
    from covidcxr.dataset.samples import SampleSet

__all__ = [
    "CROPS",
    "DEFAULT_CACHE_DIR",
    "REDUCING_GAP",
    "RESAMPLE",
    "CacheDir",
    "Crop",
    "center_crop_box",
    "check_request",
    "fill_cache",
    "grey_levels",
    "load_image",
    "load_mask",
    "normalise",
    "preprocess_image",
    "resolve_cache_dir",
]

logger = logging.getLogger(__name__)

#: ``center``: the largest centred square, exactly as torchxrayvision's
#: ``XRayCenterCrop`` cuts it. ``pad``: the whole image, its long side resized to
#: ``size`` and the short side padded with black (nothing cut off).
Crop = Literal["center", "pad"]

#: The antialiasing filter of the single resize (Pillow scales its support with the
#: reduction, so it is a proper low-pass when shrinking). Changing it or REDUCING_GAP
#: changes cached pixels: bump ``cache.CACHE_VERSION``.
RESAMPLE: Final = Image.Resampling.BILINEAR
#: Pillow's ``reducing_gap``: a whole-factor box reduce first while the image is more
#: than this many times the output.
REDUCING_GAP: Final = 1.5

_FORMATS: Final = ("PNG", "JPEG")


class _DefaultCacheDir:
    """The default cache folder: ``cache`` in the data directory."""

    def __repr__(self) -> str:
        return "DEFAULT_CACHE_DIR"


#: Pass as ``cache_dir`` to use ``<data dir>/cache``; ``None`` disables the cache.
DEFAULT_CACHE_DIR: Final = _DefaultCacheDir()
CacheDir = str | os.PathLike[str] | _DefaultCacheDir | None


def resolve_cache_dir(cache_dir: CacheDir, data_dir: Path | None = None) -> Path | None:
    """The cache folder a ``cache_dir`` argument stands for.

    Args:
        cache_dir: a folder, :data:`DEFAULT_CACHE_DIR`, or ``None`` (no cache).
        data_dir: the store's data directory, used for the default (otherwise
            :func:`covidcxr.config.data_dir`).

    Returns:
        The folder, or ``None`` when caching is off.
    """
    if cache_dir is None:
        return None
    if isinstance(cache_dir, _DefaultCacheDir):
        return (data_dir if data_dir is not None else config.data_dir()) / "cache"
    return Path(cache_dir).expanduser()


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The square ``XRayCenterCrop`` keeps, as a (left, top, right, bottom) box.

    Same integer arithmetic as torchxrayvision: side ``min(width, height)``, starting
    at ``width // 2 - side // 2`` (and likewise vertically).
    """
    side = min(width, height)
    left = width // 2 - side // 2
    top = height // 2 - side // 2
    return left, top, left + side, top + side


def _padded_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Output width and height of the whole image when its long side becomes ``size``."""
    longest = max(width, height)
    return max(1, round(width * size / longest)), max(1, round(height * size / longest))


def _read(path: Path, function: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(
            f"{function}: {str(path)!r} does not exist; re-ingest the source or point "
            "--data-dir at the store that holds it",
            code="missing_file",
        ) from exc
    except OSError as exc:
        raise ImageError(
            f"{function}: {str(path)!r} cannot be read ({exc}); re-ingest the source",
            code="undecodable",
        ) from exc


def _open(data: bytes, path: Path, function: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{function}: {str(path)!r} is over Pillow's pixel limit ({exc}); it cannot "
            "have come from a default ingest",
            code="too_many_pixels",
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(
            f"{function}: {str(path)!r} is not a PNG or JPEG Pillow can open ({exc}); "
            "re-ingest the source",
            code="undecodable",
        ) from exc


def _gray(image: Image.Image) -> Image.Image:
    """The image as 8-bit ``L``, or as ``F`` in [0, 1] for deeper modes.

    8-bit modes stay in Pillow; anything else goes through
    :func:`~covidcxr.imaging.decode.to_grayscale` so that 16-bit and odd modes get
    exactly the grey levels the rest of covidcxr uses (16-bit scaled by 65535).
    """
    mode = image.mode
    if mode == "L":
        return image
    if mode == "LA":
        return image.getchannel("L")  # alpha dropped, as to_grayscale does
    if mode in ("RGB", "RGBA", "RGBX", "1", "CMYK", "YCbCr"):
        return image.convert("L")
    if mode in ("P", "PA"):
        if mode == "PA" or "transparency" in image.info:
            # Pillow warns when converting a palette with transparency straight to L.
            image = image.convert("RGBA")
        return image.convert("L")
    return Image.fromarray(to_grayscale(image))  # float32: mode F


def _to_uint8(image: Image.Image) -> NDArray[np.uint8]:
    """An ``L`` image's pixels, or an ``F`` image's [0, 1] values rounded to 0..255."""
    if image.mode == "L":
        pixels: NDArray[np.uint8] = np.asarray(image, dtype=np.uint8)
        return np.ascontiguousarray(pixels)
    floats = np.asarray(image, dtype=np.float32) * np.float32(255)
    rounded: NDArray[np.uint8] = np.clip(np.rint(floats), 0, 255).astype(np.uint8)
    return rounded


Box = tuple[float, float, float, float]


def _resize(
    gray: Image.Image, size: tuple[int, int], resample: Image.Resampling, box: Box
) -> Image.Image:
    """``gray.resize(size, resample, box=box, reducing_gap=REDUCING_GAP)`` with the
    horizontal pass always first.

    Pillow's own steps: the whole-factor ``reduce`` of the box (and the pixels around it
    that the filter reads), then one call per pass, each of which runs that pass only.
    Pillow 13's single call runs the vertical pass first for some shapes, which moves
    a few pixels by one grey level; every earlier Pillow, and the shipped model's
    training, ran the horizontal pass first. NEAREST has no order (and no reduce).
    """
    if resample == Image.Resampling.NEAREST:
        return gray.resize(size, resample, box=box)
    factor_x = int((box[2] - box[0]) / size[0] / REDUCING_GAP) or 1
    factor_y = int((box[3] - box[1]) / size[1] / REDUCING_GAP) or 1
    if factor_x > 1 or factor_y > 1:
        reduce_box = gray._get_safe_box(size, resample, box)  # as Image.resize does
        gray = gray.reduce((factor_x, factor_y), box=reduce_box)
        box = (
            (box[0] - reduce_box[0]) / factor_x,
            (box[1] - reduce_box[1]) / factor_y,
            (box[2] - reduce_box[0]) / factor_x,
            (box[3] - reduce_box[1]) / factor_y,
        )
    height = gray.height
    gray = gray.resize((size[0], height), resample, box=(box[0], 0, box[2], height))
    return gray.resize(size, resample, box=(0, box[1], size[0], box[3]))


def _crop_resize(
    gray: Image.Image,
    source_size: tuple[int, int],
    scale: float,
    size: int,
    crop: str,
    resample: Image.Resampling,
) -> Image.Image:
    """Crop (a box in source pixels) and resize once (:func:`_resize`).

    ``gray`` may be a JPEG decoded at ``1 / scale`` of ``source_size``: the box is
    scaled to its pixels, so the geometry is that of the full-resolution crop.
    """
    width, height = source_size
    if crop == "center":
        left, top, right, bottom = center_crop_box(width, height)
        box = (left / scale, top / scale, right / scale, bottom / scale)
        return _resize(gray, (size, size), resample, box)
    out_width, out_height = _padded_size(width, height, size)
    box = (0.0, 0.0, width / scale, height / scale)
    resized = _resize(gray, (out_width, out_height), resample, box)
    padded = Image.new(resized.mode, (size, size), 0)
    padded.paste(resized, ((size - out_width) // 2, (size - out_height) // 2))
    return padded


def _load(
    path: str | os.PathLike[str],
    size: int,
    crop: str,
    resample: Image.Resampling,
    function: str,
) -> NDArray[np.uint8]:
    """Open, decode (reduced when JPEG), make grey, crop and resize once."""
    file_path = Path(path)
    with _open(_read(file_path, function), file_path, function) as image:
        source_size = image.size
        scale = 1.0
        try:
            if image.format == "JPEG":
                # libjpeg decodes at the smallest 1/2^k scale with both sides at least
                # this request, so the crop still covers ``size`` pixels or more.
                request = (size, size) if crop == "center" else _padded_size(*source_size, size)
                drafted = image.draft("L", request)
                if drafted is not None:  # reduced pixel i covers [i * scale, (i + 1) * scale)
                    scale = source_size[0] / drafted[1][2]
            resized = _crop_resize(_gray(image), source_size, scale, size, crop, resample)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(
                f"{function}: {str(file_path)!r} cannot be decoded ({exc}); re-ingest it",
                code="undecodable",
            ) from exc
    return _to_uint8(resized)


def preprocess_image(image: Image.Image, size: int, *, crop: Crop = "center") -> NDArray[np.uint8]:
    """:func:`load_image`'s pixels for an image that is already decoded.

    The same grey conversion, crop, single resize and rounding (for prediction on an
    uploaded image, so that it sees what training saw); only the reduced JPEG decode is
    missing, which changes a pixel by about one grey level.

    Raises:
        ValueError: ``size`` or ``crop`` is not valid.
    """
    check_request("preprocess_image", size, crop)
    return _to_uint8(_crop_resize(_gray(image), image.size, 1.0, size, crop, RESAMPLE))


def grey_levels(image: Image.Image) -> NDArray[np.uint8]:
    """A decoded image's grey levels as :func:`load_image` makes them, uncropped and
    at full size (``uint8``, height x width)."""
    return _to_uint8(_gray(image))


def load_image(
    path: str | os.PathLike[str], size: int, *, crop: Crop = "center"
) -> NDArray[np.uint8]:
    """Load an image as a ``size x size`` grayscale ``uint8`` array, decoding no more
    than needed.

    Colour becomes luminance (ITU-R 601-2, Pillow's ``L``), alpha is dropped, 16-bit
    images are scaled by 65535 (as :func:`~covidcxr.imaging.decode.to_grayscale`
    does). JPEGs are decoded at the smallest 1/2^k scale that still covers the output.
    The crop and the resize are one Pillow ``resize`` (RESAMPLE, REDUCING_GAP,
    horizontal pass first).

    Args:
        path: a PNG or JPEG file (normally a blob of the store, checked at ingest).
        size: output side in pixels.
        crop: ``center`` (torchxrayvision's ``XRayCenterCrop`` geometry) or ``pad``
            (whole image, letterboxed with black).

    Returns:
        A C-contiguous ``uint8`` array of shape ``(size, size)``.

    Raises:
        ValueError: ``size`` or ``crop`` is not valid.
        ImageError: the file is missing (``missing_file``), over Pillow's pixel limit
            (``too_many_pixels``) or cannot be decoded (``undecodable``).
    """
    check_request("load_image", size, crop)
    return _load(path, size, crop, RESAMPLE, "load_image")


def load_mask(
    path: str | os.PathLike[str], size: int, *, crop: Crop = "center"
) -> NDArray[np.uint8]:
    """Load a lung mask as a ``size x size`` array: 1 for lung, 0 for everything else.

    The crop is the one :func:`load_image` applies, computed on the mask's own size
    (masks in the collection have their image's size); the resize is NEAREST so that
    no new grey levels appear. Lung is a grey level of 128 or more: V7 Labs masks use
    255 lung, 127 "ignore" and 0 background; lungVAE masks use 255 and 0.

    Args:
        path: a PNG (or JPEG) mask.
        size: output side in pixels.
        crop: as for :func:`load_image`.

    Returns:
        A C-contiguous ``uint8`` array of shape ``(size, size)`` holding 0 and 1.

    Raises:
        ValueError: ``size`` or ``crop`` is not valid.
        ImageError: the file is missing or cannot be decoded.
    """
    check_request("load_mask", size, crop)
    pixels = _load(path, size, crop, Image.Resampling.NEAREST, "load_mask")
    return np.ascontiguousarray(pixels >= 128, dtype=np.uint8)


def normalise(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Map ``uint8`` grey levels to torchxrayvision's [-1024, 1024] range.

    Bit-identical to ``xrv.datasets.normalize(pixels, maxval=255)``:
    ``(2 * (x / 255) - 1) * 1024`` in float32 (the same operations in the same order).
    """
    scaled: NDArray[np.float32] = pixels.astype(np.float32)
    scaled /= np.float32(255)
    scaled *= np.float32(2)
    scaled -= np.float32(1)
    scaled *= np.float32(1024)
    return scaled


def fill_cache(
    samples: SampleSet,
    *,
    size: int = 224,
    crop: Crop = "center",
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    masks: bool = True,
    threads: int | None = None,
) -> int:
    """Decode every image (and lung mask) of ``samples`` that the cache lacks.

    Run once before training or evaluation (``covidcxr evaluate --prepare-cache``) so
    that they only read the cache. Pillow releases the GIL while decoding and
    resizing, so threads use every CPU.

    Args:
        samples: from :func:`~covidcxr.dataset.samples.build_samples`.
        size: output side in pixels (as the Dataset will use it).
        crop: ``center`` or ``pad`` (as the Dataset will use it).
        cache_dir: the cache root; default ``cache`` beside the store's ``blobs``.
        masks: also the lung masks.
        threads: decoding threads (default: the CPUs this process may use).

    Returns:
        How many files were decoded.

    Raises:
        ValueError: ``cache_dir`` is None, or a bad size, crop or thread count.
        ImageError: an image or mask cannot be read.
    """
    check_request("fill_cache", size, crop)
    if threads is not None and threads < 1:
        raise ValueError(f"fill_cache: threads must be >= 1, got {threads}")
    root = resolve_cache_dir(cache_dir, samples.blob_root.parent)
    if root is None:
        raise ValueError("fill_cache: cache_dir is None, so there is no cache to fill")
    caches = {
        "image": PreprocessCache(root, size, crop),
        "mask": PreprocessCache(root, size, crop, kind="mask"),
    }
    jobs: dict[tuple[str, str], Path] = {}
    for sample in samples.samples:
        jobs.setdefault(("image", sample.image_sha256), samples.image_path(sample))
        mask = samples.mask_path(sample)
        if masks and mask is not None and sample.mask_sha256 is not None:
            jobs.setdefault(("mask", sample.mask_sha256), mask)
    missing = [(key, path) for key, path in jobs.items() if caches[key[0]].get(key[1]) is None]

    def decode(job: tuple[tuple[str, str], Path]) -> None:
        (kind, sha), path = job
        load = load_image if kind == "image" else load_mask
        caches[kind].put(sha, load(path, size, crop=crop))

    with ThreadPoolExecutor(threads or len(os.sched_getaffinity(0))) as pool:
        list(pool.map(decode, missing))
    logger.info("fill_cache: decoded %d of %d files into %s", len(missing), len(jobs), root)
    return len(missing)
