"""What hospitals do to their X-ray exports, as fixed Pillow steps: for measuring how a
model's output moves when only the processing changes, not the chest.

:func:`histogram_flatness` tells an equalised image from an unprocessed one.

Each step in :data:`PROCESSING` takes a decoded image and returns a new greyscale
(``L``) image; none is random, so a measurement repeats exactly. The strengths are
ordinary ones (a viewer's equalisation, a gamma of 0.7 or 1.4, a radiology unsharp
mask, a quality-40 JPEG, half the pixels), not extremes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Final

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from covidcxr.dataset.loading import preprocess_image
from covidcxr.models.lungs import letterbox_area

Step = Callable[[Image.Image], Image.Image]


def _grey(image: Image.Image) -> Image.Image:
    return image if image.mode == "L" else image.convert("L")


def gamma(value: float) -> Step:
    """Grey level ``g`` becomes ``255 * (g / 255) ** value`` (< 1 brightens).

    Raises:
        ValueError: ``value`` is not positive.
    """
    if not value > 0:
        raise ValueError(f"gamma: the exponent must be positive, got {value}")
    table = [round(255 * (g / 255) ** value) for g in range(256)]
    return lambda image: _grey(image).point(table)


def equalise(image: Image.Image) -> Image.Image:
    """Histogram equalisation (Pillow's ``ImageOps.equalize``)."""
    return ImageOps.equalize(_grey(image))


def sharpen(image: Image.Image) -> Image.Image:
    """An unsharp mask of radius 1% of the shorter side, 150%, threshold 3."""
    radius = max(1.0, min(image.size) / 100)
    return _grey(image).filter(ImageFilter.UnsharpMask(radius=radius, percent=150, threshold=3))


def blur(image: Image.Image) -> Image.Image:
    """A Gaussian blur of radius 0.3% of the shorter side (at least 1 px)."""
    return _grey(image).filter(ImageFilter.GaussianBlur(max(1.0, min(image.size) / 300)))


def jpeg(quality: int) -> Step:
    """Encode as JPEG at ``quality`` and decode again.

    Raises:
        ValueError: ``quality`` is outside 1..95.
    """
    if not 1 <= quality <= 95:
        raise ValueError(f"jpeg: quality must lie in 1..95, got {quality}")

    def step(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        _grey(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("L")

    return step


def half_size(image: Image.Image) -> Image.Image:
    """Half the width and height (at least 1 px), Lanczos."""
    width, height = image.size
    return _grey(image).resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.LANCZOS)


#: The steps a measurement applies, by the name it reports them under.
PROCESSING: Final[Mapping[str, Step]] = {
    "histogram equalised": equalise,
    "gamma 0.7": gamma(0.7),
    "gamma 1.4": gamma(1.4),
    "sharpened": sharpen,
    "blurred": blur,
    "JPEG quality 40": jpeg(40),
    "half size": half_size,
}


#: Side of the letterboxed copy :func:`histogram_flatness` is measured on.
FLATNESS_SIZE: Final = 256
#: Fewer pixels than this between the darkest and brightest level: not judged.
MIN_FLATNESS_PIXELS: Final = 100


def histogram_flatness(image: Image.Image) -> float:
    """How far the image's grey-level histogram is from flat: the largest distance
    between the cumulative distribution of its grey levels and a uniform one over their
    1st-99th percentile range. Measured on the image letterboxed to
    :data:`FLATNESS_SIZE` px (bars excluded), leaving out its darkest and brightest
    level (black borders, burned-in white text), which equalisation does not spread.
    Equalisation makes it small (median about 0.02 on equalised NIH and collection
    images); unprocessed radiographs are rarely below 0.05
    (``docs/decisions/0072-pneumonia-from-lung-zones.md``). An image with fewer than
    :data:`MIN_FLATNESS_PIXELS` pixels between its extremes gives 1 (not flat)."""
    big = preprocess_image(image, FLATNESS_SIZE, crop="pad")
    values = big[letterbox_area(image.width, image.height, FLATNESS_SIZE)].ravel()
    values = values[(values > values.min()) & (values < values.max())]
    if values.size < MIN_FLATNESS_PIXELS:
        return 1.0
    cdf = np.cumsum(np.bincount(values, minlength=256)) / values.size
    low, high = np.percentile(values, [1, 99])
    levels = np.arange(256)
    inside = (levels >= low) & (levels <= high)
    uniform = np.clip((levels - low) / max(high - low, 1.0), 0.0, 1.0)
    return float(np.abs(cdf - uniform)[inside].max())
