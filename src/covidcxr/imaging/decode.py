"""Safe decoding of untrusted image bytes.

The collection's images come from papers, web sites and hospital exports; a file named
``.jpg`` may hold PNG bytes, a download may be cut short, and a hostile file may claim
to be 100000 x 100000 pixels. :func:`decode_image` checks, in this order, and raises
:class:`~covidcxr.errors.ImageError` with the matching ``code``:

1. ``empty_file``: zero bytes.
2. ``unsupported_format``: the *content* (never the extension) is not an allowed format;
   the message names what the bytes are (WEBP, DICOM, HTML, ...).
3. ``too_many_pixels``: width x height from the header exceeds ``max_pixels``; checked by
   our own header parser before Pillow sees the bytes, so no pixel is decoded and no
   ``DecompressionBombWarning`` is raised. ``extreme_shape``: one side is more than
   :data:`MAX_ASPECT_RATIO` times the other (a 79,000,000 x 1 strip is under the pixel
   limit, but no radiograph, and it defeats every bounded-size reduction).
4. ``truncated``: the file's structure is incomplete. Checked by our own structural walk
   (PNG: every chunk present with a good CRC up to ``IEND``; JPEG: an ``EOI`` marker after
   the first scan, and a decoded JPEG whose last rows are one flat mid-grey value: what
   libjpeg fills in when the entropy-coded data ends early, e.g. a file cut short with
   an ``EOI`` appended or a header that claims more rows than the data holds), because
   Pillow pads a JPEG without ``EOI`` and ignores a missing ``IEND``, a bad ``IDAT`` CRC
   and libjpeg's "premature end of data" warning, and because
   ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is process-global: another library may have
   switched it on, and we must not switch it off for them.
5. ``undecodable``: anything else Pillow cannot decode.

Each image is decoded exactly once; :func:`to_grayscale` and the hashes in
:mod:`covidcxr.imaging.hashing` work from the decoded :class:`PIL.Image.Image`.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFile

from covidcxr.errors import ImageError

logger = logging.getLogger(__name__)

#: Largest width x height :func:`decode_image` accepts by default. 80 megapixels is
#: about 9000 x 9000: above any radiograph in the collection (the largest is 6.6 MP) and
#: above full-resolution digital detectors (43 x 43 cm at 0.1 mm is ~18.5 MP), yet its
#: decoded RGBA buffer (~320 MB) still fits a CI worker. It is also below Pillow's own
#: ``Image.MAX_IMAGE_PIXELS`` (~89.5 MP), so Pillow never warns on what we accept.
DEFAULT_MAX_PIXELS = 80_000_000

#: Largest ratio of the long side to the short side :func:`decode_image` accepts. The
#: most elongated image in the collection is under 3:1; 20:1 leaves room for strips
#: and scout views while refusing shapes whose reductions cannot be bounded.
MAX_ASPECT_RATIO = 20

#: Formats :func:`decode_image` accepts unless told otherwise.
DEFAULT_ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
# Start-of-frame markers carry the image size: SOF0-3, 5-7, 9-11, 13-15. 0xC4 (DHT),
# 0xC8 (JPG) and 0xCC (DAC) share the range but are not frames.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS = 0xDA
_JPEG_EOI = b"\xff\xd9"
_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

_EXTENSIONS: dict[str, frozenset[str]] = {
    "PNG": frozenset({".png"}),
    "JPEG": frozenset({".jpg", ".jpeg", ".jpe"}),
    "GIF": frozenset({".gif"}),
    "WEBP": frozenset({".webp"}),
    "BMP": frozenset({".bmp"}),
    "TIFF": frozenset({".tif", ".tiff"}),
    "DICOM": frozenset({".dcm", ".dicom"}),
    "JPEG2000": frozenset({".jp2", ".j2k", ".jpx"}),
}

_warned_load_truncated = False


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`decode_image` learned about an image.

    Attributes:
        format: the format sniffed from the content (``"PNG"``, ``"JPEG"``).
        width: width in pixels.
        height: height in pixels.
        bit_depth: bits per channel of the decoded pixels: 1, 8 or 16.
        channels: number of bands of the decoded image (palette images count 1).
        mode: the Pillow mode as decoded (``"L"``, ``"RGB"``, ``"I;16"``, ``"P"``, ...).
        n_bytes: size of the encoded file in bytes.
    """

    format: str
    width: int
    height: int
    bit_depth: int
    channels: int
    mode: str
    n_bytes: int


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A fully decoded image and what is known about it.

    Attributes:
        info: format, size, depth and mode.
        image: the loaded Pillow image; its pixels are already decoded and it holds no
            open operating-system file (only an in-memory buffer).
    """

    info: ImageInfo
    image: Image.Image


def sniff_format(data: bytes) -> str | None:
    """Name the format of ``data`` from its magic bytes.

    Only PNG and JPEG are decoded by default; the other names exist so that errors can
    say what a rejected file actually is.

    Args:
        data: the file's bytes (the first 512 are enough).

    Returns:
        One of ``"PNG"``, ``"JPEG"``, ``"GIF"``, ``"WEBP"``, ``"BMP"``, ``"TIFF"``,
        ``"DICOM"``, ``"JPEG2000"``, ``"PDF"``, ``"ZIP"``, ``"HTML"``, ``"TEXT"``, or
        ``None`` when the bytes match none of them (including empty data).
    """
    head = data[:512]
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(_JPEG_SOI):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head.startswith(b"%PDF-"):
        return "PDF"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "ZIP"
    # "BM" alone is too weak a signature (text may start with it): also require a
    # known DIB header size at offset 14.
    if head[:2] == b"BM" and len(head) >= 18:
        (dib_size,) = struct.unpack_from("<I", head, 14)
        if dib_size in _BMP_DIB_HEADER_SIZES:
            return "BMP"
    return _sniff_text(head)


def _sniff_text(head: bytes) -> str | None:
    """Recognise HTML and plain text (error pages saved under an image name)."""
    if not head or b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Only a multi-byte character cut at the end of the sniffed window is allowed.
        if exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    stripped = text.lstrip("\ufeff \t\r\n").lower()
    if stripped.startswith(("<!doctype html", "<html", "<head", "<body")):
        return "HTML"
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return "TEXT" if printable >= 0.95 * len(text) else None


def extension_matches(filename: str | os.PathLike[str], format: str) -> bool:
    """Tell whether a file name's extension fits the format of its content.

    Used to flag, e.g., a ``.jpg`` holding PNG bytes (common in the collection, and
    harmless once the content decides how to decode).

    Args:
        filename: the file name or path; only its extension is used, case-insensitively.
        format: a format name as returned by :func:`sniff_format`.

    Returns:
        True when the extension is one of the usual ones for ``format`` (``.png`` for
        PNG; ``.jpg``, ``.jpeg``, ``.jpe`` for JPEG); False otherwise, including for
        unknown formats and names without an extension.
    """
    # os.path, not pathlib: called once per image of an ingest, where building a Path
    # cost more than the rest of the check.
    suffix = os.path.splitext(os.fspath(filename))[1].lower()  # noqa: PTH122
    return suffix in _EXTENSIONS.get(format.upper(), frozenset())


def decode_image(
    data: bytes,
    *,
    name: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: Sequence[str] = DEFAULT_ALLOWED_FORMATS,
) -> DecodedImage:
    """Decode untrusted image bytes, refusing anything unsafe or broken.

    Args:
        data: the encoded file.
        name: the file's name, used in error messages.
        max_pixels: largest width x height to decode; checked from the header before
            any pixel is decoded.
        allowed_formats: format names (as :func:`sniff_format` returns them) to accept.
            Structural truncation checks exist for PNG and JPEG only.

    Returns:
        The decoded image and its :class:`ImageInfo`.

    Raises:
        ImageError: with ``code`` ``empty_file``, ``unsupported_format``,
            ``too_many_pixels``, ``truncated`` or ``undecodable`` (see the module
            docstring for the order of the checks). The message names ``name``.
    """
    allowed = tuple(fmt.upper() for fmt in allowed_formats)
    if not data:
        raise ImageError(
            f"decode_image: {name!r} is empty (0 bytes); re-download or drop it",
            code="empty_file",
        )
    fmt = sniff_format(data)
    if fmt is None or fmt not in allowed:
        what = f"{fmt} bytes" if fmt else f"unrecognised bytes (starting {data[:8].hex()})"
        raise ImageError(
            f"decode_image: {name!r} holds {what}, expected {' or '.join(allowed)}; "
            "convert it or drop it",
            code="unsupported_format",
        )

    header_size: tuple[int, int] | None = None
    if fmt == "PNG":
        header_size = _png_header_size(data, name)
        _check_pixels(header_size, max_pixels, name)
        _check_png_structure(data, name)
    elif fmt == "JPEG":
        header_size, scan_start = _jpeg_header(data, name)
        _check_pixels(header_size, max_pixels, name)
        _check_jpeg_end(data, scan_start, name)
    header_pixels = None if header_size is None else header_size[0] * header_size[1]
    image = _pil_decode(data, fmt, name, max_pixels, header_pixels)
    if fmt == "JPEG":
        try:
            _check_jpeg_tail(image, name)
        except ImageError:
            image.close()
            raise
    return DecodedImage(info=_image_info(image, fmt, len(data)), image=image)


def read_image_file(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: Sequence[str] = DEFAULT_ALLOWED_FORMATS,
) -> tuple[bytes, DecodedImage]:
    """Read a file and decode it with :func:`decode_image`, naming the path in errors.

    Args:
        path: the image file.
        max_pixels: passed to :func:`decode_image`.
        allowed_formats: passed to :func:`decode_image`.

    Returns:
        The file's bytes (for hashing and storing) and the decoded image.

    Raises:
        ImageError: ``missing_file`` when the path does not exist, ``unreadable`` when it
            is a directory or cannot be read, or any code :func:`decode_image` raises.
    """
    file_path = Path(path)
    data = read_regular_file(file_path, function="read_image_file")
    decoded = decode_image(
        data, name=str(file_path), max_pixels=max_pixels, allowed_formats=allowed_formats
    )
    return data, decoded


def read_regular_file(path: str | os.PathLike[str], *, function: str = "read_file") -> bytes:
    """The bytes of a regular file, refusing anything else without blocking on it.

    The file is opened non-blocking and checked with ``fstat`` before any read, so a
    FIFO, socket or device named ``.png`` is refused instead of hanging the caller.

    Args:
        path: the file.
        function: the caller's name, for the message.

    Raises:
        ImageError: ``missing_file`` (absent or a dangling link), ``unreadable`` (a
            directory, a link loop, no permission, an I/O error) or ``not_a_file``.
    """
    shown = repr(os.fspath(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as exc:
        raise ImageError(
            f"{function}: {shown} does not exist (or is a dangling link); check the path",
            code="missing_file",
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket, or a device with nothing behind it
            raise ImageError(
                f"{function}: {shown} is not a regular file (a socket or device); not read",
                code="not_a_file",
            ) from exc
        raise ImageError(
            f"{function}: cannot open {shown} ({exc.strerror or exc}); check the path "
            "and its permissions",
            code="unreadable",
        ) from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageError(f"{function}: {shown} is a directory, not an image file", "unreadable")
        if not stat.S_ISREG(mode):
            raise ImageError(
                f"{function}: {shown} is not a regular file (a FIFO, socket or device); not read",
                code="not_a_file",
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        raise ImageError(
            f"{function}: cannot read {shown} ({exc.strerror or exc}); check the disk",
            code="unreadable",
        ) from exc
    finally:
        os.close(fd)


def to_grayscale(image: Image.Image) -> NDArray[np.float32]:
    """Convert a decoded image to a float32 grayscale array in [0, 1].

    Colour becomes luminance with ITU-R 601-2 weights (what Pillow's ``"L"`` uses).
    Alpha is dropped, not composited: in the collection, alpha is 255 almost
    everywhere, and where it is not the colour under it is the radiograph's own
    (compositing onto black would darken or erase real anatomy). 16-bit images are
    scaled by 65535, the full range of their depth, not by their own maximum, so that
    the brightness of different files stays comparable.

    Args:
        image: a Pillow image in mode ``1``, ``L``, ``LA``, ``P`` (with or without
            transparency), ``RGB``, ``RGBA``, ``I;16``/``I;16B``/``I;16L``, ``I`` (as
            Pillow decodes 16-bit PNGs: values taken as 16-bit), ``F`` (taken to be in
            [0, 1] already) or any other mode Pillow converts to ``L`` (``CMYK``, ...).
            Values outside the range are clipped.

    Returns:
        A C-contiguous float32 array of shape (height, width).
    """
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode.startswith("I;16"):
        return _scaled(np.asarray(image), 65535.0)
    if mode == "I":
        return _scaled(np.asarray(image), 65535.0)
    if mode == "F":
        return _scaled(np.asarray(image), 1.0)
    if mode == "L":
        return _scaled(np.asarray(image), 255.0)
    if mode == "LA":
        return _scaled(np.asarray(image.getchannel("L")), 255.0)
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in image.info):
        # Pillow warns when converting a palette with transparency straight to L.
        image = image.convert("RGBA")
    return _scaled(np.asarray(image.convert("L")), 255.0)


def _scaled(pixels: NDArray[np.generic], full_scale: float) -> NDArray[np.float32]:
    gray = pixels.astype(np.float32)
    if full_scale != 1.0:
        gray *= np.float32(1.0 / full_scale)
    np.clip(gray, 0.0, 1.0, out=gray)
    return np.ascontiguousarray(gray)


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"decode_image: {name!r} claims {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} (a possible decompression bomb); raise "
            "max_pixels only if the file is trusted",
            code="too_many_pixels",
        )
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageError(
            f"decode_image: {name!r} claims {width}x{height} pixels, a shape more than "
            f"{MAX_ASPECT_RATIO}:1 (no radiograph is); crop or re-export it",
            code="extreme_shape",
        )


def _check_jpeg_tail(image: Image.Image, name: str) -> None:
    """Refuse a JPEG whose last 8 rows are one flat value away from black and white.

    When the entropy-coded data stops early, libjpeg warns (Pillow does not pass the
    warning on) and repeats the last DC value with no detail for every block left.
    Real radiographs end in noise, or in a black or white border: among the 1,519
    JPEGs of the shared collections none has a flat tail between 8 and 247.
    """
    height = image.height
    if height < 16:
        return
    tail = image.crop((0, height - 8, image.width, height)).convert("L")
    pixels = np.asarray(tail)
    low, high = int(pixels.min()), int(pixels.max())
    if low == high and 8 <= low <= 247:
        raise _truncated(
            name,
            f"JPEG data ends before its last rows, which decode as flat grey {low}: "
            "cut short, or its header claims more rows than it holds",
        )


def _truncated(name: str, what: str) -> ImageError:
    return ImageError(
        f"decode_image: {name!r} is truncated or corrupt ({what}); re-download it",
        code="truncated",
    )


def _undecodable(name: str, what: str) -> ImageError:
    return ImageError(
        f"decode_image: {name!r} cannot be decoded ({what}); re-export it as PNG or JPEG",
        code="undecodable",
    )


def _png_header_size(data: bytes, name: str) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which the PNG spec puts first."""
    if len(data) < 8 + 8 + 13:
        raise _truncated(name, f"PNG ends after {len(data)} bytes, inside its header")
    chunk_type, payload = next(_png_chunks(data, name))
    if chunk_type != b"IHDR" or len(payload) != 13:
        raise _undecodable(name, f"PNG starts with a {chunk_type!r} chunk, not IHDR")
    width, height = struct.unpack_from(">II", payload)
    if width == 0 or height == 0:
        raise _undecodable(name, f"PNG header says {width}x{height} pixels")
    return width, height


def _check_png_structure(data: bytes, name: str) -> None:
    """Walk every chunk, checking lengths and CRCs, up to IEND."""
    for _ in _png_chunks(data, name):
        pass


def _png_chunks(data: bytes, name: str) -> Iterator[tuple[bytes, memoryview]]:
    """Each chunk's type and payload, up to and including IEND, once its length and CRC
    are checked; the package's one PNG chunk walker.

    Raises:
        ImageError: a chunk is cut short or has a bad CRC, or IEND is missing.
    """
    view = memoryview(data)
    pos = 8
    end = len(data)
    while True:
        if pos + 8 > end:
            raise _truncated(name, f"PNG ends after {end} bytes without an IEND chunk")
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        chunk_end = pos + 12 + length
        label = chunk_type.decode("latin-1")
        if chunk_end > end:
            raise _truncated(name, f"PNG {label} chunk at byte {pos} is cut short")
        (stored_crc,) = struct.unpack_from(">I", data, chunk_end - 4)
        if zlib.crc32(view[pos + 4 : chunk_end - 4]) != stored_crc:
            raise _truncated(name, f"PNG {label} chunk at byte {pos} has a bad CRC")
        yield chunk_type, view[pos + 8 : chunk_end - 4]
        if chunk_type == b"IEND":
            return
        pos = chunk_end


def _jpeg_segments(data: bytes, name: str) -> tuple[tuple[int, int] | None, int]:
    """Walk JPEG marker segments up to the first SOS.

    Returns:
        The (width, height) of the last frame header before the scan (None if none), and
        the offset of the SOS marker.
    """
    size: tuple[int, int] | None = None
    pos = 2
    end = len(data)
    while pos + 2 <= end:
        if data[pos] != 0xFF:
            raise _undecodable(name, f"JPEG has no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == 0xD9:
            raise _undecodable(name, "JPEG ends (EOI) before any image data")
        if marker == _JPEG_SOS:
            return size, pos
        if pos + 4 > end:
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            raise _undecodable(name, f"JPEG segment at byte {pos} has length {length}")
        if marker in _JPEG_SOF_MARKERS:
            if pos + 9 > end:
                break
            height, width = struct.unpack_from(">HH", data, pos + 5)
            size = (width, height)
        pos += 2 + length
    raise _truncated(name, f"JPEG ends after {end} bytes, before its image data")


def _jpeg_header(data: bytes, name: str) -> tuple[tuple[int, int], int]:
    """The frame size and the offset of the first scan (SOS) of a JPEG."""
    size, scan_start = _jpeg_segments(data, name)
    if size is None:
        raise _undecodable(name, "JPEG has no frame header (SOF) before its image data")
    if size[0] == 0 or size[1] == 0:
        raise _undecodable(name, f"JPEG header says {size[0]}x{size[1]} pixels")
    return size, scan_start


def _check_jpeg_end(data: bytes, scan_start: int, name: str) -> None:
    """Require an EOI marker after the first scan.

    Entropy-coded data escapes 0xFF as 0xFF00 and only restart markers (0xFFD0-D7) may
    appear inside it, so the first 0xFFD9 after SOS is the real end of image; bytes
    after it (padding some encoders add) are allowed.
    """
    if data.find(_JPEG_EOI, scan_start) < 0:
        raise _truncated(name, "JPEG has no end-of-image (EOI) marker")


def _pil_decode(
    data: bytes, fmt: str, name: str, max_pixels: int, header_pixels: int | None
) -> Image.Image:
    global _warned_load_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_load_truncated:
        # Someone else switched it on for the whole process; it is not ours to reset.
        # Our structural checks above still catch truncated PNG and JPEG files.
        _warned_load_truncated = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; decode_image "
            "relies on its own PNG/JPEG structure checks to detect truncation"
        )
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        if header_pixels is not None and (pil_limit is None or header_pixels <= pil_limit):
            image = Image.open(io.BytesIO(data), formats=[fmt])
        else:
            # Only reached when a caller allowed more pixels than Pillow's process-wide
            # MAX_IMAGE_PIXELS (or for a format whose header we do not parse). Our own
            # max_pixels check decides; Pillow's warning would only duplicate it (and
            # strict warning filters would turn it into an error).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"decode_image: {name!r} is over Pillow's own pixel limit ({exc}); lower "
            "max_pixels or raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted",
            code="too_many_pixels",
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _pil_error(name, exc) from exc
    try:
        # The plugin may read a different size than our header parse (or parse a
        # format we do not): check again, still before decoding any pixel.
        _check_pixels(image.size, max_pixels, name)
        image.load()
    except (ImageError, MemoryError):
        image.close()
        raise
    except Exception as exc:
        image.close()
        raise _pil_error(name, exc) from exc
    return image


def _pil_error(name: str, exc: Exception) -> ImageError:
    """Map what Pillow raises for corrupt data to an ImageError.

    Pillow signals corrupt data with OSError, SyntaxError, ValueError, EOFError,
    struct.error, zlib.error, ... depending on the plugin.
    """
    message = str(exc) or type(exc).__name__
    if "truncated" in message:
        return _truncated(name, message)
    return _undecodable(name, message)


def _image_info(image: Image.Image, fmt: str, n_bytes: int) -> ImageInfo:
    mode = image.mode
    if mode == "1":
        bit_depth = 1
    elif mode.startswith("I;16") or mode == "I":
        # Pillow decodes 16-bit grayscale PNG as I;16 (older versions: I).
        bit_depth = 16
    else:
        bit_depth = 8
    return ImageInfo(
        format=fmt,
        width=image.width,
        height=image.height,
        bit_depth=bit_depth,
        channels=len(image.getbands()),
        mode=mode,
        n_bytes=n_bytes,
    )
