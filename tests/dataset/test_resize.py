"""The loader's one resize: the C extension ``_resize`` against Pillow, and the Pillow
fallback against the extension.

covidcxr's resize is Pillow's ``reduce`` (whole factors, while the image is over
REDUCING_GAP times the output), then its BILINEAR horizontal pass, then its vertical
pass. The reference here runs those three steps in Pillow one at a time, so it does not
depend on the order Pillow's one-call ``resize`` picks (Pillow 13 runs the vertical
pass first for some shapes).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from conftest import skip_without_c_compiler, xray_like
from covidcxr.dataset import loading
from covidcxr.dataset.loading import load_image, preprocess_image

BILINEAR = Image.Resampling.BILINEAR

native = pytest.mark.skipif(not loading.NATIVE_RESIZE, reason="the C extension was not built")


def test_extension_is_built_where_there_is_a_c_compiler() -> None:
    skip_without_c_compiler("Pillow resizes")
    assert loading.NATIVE_RESIZE, "a C compiler is here but covidcxr.dataset._resize is not"


def _resizer() -> ModuleType:
    resizer = loading._resizer
    assert resizer is not None
    return resizer


def _two_passes(pixels: np.ndarray, size: tuple[int, int], box: tuple[float, ...]) -> np.ndarray:
    """Pillow's BILINEAR resize with the horizontal pass first, each pass its own call
    (a resize that keeps the height, or the width, runs one pass only)."""
    image = Image.fromarray(pixels)
    width, height = image.size
    if size[0] != width or np.float32(box[0]) != 0 or np.float32(box[2]) != size[0]:
        image = image.resize((size[0], height), BILINEAR, box=(box[0], 0, box[2], height))
        box = (0, box[1], size[0], box[3])
    return np.asarray(image.resize(size, BILINEAR, box=box))


def _random_case(
    rng: np.random.Generator, largest: int
) -> tuple[np.ndarray, tuple[int, int], tuple[float, float, float, float]]:
    width, height = (int(v) for v in rng.integers(1, largest, 2))
    if rng.random() < 0.5:
        pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
    else:  # smooth, like an X-ray: sums near the rounding points
        steps = rng.integers(-3, 4, (height, width))
        pixels = np.clip(np.cumsum(steps, axis=1) + 128, 0, 255).astype(np.uint8)
    size = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
    if rng.random() < 0.3:
        box: tuple[float, float, float, float] = (0.0, 0.0, float(width), float(height))
    else:
        left, top = rng.uniform(0, width), rng.uniform(0, height)
        box = (left, top, rng.uniform(left, width), rng.uniform(top, height))
        if rng.random() < 0.5:
            box = tuple(float(int(v)) for v in box)  # type: ignore[assignment]
    return pixels, size, box


@native
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_resize_bilinear_is_pillows_two_passes(seed: int, simd: bool) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(150):
        pixels, size, box = _random_case(rng, 700)
        height, width = pixels.shape
        out = np.empty((size[1], size[0]), np.uint8)
        _resizer().resize_bilinear(pixels, width, height, out, *size, box, simd=simd)
        np.testing.assert_array_equal(out, _two_passes(pixels, size, box), err_msg=f"{box}")


@native
@pytest.mark.parametrize(
    ("shape", "size"),
    [((300, 400), (224, 224)), ((285, 175), (256, 189)), ((9, 17), (40, 3)), ((1, 1), (5, 7))],
)
def test_resize_bilinear_one_pass_and_copy(shape: tuple[int, int], size: tuple[int, int]) -> None:
    """Only a horizontal pass, only a vertical one, and none (a copy), as Pillow."""
    pixels = xray_like(3, shape)
    height, width = shape
    for out_size, box in [
        ((size[0], height), (0.0, 0.0, float(width), float(height))),  # horizontal only
        ((width, size[1]), (0.0, 0.0, float(width), float(height))),  # vertical only
        ((width, height), (0.0, 0.0, float(width), float(height))),  # a copy
        (size, (0.0, 0.0, float(width), float(height))),
    ]:
        out = np.empty((out_size[1], out_size[0]), np.uint8)
        _resizer().resize_bilinear(pixels, width, height, out, *out_size, box)
        reference = np.asarray(Image.fromarray(pixels).resize(out_size, BILINEAR, box=box))
        if out_size[0] == width or out_size[1] == height:  # one pass: no order to pick
            np.testing.assert_array_equal(out, reference)
        np.testing.assert_array_equal(out, _two_passes(pixels, out_size, box))


@native
def test_pass_order_is_horizontal_first_whatever_pillow_does() -> None:
    """Pillow 13's one call runs the vertical pass first here; covidcxr keeps the order
    every earlier Pillow used, so that cached pixels do not change with Pillow."""
    pixels = np.random.default_rng(1).integers(0, 256, (285, 175), dtype=np.uint8)
    box = (0.0, 31.0, 175.0, 260.0)
    out = np.empty((189, 256), np.uint8)
    _resizer().resize_bilinear(pixels, 175, 285, out, 256, 189, box)
    np.testing.assert_array_equal(out, _two_passes(pixels, (256, 189), box))
    vertical_first = Image.fromarray(pixels).resize((175, 189), BILINEAR, box=(0, 31, 175, 260))
    vertical_first = vertical_first.resize((256, 189), BILINEAR)
    assert not np.array_equal(out, np.asarray(vertical_first))  # the order matters here


@native
@pytest.mark.parametrize("seed", range(3))
def test_reduce_is_pillows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(200):
        width, height = (int(v) for v in rng.integers(1, 120, 2))
        pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
        factors = (int(rng.integers(1, 10)), int(rng.integers(1, 10)))
        if factors == (1, 1):
            continue  # Pillow crops instead
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (
            left,
            top,
            int(rng.integers(left + 1, width + 1)),
            int(rng.integers(top + 1, height + 1)),
        )
        reference = np.asarray(Image.fromarray(pixels).reduce(factors, box=box))
        out = np.empty_like(reference)
        _resizer().reduce(pixels, width, height, out, box, *factors)
        np.testing.assert_array_equal(out, reference, err_msg=f"{factors} {box}")


@native
def test_reduce_of_full_blocks_of_255_is_255() -> None:
    """The largest sums: (255 n + n / 2) times the multiplier must not overflow 32 bits."""
    pixels = np.full((64, 64), 255, np.uint8)
    for factor in (2, 3, 5, 7, 16, 64):
        out = np.empty((-(-64 // factor),) * 2, np.uint8)
        _resizer().reduce(pixels, 64, 64, out, (0, 0, 64, 64), factor, factor)
        assert (out == 255).all()


@native
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r, px, out: r.resize_bilinear(px, 10, 9, out, 4, 4, (0, 0, 10, 10)), "holds 100"),
        (
            lambda r, px, out: r.resize_bilinear(px, 10, 10, out, 4, 5, (0, 0, 10, 10)),
            "out holds 16",
        ),
        (lambda r, px, out: r.resize_bilinear(px, 10, 10, out, 4, 4, (0, 0, 11, 10)), "outside"),
        (lambda r, px, out: r.resize_bilinear(px, 10, 10, out, 4, 4, (-1, 0, 10, 10)), "outside"),
        (lambda r, px, out: r.resize_bilinear(px, 10, 10, out, 4, 4, (5, 0, 4, 10)), "reversed"),
        (lambda r, px, out: r.resize_bilinear(px, 0, 10, out, 4, 4, (0, 0, 0, 10)), ">= 1"),
        (lambda r, px, out: r.reduce(px, 10, 10, out, (0, 0, 10, 10), 0, 2), "factors 0 x 2"),
        (lambda r, px, out: r.reduce(px, 10, 10, out, (0, 0, 10, 11), 3, 3), "outside the 10 x 10"),
        (lambda r, px, out: r.reduce(px, 10, 10, out, (4, 0, 4, 10), 3, 3), "empty"),
        (lambda r, px, out: r.reduce(px, 10, 10, out, (0, 0, 10, 10), 2, 2), "out holds 16"),
    ],
)
def test_extension_refuses_bad_sizes_before_writing(call: object, match: str) -> None:
    pixels = np.zeros((10, 10), np.uint8)
    out = np.full((4, 4), 7, np.uint8)
    with pytest.raises(ValueError, match=match):
        call(_resizer(), pixels, out)  # type: ignore[operator]
    assert (out == 7).all()


@native
def test_extension_refuses_a_read_only_output() -> None:
    out = np.zeros((2, 2), np.uint8)
    out.flags.writeable = False
    with pytest.raises((TypeError, BufferError)):
        _resizer().resize_bilinear(np.zeros((4, 4), np.uint8), 4, 4, out, 2, 2, (0, 0, 4, 4))


@native
@pytest.mark.parametrize("seed", range(3))
def test_pillow_fallback_gives_the_same_pixels(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the extension was not built, Pillow makes the same three steps."""
    rng = np.random.default_rng(seed)
    cases = [_random_case(rng, 1500) for _ in range(60)]
    native_out = [loading._resize_grey(pixels, size, box) for pixels, size, box in cases]
    monkeypatch.setattr(loading, "_resizer", None)
    for (pixels, size, box), expected in zip(cases, native_out, strict=True):
        np.testing.assert_array_equal(loading._resize_grey(pixels, size, box), expected)


def test_resize_grey_is_pillows_resize_where_pillow_goes_horizontal_first() -> None:
    """With reducing_gap: the reduce, the safe box around the crop and the rescaled box
    are Pillow's (these square crops are horizontal first in every Pillow)."""
    for side in (150, 224, 333, 700, 1500, 2501):
        pixels = xray_like(side, (side, side))
        for box in [(0.0, 0.0, side, side), (side / 7, side / 9, side * 0.9, side * 0.95)]:
            expected = Image.fromarray(pixels).resize(
                (224, 224), BILINEAR, box=box, reducing_gap=loading.REDUCING_GAP
            )
            got = loading._resize_grey(pixels, (224, 224), box)
            np.testing.assert_array_equal(got, np.asarray(expected), err_msg=f"{side} {box}")


@pytest.mark.parametrize("crop", ["center", "pad"])
def test_load_image_same_with_and_without_the_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crop: str
) -> None:
    paths = []
    for index, (width, height) in enumerate([(500, 380), (213, 640), (1200, 1100), (90, 60)]):
        image = Image.fromarray(xray_like(index, (height, width)))
        for suffix in (".png", ".jpg"):
            path = tmp_path / f"image{index}{suffix}"
            image.save(path)
            paths.append(path)
    expected = [load_image(path, 224, crop=crop) for path in paths]  # type: ignore[arg-type]
    monkeypatch.setattr(loading, "_resizer", None)
    for path, pixels in zip(paths, expected, strict=True):
        np.testing.assert_array_equal(load_image(path, 224, crop=crop), pixels)  # type: ignore[arg-type]
        with Image.open(path) as image:  # prediction's path: no reduced JPEG decode
            assert preprocess_image(image, 224, crop=crop).shape == (224, 224)  # type: ignore[arg-type]
