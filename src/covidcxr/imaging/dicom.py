"""DICOM images: detection by content, grey levels as a radiologist sees them, header
metadata. De-identification is :mod:`covidcxr.imaging.deid`; decisions in
``docs/decisions/0050-dicom-reader-and-deid.md``.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import re
import struct
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.errors import ImageError, MissingExtraError
from covidcxr.imaging.decode import DEFAULT_MAX_PIXELS

try:
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
    from pydicom.uid import DeflatedExplicitVRLittleEndian
except ImportError as exc:  # pragma: no cover - the dicom extra is missing
    raise MissingExtraError("pydicom", "dicom") from exc

__all__ = [
    "DicomImage",
    "DicomMetadata",
    "display_levels",
    "header_index",
    "is_dicom",
    "pydicom_quiet",
    "read_dicom",
    "read_dicom_file",
]

logger = logging.getLogger(__name__)

#: The DICOM Part 10 magic and where it sits (after the 128-byte preamble).
DICOM_MAGIC: Final = b"DICM"
MAGIC_OFFSET: Final = 128

_MONOCHROME: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
# Colour encodings pydicom's pixel_array converts to RGB itself.
_COLOUR: Final = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
_AGE_STRING: Final = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS: Final = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass(frozen=True)
class DicomMetadata:
    """What the header says about the image, read before de-identification.

    Attributes:
        modality: (0008,0060) as written (``DX``, ``CR``, ``CT``, ...), or ``None``.
        view_position: (0018,5101) as written (``PA``, ``AP``, ``LL``, ...), or ``None``.
        sex: (0010,0040) ``M``, ``F`` or ``O``, or ``None``.
        age_years: (0010,1010) PatientAge (``045Y``, ``006M``) in years, else completed
            years from the birth date to the study date, or ``None``.
        study_date: the study's day (StudyDate, else SeriesDate, AcquisitionDate,
            ContentDate). Identifying: :func:`covidcxr.imaging.deid.day_offsets` turns it
            into days from the patient's first study; never store or show it.
        burned_in_annotation: (0028,0301) ``YES`` -> True, ``NO`` -> False, else None.
        transfer_syntax: the transfer syntax's name.
        photometric: (0028,0004) PhotometricInterpretation.
        bits_stored: (0028,0101) BitsStored.
    """

    modality: str | None
    view_position: str | None
    sex: str | None
    age_years: float | None
    study_date: dt.date | None
    burned_in_annotation: bool | None
    transfer_syntax: str
    photometric: str
    bits_stored: int


@dataclass(frozen=True, eq=False)
class DicomImage:
    """A decoded DICOM image.

    Attributes:
        image: grey levels as displayed (``L``), or ``RGB`` for colour encodings.
        metadata: what the header says (see :class:`DicomMetadata`).
        dataset: the header as read, patient identity included: hand it to
            :func:`covidcxr.imaging.deid.deidentify` and never keep or show it.
    """

    image: Image.Image
    metadata: DicomMetadata
    dataset: Dataset


def is_dicom(data: bytes) -> bool:
    """Tell whether ``data`` is a DICOM Part 10 file (``DICM`` at byte 128).

    This is exactly what ``pydicom.dcmread(force=False)`` accepts; the file's name and
    extension play no part.
    """
    return data[MAGIC_OFFSET : MAGIC_OFFSET + 4] == DICOM_MAGIC


def read_dicom(
    data: bytes,
    *,
    name: str = "<bytes>",
    window: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DicomImage:
    """Decode a single-frame DICOM image to the grey levels a viewer shows.

    Stored values go through the Modality LUT (rescale slope/intercept or LUT), then the
    VOI LUT, or else the window centre/width, ``window`` choosing among several; the
    result is scaled to 0..255 over the VOI's output range (the image's own range
    without a VOI), and MONOCHROME1 is inverted to MONOCHROME2. Compressed transfer
    syntaxes decode through pydicom's plugins (pylibjpeg, Pillow).

    Args:
        data: the file's bytes.
        name: the file's name, used in error messages.
        window: which VOI LUT item or window centre/width value to use.
        max_pixels: largest Rows x Columns to decode, checked before decoding.

    Returns:
        The image, its metadata and the (still identified) header.

    Raises:
        ImageError: ``unsupported_format`` (not DICOM, or a photometric interpretation
            other than monochrome or RGB/YBR), ``truncated``, ``no_pixel_data``,
            ``multi_frame``, ``too_many_pixels``, ``unsupported_transfer_syntax``
            (no decoder, or its plugin is not installed) or ``undecodable``. Messages
            name ``name`` and the reason, never a header value that could identify
            the patient.
    """
    dataset = _parse(data, name)
    _check_image(dataset, name, max_pixels)
    stored = _stored_values(dataset, name)
    metadata = _metadata(dataset)
    if metadata.photometric in _MONOCHROME:
        levels = display_levels(dataset, stored, window=window, name=name)
        image = Image.fromarray(np.rint(levels * 255.0).astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(_rgb8(stored, metadata.bits_stored), mode="RGB")
    return DicomImage(image=image, metadata=metadata, dataset=dataset)


def read_dicom_file(
    path: str | os.PathLike[str], *, window: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, DicomImage]:
    """Read a file and decode it with :func:`read_dicom`, naming the path in errors.

    Returns:
        The file's bytes and the decoded image.

    Raises:
        ImageError: ``missing_file`` or ``unreadable``, or any code of :func:`read_dicom`.
    """
    file_path = Path(path)
    try:
        data = file_path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(
            f"read_dicom_file: {str(file_path)!r} does not exist; check the path",
            code="missing_file",
        ) from exc
    except OSError as exc:
        raise ImageError(
            f"read_dicom_file: cannot read {str(file_path)!r} ({exc.strerror or exc})",
            code="unreadable",
        ) from exc
    return data, read_dicom(data, name=str(file_path), window=window, max_pixels=max_pixels)


def display_levels(
    dataset: Dataset, stored: NDArray[Any], *, window: int = 0, name: str = "<bytes>"
) -> NDArray[np.float64]:
    """Monochrome stored values as displayed grey levels in [0, 1] (1 is white).

    Args:
        dataset: the header (Modality LUT, VOI LUT, window, photometric interpretation).
        stored: the stored values (``dataset.pixel_array``).
        window: which VOI LUT item or window value to use.
        name: the file's name, for errors.

    Raises:
        ImageError: ``undecodable`` when ``window`` is past the file's VOI items or
            windows, or the VOI module is malformed.
    """
    values = apply_modality_lut(stored, dataset)
    try:
        shown, low, high = _apply_voi(values, dataset, window)
    except (ValueError, IndexError, NotImplementedError, AttributeError) as exc:
        raise ImageError(
            f"read_dicom: {name!r} has a VOI LUT or window that cannot be applied "
            f"(window {window}: {exc}); choose another window or re-export the image",
            code="undecodable",
        ) from exc
    levels: NDArray[np.float64]
    if high > low:
        levels = np.clip((np.asarray(shown, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    else:
        levels = np.zeros(np.shape(shown), dtype=np.float64)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        levels = 1.0 - levels
    return levels


def _apply_voi(
    values: NDArray[Any], dataset: Dataset, window: int
) -> tuple[NDArray[Any], float, float]:
    """The VOI transform's output and the range it maps onto (PS3.3 C.11.2)."""
    if dataset.get("VOILUTSequence"):
        item = dataset.VOILUTSequence[window]
        descriptor = list(item.LUTDescriptor)
        # pydicom indexes an 8-bit LUT with uint8, wrapping inputs past entry 255: it
        # reads the same entries as 16-bit ones.
        item.LUTDescriptor = [*descriptor[:2], max(int(descriptor[2]), 16)]
        try:
            # A VOI LUT indexes by integer input; pydicom warns on floats.
            shown = apply_voi(np.rint(values).astype(np.int64), dataset, window)
        finally:
            item.LUTDescriptor = descriptor
        return shown, 0.0, float(2 ** int(descriptor[2]) - 1)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        count = dataset["WindowCenter"].VM
        if window >= max(count, 1):
            raise IndexError(f"the file has {count} window(s)")
        shown = apply_windowing(values, dataset, window)
        # pydicom maps the window onto the modality output's range: probe it for the
        # ends rather than restating its rule.
        ends = apply_windowing(np.array([-np.inf, np.inf]), dataset, window)
        return shown, float(ends[0]), float(ends[1])
    return values, float(np.min(values)), float(np.max(values))


def _rgb8(stored: NDArray[Any], bits_stored: int) -> NDArray[np.uint8]:
    if stored.dtype == np.uint8:
        same: NDArray[np.uint8] = np.ascontiguousarray(stored)
        return same
    scaled = np.asarray(stored, dtype=np.float64) * (255.0 / (2**bits_stored - 1))
    rgb: NDArray[np.uint8] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return rgb


# --------------------------------------------------------------------------- parsing


class _QuietPydicom(logging.Filter):
    """Withholds pydicom's log records while this thread reads a file: they may quote
    header values (names, ids), which must not reach any log."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held: list[str] | None = getattr(self.local, "held", None)
        if held is None:
            return True
        held.append(record.levelname)
        return False


_QUIET = _QuietPydicom()
logging.getLogger("pydicom").addFilter(_QUIET)


@contextmanager
def pydicom_quiet(name: str) -> Iterator[None]:
    """Run pydicom with its warnings and log records withheld (they may quote header
    values); a count is logged instead, naming only the file."""
    previous = getattr(_QUIET.local, "held", None)
    _QUIET.local.held = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        held = _QUIET.local.held
        _QUIET.local.held = previous
    count = max(len(held), len(caught))
    if count:
        logger.info(
            "read_dicom: pydicom noted %d problem(s) in %r (details withheld: they may "
            "quote header values)",
            count,
            name,
        )


def _parse(data: bytes, name: str) -> Dataset:
    if not is_dicom(data):
        raise ImageError(
            f"read_dicom: {name!r} is not a DICOM file (no 'DICM' at byte 128); "
            "convert it or drop it",
            code="unsupported_format",
        )
    try:
        with pydicom_quiet(name):
            dataset = pydicom.dcmread(io.BytesIO(data), force=False)
    except (struct.error, EOFError) as exc:
        raise _truncated(name, "it ends inside an element header") from exc
    except (InvalidDicomError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise ImageError(
            f"read_dicom: {name!r} has a malformed DICOM header ({type(exc).__name__}); "
            "re-export it",
            code="undecodable",
        ) from exc
    _check_complete(dataset, name, len(data))
    return dataset


def _truncated(name: str, what: str) -> ImageError:
    return ImageError(
        f"read_dicom: {name!r} is truncated ({what}); copy or export it again",
        code="truncated",
    )


def _check_complete(dataset: Dataset, name: str, n_bytes: int) -> None:
    """Detect a cut file: pydicom reads a short last element without complaint."""
    meta_length: object = dataset.file_meta.get("FileMetaInformationGroupLength")
    if meta_length == "" or (meta_length is not None and not isinstance(meta_length, int)):
        raise _truncated(name, "it ends inside its file meta header")
    end = MAGIC_OFFSET + 4 + 12 + meta_length if meta_length is not None else 0
    if end > n_bytes:
        raise _truncated(name, f"its file meta header needs {end} bytes, the file has {n_bytes}")
    if dataset.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # offsets count inflated bytes; a cut stream leaves the pixel data short
    for tag in dataset.keys():  # noqa: SIM118 - a Dataset iterates over elements
        element: object = dataset.get_item(tag)  # raw until read: value_tell is known
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
            end = n_bytes  # the end of an undefined length is not recorded
            continue
        end = element.value_tell + element.length
        if end > n_bytes:
            raise _truncated(name, f"element {tag} needs {end} bytes, the file has {n_bytes}")
    if 0 < end < n_bytes:
        raise _truncated(name, f"its last {n_bytes - end} bytes are an element cut short")


def _check_image(dataset: Dataset, name: str, max_pixels: int) -> None:
    if "PixelData" not in dataset:
        raise ImageError(
            f"read_dicom: {name!r} has no pixel data (a structured report or other "
            "non-image object); drop it",
            code="no_pixel_data",
        )
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(
            f"read_dicom: {name!r} holds {frames} frames; X-ray tasks take single-frame "
            "images: export the frame you want as its own file",
            code="multi_frame",
        )
    rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    if rows * columns > max_pixels:
        raise ImageError(
            f"read_dicom: {name!r} claims {columns}x{rows} = {rows * columns} pixels, "
            f"over the limit of {max_pixels}; raise max_pixels only if the file is trusted",
            code="too_many_pixels",
        )
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if photometric not in _MONOCHROME | _COLOUR:
        raise ImageError(
            f"read_dicom: {name!r} has photometric interpretation {photometric!r}; "
            "expected MONOCHROME1, MONOCHROME2 or RGB: re-export it",
            code="unsupported_format",
        )
    _check_decoder(dataset, name)


def _check_decoder(dataset: Dataset, name: str) -> None:
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise ImageError(
            f"read_dicom: {name!r} uses transfer syntax {syntax.name} ({syntax}), which "
            "no installed decoder reads; re-export it uncompressed or as JPEG, JPEG-LS, "
            "JPEG 2000 or RLE",
            code="unsupported_transfer_syntax",
        ) from exc
    if not decoder.is_available:
        raise ImageError(
            f"read_dicom: {name!r} uses transfer syntax {syntax.name}, whose decoding "
            "plugin is missing: pip install 'covidcxr[dicom]'",
            code="unsupported_transfer_syntax",
        )


def _stored_values(dataset: Dataset, name: str) -> NDArray[Any]:
    try:
        with pydicom_quiet(name):
            stored: NDArray[Any] = dataset.pixel_array
    except MemoryError:
        raise
    except Exception as exc:
        message = str(exc)
        if "less than expected" in message or "truncat" in message.lower():
            raise _truncated(name, "its pixel data is cut short") from exc
        raise ImageError(
            f"read_dicom: {name!r} pixel data cannot be decoded "
            f"({type(exc).__name__}: {message[:200]}); re-export it",
            code="undecodable",
        ) from exc
    return stored


def header_index(paths: Iterable[Path], keyword: str) -> dict[str, list[Path]]:
    """DICOM files by the value of one header attribute (``SOPInstanceUID``,
    ``AccessionNumber``), read without pixel data; files that are not DICOM or lack
    the attribute are left out. The values stay in memory: never log or keep them."""
    index: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        try:
            with path.open("rb") as handle:
                if not is_dicom(handle.read(MAGIC_OFFSET + 4)):
                    continue
            with pydicom_quiet(path.name):
                value = pydicom.dcmread(path, stop_before_pixels=True).get(keyword)
        except Exception:
            continue
        if value:
            index[str(value).strip()].append(path)
    return dict(index)


# --------------------------------------------------------------------------- metadata


def _metadata(dataset: Dataset) -> DicomMetadata:
    with pydicom_quiet("<header>"):
        study_date = _first_date(
            dataset, ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
        )
        burned = str(dataset.get("BurnedInAnnotation", "")).strip().upper()
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        return DicomMetadata(
            modality=_text(dataset, "Modality"),
            view_position=_text(dataset, "ViewPosition"),
            sex=_text(dataset, "PatientSex"),
            age_years=_age_years(dataset, study_date),
            study_date=study_date,
            burned_in_annotation={"YES": True, "NO": False}.get(burned),
            transfer_syntax=str(syntax.name) if syntax is not None else "unknown",
            photometric=str(dataset.get("PhotometricInterpretation", "")),
            bits_stored=int(dataset.get("BitsStored") or 8),
        )


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = str(dataset.get(keyword) or "").strip().upper()
    return value or None


def _date(value: object) -> dt.date | None:
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def _first_date(dataset: Dataset, keywords: tuple[str, ...]) -> dt.date | None:
    for keyword in keywords:
        day = _date(dataset.get(keyword))
        if day is not None:
            return day
    return None


def _age_years(dataset: Dataset, study_date: dt.date | None) -> float | None:
    match = _AGE_STRING.match(str(dataset.get("PatientAge") or "").strip().upper())
    if match is not None:
        return round(int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)], 3)
    birth = _date(dataset.get("PatientBirthDate"))
    if birth is None or study_date is None or birth > study_date:
        return None
    before_birthday = (study_date.month, study_date.day) < (birth.month, birth.day)
    return float(study_date.year - birth.year - before_birthday)
