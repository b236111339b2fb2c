"""Loading: geometry like torchxrayvision, Pillow's pixels, every mode, masks, the cache."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from conftest import encode, xray_like
from covidcxr.dataset.cache import PreprocessCache
from covidcxr.dataset.loading import (
    DEFAULT_CACHE_DIR,
    REDUCING_GAP,
    RESAMPLE,
    center_crop_box,
    fill_cache,
    grey_levels,
    load_image,
    load_mask,
    normalise,
    preprocess_image,
    resolve_cache_dir,
)
from covidcxr.dataset.samples import Sample, SampleSet, Selection
from covidcxr.dataset.tasks import get_task
from covidcxr.errors import ImageError
from covidcxr.store.blobs import sha256_hex

SHA_A = "a" * 64
SHA_B = "b" * 64


def _save(path: Path, image: Image.Image, fmt: str = "PNG", **params: Any) -> Path:
    image.save(path, format=fmt, **params)
    return path


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def _xrv_center_crop(pixels: np.ndarray) -> np.ndarray:
    """torchxrayvision's XRayCenterCrop.crop_center, on a 2-D array."""
    y, x = pixels.shape
    crop_size = min(y, x)
    startx = x // 2 - (crop_size // 2)
    starty = y // 2 - (crop_size // 2)
    return pixels[starty : starty + crop_size, startx : startx + crop_size]


# -- geometry ------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(23, 37), (37, 23), (24, 37), (30, 31), (16, 16)])
def test_center_crop_is_xrv_center_crop(tmp_path: Path, height: int, width: int) -> None:
    pixels = _noise(height, width)
    path = _save(tmp_path / "noise.png", Image.fromarray(pixels))
    side = min(height, width)
    # At the crop's own size the resize is the identity: the pixels are the crop's.
    np.testing.assert_array_equal(load_image(path, side), _xrv_center_crop(pixels))
    left, top, right, bottom = center_crop_box(width, height)
    np.testing.assert_array_equal(pixels[top:bottom, left:right], _xrv_center_crop(pixels))


@pytest.mark.parametrize("size", [1, 7, 32, 64, 200])
def test_shapes_and_dtype(tmp_path: Path, size: int) -> None:
    path = _save(tmp_path / "x.png", Image.fromarray(xray_like(1, (96, 80))))
    pixels = load_image(path, size)
    assert pixels.shape == (size, size)
    assert pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous


def test_resize_is_antialiased_and_close_to_area_average(tmp_path: Path) -> None:
    # A 1-pixel checkerboard averages to mid-grey; point sampling would keep 0/255.
    board = (np.indices((128, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    path = _save(tmp_path / "board.png", Image.fromarray(board))
    pixels = load_image(path, 16).astype(int)
    assert np.abs(pixels - 127).max() <= 2


def test_pad_keeps_the_whole_image_letterboxed(tmp_path: Path) -> None:
    pixels = np.full((40, 80), 200, dtype=np.uint8)
    path = _save(tmp_path / "wide.png", Image.fromarray(pixels))
    padded = load_image(path, 40, crop="pad")
    assert padded.shape == (40, 40)
    np.testing.assert_array_equal(padded[10:30], 200)
    np.testing.assert_array_equal(padded[:10], 0)
    np.testing.assert_array_equal(padded[30:], 0)
    tall = _save(tmp_path / "tall.png", Image.fromarray(pixels.T.copy()))
    padded = load_image(tall, 40, crop="pad")
    np.testing.assert_array_equal(padded[:, 10:30], 200)
    np.testing.assert_array_equal(padded[:, :10], 0)


@pytest.mark.parametrize(
    ("size", "crop", "message"),
    [(0, "center", "positive int"), (True, "center", "positive int"), (8, "middle", "crop")],
)
def test_bad_requests_are_refused(tmp_path: Path, size: Any, crop: Any, message: str) -> None:
    path = _save(tmp_path / "x.png", Image.fromarray(xray_like(1)))
    with pytest.raises(ValueError, match=message):
        load_image(path, size, crop=crop)
    with pytest.raises(ValueError, match=message):
        load_mask(path, size, crop=crop)
    with pytest.raises(ValueError, match=message):
        PreprocessCache(tmp_path, size, crop)


@pytest.mark.parametrize("depth", [8, 16])
def test_decompression_bomb_is_an_image_error(tmp_path: Path, depth: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, depth, 0, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="pixel limit") as raised:
        load_image(bomb, 8)
    assert raised.value.code == "too_many_pixels"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_missing_and_undecodable_files(tmp_path: Path, dtype: type) -> None:
    with pytest.raises(ImageError, match="does not exist") as missing:
        load_image(tmp_path / "nope.png", 8)
    assert missing.value.code == "missing_file"
    with pytest.raises(ImageError, match="cannot be read") as folder:
        load_image(tmp_path, 8)
    assert folder.value.code == "undecodable"
    text = tmp_path / "page.png"
    text.write_text("<html>not an image</html>", encoding="utf-8")
    with pytest.raises(ImageError, match="not a PNG or JPEG") as bad:
        load_image(text, 8)
    assert bad.value.code == "undecodable"
    cut = tmp_path / "cut.png"
    cut.write_bytes(encode(xray_like(1).astype(dtype) * (257 if dtype is np.uint16 else 1))[:200])
    with pytest.raises(ImageError, match="cannot be decoded") as truncated:
        load_image(cut, 8)
    assert truncated.value.code == "undecodable"


# -- JPEG reduced decoding -------------------------------------------------------------


def _reference(path: Path, size: int) -> np.ndarray:
    """Full decode, grey, XRayCenterCrop, one resize with the same filter."""
    with Image.open(path) as image:
        gray = image.convert("L")
        width, height = gray.size
        box = center_crop_box(width, height)
        return np.asarray(gray.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP))


@pytest.mark.parametrize(("mode", "size", "scale"), [("L", 64, 8), ("RGB", 100, 4), ("L", 300, 1)])
def test_jpeg_draft_decodes_reduced_and_stays_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, size: int, scale: int
) -> None:
    pixels = xray_like(5, (600, 520))
    image = Image.fromarray(pixels).convert(mode)
    path = _save(tmp_path / "x.jpg", image, "JPEG", quality=92)
    scales: list[float] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, *args: Any) -> Any:
        width = self.size[0]
        result = original(self, *args)
        scales.append(width / result[1][2] if result else 1.0)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = load_image(path, size)
    assert scales == [scale]  # 520 // 64 = 8; 520 // 100 = 5 -> 4; 300 > 520 / 2 -> 1
    diff = np.abs(fast.astype(int) - _reference(path, size).astype(int))
    assert diff.mean() < 2.0
    assert diff.max() < 40


def test_jpeg_draft_keeps_the_crop_geometry(tmp_path: Path) -> None:
    # A bright square in the middle of a wide image must stay in the middle.
    pixels = np.zeros((400, 800), dtype=np.uint8)
    pixels[150:250, 350:450] = 255
    path = _save(tmp_path / "wide.jpg", Image.fromarray(pixels), "JPEG", quality=95)
    small = load_image(path, 50)  # decoded at 1/8
    rows, cols = np.nonzero(small > 128)
    assert abs(rows.mean() - 24.5) < 0.6
    assert abs(cols.mean() - 24.5) < 0.6
    assert 11 <= np.ptp(rows) + 1 <= 14  # 100 px of a 400 px crop -> 12.5 of 50


# -- pixel modes ------------------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_by_its_full_range(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    path = _save(tmp_path / "deep.png", image)
    with Image.open(path) as reopened:
        assert reopened.mode in ("I;16", "I")
    pixels = load_image(path, 32)
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    assert np.abs(pixels.astype(int) - expected).max() <= 1
    assert pixels.min() == 0
    assert pixels.max() == 255
    # Shrunk (through Pillow's float mode, reduce and resize): still the same grey levels.
    small = load_image(path, 8).astype(float)
    assert abs(small.mean() - expected.mean()) < 2
    assert np.all(np.diff(small.mean(axis=1)) > 0)  # the ramp still rises row by row


def test_dark_sixteen_bit_png_stays_dark(tmp_path: Path) -> None:
    # 12-bit data in a 16-bit file: scaled by 65535, as to_grayscale does, not stretched.
    values = np.full((16, 16), 4095, dtype=np.uint16)
    path = _save(tmp_path / "twelve.png", Image.fromarray(values))
    assert int(load_image(path, 16).max()) == round(4095 * 255 / 65535)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgb = np.stack([xray_like(1), xray_like(2), xray_like(3)], axis=-1)
    alpha = np.zeros(rgb.shape[:2], dtype=np.uint8)
    alpha[:, :40] = 255
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    with_alpha = _save(tmp_path / "rgba.png", Image.fromarray(rgba))
    without = _save(tmp_path / "rgb.png", Image.fromarray(rgb))
    np.testing.assert_array_equal(load_image(with_alpha, 40), load_image(without, 40))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(load_image(without, 80), _xrv_center_crop(gray))


def test_palette_la_and_cmyk(tmp_path: Path) -> None:
    gray = xray_like(4)
    plain = load_image(_save(tmp_path / "l.png", Image.fromarray(gray)), 48)
    palette = Image.fromarray(gray).convert("P")
    np.testing.assert_array_equal(load_image(_save(tmp_path / "p.png", palette), 48), plain)
    transparent = Image.fromarray(gray).convert("P")
    transparent.info["transparency"] = 0
    # No "Palette images with Transparency" warning (warnings are errors here).
    got = load_image(_save(tmp_path / "pt.png", transparent, transparency=0), 48)
    np.testing.assert_array_equal(got, plain)
    la = Image.fromarray(np.stack([gray, np.zeros_like(gray)], axis=-1))
    assert la.mode == "LA"
    np.testing.assert_array_equal(load_image(_save(tmp_path / "la.png", la), 48), plain)
    cmyk = Image.fromarray(gray).convert("CMYK")
    path = _save(tmp_path / "cmyk.jpg", cmyk, "JPEG", quality=95)
    assert load_image(path, 48).shape == (48, 48)


def _colour(seed: int, channels: int) -> np.ndarray:
    planes = [xray_like(seed + i, (61, 83)) for i in range(channels)]
    return planes[0] if channels == 1 else np.stack(planes, axis=-1)


def _two_passes(gray: Image.Image, size: tuple[int, int], box: tuple[float, ...]) -> Image.Image:
    """Pillow's BILINEAR resize with reducing_gap, step by step as ``Image.resize`` runs
    it (reduce, then the resize), the resize as two calls that run one pass each:
    horizontal, then vertical."""
    factor = tuple(int((box[i + 2] - box[i]) / size[i] / REDUCING_GAP) or 1 for i in (0, 1))
    if factor != (1, 1):
        safe = gray._get_safe_box(size, RESAMPLE, box)  # type: ignore[arg-type]
        gray = gray.reduce(factor, box=safe)  # type: ignore[arg-type]
        box = tuple((box[i] - safe[i % 2]) / factor[i % 2] for i in range(4))
    wide = gray.resize((size[0], gray.height), RESAMPLE, box=(box[0], 0, box[2], gray.height))
    return wide.resize(size, RESAMPLE, box=(0, box[1], size[0], box[3]))


def _pillow_reference(path: Path, size: int, crop: str) -> np.ndarray:
    """What load_image must give, computed directly with Pillow: grey (``L``), then
    the resize of the crop box (pad: of the whole image, pasted centred on black)."""
    with Image.open(path) as image:
        gray = image.convert("L")
    width, height = gray.size
    if crop == "center":
        return np.asarray(_two_passes(gray, (size, size), center_crop_box(width, height)))
    scale = size / max(width, height)
    out = (max(1, round(width * scale)), max(1, round(height * scale)))
    padded = Image.new("L", (size, size), 0)
    resized = _two_passes(gray, out, (0, 0, width, height))
    padded.paste(resized, ((size - out[0]) // 2, (size - out[1]) // 2))
    return np.asarray(padded)


def test_resize_is_pillows_single_call_where_pillow_goes_horizontal_first(tmp_path: Path) -> None:
    """Square crops of square images: every Pillow runs the horizontal pass first."""
    for side in (150, 224, 333, 700, 1500):
        path = _save(tmp_path / f"{side}.png", Image.fromarray(xray_like(side, (side, side))))
        with Image.open(path) as image:
            expected = image.resize((224, 224), RESAMPLE, reducing_gap=REDUCING_GAP)
        np.testing.assert_array_equal(load_image(path, 224), np.asarray(expected))


def test_pass_order_is_horizontal_first_whatever_pillow_does(tmp_path: Path) -> None:
    """Where the order of the two passes changes pixels, the horizontal pass comes first
    (as in every Pillow before 13, and in the shipped model's training)."""
    pixels = np.random.default_rng(1).integers(0, 256, (285, 175), dtype=np.uint8)
    path = _save(tmp_path / "noise.png", Image.fromarray(pixels))
    image = Image.fromarray(pixels)
    box = (0, 55, 175, 230)  # center_crop_box(175, 285); 100 px: no reduce
    wide = image.resize((100, 285), RESAMPLE, box=(0, 0, 175, 285))
    horizontal_first = wide.resize((100, 100), RESAMPLE, box=(0, 55, 100, 230))
    vertical_first = image.resize((175, 100), RESAMPLE, box=box).resize((100, 100), RESAMPLE)
    assert not np.array_equal(np.asarray(horizontal_first), np.asarray(vertical_first))
    np.testing.assert_array_equal(load_image(path, 100), np.asarray(horizontal_first))


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("LA", 2), ("RGB", 3), ("RGBA", 4)])
@pytest.mark.parametrize("crop", ["center", "pad"])
@pytest.mark.parametrize("shape", [(61, 83), (300, 200), (1100, 900), (50, 50)])
def test_pngs_are_pillows_pixels(
    tmp_path: Path, mode: str, channels: int, crop: str, shape: tuple[int, int]
) -> None:
    if channels == 1:
        pixels = xray_like(7, shape)
    else:
        pixels = np.stack([xray_like(7 + i, shape) for i in range(channels)], axis=-1)
    path = _save(tmp_path / "image.png", Image.fromarray(pixels))
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    for size in (24, 61, 224):
        expected = _pillow_reference(path, size, crop)
        np.testing.assert_array_equal(load_image(path, size, crop=crop), expected)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_png_with_a_transparent_colour_keeps_its_grey_levels(tmp_path: Path, mode: str) -> None:
    image = Image.fromarray(_colour(5, len(mode)))
    transparent = 0 if mode == "L" else (0, 0, 0)
    path = _save(tmp_path / "trns.png", image, transparency=transparent)
    np.testing.assert_array_equal(load_image(path, 40), _pillow_reference(path, 40, "center"))


def test_png_with_a_wrong_data_checksum_is_read_like_pillow(tmp_path: Path) -> None:
    data = bytearray(encode(xray_like(6)))
    position = 8
    while data[position + 4 : position + 8] != b"IDAT":
        position += 12 + struct.unpack_from(">I", data, position)[0]
    length = struct.unpack_from(">I", data, position)[0]
    data[position + 8 + length] ^= 0xFF  # Pillow does not check the data chunks' CRC
    path = tmp_path / "bad-crc.png"
    path.write_bytes(bytes(data))
    assert (
        zlib.crc32(bytes(data[position + 4 : position + 8 + length]))
        != struct.unpack_from(">I", data, position + 8 + length)[0]
    )
    np.testing.assert_array_equal(load_image(path, 32), _pillow_reference(path, 32, "center"))


def test_png_holding_jpeg_name_and_jpeg_bytes(tmp_path: Path) -> None:
    # Blobs have no extension; the content decides.
    blob = tmp_path / "blob"
    blob.write_bytes(encode(xray_like(2), "JPEG", quality=90))
    assert load_image(blob, 20).shape == (20, 20)


def test_preprocess_image_is_load_image_for_decoded_images(tmp_path: Path) -> None:
    rgba = np.concatenate(
        [np.stack([xray_like(7, (90, 120))] * 3, axis=-1), np.full((90, 120, 1), 255, np.uint8)],
        axis=-1,
    )
    png = _save(tmp_path / "x.png", Image.fromarray(rgba))
    jpeg = _save(tmp_path / "x.jpg", Image.fromarray(xray_like(7, (600, 640))), "JPEG")
    for crop in ("center", "pad"):
        with Image.open(png) as image:
            np.testing.assert_array_equal(
                preprocess_image(image, 40, crop=crop), load_image(png, 40, crop=crop)
            )
        with Image.open(jpeg) as image:
            full = preprocess_image(image, 64, crop=crop).astype(int)
        assert np.abs(full - load_image(jpeg, 64, crop=crop).astype(int)).mean() < 2.0
    with Image.open(png) as image:
        grey = grey_levels(image)
        with pytest.raises(ValueError, match="size"):
            preprocess_image(image, 0)
    assert grey.shape == (90, 120)
    np.testing.assert_array_equal(grey, np.asarray(Image.fromarray(rgba).convert("L")))


# -- masks ------------------------------------------------------------------------------


def test_v7_mask_binarised_and_nearest(tmp_path: Path) -> None:
    mask = np.zeros((96, 80), dtype=np.uint8)
    mask[20:70, 8:36] = 255  # lung
    mask[20:70, 44:72] = 127  # V7's "ignore"
    path = _save(tmp_path / "v7.png", Image.fromarray(mask))
    loaded = load_mask(path, 40)
    assert loaded.dtype == np.uint8
    assert set(np.unique(loaded)) == {0, 1}
    # Crop rows 8..88 of 96 at scale 1/2: lung rows 20..70 -> 6..31, cols 8..36 -> 4..18.
    assert loaded[6:31, 4:18].all()
    assert not loaded[:, 22:].any()  # the ignore region is not lung
    np.testing.assert_array_equal(load_mask(path, 80), _xrv_center_crop(mask) == 255)


def test_lungvae_and_rgb_masks(tmp_path: Path) -> None:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:50, 10:30] = 255
    path = _save(tmp_path / "vae.png", Image.fromarray(np.stack([mask] * 3, axis=-1)))
    loaded = load_mask(path, 64)
    np.testing.assert_array_equal(loaded, mask // 255)


# -- normalisation ----------------------------------------------------------------------


def test_normalise_is_xrv_normalize() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = (2 * (values.astype(np.float32) / 255) - 1.0) * 1024
    got = normalise(values)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert got.min() == -1024
    assert got.max() == 1024


# -- the cache folder -------------------------------------------------------------------


def test_resolve_cache_dir(tmp_path: Path, _isolated_data_dir: Path) -> None:
    assert resolve_cache_dir(None) is None
    assert resolve_cache_dir(DEFAULT_CACHE_DIR) == _isolated_data_dir / "cache"
    assert resolve_cache_dir(DEFAULT_CACHE_DIR, tmp_path) == tmp_path / "cache"
    assert resolve_cache_dir(tmp_path / "c") == tmp_path / "c"
    assert resolve_cache_dir(str(tmp_path)) == tmp_path
    assert repr(DEFAULT_CACHE_DIR) == "DEFAULT_CACHE_DIR"


# -- filling the cache ahead -----------------------------------------------------------


def _sample_set(root: Path) -> SampleSet:
    """Three images (one referenced twice), the first with a lung mask; no database."""
    blobs = root / "data" / "blobs"

    def put(data: bytes) -> str:
        sha = sha256_hex(data)
        (blobs / sha[:2]).mkdir(parents=True, exist_ok=True)
        (blobs / sha[:2] / sha).write_bytes(data)
        return sha

    mask = np.zeros((96, 80), dtype=np.uint8)
    mask[20:70, 10:70] = 255
    mask_sha = put(encode(mask))
    shas = [put(encode(xray_like(i))) for i in range(3)]
    samples = [
        Sample(i, sha, f"x:{i}", "x", (0.0,), mask_sha256=mask_sha if i == 0 else None)
        for i, sha in enumerate([*shas, shas[1]])
    ]
    return SampleSet(get_task("covid-vs-other-pneumonia"), Selection(), samples, Counter(), blobs)


def test_fill_cache_decodes_each_file_once(tmp_path: Path) -> None:
    samples = _sample_set(tmp_path)
    assert fill_cache(samples, size=24, threads=2) == 4  # 3 images + 1 mask
    assert fill_cache(samples, size=24) == 0
    images = PreprocessCache(tmp_path / "data" / "cache", 24)
    masks = PreprocessCache(tmp_path / "data" / "cache", 24, kind="mask")
    for sample in samples.samples:
        np.testing.assert_array_equal(
            images.get(sample.image_sha256),  # type: ignore[arg-type]
            load_image(samples.image_path(sample), 24),
        )
    first = samples.samples[0]
    assert first.mask_sha256 is not None
    cached_mask = masks.get(first.mask_sha256)
    assert cached_mask is not None
    assert set(np.unique(cached_mask)) == {0, 1}
    images.path(first.image_sha256).write_bytes(b"damaged")  # decoded again
    assert fill_cache(samples, size=24) == 1
    assert fill_cache(samples, size=32, crop="pad", masks=False, cache_dir=tmp_path / "c") == 3


def test_fill_cache_refuses_no_cache(tmp_path: Path) -> None:
    samples = _sample_set(tmp_path)
    with pytest.raises(ValueError, match="no cache to fill"):
        fill_cache(samples, cache_dir=None)
    with pytest.raises(ValueError, match="threads"):
        fill_cache(samples, threads=0)


# -- torch-free core --------------------------------------------------------------------


def test_core_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import covidcxr.dataset.samples, covidcxr.dataset.tasks, covidcxr.dataset.loading\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    import covidcxr.dataset.torch_dataset\n"
        "except ImportError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "REFUSED torch is not installed: pip install 'covidcxr[ml]'" in done.stdout
