"""The processing steps hospitals apply: fixed, greyscale out, and each does what its
name says on small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from covidcxr.models import processing
from covidcxr.models.processing import PROCESSING


def ramp(width: int = 64, height: int = 48, low: int = 60, high: int = 120) -> Image.Image:
    """A low-contrast horizontal grey ramp with a sharp bright square in the middle."""
    row = np.linspace(low, high, width)
    pixels = np.tile(row, (height, 1))
    pixels[16:32, 24:40] = 200
    return Image.fromarray(pixels.astype(np.uint8))


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize("name", list(PROCESSING))
def test_every_step_is_fixed_and_gives_greyscale(name: str) -> None:
    image = ramp()
    first, second = PROCESSING[name](image), PROCESSING[name](image)
    assert first.mode == "L"
    assert np.array_equal(grey(first), grey(second))


@pytest.mark.parametrize("name", [n for n in PROCESSING if n != "half size"])
def test_every_step_but_resizing_keeps_the_size_even_from_rgb(name: str) -> None:
    image = ramp().convert("RGB")
    assert PROCESSING[name](image).size == image.size


def test_half_size_halves_and_never_reaches_zero() -> None:
    assert processing.half_size(ramp(64, 48)).size == (32, 24)
    assert processing.half_size(Image.new("L", (1, 3))).size == (1, 1)


def test_equalisation_spreads_a_narrow_histogram() -> None:
    image = ramp()
    out = grey(processing.equalise(image))
    assert out.max() - out.min() > 200 > grey(image).max() - grey(image).min()


def test_gamma_below_one_brightens_and_above_one_darkens() -> None:
    image = ramp()
    assert grey(processing.gamma(0.7)(image)).mean() > grey(image).mean()
    assert grey(processing.gamma(1.4)(image)).mean() < grey(image).mean()
    assert np.array_equal(grey(processing.gamma(1.0)(image)), grey(image))


def test_sharpening_raises_and_blurring_lowers_the_edge_of_the_square() -> None:
    def edge(image: Image.Image) -> float:
        return float(np.abs(np.diff(grey(image), axis=1)).max())

    image = ramp()
    assert edge(processing.sharpen(image)) > edge(image) > edge(processing.blur(image))


def test_jpeg_changes_pixels_a_little() -> None:
    image = ramp()
    out = grey(processing.jpeg(40)(image))
    difference = np.abs(out - grey(image))
    assert 0 < difference.mean() < 10


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_gamma_refuses_an_exponent_that_is_not_positive(value: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        processing.gamma(value)


@pytest.mark.parametrize("quality", [0, 96])
def test_jpeg_refuses_a_quality_outside_1_95(quality: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.95"):
        processing.jpeg(quality)


def chest_like(seed: int = 0) -> Image.Image:
    """A radiograph-like histogram: a shaded body, two darker shaded lungs, air around;
    256 px a side, the size flatness is measured at (no resampling)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256].astype(np.float64) * (200 / 256)
    body = ((y - 100) / 95) ** 2 + ((x - 100) / 85) ** 2 < 1
    lungs = (((y - 95) / 55) ** 2 + ((np.abs(x - 100) - 38) / 24) ** 2) < 1
    shade = y / 200  # soft tissue and lungs brighten towards the abdomen, as on film
    grey = np.where(body, 150.0 + 80 * shade, 25.0 + 20 * shade)
    grey = np.where(lungs, 40.0 + 70 * shade, grey) + rng.normal(0, 10, grey.shape)
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))


def test_equalisation_flattens_the_histogram_below_the_gates_limit() -> None:
    from covidcxr.models.gate import EQUALISED_MAX_FLATNESS

    image = chest_like()
    assert processing.histogram_flatness(image) > 2 * EQUALISED_MAX_FLATNESS
    assert processing.histogram_flatness(processing.equalise(image)) < EQUALISED_MAX_FLATNESS


def test_histogram_flatness_ignores_letterbox_bars_and_colour() -> None:
    image = chest_like()
    wide = Image.new("L", (400, 200), 0)
    wide.paste(image, (110, 0))
    assert processing.histogram_flatness(image.convert("RGB")) == pytest.approx(
        processing.histogram_flatness(image)
    )
    assert 0.0 <= processing.histogram_flatness(wide) <= 1.0
    assert processing.histogram_flatness(Image.new("L", (50, 50), 128)) == 1.0  # not judged


def test_the_darkest_and_brightest_levels_do_not_hide_an_equalised_image() -> None:
    from covidcxr.models.gate import EQUALISED_MAX_FLATNESS

    framed = np.asarray(chest_like()).copy()
    framed[:, :40] = framed[:, -40:] = 0  # wide black borders
    framed[:16, 60:180] = 255  # and a burned-in white label, both there before equalising
    equalised = processing.equalise(Image.fromarray(framed))
    assert processing.histogram_flatness(Image.fromarray(framed)) > 2 * EQUALISED_MAX_FLATNESS
    assert processing.histogram_flatness(equalised) < EQUALISED_MAX_FLATNESS
