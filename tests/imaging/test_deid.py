"""De-identification: the PS3.15 Basic Profile from its table, keyed pseudonyms and UIDs,
day offsets, and no patient identity in anything predict shows."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from covidcxr.errors import StoreError
from covidcxr.imaging.deid import (
    KEY_FILE,
    day_offsets,
    deidentified_bytes,
    deidentify,
    deidentify_image,
    keyed_uid,
    load_key,
    profile_actions,
    pseudonym,
)
from covidcxr.imaging.dicom import read_dicom
from dicom_files import IDENTITY, make_dataset, radiograph, to_bytes

IMAGE = radiograph(300, 260)
STRINGS = [value.encode() for value in IDENTITY.values()] + [b"Zyxwv", b"Ozymandias"]


def identified() -> Dataset:
    """A DX image carrying identity at the top level, in a nested sequence, in a
    private tag, and in dates."""
    ds = make_dataset(IMAGE, OperatorsName="Opal^Nurse", StudyTime="101500")
    request = Dataset()
    request.AccessionNumber = IDENTITY["AccessionNumber"]
    request.RequestedProcedureID = "RP-3141"
    anatomy = Dataset()  # a sequence the profile keeps, holding one it does not
    anatomy.CodeValue = "T-D3000"
    anatomy.PatientName = IDENTITY["PatientName"]
    ds.RequestAttributesSequence = Sequence([request])
    ds.AnatomicRegionSequence = Sequence([anatomy])
    block = ds.private_block(0x0009, "ACME PACS", create=True)
    block.add_new(0x01, "LO", IDENTITY["InstitutionName"])
    return ds


@pytest.fixture
def key(tmp_path: Path) -> bytes:
    return load_key(tmp_path / "store")


def test_the_profile_comes_from_the_standards_table() -> None:
    rules = profile_actions()
    assert len(rules.exact) > 500  # Table E.1-1 lists several hundred attributes
    assert rules.exact[0x00100010] == "Z"  # Patient's Name
    assert rules.exact[0x00080080] == "X"  # Institution Name (X/Z/D)
    assert rules.exact[0x00080018] == "U"  # SOP Instance UID
    overlay_comments = Dataset()
    overlay_comments.add_new(0x60024000, "LT", "x")
    assert rules.action(overlay_comments[0x60024000].tag) == "X"  # a repeating group


def test_identity_is_gone_from_the_written_file(key: bytes) -> None:
    original = to_bytes(identified())
    assert all(text in original for text in STRINGS)
    result = deidentify(read_dicom(original, name="a.dcm").dataset, key, name="a.dcm")
    written = deidentified_bytes(result)
    assert [text for text in STRINGS if text in written] == []
    for gone in (b"Opal", b"RP-3141", b"20200317", b"101500", b"ACME"):
        assert gone not in written
    ds = dcmread(io.BytesIO(written))
    assert ds.PatientID == ds.PatientName == result.patient_pseudonym
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert "RequestAttributesSequence" not in ds
    assert ds.AnatomicRegionSequence[0].CodeValue == "T-D3000"  # kept, cleaned inside
    assert ds.Modality == "DX" and ds.ViewPosition == "PA"  # what the collection needs
    np.testing.assert_array_equal(ds.pixel_array, IMAGE)


def test_the_input_dataset_is_left_untouched(key: bytes) -> None:
    ds = identified()
    deidentify(ds, key)
    assert ds.PatientID == IDENTITY["PatientID"]


def test_pseudonyms_and_uids_are_keyed_and_stable(tmp_path: Path) -> None:
    first = load_key(tmp_path / "store")
    again = load_key(tmp_path / "store")  # a re-ingest reads the same key
    other = load_key(tmp_path / "elsewhere")
    assert first == again and first != other
    ds = identified()
    a, b, c = deidentify(ds, first), deidentify(ds, again), deidentify(ds, other)
    assert a.patient_pseudonym == b.patient_pseudonym != c.patient_pseudonym
    assert a.patient_pseudonym == pseudonym(first, f"id:|{IDENTITY['PatientID']}")
    uid = a.dataset.SOPInstanceUID
    assert uid == keyed_uid(first, ds.SOPInstanceUID) == b.dataset.SOPInstanceUID
    assert uid == a.dataset.file_meta.MediaStorageSOPInstanceUID
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert uid != c.dataset.SOPInstanceUID


def test_without_a_patient_id_the_name_and_birth_date_identify_the_patient(
    key: bytes,
) -> None:
    ds = identified()
    ds.PatientID = ""
    result = deidentify(ds, key, name="b.dcm")
    assert result.patient_pseudonym == pseudonym(
        key, f"name:{IDENTITY['PatientName'].upper()}|{IDENTITY['PatientBirthDate']}"
    )
    assert result.warnings == (
        "b.dcm: no PatientID, pseudonym from PatientName and PatientBirthDate",
    )


def test_burned_in_annotation_is_flagged(key: bytes) -> None:
    ds = identified()
    ds.BurnedInAnnotation = "YES"
    result = deidentify(ds, key, name="c.dcm")
    assert result.burned_in_annotation
    assert any("c.dcm: BurnedInAnnotation is YES" in note for note in result.warnings)
    ds.BurnedInAnnotation = "NO"
    assert not deidentify(ds, key).burned_in_annotation


def test_the_key_file_is_private_and_checked(tmp_path: Path) -> None:
    load_key(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    path.write_bytes(b"short")
    with pytest.raises(StoreError, match=r"deid\.key.*5 bytes.*backup"):
        load_key(tmp_path)


def test_a_readable_key_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_key(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_key(tmp_path)
    assert "chmod 600" in caplog.text


def test_day_offsets_count_from_each_patients_first_study() -> None:
    studies = [
        ("p1", dt.date(2020, 3, 10)),
        ("p2", dt.date(2021, 1, 1)),
        ("p1", dt.date(2020, 3, 1)),
        ("p1", None),
        ("p2", dt.date(2021, 1, 4)),
    ]
    assert day_offsets(studies) == [9, 0, 0, None, 3]


def test_header_warnings_never_quote_values(key: bytes, caplog: pytest.LogCaptureFixture) -> None:
    too_long = "Zyxwvlongname" * 6  # a PN component over 64 characters: pydicom warns
    ds = identified()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientName = too_long
        data = to_bytes(ds)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        deidentify(read_dicom(data, name="d.dcm").dataset, key, name="d.dcm")
    assert "details withheld" in caplog.text
    assert "Zyxwv" not in caplog.text


# ---------------------------------------------------------------- predict


def test_predict_on_identified_dicom_shows_no_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("torch")
    from covidcxr.cli import main
    from covidcxr.models.predict import random_bundle

    bundle = tmp_path / "model"
    random_bundle(bundle, model_id="t", width=8, gate_bias=(8.0, 0.0, 0.0, 0.0, 0.0), onnx=False)
    folder = tmp_path / "export"
    folder.mkdir()
    ds = identified()
    ds.BurnedInAnnotation = "YES"
    (folder / "IM0001").write_bytes(to_bytes(ds))  # PACS exports often have no extension
    (folder / "IM0002").write_bytes(to_bytes(identified())[:-500])  # cut short
    outputs = []
    with caplog.at_level(logging.DEBUG):
        for form in ("table", "csv", "json"):
            args = ["predict", str(folder), "--model", str(bundle), "--format", form]
            main([*args, "--heatmaps", str(tmp_path / f"maps-{form}")])
            outputs.append(capsys.readouterr())
    rows = json.loads(outputs[2].out)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [row["input_check"] for row in rows] == ["pass", "fail"], rows
    assert "IM0002" in rows[1]["reason"] and "truncated" in rows[1]["reason"]
    assert "burned-in annotation" in caplog.text
    shown = "".join(o.out + o.err for o in outputs) + caplog.text
    maps = b"".join(p.read_bytes() for p in tmp_path.glob("maps-*/*"))
    assert maps  # heatmap overlays were written (and checked below)
    for text in STRINGS:
        assert text.decode() not in shown
        assert text not in maps


def test_deidentify_image_keeps_pixels_as_png_and_no_header(key: bytes) -> None:
    ds = identified()
    ds.PatientAge = "061Y"
    kept = deidentify_image(to_bytes(ds), key, name="e.dcm")
    assert kept.png.startswith(b"\x89PNG")
    assert [text for text in STRINGS if text in kept.png] == []
    assert kept.patient_pseudonym == deidentify(ds, key).patient_pseudonym
    assert kept.sop_instance_uid == keyed_uid(key, ds.SOPInstanceUID)
    assert (kept.metadata.age_years, kept.metadata.view_position) == (61.0, "PA")
    with Image.open(io.BytesIO(kept.png)) as png:
        expected = np.asarray(read_dicom(to_bytes(ds)).image)
        np.testing.assert_array_equal(np.asarray(png), expected)
