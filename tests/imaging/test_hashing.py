"""Perceptual hashes: border trimming, hash format, robustness to edits, separation."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from covidcxr.imaging.decode import decode_image, to_grayscale
from covidcxr.imaging.duplicates import DEFAULT_MAX_DISTANCE
from covidcxr.imaging.hashing import (
    FEATURE_CENTRES,
    HASH_BITS,
    ImageHashes,
    content_window,
    dct_features,
    fit_centres,
    hamming,
    image_hashes,
    phash,
    phash_pair,
    to_hex,
    trim_borders,
    working_gray,
)

SEEDS = range(5)


def xray_like(seed: int, height: int = 320, width: int = 280) -> Image.Image:
    """A chest-film-like picture: body, two dark lungs, spine, ribs, blobs and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    picture = 0.35 + 0.45 * np.exp(-(((x - 0.5) / 0.42) ** 4))
    for side in (-1, 1):
        cx, cy = 0.5 + side * rng.uniform(0.17, 0.23), rng.uniform(0.4, 0.5)
        rx, ry = rng.uniform(0.11, 0.15), rng.uniform(0.25, 0.32)
        picture -= 0.35 * np.exp(-((((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) ** 2))
    picture += 0.3 * np.exp(-(((x - 0.5) / 0.05) ** 2))
    rib_phase = rng.uniform(0, 2 * np.pi)
    picture += 0.04 * np.sin(2 * np.pi * rng.uniform(8, 12) * y + 4 * (x - 0.5) ** 2 + rib_phase)
    for _ in range(8):
        bx, by, radius = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.03, 0.1)
        picture += rng.uniform(-0.2, 0.2) * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / radius**2)
    picture += rng.normal(0, 0.02, picture.shape)
    return Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8))


def _recompressed(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return decode_image(buffer.getvalue()).image


def _framed(image: Image.Image, fraction: float, value: int) -> Image.Image:
    width, height = image.size
    pad_x, pad_y = round(width * fraction), round(height * fraction)
    framed = Image.new("L", (width + 2 * pad_x, height + 2 * pad_y), value)
    framed.paste(image, (pad_x, pad_y))
    return framed


def _cropped(image: Image.Image, fraction: float) -> Image.Image:
    width, height = image.size
    dx, dy = round(width * fraction), round(height * fraction)
    return image.crop((dx, dy, width - dx, height - dy))


def _distance(a: ImageHashes, b: ImageHashes) -> int:
    return hamming(a.phash, b.phash) + hamming(a.phash_detail, b.phash_detail)


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resized": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "upscaled": lambda im: im.resize((im.width * 3, im.height * 3), Image.Resampling.BICUBIC),
    "jpeg-q60": lambda im: _recompressed(im, 60),
    "black-border-5pct": lambda im: _framed(im, 0.05, 0),
    "white-border-5pct": lambda im: _framed(im, 0.05, 255),
    "rgb": lambda im: im.convert("RGB"),
}


# --- trim_borders ---------------------------------------------------------------------


def _content(seed: int = 0) -> np.ndarray:
    return np.asarray(xray_like(seed, 60, 50), dtype=np.float32) / 255


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_trim_removes_a_uniform_frame(value: float) -> None:
    content = _content()
    framed = np.pad(content, ((7, 3), (5, 9)), constant_values=value)
    np.testing.assert_array_equal(trim_borders(framed), content)


def test_trim_tolerates_noise_in_the_frame() -> None:
    rng = np.random.default_rng(3)
    content = _content()
    framed = np.pad(content, 6, constant_values=0.0)
    noisy = framed + np.where(framed == 0, rng.uniform(0, 0.02, framed.shape), 0)
    assert trim_borders(noisy.astype(np.float32)).shape == content.shape


def test_trim_peels_a_side_frame_before_the_rows_it_crosses() -> None:
    content = _content()
    # Dark band on top (uniform once the white side frame is gone), white side frames.
    dark_top = np.pad(content, ((8, 0), (0, 0)), constant_values=0.0)
    framed = np.pad(dark_top, ((0, 0), (6, 6)), constant_values=1.0)
    np.testing.assert_array_equal(trim_borders(framed), content)


@pytest.mark.parametrize("shape", [(60, 50), (50, 50)])
@pytest.mark.parametrize("side", ["top", "bottom", "left", "right"])
def test_trim_finds_a_frame_on_any_one_side(side: str, shape: tuple[int, int]) -> None:
    # One uniform edge is enough to leave the quick no-frame check, square or not.
    content = np.asarray(xray_like(4, *shape), dtype=np.float32) / 255
    widths = {"top": ((4, 0), (0, 0)), "bottom": ((0, 4), (0, 0))}
    widths |= {"left": ((0, 0), (4, 0)), "right": ((0, 0), (0, 4))}
    framed = np.pad(content, widths[side], constant_values=1.0)
    np.testing.assert_array_equal(trim_borders(framed), content)


def test_trim_keeps_an_image_without_border() -> None:
    content = _content()
    assert trim_borders(content).shape == content.shape


@pytest.mark.parametrize(
    "gray",
    [
        pytest.param(np.zeros((20, 30), np.float32), id="blank"),
        pytest.param(np.pad(np.ones((1, 30), np.float32), ((10, 10), (0, 0))), id="one-line"),
    ],
)
def test_trim_never_trims_to_nothing(gray: np.ndarray) -> None:
    assert trim_borders(gray) is gray


def test_trim_rejects_colour_arrays() -> None:
    with pytest.raises(ValueError, match=r"trim_borders: expected a 2-D .* shape \(4, 4, 3\)"):
        trim_borders(np.zeros((4, 4, 3), np.float32))


# --- window, features, hash format ------------------------------------------------


def test_content_window_of_blank_image_is_the_image() -> None:
    blank = np.zeros((10, 12), np.float32)
    assert content_window(blank) is blank


def test_content_window_ignores_dark_padding() -> None:
    content = _content()
    padded = np.pad(content, ((0, 0), (0, 40)), constant_values=0.0)
    window = content_window(padded)
    assert window.shape[1] < content.shape[1] + 5


def test_dct_features_are_unit_length_and_scale_invariant() -> None:
    # Texture everywhere, so that no border is trimmed at either contrast.
    gray = np.random.default_rng(5).uniform(0, 1, (60, 50)).astype(np.float32)
    features = dct_features(gray)
    assert features.shape == (2 * HASH_BITS,)
    assert np.linalg.norm(features) == pytest.approx(1.0)
    np.testing.assert_allclose(dct_features(0.5 * gray), features, atol=1e-6)


def test_dct_features_of_flat_image_is_zero() -> None:
    assert not np.any(dct_features(np.full((20, 20), 0.5, np.float32)))


def test_phash_is_a_64_bit_int_and_matches_phash_pair() -> None:
    gray = _content()
    value = phash(gray)
    assert 0 <= value < 1 << 64
    assert phash_pair(gray)[0] == value
    with pytest.raises(ValueError, match=r"dct_features: expected a 2-D .* shape \(3,\)"):
        phash(np.zeros(3, np.float32))


def test_image_hashes_format() -> None:
    hashes = image_hashes(xray_like(0))
    for value in (hashes.phash, hashes.phash_detail):
        assert len(value) == 16
        assert value == value.lower()
        int(value, 16)


def test_image_hashes_accepts_an_array_and_agrees_with_the_image() -> None:
    image = xray_like(1)
    from_array = image_hashes(to_grayscale(image))
    assert _distance(from_array, image_hashes(image)) <= 2


@pytest.mark.parametrize("mode", ["1", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_image_hashes_of_every_decoded_mode(mode: str) -> None:
    image = xray_like(2)
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    else:
        converted = image.convert(mode)
    hashes = image_hashes(converted)
    if mode != "1":  # dithering to 1 bit changes the picture; the others keep it
        assert _distance(hashes, image_hashes(image)) <= 4


def test_working_gray_shrinks_large_images_only() -> None:
    large = xray_like(0, 1200, 1000)
    assert max(working_gray(large).shape) < 300
    small = xray_like(0, 100, 90)
    assert working_gray(small).shape == (100, 90)
    # 800 // 128 = 6: blocks of 6 x 6 pixels.
    assert working_gray(np.zeros((1000, 800), np.float32)).shape == (166, 133)
    with pytest.raises(ValueError, match="working_gray: expected a 2-D"):
        working_gray(np.zeros((10, 10, 3), np.float32))


def test_fit_centres_reproduces_medians() -> None:
    grays = [_content(seed) for seed in range(3)]
    centres = fit_centres(grays)
    assert centres.shape == FEATURE_CENTRES.shape
    expected = np.median(np.stack([dct_features(g) for g in grays]), axis=0)
    np.testing.assert_allclose(centres, expected)
    with pytest.raises(ValueError, match="fit_centres: no images given"):
        fit_centres([])


def test_feature_centres_are_read_only() -> None:
    with pytest.raises(ValueError, match="read-only"):
        FEATURE_CENTRES[0] = 1.0


# --- hamming / to_hex ----------------------------------------------------------------


def test_hamming() -> None:
    assert hamming("0" * 16, "0" * 16) == 0
    assert hamming("0" * 16, "f" * 16) == 64
    assert hamming("8000000000000001", "0000000000000000") == 2
    assert hamming("ABCDEF0123456789", "abcdef0123456789") == 0


@pytest.mark.parametrize("bad", ["", "0" * 15, "0" * 17, "g" * 16, " " * 16])
def test_hamming_rejects_malformed_hashes(bad: str) -> None:
    with pytest.raises(ValueError, match=r"hamming: .* is not a 16-character hex hash"):
        hamming(bad, "0" * 16)


def test_to_hex() -> None:
    assert to_hex(0) == "0" * 16
    assert to_hex((1 << 64) - 1) == "f" * 16
    assert to_hex(0xABC) == "0000000000000abc"
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match=r"to_hex: .* is not a 64-bit unsigned hash"):
            to_hex(bad)


# --- near-duplicates and separation --------------------------------------------------


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("seed", SEEDS)
def test_edited_copy_is_within_threshold(seed: int, edit: str) -> None:
    original = xray_like(seed)
    distance = _distance(image_hashes(original), image_hashes(EDITS[edit](original)))
    assert distance <= DEFAULT_MAX_DISTANCE


@pytest.mark.parametrize("seed", SEEDS)
def test_cropped_copy_is_nearer_than_any_other_picture(seed: int) -> None:
    original = image_hashes(xray_like(seed))
    cropped = image_hashes(_cropped(xray_like(seed), 0.03))
    others = [image_hashes(xray_like(other)) for other in range(100, 106)]
    assert _distance(original, cropped) < min(_distance(original, o) for o in others)


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: a 3% crop of each side zooms the picture by 6%, which "
    "whole-image DCT hashes do not survive (9% of real films stay within the "
    "threshold); see covidcxr.imaging.duplicates",
)
def test_cropped_copies_are_within_threshold() -> None:
    distances = [
        _distance(image_hashes(xray_like(seed)), image_hashes(_cropped(xray_like(seed), 0.03)))
        for seed in SEEDS
    ]
    assert max(distances) <= DEFAULT_MAX_DISTANCE


def test_different_pictures_are_far_apart() -> None:
    hashes = [image_hashes(xray_like(seed)) for seed in range(8)]
    distances = [_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) > 2 * DEFAULT_MAX_DISTANCE


# --- stability --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda: xray_like(11), ("48e8f0bed5e454da", "97ede36547550e57"), id="plain"),
        pytest.param(
            lambda: Image.fromarray(
                np.pad(np.asarray(xray_like(12, 280, 300)), ((20, 6), (0, 14)), constant_values=255)
            ),
            ("d8c0d19ff5f2bcdb", "50adc1457f613b20"),
            id="framed",
        ),
        pytest.param(
            lambda: xray_like(13, 90, 120), ("59e2c4daf7d8514b", "c57dc952f5713f52"), id="small"
        ),
        pytest.param(
            lambda: xray_like(14, 600, 520).convert("RGB"),
            ("48e2e4faf476115b", "e2ed4543ae291b76"),
            id="rgb-reduced",
        ),
    ],
)
def test_hash_values_do_not_drift(
    make: Callable[[], Image.Image], expected: tuple[str, str]
) -> None:
    # Stores keep hashes from earlier ingests and compare them with new ones, so a
    # speed-up must not change a single bit. These values were computed before the
    # quick no-frame check and the frombuffer resize went in; change them only with a
    # rehash of every store (see fit_centres).
    hashes = image_hashes(make())
    assert (hashes.phash, hashes.phash_detail) == expected
