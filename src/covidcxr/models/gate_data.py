"""Pictures that are not chest X-rays, made in code, for training the input gate.

The gate's ``not_medical`` class needs examples of everything a user might upload by
mistake. Photographs cannot be shipped or downloaded, so they are drawn procedurally:
textures (sums of sinusoids), gradients (linear and radial), shapes (rectangles,
ellipses, polygons, lines), rendered text (documents, slides, screenshots), and noise
(white, salt-and-pepper and 1/f "natural image" noise). Every picture is grayscale,
because colour is refused by a separate rule (:class:`covidcxr.models.bundle.GateRules`
``max_colourfulness``, measured by :func:`colourfulness`).

Randomness: every function takes a ``numpy.random.Generator``; the same generator
state gives the same pictures on any machine (text rendering uses Pillow's built-in
bitmap-free default font at a fixed size).

The ``inverted`` class needs no generator: :func:`invert` flips a radiograph's grey
levels (bones dark, air bright), as a wrongly windowed DICOM export shows them.

This module needs no torch.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Pixels = NDArray[np.uint8]

#: The kinds of picture, drawn in turn (picture ``i`` is of kind ``i % 6``).
NOT_MEDICAL_KINDS: Final[tuple[str, ...]] = (
    "texture",
    "gradient",
    "shapes",
    "text",
    "noise",
    "fractal",
)


def _scale(values: NDArray[np.float64]) -> Pixels:
    """Stretch to 0..255 (a flat picture becomes mid-grey)."""
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-9:
        return np.full(values.shape, 128, dtype=np.uint8)
    scaled = (values - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grid(size: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    return y, x


def _texture(size: int, rng: np.random.Generator) -> Pixels:
    y, x = _grid(size)
    picture = np.zeros((size, size))
    for _ in range(int(rng.integers(2, 6))):
        angle = rng.uniform(0, np.pi)
        frequency = rng.uniform(2, 40)
        phase = rng.uniform(0, 2 * np.pi)
        picture += rng.uniform(0.3, 1.0) * np.sin(
            2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase
        )
    if rng.random() < 0.5:
        picture = np.sign(picture)  # hard-edged stripes and checks
    return _scale(picture)


def _gradient(size: int, rng: np.random.Generator) -> Pixels:
    y, x = _grid(size)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        picture = x * np.cos(angle) + y * np.sin(angle)
    else:
        cy, cx = rng.uniform(0, 1, size=2)
        picture = np.hypot(y - cy, x - cx)
    picture = picture ** rng.uniform(0.5, 2.0) if picture.min() >= 0 else picture
    return _scale(picture + rng.normal(0, 0.01, size=picture.shape))


def _shapes(size: int, rng: np.random.Generator) -> Pixels:
    image = Image.new("L", (size, size), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):
        fill = int(rng.integers(0, 256))
        x0, y0 = (int(v) for v in rng.integers(0, size, size=2))
        x1, y1 = (int(v) for v in rng.integers(0, size, size=2))
        box = (min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1)
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.rectangle(box, fill=fill)
        elif kind == 1:
            draw.ellipse(box, fill=fill)
        elif kind == 2:
            points = [tuple(int(v) for v in rng.integers(0, size, size=2)) for _ in range(3)]
            draw.polygon(points, fill=fill)
        else:
            draw.line(box, fill=fill, width=max(1, int(rng.integers(1, max(2, size // 16)))))
    return np.asarray(image, dtype=np.uint8).copy()


_LETTERS = string.ascii_letters + string.digits + "     .,:;-"


def _text(size: int, rng: np.random.Generator) -> Pixels:
    dark_on_light = rng.random() < 0.7
    background, ink = (int(rng.integers(200, 256)), int(rng.integers(0, 60)))
    if not dark_on_light:
        background, ink = ink, background
    image = Image.new("L", (size, size), background)
    draw = ImageDraw.Draw(image)
    font_px = max(6, int(size * rng.uniform(0.04, 0.12)))
    font = ImageFont.load_default(size=font_px)
    y = int(rng.integers(0, max(1, font_px)))
    while y < size:
        length = int(rng.integers(3, 40))
        line = "".join(_LETTERS[int(i)] for i in rng.integers(0, len(_LETTERS), size=length))
        draw.text((int(rng.integers(0, max(1, size // 8))), y), line, fill=ink, font=font)
        y += int(font_px * rng.uniform(1.2, 2.0))
    return np.asarray(image, dtype=np.uint8).copy()


def _noise(size: int, rng: np.random.Generator) -> Pixels:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        picture = rng.normal(0, 1, size=(size, size))
    elif kind == 1:
        picture = rng.choice([0.0, 0.5, 1.0], size=(size, size), p=[0.1, 0.8, 0.1])
    else:
        small = _scale(rng.normal(0, 1, size=(max(2, size // 8), max(2, size // 8))))
        blurred = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(
            blurred.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3.0))), dtype=np.uint8
        ).copy()
    return _scale(picture)


def _fractal(size: int, rng: np.random.Generator) -> Pixels:
    """1/f^beta noise: the power spectrum of natural photographs (clouds, foliage)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.hypot(fy, fx)
    radius[0, 0] = 1.0
    beta = rng.uniform(1.5, 3.0)
    spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** (
        beta / 2
    )
    spectrum[0, 0] = 0.0
    return _scale(np.fft.irfft2(spectrum, s=(size, size)))


_DRAW: Final[dict[str, Callable[[int, np.random.Generator], Pixels]]] = {
    "texture": _texture,
    "gradient": _gradient,
    "shapes": _shapes,
    "text": _text,
    "noise": _noise,
    "fractal": _fractal,
}


def not_medical_images(
    count: int,
    size: int,
    rng: np.random.Generator,
    *,
    kinds: Sequence[str] = NOT_MEDICAL_KINDS,
) -> Pixels:
    """Draw ``count`` grayscale pictures that are not radiographs.

    Args:
        count: how many pictures.
        size: side of each square picture in pixels.
        rng: the generator every random choice is drawn from.
        kinds: which kinds to draw, in turn (default all of :data:`NOT_MEDICAL_KINDS`).

    Returns:
        ``uint8`` array of shape ``(count, size, size)``.

    Raises:
        ValueError: a negative count, a size below 8, or an unknown kind.
    """
    if count < 0:
        raise ValueError(f"not_medical_images: count must be >= 0, got {count}")
    if size < 8:
        raise ValueError(f"not_medical_images: size must be >= 8 pixels, got {size}")
    unknown = [k for k in kinds if k not in _DRAW]
    if unknown or not kinds:
        raise ValueError(
            f"not_medical_images: unknown kind(s) {unknown or list(kinds)}; "
            f"choose from {', '.join(NOT_MEDICAL_KINDS)}"
        )
    pictures = np.empty((count, size, size), dtype=np.uint8)
    for i in range(count):
        pictures[i] = _DRAW[kinds[i % len(kinds)]](size, rng)
    return pictures


def invert(pixels: Pixels) -> Pixels:
    """Flip grey levels (``255 - x``): what the gate's ``inverted`` class looks like."""
    inverted: Pixels = np.subtract(255, pixels, dtype=np.uint8)
    return inverted


def colourfulness(rgb: NDArray[np.generic]) -> float:
    """How colourful a picture is, 0 for grey (Hasler and Süsstrunk 2003, on a 0..1 scale).

    ``M = sqrt(sd(rg)^2 + sd(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)`` with
    ``rg = R - G`` and ``yb = (R + G) / 2 - B``, channels scaled to 0..1. Their paper's
    0..255 values divided by 255: "not colourful" 0, "slightly" ~0.06, "moderately"
    ~0.13, "averagely" ~0.18, "quite" ~0.23, "highly" ~0.32. Compared against
    :attr:`covidcxr.models.bundle.GateRules.max_colourfulness`.

    Args:
        rgb: ``(H, W)`` grey (gives 0), ``(H, W, 3)`` or ``(H, W, 4)`` (alpha ignored);
            ``uint8`` (0..255), ``uint16`` (0..65535) or floats in 0..1.

    Raises:
        ValueError: another shape.
    """
    array = np.asarray(rgb)
    if array.ndim == 2:
        return 0.0
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(
            f"colourfulness: expected (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    if array.dtype == np.uint8:
        channels = array[..., :3].astype(np.float64) / 255.0
    elif array.dtype == np.uint16:
        channels = array[..., :3].astype(np.float64) / 65535.0
    else:
        channels = array[..., :3].astype(np.float64)
    red, green, blue = channels[..., 0], channels[..., 1], channels[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    spread = float(np.hypot(rg.std(), yb.std()))
    offset = float(np.hypot(rg.mean(), yb.mean()))
    return spread + 0.3 * offset
