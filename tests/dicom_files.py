"""Synthetic DICOM files for the tests, made with pydicom (and imagecodecs for the
compressed transfer syntaxes pydicom cannot encode)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

#: What a hospital export carries that must never come out of covidcxr.
IDENTITY = {
    "PatientName": "Zyxwv^Quentina",
    "PatientID": "MRN-7733119",
    "PatientBirthDate": "19580214",
    "InstitutionName": "Saint Ozymandias Infirmary",
    "AccessionNumber": "ACC-55219904",
}


def radiograph(rows: int = 64, columns: int = 48, *, bits: int = 12, seed: int = 0) -> NDArray[Any]:
    """Smooth unsigned stored values using the full range of ``bits`` (uint16)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    ramp = (x / max(columns - 1, 1) + y / max(rows - 1, 1)) / 2
    noise = rng.normal(0, 0.02, (rows, columns))
    values = np.clip(ramp + noise, 0, 1) * (2**bits - 1)
    return np.rint(values).astype(np.uint16)


def make_dataset(
    stored: NDArray[Any],
    *,
    bits_stored: int = 12,
    bits_allocated: int | None = None,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    syntax: UID = ExplicitVRLittleEndian,
    identity: bool = True,
    **attributes: Any,
) -> Dataset:
    """A DX image with ``stored`` as native (uncompressed) pixel data."""
    allocated = bits_allocated or (8 if stored.dtype.itemsize == 1 else 16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.PatientSex = "F"
    ds.StudyDate = "20200317"
    if identity:
        for keyword, value in IDENTITY.items():
            setattr(ds, keyword, value)
    frames = 1 if stored.ndim == 2 else stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    dtype = f"<{'i' if signed else 'u'}{allocated // 8}"
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def encapsulated(ds: Dataset, frame: bytes, syntax: UID) -> Dataset:
    """``ds`` with its pixel data replaced by one compressed frame."""
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


def to_bytes(ds: Dataset, *, implicit: bool = False) -> bytes:
    """``ds`` as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    if implicit:
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2")
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
