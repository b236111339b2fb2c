"""Perceptual hashes for near-duplicate detection.

The collection files the same radiograph more than once: under different patients
and sources, resized, recompressed, with or without a frame, cropped a little
differently. A perceptual hash maps such copies to codes a few bits apart.

How a hash is made (:func:`phash_pair`):

1. the decoded image is shrunk by an integer box filter to ~128-255 px and made
   grayscale (:func:`working_gray`); hashing costs ~2-3 ms an image, a fraction of
   the decode;
2. uniform borders (frames, padding) are peeled off (:func:`trim_borders`);
3. a window centred on the intensity-weighted centroid is cut
   (:func:`content_window`), so padding and small crops move it little;
4. the window is shrunk to 32 x 32, its 2-D DCT is taken (a matrix product), and the
   128 lowest frequencies after DC, in zig-zag order, are scaled to unit length
   (:func:`dct_features`);
5. each coefficient is compared with its median over the collection
   (:data:`FEATURE_CENTRES`): bit set when above. The first 64 coefficients make the
   coarse ``phash``, the next 64 the ``phash_detail`` (most significant bit first).

Why not the textbook pHash (threshold at the median of the image's own coefficients)?
Every chest film shares the same low-frequency anatomy, so most of its bits are the
same for every film: on the 724 images, 711 pairs of different pictures lie within 10
of 64 bits. Centring on the collection's medians makes each bit a coin flip across
films (17 such pairs within 8 bits instead of 167), and the detail bits separate
different films of one patient, which a 64-bit hash cannot. See
:mod:`covidcxr.imaging.duplicates` for the measurements and the threshold.

Hashes are stored as 16-character lowercase hex strings (:class:`ImageHashes`);
:func:`hamming` compares two of them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.errors import ImageError
from covidcxr.imaging.decode import MAX_ASPECT_RATIO, to_grayscale

#: Side of the square image the DCT is taken of.
HASH_IMAGE_SIZE = 32
#: Number of bits in a hash.
HASH_BITS = 64
#: Before hashing, a decoded image is shrunk by an integer factor (a cheap box filter)
#: until its shorter side is below twice this; border trimming works at that scale.
WORKING_MIN_SIDE = 128
#: A border row/column is "uniform" when the central 95% of its values span at most
#: twice this (on the 0-1 scale; about 20 grey levels of 255), which absorbs JPEG
#: ringing and noise in a scanned frame, but not anatomy.
BORDER_TOLERANCE = 0.04
#: Half-width of :func:`content_window`, in intensity-weighted standard deviations.
WINDOW_SIGMAS = 1.6
_MAX_TRIM_PASSES = 8
# Below this norm the DCT coefficients of a [0, 1] image are rounding noise (a real
# picture's are of order 1 to 10).
_FLAT_NORM = 1e-6

#: Median of each :func:`dct_features` coefficient over the 724 images of the
#: collection, from :func:`fit_centres` (rounded to 6 decimals); a hash bit is set when
#: its coefficient is above its median. Changing these changes every hash.
# fmt: off
FEATURE_CENTRES: NDArray[np.float64] = np.array(
    [
        -0.011434, -0.502621, -0.189797, -0.003585, 0.158728, 0.050551, 0.154234, 0.036634,
        -0.016697, 0.290977, -0.008567, 0.013789, -0.022049, 0.017507, -0.033822, 0.153070,
        -0.055697, -0.060748, -0.011090, 0.001048, -0.091495, -0.003449, -0.211175, 0.015154,
        -0.042758, 0.004529, -0.014292, -0.003486, -0.035080, 0.016834, -0.059528, 0.000946,
        -0.029551, -0.008384, -0.007821, -0.006723, 0.015985, -0.050965, 0.010536, -0.025685,
        -0.006319, -0.020044, -0.002458, -0.014269, -0.000134, 0.003921, 0.007620, 0.035731,
        0.004373, -0.022801, 0.008658, -0.016221, -0.000206, -0.011815, -0.030140, -0.003245,
        -0.002507, -0.013938, 0.026572, 0.002571, -0.007180, 0.003012, -0.015674, -0.003262,
        -0.010210, 0.001111, -0.001237, -0.008217, 0.023041, 0.000474, 0.003546, -0.000174,
        -0.003646, -0.000515, -0.010841, -0.001335, -0.009654, -0.018814, 0.003979, 0.002308,
        0.005221, -0.010028, 0.002804, 0.005097, -0.000108, 0.000664, 0.002329, -0.009961,
        -0.000511, -0.008160, -0.000032, 0.001494, 0.002849, 0.010672, 0.005240, -0.002355,
        -0.001961, 0.001560, 0.001128, 0.000431, 0.001826, -0.008926, -0.000575, -0.007429,
        -0.009457, 0.000107, 0.002342, 0.002641, -0.000516, 0.000076, 0.004484, 0.000904,
        0.003692, 0.002121, 0.001021, -0.000457, -0.005860, 0.000191, -0.004006, -0.000110,
        0.005108, -0.002584, 0.003937, -0.003088, 0.004467, 0.000994, 0.000224, 0.001082,
    ]
)
# fmt: on
FEATURE_CENTRES.flags.writeable = False

# Modes Image.reduce() handles directly; others are converted to grayscale first.
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F", "CMYK"})


@dataclass(frozen=True)
class ImageHashes:
    """Perceptual hashes of one image, in store format.

    Attributes:
        phash: the coarse 64-bit DCT hash (the 64 lowest frequencies), 16 lowercase hex
            characters. Enough on its own for exact-content and resize/recompress
            matches; :mod:`covidcxr.imaging.duplicates` indexes it.
        phash_detail: the next 64 frequencies, same format. Compared together with
            ``phash`` (distance = sum of both), it separates copies of one picture from
            different radiographs of the same patient or of look-alike patients.
    """

    phash: str
    phash_detail: str


def trim_borders(
    gray: NDArray[np.float32], tolerance: float = BORDER_TOLERANCE
) -> NDArray[np.float32]:
    """Remove near-uniform rows and columns from the edges of an image.

    Frames (black or white), padding and letterboxing are what differ between two
    copies of a figure; trimming them aligns the copies before hashing. Dark air that
    is part of the radiograph may be trimmed too, which is harmless: the same trimming
    happens to every copy.

    Args:
        gray: a 2-D grayscale image in [0, 1].
        tolerance: a row or column is uniform when the central 95% of its values
            span at most ``2 * tolerance`` (one outlier pixel in 40 is ignored).

    Returns:
        A view of ``gray`` without its uniform leading/trailing rows and columns, or
        ``gray`` itself when trimming would leave fewer than 2 rows or columns (a blank
        image is never trimmed to nothing).

    Raises:
        ValueError: if ``gray`` is not 2-D.
    """
    if gray.ndim != 2:
        raise ValueError(f"trim_borders: expected a 2-D grayscale array, got shape {gray.shape}")
    if not _any_uniform_edge(gray, tolerance):
        return gray  # the common case: no frame, so no trimming (what the loop finds)
    top, bottom, left, right = 0, gray.shape[0], 0, gray.shape[1]
    # Peel rows and columns in turn until neither changes: a frame on the left and
    # right keeps the rows it crosses from looking uniform until it is gone.
    for _ in range(_MAX_TRIM_PASSES):
        window = gray[top:bottom, left:right]
        cut_top = _uniform_run(window, tolerance)
        cut_bottom = _uniform_run(window[::-1], tolerance)
        cut_left = _uniform_run(window.T, tolerance)
        cut_right = _uniform_run(window.T[::-1], tolerance)
        if (bottom - top) - cut_top - cut_bottom < 2 or (right - left) - cut_left - cut_right < 2:
            return gray
        if cut_top == cut_bottom == cut_left == cut_right == 0:
            break
        top, bottom = top + cut_top, bottom - cut_bottom
        left, right = left + cut_left, right - cut_right
    return gray[top:bottom, left:right]


def _any_uniform_edge(gray: NDArray[np.float32], tolerance: float) -> bool:
    """Is the first or last row or column uniform? Two sorts instead of four."""
    if gray.shape[0] < 2 or gray.shape[1] < 2:
        return True  # let the full loop decide (it returns ``gray`` untrimmed)
    edge_rows = _uniform_lines(gray[[0, -1]], tolerance)
    return bool(edge_rows.any() or _uniform_lines(gray[:, [0, -1]].T, tolerance).any())


def _uniform_run(lines: NDArray[np.float32], tolerance: float) -> int:
    """Count the uniform rows at the start of ``lines``.

    Rows are tested in growing blocks from the edge, so an image without a border
    costs a few rows, not a pass over the whole image.
    """
    count = 0
    block = 8
    while count < lines.shape[0]:
        chunk = lines[count : count + block]
        content = np.flatnonzero(~_uniform_lines(chunk, tolerance))
        if content.size:
            return count + int(content[0])
        count += chunk.shape[0]
        block *= 2
    return count


def _uniform_lines(gray: NDArray[np.float32], tolerance: float) -> NDArray[np.bool_]:
    """For each row: do its central 95% of values span at most ``2 * tolerance``?"""
    ordered = np.sort(gray, axis=1)
    last = gray.shape[1] - 1
    low, high = int(0.025 * last), last - int(0.025 * last)
    return np.asarray(ordered[:, high] - ordered[:, low] <= 2 * tolerance)


@functools.cache
def _dct_matrix(size: int) -> NDArray[np.float64]:
    """Orthonormal DCT-II matrix: ``C @ x`` is the DCT of a column vector ``x``."""
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    matrix: NDArray[np.float64] = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    matrix.flags.writeable = False  # shared through the cache
    return matrix


@functools.cache
def _zigzag(size: int, count: int) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Row and column indices of the ``count`` lowest frequencies after DC (zig-zag)."""
    order = sorted(
        ((u, v) for u in range(size) for v in range(size) if (u, v) != (0, 0)),
        key=lambda uv: (uv[0] + uv[1], uv[0]),
    )[:count]
    rows, cols = zip(*order, strict=True)
    row_index = np.array(rows, dtype=np.intp)
    col_index = np.array(cols, dtype=np.intp)
    row_index.flags.writeable = False  # shared through the cache
    col_index.flags.writeable = False
    return row_index, col_index


def _resize_gray(gray: NDArray[np.float32], size: int) -> NDArray[np.float64]:
    # frombuffer/tobytes: the same pixels as fromarray/asarray, at half the overhead
    # (which matters at ~100 px).
    pixels = np.ascontiguousarray(gray, dtype=np.float32)
    height, width = pixels.shape
    source = Image.frombuffer("F", (width, height), pixels, "raw", "F", 0, 1)
    small = source.resize((size, size), Image.Resampling.BOX)
    return np.frombuffer(small.tobytes(), dtype=np.float32).reshape(size, size).astype(np.float64)


def content_window(gray: NDArray[np.float32]) -> NDArray[np.float32]:
    """Cut the part of a border-trimmed image that a hash should describe.

    The window is centred on the intensity-weighted centroid and spans
    ``WINDOW_SIGMAS`` intensity-weighted standard deviations each way (about 92% of a
    uniform image). Bright anatomy, not the dark margins, decides where it sits, so a
    copy cropped by a few percent, or padded, yields nearly the same window.

    Args:
        gray: a 2-D grayscale image in [0, 1], usually from :func:`trim_borders`.

    Returns:
        A view of ``gray`` (``gray`` itself when it is blank).
    """
    weights = gray.astype(np.float64)
    total = float(weights.sum())
    if total <= 1e-9 * weights.size:
        return gray
    height, width = gray.shape
    row_mass = weights.sum(axis=1) / total
    col_mass = weights.sum(axis=0) / total
    rows = np.arange(height)
    cols = np.arange(width)
    centre_row = float(row_mass @ rows)
    centre_col = float(col_mass @ cols)
    spread_row = float(np.sqrt(row_mass @ (rows - centre_row) ** 2))
    spread_col = float(np.sqrt(col_mass @ (cols - centre_col) ** 2))
    top = max(0, int(centre_row - WINDOW_SIGMAS * spread_row))
    bottom = min(height, int(centre_row + WINDOW_SIGMAS * spread_row) + 1)
    left = max(0, int(centre_col - WINDOW_SIGMAS * spread_col))
    right = min(width, int(centre_col + WINDOW_SIGMAS * spread_col) + 1)
    if bottom - top < 2 or right - left < 2:
        return gray
    return gray[top:bottom, left:right]


def dct_features(gray: NDArray[np.float32]) -> NDArray[np.float64]:
    """The unit-length vector of low DCT frequencies both hashes threshold.

    Args:
        gray: a 2-D grayscale image in [0, 1] (any size).

    Returns:
        The ``2 * HASH_BITS`` lowest non-DC DCT coefficients (zig-zag order) of the
        trimmed, windowed image shrunk to 32 x 32, divided by their norm (so scaling
        the contrast changes nothing), or zeros for a flat image.

    Raises:
        ValueError: if ``gray`` is not 2-D.
    """
    if gray.ndim != 2:
        raise ValueError(f"dct_features: expected a 2-D grayscale array, got shape {gray.shape}")
    small = _resize_gray(content_window(trim_borders(gray)), HASH_IMAGE_SIZE)
    dct = _dct_matrix(HASH_IMAGE_SIZE)
    coefficients = (dct @ small @ dct.T)[_zigzag(HASH_IMAGE_SIZE, 2 * HASH_BITS)]
    norm = float(np.linalg.norm(coefficients))
    if norm < _FLAT_NORM:  # a flat picture: rounding noise, not structure
        return np.zeros_like(coefficients, dtype=np.float64)
    return np.asarray(coefficients / norm, dtype=np.float64)


def fit_centres(grays: Sequence[NDArray[np.float32]]) -> NDArray[np.float64]:
    """Compute per-coefficient medians of :func:`dct_features` over a set of images.

    This is how :data:`FEATURE_CENTRES` was produced, from the 724 images of the
    ``covid-chestxray`` snapshot in ``../shared/datasets``::

        files = sorted((covid_dir / "images").iterdir())
        fit_centres([working_gray(read_image_file(f)[1].image) for f in files])

    Refit only together with a rehash of every stored image: hashes made with
    different centres are not comparable.

    Args:
        grays: grayscale images as :func:`working_gray` returns them.

    Returns:
        An array of ``2 * HASH_BITS`` medians.

    Raises:
        ValueError: if ``grays`` is empty.
    """
    if not grays:
        raise ValueError("fit_centres: no images given; pass at least one grayscale image")
    return np.asarray(np.median(np.stack([dct_features(g) for g in grays]), axis=0))


def _bits_to_int(bits: NDArray[np.bool_]) -> int:
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_pair(gray: NDArray[np.float32]) -> tuple[int, int]:
    """Compute the coarse and the detail 64-bit hash of a grayscale image.

    Args:
        gray: a 2-D grayscale image in [0, 1] (any size; :func:`image_hashes` passes a
            reduced copy).

    Returns:
        ``(coarse, detail)``: bit 63 of ``coarse`` is the lowest frequency; ``detail``
        continues with the next 64 frequencies.

    Raises:
        ValueError: if ``gray`` is not 2-D.
    """
    bits = dct_features(gray) > FEATURE_CENTRES
    return _bits_to_int(bits[:HASH_BITS]), _bits_to_int(bits[HASH_BITS:])


def phash(gray: NDArray[np.float32]) -> int:
    """Compute the 64-bit coarse DCT perceptual hash of a grayscale image.

    Args:
        gray: a 2-D grayscale image in [0, 1] (any size). Its borders are trimmed
            (:func:`trim_borders`) and its content window cut (:func:`content_window`)
            first.

    Returns:
        The hash as an int in [0, 2**64); bit 63 is the lowest frequency.

    Raises:
        ValueError: if ``gray`` is not 2-D.
    """
    return phash_pair(gray)[0]


def to_hex(value: int) -> str:
    """Format a 64-bit hash as 16 lowercase hex characters (the store format).

    Args:
        value: a hash in [0, 2**64).

    Returns:
        The zero-padded hex string.

    Raises:
        ValueError: if ``value`` is out of range.
    """
    if not 0 <= value < 1 << HASH_BITS:
        raise ValueError(f"to_hex: {value!r} is not a 64-bit unsigned hash")
    return f"{value:016x}"


def hamming(a: str, b: str) -> int:
    """Count the bits that differ between two hex hashes.

    Args:
        a: a hash as 16 hex characters.
        b: another hash as 16 hex characters.

    Returns:
        The Hamming distance, 0 to 64.

    Raises:
        ValueError: if either is not 16 hex characters.
    """
    return (_parse_hex(a, "hamming") ^ _parse_hex(b, "hamming")).bit_count()


def _parse_hex(value: str, function: str) -> int:
    if len(value) != HASH_BITS // 4:
        raise ValueError(f"{function}: {value!r} is not a 16-character hex hash")
    try:
        return int(value, 16)
    except ValueError:
        raise ValueError(f"{function}: {value!r} is not a 16-character hex hash") from None


def working_gray(image: Image.Image | NDArray[np.float32]) -> NDArray[np.float32]:
    """Shrink a decoded image cheaply and convert it to grayscale for hashing.

    Shrinking first (``Image.reduce``, an integer box filter in C) keeps hashing a small
    fraction of the decode time; the hash only looks at 32 x 32 anyway.

    Args:
        image: a decoded Pillow image, or a 2-D grayscale array in [0, 1].

    Returns:
        A 2-D float32 grayscale array whose shorter side is below
        ``2 * WORKING_MIN_SIDE`` (unless the input was already smaller), so at most
        ``2 * WORKING_MIN_SIDE * MAX_ASPECT_RATIO`` long.

    Raises:
        ImageError: ``extreme_shape`` when one side is more than ``MAX_ASPECT_RATIO``
            times the other; checked before any pixel is converted.
    """
    height, width = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageError(
            f"working_gray: a {width}x{height} image is more than {MAX_ASPECT_RATIO}:1; "
            "its reduction cannot be bounded, so it is not hashed",
            code="extreme_shape",
        )
    if isinstance(image, Image.Image):
        if image.mode not in _REDUCIBLE_MODES:
            # Palette indices and 1-bit pixels cannot be averaged; 16-bit modes are not
            # supported by reduce(). Rare in practice: convert at full size.
            return _reduce_array(to_grayscale(image))
        factor = min(image.size) // WORKING_MIN_SIDE
        if factor >= 2:
            image = image.reduce(factor)
        return to_grayscale(image)
    return _reduce_array(np.asarray(image, dtype=np.float32))


def _reduce_array(gray: NDArray[np.float32]) -> NDArray[np.float32]:
    if gray.ndim != 2:
        raise ValueError(f"working_gray: expected a 2-D grayscale array, got shape {gray.shape}")
    factor = min(gray.shape) // WORKING_MIN_SIDE
    if factor < 2:
        return gray
    height = gray.shape[0] // factor * factor
    width = gray.shape[1] // factor * factor
    blocks = gray[:height, :width].reshape(height // factor, factor, width // factor, factor)
    return np.ascontiguousarray(blocks.mean(axis=(1, 3), dtype=np.float32))


def image_hashes(image: Image.Image | NDArray[np.float32]) -> ImageHashes:
    """Compute every perceptual hash covidcxr stores for an image.

    Args:
        image: a decoded Pillow image (as :func:`~covidcxr.imaging.decode.decode_image`
            returns it) or a 2-D grayscale array in [0, 1].

    Returns:
        The hashes as 16-character lowercase hex strings.
    """
    coarse, detail = phash_pair(working_gray(image))
    return ImageHashes(phash=to_hex(coarse), phash_detail=to_hex(detail))
