"""DICOM sources: a folder of DICOM files as a source of its own, DICOM files named by a
table, and no patient identity anywhere afterwards (store, blobs, reports, logs,
exports)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("pydicom")
from pydicom import dcmread

from covidcxr.errors import MappingError
from covidcxr.export import export_records
from covidcxr.ingest.mapping import load_mapping
from covidcxr.ingest.pipeline import check_source, ingest_source
from covidcxr.store import queries
from covidcxr.store.db import open_store
from dicom_files import IDENTITY, make_dataset, radiograph, to_bytes

STRINGS = [*IDENTITY.values(), "Zyxwv", "Ozymandias", "Ozzie^Other", "MRN-0000042"]


def pacs_export(root: Path) -> Path:
    """Two studies of one patient, one of another, a truncated file, a text file."""
    root.mkdir(parents=True)
    pixels = radiograph(300, 260)
    first = make_dataset(pixels, StudyDate="20200317", PatientAge="061Y")
    later = make_dataset(pixels[::-1], StudyDate="20200329", ViewPosition="LL")
    other = make_dataset(pixels[:, ::-1], PatientName="Ozzie^Other", PatientID="MRN-0000042")
    other.PatientSex, other.BurnedInAnnotation = "M", "YES"
    (root / "IM0001").write_bytes(to_bytes(first))
    (root / "series2").mkdir()
    (root / "series2" / "IM0002.dcm").write_bytes(to_bytes(later))
    (root / "IM0003").write_bytes(to_bytes(other))
    (root / "IM0004").write_bytes(to_bytes(make_dataset(pixels))[:-700])
    (root / "DICOMDIR.txt").write_text("exported by PACS\n")
    return root


def test_a_dicom_folder_is_a_source_of_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = pacs_export(tmp_path / "export")
    data_dir = tmp_path / "data"
    with (
        caplog.at_level(logging.DEBUG),
        open_store(f"sqlite:///{tmp_path / 's.db'}", data_dir, create=True) as store,
    ):
        outcome = ingest_source(root, store, workers=1)
        again = ingest_source(root, store, workers=1)  # re-ingest: same pseudonyms
        with store.read() as conn:
            rows = {r["filename"]: r for r in queries.list_records(conn)}
        export_records(store, tmp_path / "out.csv", "upstream-csv")
    assert outcome.scan.spec.kind == "dicom"
    assert sorted(rows) == ["IM0001", "IM0003", "series2/IM0002.dcm"]
    first, later, other = rows["IM0001"], rows["series2/IM0002.dcm"], rows["IM0003"]
    assert first["patient_id"] == later["patient_id"] != other["patient_id"]
    assert first["patient_id"].startswith("anon-")
    assert (first["offset_days"], later["offset_days"]) == (0, 12)
    assert (first["view"], later["view"], first["modality"]) == ("PA", "L", "X-ray")
    assert (first["age_years"], first["sex"], other["sex"]) == (61, "F", "M")
    assert not again.summary.changed
    issues = {(i.file, i.code) for i in outcome.scan.report.issues}
    assert ("IM0004", "truncated") in issues
    assert ("DICOMDIR.txt", "unsupported_format") in issues
    assert ("IM0003", "dicom_deidentification") in issues  # burned-in annotation
    blobs = [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 3 and all(p.read_bytes().startswith(b"\x89PNG") for p in blobs)
    assert (data_dir / "deid.key").stat().st_mode & 0o777 == 0o600
    written = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents]
    everything = b"".join(p.read_bytes() for p in written) + caplog.text.encode()
    assert [text for text in STRINGS if text.encode() in everything] == []


def test_check_reads_a_dicom_folder_without_a_store(tmp_path: Path) -> None:
    scan = check_source(pacs_export(tmp_path / "export"), workers=1)
    assert len(scan.records) == 3
    assert len({s.record.patient_id for s in scan.records}) == 2
    assert not (tmp_path / "export" / "deid.key").exists()


def test_a_table_may_name_dicom_files(tmp_path: Path) -> None:
    root = pacs_export(tmp_path / "site")
    (root / "cases.csv").write_text(
        "case,image,diagnosis\nc1,IM0001,COVID-19\nc1,series2/IM0002.dcm,COVID-19\n",
        encoding="utf-8",
    )
    mapping = tmp_path / "site.toml"
    mapping.write_text(
        '[source]\nmetadata = "cases.csv"\n[columns]\npatientid = "case"\n'
        'filename = "image"\nfinding = "diagnosis"\n[constants]\nmodality = "X-ray"\n',
        encoding="utf-8",
    )
    data_dir = tmp_path / "data"
    with open_store(f"sqlite:///{tmp_path / 's.db'}", data_dir, create=True) as store:
        outcome = ingest_source(root, store, mapping=load_mapping(mapping), workers=1)
        with store.read() as conn:
            rows = {r["filename"]: r for r in queries.list_records(conn)}
    assert outcome.summary.counts["records_added"] == 2
    assert rows["IM0001"]["findings"] == ["Pneumonia/Viral/COVID-19"]
    blobs = [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in blobs)
    stored = b"".join(p.read_bytes() for p in blobs)
    assert [text for text in STRINGS if text.encode() in stored] == []


@pytest.mark.parametrize("keyword", ["AccessionNumber", "SOPInstanceUID"])
def test_table_rows_join_dicom_files_by_an_attribute(tmp_path: Path, keyword: str) -> None:
    root = pacs_export(tmp_path / "site")
    value = {
        "AccessionNumber": IDENTITY["AccessionNumber"],
        "SOPInstanceUID": str(dcmread(root / "IM0003").SOPInstanceUID),
    }[keyword]
    (root / "cases.csv").write_text(
        f"case,ref,diagnosis\nc1,{value},COVID-19\nc2,ACC-NOT-THERE,Unknown\n", encoding="utf-8"
    )
    mapping = tmp_path / "site.toml"
    mapping.write_text(
        f'[source]\nmetadata = "cases.csv"\ndicom_match = "{keyword}"\n[columns]\n'
        'patientid = "case"\nfilename = "ref"\nfinding = "diagnosis"\n',
        encoding="utf-8",
    )
    data_dir = tmp_path / "data"
    with open_store(f"sqlite:///{tmp_path / 's.db'}", data_dir, create=True) as store:
        outcome = ingest_source(root, store, mapping=load_mapping(mapping), workers=1)
        with store.read() as conn:
            rows = list(queries.list_records(conn))
    issues = outcome.scan.report.issues
    if keyword == "AccessionNumber":  # three files share the accession: ambiguous
        assert [(i.code, i.row) for i in issues if i.code.startswith("dicom_")] == [
            ("dicom_ambiguous", 2),
            ("dicom_unmatched", 3),
        ]
        assert rows == []
    else:
        assert [(r["patient_id"], r["filename"]) for r in rows] == [("c1", "IM0003")]
        assert ("dicom_unmatched", 3) in [(i.code, i.row) for i in issues]
    written = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    assert IDENTITY["AccessionNumber"].encode() not in written
    assert "ACC-NOT-THERE" not in " ".join(i.message + i.value for i in issues)


def test_a_bad_dicom_match_keyword_is_refused(tmp_path: Path) -> None:
    mapping = tmp_path / "m.toml"
    mapping.write_text('[source]\ndicom_match = "PatientName"\n', encoding="utf-8")
    with pytest.raises(MappingError, match="dicom_match 'PatientName': expected one of"):
        load_mapping(mapping)
