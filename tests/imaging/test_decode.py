"""Safe decoding: every rejection path, every pixel mode, grayscale conversion."""

from __future__ import annotations

import io
import logging
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from covidcxr.errors import ImageError
from covidcxr.imaging import decode
from covidcxr.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    extension_matches,
    read_image_file,
    sniff_format,
    to_grayscale,
)


def _pixels(height: int = 48, width: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = 128 + 60 * np.sin(x / 6.0) * np.cos(y / 9.0)
    return np.clip(smooth + rng.normal(0, 8, (height, width)), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png(mode: str = "L") -> bytes:
    return _encode(Image.fromarray(_pixels()).convert(mode), "PNG")


def _jpeg(mode: str = "RGB", **params: Any) -> bytes:
    return _encode(Image.fromarray(_pixels()).convert(mode), "JPEG", quality=90, **params)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray(b"\x89PNG\r\n\x1a\n")
    for chunk_type, payload in chunks:
        out += struct.pack(">I", len(payload)) + chunk_type + payload
        out += struct.pack(">I", zlib.crc32(chunk_type + payload))
    return bytes(out)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims ``width`` x ``height``."""
    chunks = _png_chunks(_png())
    ihdr = chunks[0][1]
    chunks[0] = (b"IHDR", struct.pack(">II", width, height) + ihdr[8:])
    return _build_png(chunks)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_jpeg("L"))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


# --- sniff_format -----------------------------------------------------------------


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "hello")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(_png(), "PNG", id="png"),
        pytest.param(_jpeg(), "JPEG", id="jpeg"),
        pytest.param(_encode(Image.new("RGB", (4, 4)), "GIF"), "GIF", id="gif"),
        pytest.param(_encode(Image.new("RGB", (4, 4)), "WEBP"), "WEBP", id="webp"),
        pytest.param(_encode(Image.new("RGB", (4, 4)), "BMP"), "BMP", id="bmp"),
        pytest.param(_encode(Image.new("RGB", (4, 4)), "TIFF"), "TIFF", id="tiff"),
        pytest.param(b"\x00" * 128 + b"DICM" + b"\x02\x00" * 20, "DICOM", id="dicom"),
        pytest.param(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF", id="pdf"),
        pytest.param(_zip_bytes(), "ZIP", id="zip"),
        pytest.param(b"\xef\xbb\xbf  <!DOCTYPE html><html>Not found</html>", "HTML", id="html"),
        pytest.param(b"BMI report: 23.4\nall fine\n", "TEXT", id="text-starting-BM"),
        pytest.param("Ärztlicher Befund: unauffällig\n".encode(), "TEXT", id="utf8-text"),
        pytest.param(bytes(range(256)) * 2, None, id="binary"),
        pytest.param(b"", None, id="empty"),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


def test_sniff_text_allows_a_character_cut_at_the_window_edge() -> None:
    text = ("x" * 511 + "é" * 10).encode()
    assert sniff_format(text) == "TEXT"
    # ...but not invalid UTF-8 earlier on.
    assert sniff_format(b"abc\xff\xfe" + b"x" * 600) is None


# --- extension_matches ------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "fmt", "expected"),
    [
        ("a.png", "PNG", True),
        ("A.PNG", "PNG", True),
        ("x/y/a.jpg", "JPEG", True),
        ("a.JPEG", "JPEG", True),
        ("a.jpe", "JPEG", True),
        ("a.jpg", "PNG", False),
        ("a.png", "JPEG", False),
        ("a", "PNG", False),
        ("a.png", "NOPE", False),
        (Path("scan.tif"), "TIFF", True),
    ],
)
def test_extension_matches(filename: str | Path, fmt: str, expected: bool) -> None:
    assert extension_matches(filename, fmt) is expected


# --- decode_image: accepted images --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt", "mode", "bit_depth", "channels"),
    [
        pytest.param(_png("L"), "PNG", "L", 8, 1, id="png-gray"),
        pytest.param(_png("RGB"), "PNG", "RGB", 8, 3, id="png-rgb"),
        pytest.param(_png("RGBA"), "PNG", "RGBA", 8, 4, id="png-rgba"),
        pytest.param(_png("LA"), "PNG", "LA", 8, 2, id="png-la"),
        pytest.param(_png("1"), "PNG", "1", 1, 1, id="png-1bit"),
        pytest.param(_png("P"), "PNG", "P", 8, 1, id="png-palette"),
        pytest.param(
            _encode(Image.fromarray(_pixels().astype(np.uint16) * 257), "PNG"),
            "PNG",
            "I;16",
            16,
            1,
            id="png-16bit",
        ),
        pytest.param(_jpeg("L"), "JPEG", "L", 8, 1, id="jpeg-gray"),
        pytest.param(_jpeg("RGB"), "JPEG", "RGB", 8, 3, id="jpeg-rgb"),
        pytest.param(_jpeg("CMYK"), "JPEG", "CMYK", 8, 4, id="jpeg-cmyk"),
        pytest.param(_jpeg("L", progressive=True), "JPEG", "L", 8, 1, id="jpeg-progressive"),
    ],
)
def test_decode_accepts(data: bytes, fmt: str, mode: str, bit_depth: int, channels: int) -> None:
    decoded = decode_image(data, name="x")
    info = decoded.info
    assert (info.format, info.mode, info.bit_depth, info.channels) == (
        fmt,
        mode,
        bit_depth,
        channels,
    )
    assert (info.width, info.height) == (40, 48)
    assert info.n_bytes == len(data)
    assert decoded.image.size == (40, 48)
    assert np.asarray(decoded.image).shape[:2] == (48, 40)  # pixels are loaded


def test_decode_palette_png_with_transparency() -> None:
    palette = Image.fromarray(_pixels()).convert("P")
    palette.info["transparency"] = bytes([0] * 8 + [255] * 248)
    decoded = decode_image(_encode(palette, "PNG"), name="p.png")
    assert decoded.info.mode == "P"
    assert "transparency" in decoded.image.info


def test_jpg_named_file_with_png_bytes_decodes_by_content(tmp_path: Path) -> None:
    path = tmp_path / "000001-12.jpg"
    path.write_bytes(_png())
    data, decoded = read_image_file(path)
    assert data == path.read_bytes()
    assert decoded.info.format == "PNG"
    assert extension_matches(path, decoded.info.format) is False
    assert extension_matches(tmp_path / "ok.png", decoded.info.format) is True


def test_jpeg_with_bytes_after_eoi_is_accepted() -> None:
    decoded = decode_image(_jpeg() + b"\x00" * 64, name="padded.jpg")
    assert decoded.info.format == "JPEG"


# --- decode_image: rejections ----------------------------------------------------


def _rejects(data: bytes, code: str, match: str, **kwargs: Any) -> ImageError:
    with pytest.raises(ImageError, match=match) as caught:
        decode_image(data, name="x.png", **kwargs)
    assert caught.value.code == code
    assert "decode_image: 'x.png'" in str(caught.value)
    return caught.value


def test_empty_file() -> None:
    _rejects(b"", "empty_file", r"is empty \(0 bytes\)")


@pytest.mark.parametrize(
    ("data", "what"),
    [
        pytest.param(_encode(Image.new("RGB", (8, 8)), "WEBP"), "WEBP", id="webp"),
        pytest.param(_encode(Image.new("RGB", (8, 8)), "GIF"), "GIF", id="gif"),
        pytest.param(b"<html><body>404</body></html>", "HTML", id="html"),
        pytest.param(b"just some text\n", "TEXT", id="text"),
        pytest.param(b"\x00" * 128 + b"DICM" + b"\x00" * 64, "DICOM", id="dicom"),
    ],
)
def test_unsupported_format_names_what_it_is(data: bytes, what: str) -> None:
    _rejects(data, "unsupported_format", rf"holds {what} bytes, expected PNG or JPEG")


def test_unrecognised_bytes() -> None:
    _rejects(b"\x01\x02\x03\x04\x05\x06\x07\x08\x09", "unsupported_format", "unrecognised bytes")


def test_allowed_formats_is_an_allow_list() -> None:
    _rejects(
        _jpeg(), "unsupported_format", "holds JPEG bytes, expected PNG;", allowed_formats=["png"]
    )
    assert decode_image(_png(), allowed_formats=["png"]).info.format == "PNG"


def test_other_formats_decode_when_allowed() -> None:
    gif = _encode(Image.fromarray(_pixels()).convert("P"), "GIF")
    decoded = decode_image(gif, allowed_formats=("PNG", "JPEG", "GIF"))
    assert (decoded.info.format, decoded.info.width, decoded.info.height) == ("GIF", 40, 48)
    # Without our own header parser for GIF, Pillow's size is checked before loading.
    with pytest.raises(ImageError, match="over the limit of 100") as caught:
        decode_image(gif, allowed_formats=("GIF",), max_pixels=100)
    assert caught.value.code == "too_many_pixels"


def test_oversized_png_header_is_rejected_before_decoding() -> None:
    # The IDAT still holds 40x48 pixels: decoding would fail as corrupt, so a
    # too_many_pixels error proves the header was checked first.
    error = _rejects(_png_claiming(100_000, 100_000), "too_many_pixels", "100000x100000")
    assert "decompression bomb" in str(error)


def test_oversized_jpeg_header_is_rejected_before_decoding() -> None:
    _rejects(_jpeg_claiming(60_000, 60_000), "too_many_pixels", "60000x60000")


def test_max_pixels_boundary() -> None:
    data = _png()  # 40 x 48 = 1920 pixels
    _rejects(data, "too_many_pixels", "over the limit of 1919", max_pixels=1919)
    assert decode_image(data, max_pixels=1920).info.width == 40


def test_pillow_limit_below_ours_warns_nothing_and_maps_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Between Pillow's limit and twice it, Pillow warns: the warning must not escape
    # (pytest turns warnings into errors here) since our own limit allowed the image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_image(_png(), max_pixels=DEFAULT_MAX_PIXELS).info.width == 40
    # Above twice Pillow's limit, Pillow refuses: reported as too_many_pixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900)
    _rejects(_png(), "too_many_pixels", "Pillow's own pixel limit")


def test_pillow_limit_none_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert decode_image(_png()).info.height == 48


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda png: png[: len(png) // 2], "cut short", id="png-half"),
        pytest.param(lambda png: png[:-12], "without an IEND", id="png-no-iend"),
        pytest.param(lambda png: png[:20], "inside its header", id="png-header-only"),
    ],
)
def test_truncated_png(make: Any, match: str) -> None:
    _rejects(make(_png()), "truncated", match)


def test_png_with_bad_crc() -> None:
    data = bytearray(_png())
    idat = data.find(b"IDAT")
    data[idat + 6] ^= 0xFF  # inside the IDAT payload; CRC no longer matches
    _rejects(bytes(data), "truncated", "IDAT chunk at byte .* has a bad CRC")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda jpg: jpg[: len(jpg) // 2], "no end-of-image", id="jpeg-half"),
        pytest.param(lambda jpg: jpg[:-2], "no end-of-image", id="jpeg-no-eoi"),
        pytest.param(lambda jpg: jpg[:30], "before its image data", id="jpeg-header-only"),
    ],
)
def test_truncated_jpeg(make: Any, match: str) -> None:
    _rejects(make(_jpeg()), "truncated", match)


def test_truncation_is_caught_even_if_someone_enabled_load_truncated_images(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(decode, "_warned_load_truncated", False)
    with caplog.at_level(logging.WARNING, logger="covidcxr.imaging.decode"):
        _rejects(_jpeg()[:-2], "truncated", "no end-of-image")
        assert decode_image(_jpeg()).info.format == "JPEG"
    assert "LOAD_TRUNCATED_IMAGES is True" in caplog.text
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as the caller set it


def test_decode_does_not_touch_load_truncated_images() -> None:
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    decode_image(_jpeg())
    with pytest.raises(ImageError):
        decode_image(_jpeg()[:-2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before


def test_png_with_corrupt_compressed_data_is_undecodable() -> None:
    chunks = _png_chunks(_png())
    chunks = [
        (kind, b"\x78\x9c" + bytes(range(200)) if kind == b"IDAT" else payload)
        for kind, payload in chunks
    ]
    _rejects(_build_png(chunks), "undecodable", "cannot be decoded")


def test_png_not_starting_with_ihdr_is_undecodable() -> None:
    chunks = _png_chunks(_png())
    _rejects(_build_png([(b"tEXt", b"a\x00b"), *chunks]), "undecodable", "not IHDR")


def test_png_with_zero_width_is_undecodable() -> None:
    _rejects(_png_claiming(0, 48), "undecodable", "0x48 pixels")


def test_jpeg_with_zero_height_is_undecodable() -> None:
    _rejects(_jpeg_claiming(40, 0), "undecodable", "JPEG header says 40x0 pixels")


def test_jpeg_without_frame_header_is_undecodable() -> None:
    data = b"\xff\xd8" + b"\xff\xdb\x00\x04\x00\x00" + b"\xff\xda\x00\x02" + b"\x00" * 8
    _rejects(data + b"\xff\xd9", "undecodable", "no frame header")


def test_jpeg_garbage_between_markers_is_undecodable() -> None:
    _rejects(b"\xff\xd8\xff\xe0\x00\x04ab" + b"zz" * 10, "undecodable", "no marker at byte 8")


# --- read_image_file -----------------------------------------------------------------


def test_read_image_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes(_png()[:100])
    with pytest.raises(ImageError, match=f"'{path}' is truncated") as caught:
        read_image_file(path)
    assert caught.value.code == "truncated"


def test_read_image_file_passes_limits(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg())
    with pytest.raises(ImageError, match="over the limit of 10") as caught:
        read_image_file(path, max_pixels=10)
    assert caught.value.code == "too_many_pixels"
    with pytest.raises(ImageError, match="expected PNG") as caught:
        read_image_file(path, allowed_formats=("PNG",))
    assert caught.value.code == "unsupported_format"


def test_read_image_file_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory") as caught:
        read_image_file(tmp_path)
    assert caught.value.code == "unreadable"


def test_read_image_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist") as caught:
        read_image_file(tmp_path / "nope.png")
    assert caught.value.code == "missing_file"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_read_image_file_without_permission(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(_png())
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match=r"cannot open .*permissions") as caught:
            read_image_file(path)
        assert caught.value.code == "unreadable"
    finally:
        path.chmod(0o600)


def test_read_image_file_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ImageError, match=r"\(Permission denied\); check .*permissions") as caught:
        read_image_file(tmp_path / "x.png")
    assert caught.value.code == "unreadable"


# --- to_grayscale --------------------------------------------------------------------


def _gray_of(image: Image.Image) -> np.ndarray:
    gray = to_grayscale(image)
    assert gray.dtype == np.float32
    assert gray.shape == (image.height, image.width)
    assert gray.flags.c_contiguous
    assert gray.min() >= 0.0 and gray.max() <= 1.0
    return gray


def test_grayscale_of_l_and_rgb_matches_pillow_luma() -> None:
    rgb = Image.fromarray(np.stack([_pixels(seed=s) for s in range(3)], axis=-1))
    expected = np.asarray(rgb.convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(_gray_of(rgb), expected, atol=1e-6)
    np.testing.assert_allclose(_gray_of(rgb.convert("L")), expected, atol=1e-6)


def test_grayscale_drops_alpha_instead_of_blackening() -> None:
    pixels = np.full((4, 5, 4), 200, dtype=np.uint8)
    pixels[..., 3] = 0  # fully transparent: the radiograph is still there
    np.testing.assert_allclose(_gray_of(Image.fromarray(pixels, "RGBA")), 200 / 255, atol=1e-6)
    la = Image.fromarray(pixels[..., [0, 3]], "LA")
    np.testing.assert_allclose(_gray_of(la), 200 / 255, atol=1e-6)


def test_grayscale_of_palette_with_and_without_transparency() -> None:
    palette = Image.new("P", (3, 2))
    palette.putpalette([10, 10, 10, 250, 250, 250] + [0, 0, 0] * 254)
    palette.putpixel((1, 0), 1)
    plain = _gray_of(palette)
    assert plain[0, 1] == pytest.approx(250 / 255) and plain[0, 0] == pytest.approx(10 / 255)
    palette.info["transparency"] = bytes([0, 255] + [255] * 254)  # bytes: Pillow warns on L
    np.testing.assert_allclose(_gray_of(palette), plain, atol=1e-6)


def test_grayscale_of_1bit() -> None:
    image = Image.new("1", (3, 2))
    image.putpixel((2, 1), 1)
    assert _gray_of(image).tolist() == [[0, 0, 0], [0, 0, 1]]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_grayscale_of_16bit_uses_full_depth(mode: str) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (3, 1), values.astype(dtype).tobytes())
    gray = _gray_of(image)
    np.testing.assert_allclose(gray, [[0.0, 32768 / 65535, 1.0]], atol=1e-6)


def test_grayscale_of_16bit_png_roundtrip() -> None:
    values = (_pixels().astype(np.uint16) * 257)[:, :]
    decoded = decode_image(_encode(Image.fromarray(values), "PNG"))
    np.testing.assert_allclose(_gray_of(decoded.image), values / 65535, atol=1e-6)


def test_grayscale_of_int32_and_float_modes_clips() -> None:
    as_int = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32), "I")
    np.testing.assert_allclose(_gray_of(as_int), [[0.0, 1.0, 1.0]], atol=1e-6)
    as_float = Image.fromarray(np.array([[-0.5, 0.25, 1.5]], dtype=np.float32), "F")
    np.testing.assert_allclose(_gray_of(as_float), [[0.0, 0.25, 1.0]], atol=1e-6)


def test_grayscale_of_cmyk_falls_back_to_pillow() -> None:
    image = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # no ink: white
    np.testing.assert_allclose(_gray_of(image), 1.0, atol=1e-6)
