"""DICOM reading: every transfer syntax the installed plugins claim, every LUT path
against an independent numpy computation, and the clear refusals."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest

pytest.importorskip("pydicom")
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread, uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence

from covidcxr.errors import ImageError
from covidcxr.imaging.decode import sniff_format
from covidcxr.imaging.dicom import is_dicom, read_dicom, read_dicom_file
from dicom_files import encapsulated, make_dataset, radiograph, to_bytes

# ---------------------------------------------------------------- independent references


def linear(x: NDArray[Any], center: float, width: float) -> NDArray[np.float64]:
    """PS3.3 C.11.2.1.2.1 (LINEAR) as a fraction of the output range."""
    c, w = center - 0.5, width - 1.0
    return np.clip((np.asarray(x, dtype=np.float64) - c) / w + 0.5, 0.0, 1.0)


def linear_exact(x: NDArray[Any], center: float, width: float) -> NDArray[np.float64]:
    """PS3.3 C.11.2.1.3.2 (LINEAR_EXACT)."""
    return np.clip((np.asarray(x, dtype=np.float64) - center) / width + 0.5, 0.0, 1.0)


def sigmoid(x: NDArray[Any], center: float, width: float) -> NDArray[np.float64]:
    """PS3.3 C.11.2.1.3.1 (SIGMOID)."""
    return 1.0 / (1.0 + np.exp(-4.0 * (np.asarray(x, dtype=np.float64) - center) / width))


def lookup(x: NDArray[Any], first: int, table: NDArray[Any]) -> NDArray[Any]:
    """A LUT: inputs below ``first`` take entry 0, above the table its last entry."""
    index = np.clip(np.asarray(x, dtype=np.int64) - first, 0, len(table) - 1)
    return np.asarray(table)[index]


def span(x: NDArray[Any]) -> NDArray[np.float64]:
    values = np.asarray(x, dtype=np.float64)
    return (values - values.min()) / (values.max() - values.min())


def grey(levels: NDArray[np.float64]) -> NDArray[np.uint8]:
    return np.rint(levels * 255.0).astype(np.uint8)


def pixels(data: bytes, **kwargs: Any) -> NDArray[np.uint8]:
    decoded = read_dicom(data, name="t.dcm", **kwargs)
    assert decoded.image.mode == "L"
    return np.asarray(decoded.image)


def lut_item(first: int, table: NDArray[Any], bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(table), first, bits]
    item["LUTDescriptor"].VR = "SS" if first < 0 else "US"
    item.LUTData = [int(v) for v in table]
    item["LUTData"].VR = "US"
    return item


# ---------------------------------------------------------------- transfer syntaxes

STORED = radiograph(bits=12)
WINDOW_12 = {"WindowCenter": 2048, "WindowWidth": 4096}
WINDOW_8 = {"WindowCenter": 128, "WindowWidth": 256}
Encoded = tuple[bytes, NDArray[Any], dict[str, int], bool]


def _compressed(syntax: uid.UID, frame: bytes, reference: NDArray[Any], lossless: bool) -> Encoded:
    window = WINDOW_8 if reference.dtype == np.uint8 else WINDOW_12
    bits = 8 if reference.dtype == np.uint8 else 12
    ds = make_dataset(reference, bits_stored=bits, **window)
    return to_bytes(encapsulated(ds, frame, syntax)), reference, window, lossless


def _lossy(syntax: uid.UID, frame: bytes, decode: Callable[[bytes], NDArray[Any]]) -> Encoded:
    """A lossy frame's reference is what an independent decoder (imagecodecs) reads."""
    reference = decode(frame)
    return _compressed(syntax, frame, reference, lossless=False)


def _native(syntax: uid.UID) -> Encoded:
    ds = make_dataset(STORED, syntax=syntax, **WINDOW_12)
    return to_bytes(ds), STORED, WINDOW_12, True


def _big_endian() -> Encoded:
    ds = make_dataset(STORED, syntax=uid.ExplicitVRBigEndian, **WINDOW_12)
    ds.PixelData = STORED.astype(">u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), STORED, WINDOW_12, True


def _rle() -> Encoded:
    ds = make_dataset(STORED, **WINDOW_12)
    ds.compress(uid.RLELossless)
    return to_bytes(ds), STORED, WINDOW_12, True


EIGHT_BIT = (STORED >> 4).astype(np.uint8)
J2K = imagecodecs.JPEG2K.CODEC.J2K
ENCODERS: dict[uid.UID, Callable[[], Encoded]] = {
    uid.ImplicitVRLittleEndian: lambda: _native(uid.ImplicitVRLittleEndian),
    uid.ExplicitVRLittleEndian: lambda: _native(uid.ExplicitVRLittleEndian),
    uid.DeflatedExplicitVRLittleEndian: lambda: _native(uid.DeflatedExplicitVRLittleEndian),
    uid.ExplicitVRBigEndian: _big_endian,
    uid.RLELossless: _rle,
    uid.JPEGBaseline8Bit: lambda: _lossy(
        uid.JPEGBaseline8Bit,
        imagecodecs.jpeg8_encode(EIGHT_BIT, level=90),
        imagecodecs.jpeg8_decode,
    ),
    uid.JPEGExtended12Bit: lambda: _lossy(
        uid.JPEGExtended12Bit,
        imagecodecs.jpeg8_encode(STORED, level=90, bitspersample=12),
        imagecodecs.jpeg8_decode,
    ),
    uid.JPEGLossless: lambda: _compressed(
        uid.JPEGLossless,
        imagecodecs.jpeg8_encode(STORED, lossless=True, predictor=6, bitspersample=12),
        STORED,
        True,
    ),
    uid.JPEGLosslessSV1: lambda: _compressed(
        uid.JPEGLosslessSV1,
        imagecodecs.jpeg8_encode(STORED, lossless=True, predictor=1, bitspersample=12),
        STORED,
        True,
    ),
    uid.JPEGLSLossless: lambda: _compressed(
        uid.JPEGLSLossless, imagecodecs.jpegls_encode(STORED), STORED, True
    ),
    uid.JPEGLSNearLossless: lambda: _lossy(
        uid.JPEGLSNearLossless,
        imagecodecs.jpegls_encode(STORED, level=2),
        imagecodecs.jpegls_decode,
    ),
    uid.JPEG2000Lossless: lambda: _compressed(
        uid.JPEG2000Lossless,
        imagecodecs.jpeg2k_encode(STORED, codecformat=J2K, reversible=True, bitspersample=12),
        STORED,
        True,
    ),
    uid.JPEG2000: lambda: _lossy(
        uid.JPEG2000,
        imagecodecs.jpeg2k_encode(STORED, level=40, codecformat=J2K, bitspersample=12),
        imagecodecs.jpeg2k_decode,
    ),
    # imagecodecs cannot choose the RPCL progression order; decoders do not depend on it.
    uid.HTJ2KLossless: lambda: _compressed(
        uid.HTJ2KLossless, imagecodecs.htj2k_encode(STORED, reversible=True), STORED, True
    ),
    uid.HTJ2KLosslessRPCL: lambda: _compressed(
        uid.HTJ2KLosslessRPCL, imagecodecs.htj2k_encode(STORED, reversible=True), STORED, True
    ),
    uid.HTJ2K: lambda: _lossy(
        uid.HTJ2K, imagecodecs.htj2k_encode(STORED, level=40), imagecodecs.htj2k_decode
    ),
}


def claimed_syntaxes() -> list[uid.UID]:
    """Every transfer syntax a pydicom decoder with an installed plugin reads."""
    claimed = []
    for syntax in uid.AllTransferSyntaxes:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            continue
        if decoder.is_available:
            claimed.append(syntax)
    return claimed


def test_every_claimed_transfer_syntax_has_a_test() -> None:
    missing = [syntax.name for syntax in claimed_syntaxes() if syntax not in ENCODERS]
    assert missing == []


@pytest.mark.parametrize("syntax", claimed_syntaxes(), ids=lambda s: s.name)
def test_each_claimed_transfer_syntax_decodes_to_the_windowed_values(syntax: uid.UID) -> None:
    data, reference, window, lossless = ENCODERS[syntax]()
    assert dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    expected = grey(linear(reference, window["WindowCenter"], window["WindowWidth"]))
    got = pixels(data)
    if lossless:
        np.testing.assert_array_equal(got, expected)
    else:  # two decoders of a lossy stream may round differently
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_pydicoms_bundled_lossless_variants_match_the_native_file(variant: str) -> None:
    native = Path(get_testdata_file("MR_small.dcm", download=False) or "")
    other = Path(get_testdata_file(variant, download=False) or "")
    ds = dcmread(native)
    expected = grey(linear(ds.pixel_array, float(ds.WindowCenter), float(ds.WindowWidth)))
    np.testing.assert_array_equal(pixels(other.read_bytes()), expected)
    np.testing.assert_array_equal(pixels(native.read_bytes()), expected)


def test_a_bundled_jpeg_extended_file_decodes() -> None:
    path = Path(get_testdata_file("JPGExtended.dcm", download=False) or "")
    decoded = read_dicom(path.read_bytes(), name=path.name)
    reference = dcmread(path).pixel_array
    assert decoded.metadata.transfer_syntax == uid.JPEGExtended12Bit.name
    np.testing.assert_array_equal(np.asarray(decoded.image), grey(span(reference)))


# ---------------------------------------------------------------- LUT paths


def test_no_voi_spans_the_images_own_range() -> None:
    np.testing.assert_array_equal(pixels(to_bytes(make_dataset(STORED))), grey(span(STORED)))


@pytest.mark.parametrize(
    ("function", "reference"),
    [("LINEAR", linear), ("LINEAR_EXACT", linear_exact), ("SIGMOID", sigmoid)],
)
def test_window_functions(function: str, reference: Callable[..., NDArray[np.float64]]) -> None:
    ds = make_dataset(STORED, WindowCenter=1500, WindowWidth=1000, VOILUTFunction=function)
    np.testing.assert_array_equal(pixels(to_bytes(ds)), grey(reference(STORED, 1500, 1000)))


def test_rescale_then_window() -> None:
    ds = make_dataset(
        STORED, RescaleSlope=0.5, RescaleIntercept=-1024, WindowCenter=-300, WindowWidth=900
    )
    hounsfield = STORED * 0.5 - 1024
    np.testing.assert_array_equal(pixels(to_bytes(ds)), grey(linear(hounsfield, -300, 900)))


def test_rescale_without_a_window_spans_the_rescaled_range() -> None:
    ds = make_dataset(STORED, RescaleSlope=-2, RescaleIntercept=100)
    np.testing.assert_array_equal(pixels(to_bytes(ds)), grey(span(STORED * -2.0 + 100)))


def test_the_window_index_chooses_among_several_windows() -> None:
    ds = make_dataset(STORED, WindowCenter=[1000, 3000], WindowWidth=[500, 2000])
    data = to_bytes(ds)
    np.testing.assert_array_equal(pixels(data), grey(linear(STORED, 1000, 500)))
    np.testing.assert_array_equal(pixels(data, window=1), grey(linear(STORED, 3000, 2000)))
    with pytest.raises(ImageError, match=r"'t\.dcm'.*window 2.*2 window") as caught:
        pixels(data, window=2)
    assert caught.value.code == "undecodable"


def test_modality_lut_sequence() -> None:
    table = (np.sqrt(np.arange(4096)) * 64).astype(np.uint16)
    ds = make_dataset(STORED)
    ds.ModalityLUTSequence = Sequence([lut_item(0, table, 16)])
    np.testing.assert_array_equal(pixels(to_bytes(ds)), grey(span(lookup(STORED, 0, table))))


@pytest.mark.parametrize("bits", [8, 16])
def test_voi_lut_sequence(bits: int) -> None:
    first = 500
    table = np.linspace(0, 2**bits - 1, 3000).astype(np.uint16)
    ds = make_dataset(STORED, WindowCenter=99, WindowWidth=3)  # the LUT takes precedence
    ds.VOILUTSequence = Sequence([lut_item(first, table, bits)])
    expected = lookup(STORED, first, table) / (2**bits - 1)
    np.testing.assert_array_equal(pixels(to_bytes(ds)), grey(expected))


def test_voi_lut_after_a_rescale() -> None:
    table = np.linspace(0, 255, 2048).astype(np.uint16)
    ds = make_dataset(STORED, RescaleSlope=1, RescaleIntercept=-1000)
    ds.VOILUTSequence = Sequence([lut_item(-1000, table, 8)])
    expected = lookup(STORED.astype(np.int64) - 1000, -1000, table) / 255
    np.testing.assert_array_equal(pixels(to_bytes(ds)), grey(expected))


def test_monochrome1_is_inverted() -> None:
    mono2 = pixels(to_bytes(make_dataset(STORED, **WINDOW_12)))
    mono1 = pixels(to_bytes(make_dataset(STORED, photometric="MONOCHROME1", **WINDOW_12)))
    np.testing.assert_array_equal(mono1, grey(1.0 - linear(STORED, 2048, 4096)))
    np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))


def test_bits_above_bits_stored_are_ignored() -> None:
    dirty = STORED | np.uint16(0xA000)  # an overlay in the unused high bits
    ds = make_dataset(dirty, bits_stored=12, **WINDOW_12)
    np.testing.assert_array_equal(pixels(to_bytes(ds)), grey(linear(STORED, 2048, 4096)))


def test_signed_values_in_bits_stored_are_sign_extended() -> None:
    values = STORED.astype(np.int16) - 2048  # -2048..2047: 12-bit two's complement
    raw = (values.astype(np.int32) & 0x0FFF).astype(np.uint16)  # high bits left 0
    ds = make_dataset(raw, bits_stored=12, WindowCenter=0, WindowWidth=4096)
    ds.PixelRepresentation = 1
    np.testing.assert_array_equal(pixels(to_bytes(ds)), grey(linear(values, 0, 4096)))


def test_colour_images_stay_rgb() -> None:
    path = Path(get_testdata_file("SC_rgb_rle.dcm", download=False) or "")
    decoded = read_dicom(path.read_bytes(), name=path.name)
    assert decoded.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded.image), dcmread(path).pixel_array)


# ---------------------------------------------------------------- metadata


def test_metadata_from_the_header() -> None:
    ds = make_dataset(STORED, PatientAge="045Y", BurnedInAnnotation="YES", ViewPosition="AP")
    meta = read_dicom(to_bytes(ds)).metadata
    assert (meta.modality, meta.view_position, meta.sex) == ("DX", "AP", "F")
    assert meta.age_years == 45.0
    assert meta.study_date is not None and meta.study_date.isoformat() == "2020-03-17"
    assert meta.burned_in_annotation is True
    assert (meta.photometric, meta.bits_stored) == ("MONOCHROME2", 12)


@pytest.mark.parametrize(
    ("age", "birth", "expected"),
    [("006M", "", 0.5), ("", "19580214", 62.0), ("", "19580318", 61.0), ("", "", None)],
)
def test_age_from_age_string_or_birth_and_study_dates(
    age: str, birth: str, expected: float | None
) -> None:
    ds = make_dataset(STORED, PatientAge=age)
    ds.PatientBirthDate = birth
    assert read_dicom(to_bytes(ds)).metadata.age_years == expected


# ---------------------------------------------------------------- refusals


def test_a_png_named_dcm_is_not_dicom(tmp_path: Path) -> None:
    fake = tmp_path / "scan.dcm"
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buffer, format="PNG")
    fake.write_bytes(buffer.getvalue())
    assert not is_dicom(fake.read_bytes())
    with pytest.raises(ImageError, match=r"scan\.dcm.*not a DICOM file") as caught:
        read_dicom_file(fake)
    assert caught.value.code == "unsupported_format"


def test_dicom_bytes_are_found_by_content_whatever_the_name(tmp_path: Path) -> None:
    disguised = tmp_path / "image.png"
    disguised.write_bytes(to_bytes(make_dataset(STORED)))
    assert sniff_format(disguised.read_bytes()) == "DICOM"
    assert read_dicom_file(disguised)[1].image.size == (48, 64)


@pytest.mark.parametrize("keep", [140, 200, 420, -130, -127, -1])
def test_truncated_files_are_refused(keep: int) -> None:
    data = to_bytes(make_dataset(STORED))
    with pytest.raises(ImageError, match=r"'cut\.dcm' is truncated") as caught:
        read_dicom(data[:keep], name="cut.dcm")
    assert caught.value.code == "truncated"


def test_a_truncated_compressed_frame_is_refused() -> None:
    data = ENCODERS[uid.JPEG2000Lossless]()[0]
    with pytest.raises(ImageError, match=r"'cut\.dcm'") as caught:
        read_dicom(data[: len(data) - 200], name="cut.dcm")
    assert caught.value.code in {"truncated", "undecodable"}


def test_no_pixel_data_is_refused() -> None:
    ds = make_dataset(STORED)
    del ds.PixelData
    with pytest.raises(ImageError, match=r"'sr\.dcm' has no pixel data") as caught:
        read_dicom(to_bytes(ds), name="sr.dcm")
    assert caught.value.code == "no_pixel_data"


def test_multi_frame_is_refused() -> None:
    frames = np.stack([STORED, STORED])
    with pytest.raises(ImageError, match=r"'cine\.dcm' holds 2 frames.*single-frame") as caught:
        read_dicom(to_bytes(make_dataset(frames)), name="cine.dcm")
    assert caught.value.code == "multi_frame"


def test_an_unsupported_transfer_syntax_is_refused() -> None:
    ds = encapsulated(make_dataset(STORED), b"\x00\x00\x01\xb3" + bytes(60), uid.MPEG2MPML)
    with pytest.raises(ImageError, match=r"'video\.dcm' uses transfer syntax MPEG2") as caught:
        read_dicom(to_bytes(ds), name="video.dcm")
    assert caught.value.code == "unsupported_transfer_syntax"


def test_too_many_pixels_are_refused_before_decoding() -> None:
    with pytest.raises(ImageError, match="over the limit of 100") as caught:
        read_dicom(to_bytes(make_dataset(STORED)), max_pixels=100)
    assert caught.value.code == "too_many_pixels"


def test_palette_colour_is_refused() -> None:
    path = Path(get_testdata_file("examples_palette.dcm", download=False) or "")
    with pytest.raises(ImageError, match="PALETTE COLOR") as caught:
        read_dicom(path.read_bytes(), name=path.name)
    assert caught.value.code == "unsupported_format"


def test_a_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist") as caught:
        read_dicom_file(tmp_path / "nowhere.dcm")
    assert caught.value.code == "missing_file"
