"""The native PNG decoder: the C extension's row filters and the chunk walk around them.

Each filter is checked by encoding rows with it here (the PNG specification's
arithmetic, in numpy) and decoding them in C, with and without SSE2; whole PNGs are
checked against Pillow's decoder.
"""

from __future__ import annotations

import io
import platform
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from conftest import encode, skip_without_c_compiler, xray_like
from covidcxr.dataset import loading
from covidcxr.dataset.loading import grey_levels, load_image
from covidcxr.errors import ImageError

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
NONE, SUB, UP, AVERAGE, PAETH = range(5)

native = pytest.mark.skipif(not loading.NATIVE_PNG, reason="the C extension was not built")


def test_extension_is_built_where_there_is_a_c_compiler() -> None:
    skip_without_c_compiler("libpng decodes plain PNGs")
    assert loading.NATIVE_PNG, "a C compiler is here but covidcxr.dataset._pngfilter is not"


# -- a PNG encoder for the tests ---------------------------------------------------------


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filter_rows(rows: np.ndarray, filters: list[int], bpp: int) -> bytes:
    """``rows`` (height x rowbytes, uint8) filtered as the PNG specification says."""
    out = bytearray()
    prior = np.zeros(rows.shape[1], dtype=np.int32)
    for row, kind in zip(rows.astype(np.int32), filters, strict=True):
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])[: len(row)]
        upper_left = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])[: len(row)]
        predictor = {
            NONE: 0,
            SUB: left,
            UP: prior,
            AVERAGE: (left + prior) // 2,
            PAETH: _paeth(left, prior, upper_left),
        }[kind]
        out.append(kind)
        out += ((row - predictor) % 256).astype(np.uint8).tobytes()
        prior = row
    return bytes(out)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(
    pixels: np.ndarray, filters: list[int], *, idat_chunks: int = 1, stream: bytes | None = None
) -> bytes:
    """A PNG of ``pixels`` (height x width [x channels]) with the given row filters."""
    height, width = pixels.shape[:2]
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[bpp]
    if stream is None:
        stream = zlib.compress(_filter_rows(pixels.reshape(height, -1), filters, bpp))
    step = -(-len(stream) // idat_chunks)
    data = [stream[i : i + step] for i in range(0, len(stream), step)]
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + b"".join(_chunk(b"IDAT", part) for part in data)
        + _chunk(b"IEND", b"")
    )


def _pixels(height: int, width: int, bpp: int, seed: int) -> np.ndarray:
    """Noise, with rows of extreme values where the Paeth predictor's ties are common."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width * bpp), dtype=np.uint8)
    pixels[1::3] = rng.choice(np.array([0, 1, 127, 128, 254, 255], np.uint8), pixels[1::3].shape)
    return pixels if bpp == 1 else pixels.reshape(height, width, bpp)


def _all_filters(height: int) -> list[int]:
    return [row % 5 for row in range(height)]


# -- the C extension ---------------------------------------------------------------------


def _unfilter() -> Callable[..., None]:
    unfilter = loading._unfilter
    assert unfilter is not None
    return unfilter


@native
@pytest.mark.parametrize("bpp", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("width", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("kind", [NONE, SUB, UP, AVERAGE, PAETH, None])  # None: all five
@pytest.mark.parametrize("simd", [True, False])
def test_unfilter_inverts_each_filter(bpp: int, width: int, kind: int | None, simd: bool) -> None:
    height = 7
    rows = _pixels(height, width, bpp, seed=bpp * 100 + width).reshape(height, -1)
    filters = _all_filters(height) if kind is None else [kind] * height
    out = np.full(rows.shape, 0xAB, dtype=np.uint8)
    _unfilter()(_filter_rows(rows, filters, bpp), out, height, width * bpp, bpp, simd=simd)
    np.testing.assert_array_equal(out, rows)


@native
@pytest.mark.parametrize("bpp", [3, 4])
@pytest.mark.parametrize("width", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("grey", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_runs_of_paeth_rows_two_at_a_time(bpp: int, width: int, grey: bool, seed: int) -> None:
    """Consecutive Paeth rows (reconstructed in pairs with SSE2) amid other filters, runs
    of odd and even length, the first and the last row included: the same pixels as the
    plain C path and as the rows that were filtered."""
    rng = np.random.default_rng(seed)
    height = 23
    filters = [PAETH if rng.random() < 0.7 else int(rng.integers(0, 4)) for _ in range(height)]
    filters[:2] = [PAETH, PAETH] if seed % 2 else [PAETH, SUB]
    filters[-2:] = [PAETH, PAETH]
    pixels = _pixels(height, width, bpp, seed=seed)
    filtered = _filter_rows(pixels.reshape(height, -1), filters, bpp)
    shape = (height, width) if grey else (height, width * bpp)
    expected = grey_levels(Image.fromarray(pixels, MODES[bpp])) if grey else pixels.reshape(shape)
    for simd in (True, False):
        out = np.full(shape, 0xAB, dtype=np.uint8)
        _unfilter()(filtered, out, height, width * bpp, bpp, simd=simd, grey=grey)
        np.testing.assert_array_equal(out, expected)


@native
def test_sse2_paths_exist_on_x86_64() -> None:
    from covidcxr.dataset import _pngfilter

    on_x86_64 = platform.machine() in ("x86_64", "AMD64")
    assert bool(_pngfilter.SIMD) is on_x86_64


@native
@pytest.mark.parametrize(
    ("filtered", "out", "height", "rowbytes", "bpp", "grey", "message"),
    [
        (b"\0\0\0\5\0\0", 4, 2, 2, 1, False, "row 1 has filter type 5"),
        (b"\xff\0\0", 2, 1, 2, 1, False, "row 0 has filter type 255"),
        (b"\0\0\0\5\0\0", 2, 2, 2, 2, True, "row 1 has filter type 5"),
        (b"\0\0\0\0", 4, 2, 2, 1, False, "4 filtered bytes, expected 2 rows of 1 \\+ 2 bytes"),
        (b"\0\0\0", 3, 1, 2, 1, False, "out holds 3 bytes, expected 2"),
        (b"\0" * 7, 6, 1, 6, 3, True, "out holds 6 bytes, expected 2"),
        (b"\0\0\0", 2, 1, 2, 0, False, "bpp 0 are not valid"),
        (b"\0\0\0", 2, 1, 2, 9, False, "bpp 9 are not valid"),
        (b"", 0, -1, 2, 1, False, "height -1"),
        (b"\0" * 7, 1, 1, 6, 6, True, "grey needs 1 to 4 bytes per pixel"),
        (b"\0" * 6, 1, 1, 5, 3, True, "whole pixels in a row, got bpp 3 and rowbytes 5"),
    ],
)
def test_unfilter_refuses_bad_input(
    filtered: bytes, out: int, height: int, rowbytes: int, bpp: int, grey: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _unfilter()(filtered, bytearray(out), height, rowbytes, bpp, grey=grey)


@native
@pytest.mark.parametrize("bpp", [1, 2, 3, 4])
@pytest.mark.parametrize("width", [1, 2, 3, 17])
@pytest.mark.parametrize("simd", [True, False])
def test_unfilter_grey_is_pillows_grey_of_the_rows(bpp: int, width: int, simd: bool) -> None:
    height = 10
    pixels = _pixels(height, width, bpp, seed=width)
    filtered = _filter_rows(pixels.reshape(height, -1), _all_filters(height), bpp)
    grey = np.full((height, width), 0xAB, dtype=np.uint8)
    _unfilter()(filtered, grey, height, width * bpp, bpp, simd=simd, grey=True)
    np.testing.assert_array_equal(grey, grey_levels(Image.fromarray(pixels, MODES[bpp])))


def _every_colour(bpp: int) -> np.ndarray:
    """All 2**24 colours (4096 x 4096), with noise as alpha for RGBA; all 65,536 grey and
    alpha pairs for LA."""
    if bpp == 2:
        values = np.arange(1 << 16, dtype=np.uint32)
        return np.stack([values >> 8, values & 255], axis=-1).astype(np.uint8).reshape(256, 256, 2)
    values = np.arange(1 << 24, dtype=np.uint32)
    planes = [values >> 16, (values >> 8) & 255, values & 255]
    if bpp == 4:
        planes.append(np.random.default_rng(0).integers(0, 256, 1 << 24, dtype=np.uint32))
    return np.stack(planes, axis=-1).astype(np.uint8).reshape(4096, 4096, bpp)


@native
@pytest.mark.parametrize("bpp", [2, 3, 4])
def test_unfilter_grey_is_pillows_for_every_colour(bpp: int) -> None:
    pixels = _every_colour(bpp)
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    filtered = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter None
    grey = np.empty((height, width), dtype=np.uint8)
    _unfilter()(filtered.tobytes(), grey, height, width * bpp, bpp, grey=True)
    np.testing.assert_array_equal(grey, grey_levels(Image.fromarray(pixels, MODES[bpp])))


@native
def test_unfilter_refuses_a_read_only_output() -> None:
    with pytest.raises(TypeError):
        _unfilter()(b"\0\0", b"\0", 1, 1, 1)


# -- whole files -------------------------------------------------------------------------


def _native_grey(data: bytes) -> np.ndarray | None:
    """What the loader's native decoder makes of a PNG file: its grey levels, or None
    where it leaves the file to libpng and Pillow."""
    with mock.patch.object(loading, "_libpng", lambda *_: None):
        image = loading._plain_png(data, Path("test.png"), "test")
    return None if image is None else np.asarray(image)


@native
@pytest.mark.parametrize("bpp", [1, 2, 3, 4])
@pytest.mark.parametrize(("height", "width"), [(1, 1), (5, 3), (40, 57)])
@pytest.mark.parametrize("idat_chunks", [1, 3])
def test_native_png_gives_pillows_grey_levels(
    bpp: int, height: int, width: int, idat_chunks: int
) -> None:
    pixels = _pixels(height, width, bpp, seed=height + bpp)
    data = _png(pixels, _all_filters(height), idat_chunks=idat_chunks)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == MODES[bpp]
        np.testing.assert_array_equal(np.asarray(image), pixels)
        expected = grey_levels(image)
    got = _native_grey(data)
    assert got is not None
    np.testing.assert_array_equal(got, expected)


@native
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_pillows_own_pngs_decode_natively(mode: str) -> None:
    pixels = _pixels(33, 45, len(mode), seed=3)
    data = encode(pixels)  # Pillow chooses the filters (an adaptive mix)
    got = _native_grey(data)
    assert got is not None
    np.testing.assert_array_equal(got, grey_levels(Image.fromarray(pixels, mode)))


def _chunk_at(data: bytes, kind: bytes) -> tuple[int, int]:
    """The offset and body length of the first ``kind`` chunk."""
    position = 8
    while True:
        length, found = struct.unpack_from(">I4s", data, position)
        if found == kind:
            return position, length
        position += 12 + length


def _broken(data: bytes, kind: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    """``data`` with the body of its first ``kind`` chunk edited (and a right checksum)."""
    position, length = _chunk_at(data, kind)
    body = edit(data[position + 8 : position + 8 + length])
    return data[:position] + _chunk(kind, body) + data[position + 12 + length :]


def _bad_checksum(data: bytes, kind: bytes) -> bytes:
    """``data`` with the checksum of its first ``kind`` chunk inverted."""
    position, length = _chunk_at(data, kind)
    at = position + 8 + length
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 4]) + data[at + 4 :]


def _set_byte(index: int, value: int) -> Callable[[bytes], bytes]:
    return lambda body: body[:index] + bytes([value]) + body[index + 1 :]


PIXELS = _pixels(20, 30, 3, seed=9)
FILTERED = _filter_rows(PIXELS.reshape(20, -1), _all_filters(20), 3)
GOOD = _png(PIXELS, _all_filters(20))
GREY = grey_levels(Image.fromarray(PIXELS))

LEFT_TO_OTHERS = {
    "interlaced": _broken(GOOD, b"IHDR", _set_byte(12, 1)),
    "unknown compression method": _broken(GOOD, b"IHDR", _set_byte(10, 1)),
    "header checksum wrong": _bad_checksum(GOOD, b"IHDR"),
    "text chunk checksum wrong": _bad_checksum(
        GOOD[:33] + _chunk(b"tEXt", b"a\0b") + GOOD[33:], b"tEXt"
    ),
    "no data chunk": GOOD[:33] + _chunk(b"IEND", b""),
    "chunk past the end": GOOD[:-20],
    "stream too short": _png(PIXELS, [], stream=zlib.compress(FILTERED[:-1])),
    "stream too long": _png(PIXELS, [], stream=zlib.compress(FILTERED + b"\0")),
    "stream damaged": _png(PIXELS, [], stream=zlib.compress(FILTERED)[:-6]),
    "unknown filter type": _png(PIXELS, [], stream=zlib.compress(b"\5" + FILTERED[1:])),
}


@native
@pytest.mark.parametrize("case", sorted(LEFT_TO_OTHERS))
def test_native_png_leaves_what_it_does_not_handle(case: str) -> None:
    data = LEFT_TO_OTHERS[case]
    assert data != GOOD
    assert _native_grey(data) is None


@native
def test_good_file_of_those_cases_decodes() -> None:
    got = _native_grey(GOOD)
    assert got is not None
    np.testing.assert_array_equal(got, GREY)


@pytest.mark.parametrize(
    "case", ["header checksum wrong", "text chunk checksum wrong", "unknown filter type"]
)
def test_files_pillow_refuses_are_image_errors(tmp_path: Path, png_decoder: str, case: str) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(LEFT_TO_OTHERS[case])
    with pytest.raises(ImageError) as raised:
        load_image(path, 8)
    assert raised.value.code == "undecodable"
    assert str(path) in str(raised.value)


@native
def test_data_chunk_checksum_is_not_checked_like_pillow(tmp_path: Path) -> None:
    data = _bad_checksum(GOOD, b"IDAT")
    with Image.open(io.BytesIO(data)) as image:
        np.testing.assert_array_equal(np.asarray(image), PIXELS)
    got = _native_grey(data)
    assert got is not None
    np.testing.assert_array_equal(got, GREY)


@pytest.mark.parametrize("seed", [0, 1])
def test_load_image_is_the_same_with_and_without_the_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(encode(np.stack([xray_like(seed)] * 3, axis=-1)))
    with_extension = load_image(path, 50)
    monkeypatch.setattr(loading, "_unfilter", None)
    np.testing.assert_array_equal(load_image(path, 50), with_extension)
