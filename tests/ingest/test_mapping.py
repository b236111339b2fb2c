"""Mapping files, and ingesting a source in another layout through one."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import encode, xray_like
from covidcxr.errors import MappingError, MetadataError
from covidcxr.ingest.mapping import load_mapping
from covidcxr.ingest.pipeline import check_source, ingest_source
from covidcxr.ingest.report import Action
from covidcxr.store import queries
from covidcxr.store.db import open_store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mappings"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mapping.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_full_mapping_is_read(tmp_path: Path) -> None:
    mapping = load_mapping(
        write_toml(
            tmp_path,
            """
[source]
name = "other"
images = "pics"
encoding = "cp1252"
delimiter = ";"
[columns]
filename = "imagename"
"Patient Age" = "Alter"
[constants]
modality = "X-ray"
[values.view]
"AP erect" = "AP Erect"
[values.finding]
"Covid" = "COVID-19"
[findings]
separator = "+"
""",
        )
    )
    assert mapping.name == "other" and mapping.images == "pics"
    assert mapping.encoding == "cp1252" and mapping.delimiter == ";"
    assert mapping.columns == {"filename": "imagename", "age_years": "Alter"}
    assert mapping.constants == {"modality": "X-ray"}
    assert mapping.values["view"] == {"AP erect": "AP Erect"}
    assert mapping.finding_map == {"Covid": "COVID-19"}
    assert mapping.finding_separator == "+"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[source\nname=1", "not valid TOML"),
        ("[sauce]\nname='x'", r"unknown section\(s\) \['sauce'\]"),
        ("[source]\nfolder='x'", r"\[source\] has unknown key"),
        ("[source]\nname=3", r"\[source\] name must be a string"),
        ("[columns]\nfilname='x'", "unknown column 'filname'; did you mean filename"),
        ("[columns]\nfilename=3", "expected a string"),
        ("[columns]\nmodality='m'\n[constants]\nmodality='X-ray'", "both in"),
        ("[values]\nview='x'", r"\[values.view\] must be a table"),
        ("[findings]\nsep='|'", "takes only separator, strip, uncertain_marker"),
        ("[findings]\nseparator=''", "separator must be"),
        ("[source]\ndelimiter=';;'", "must be one character"),
    ],
)
def test_bad_mappings_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        load_mapping(write_toml(tmp_path, text))


def test_missing_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="cannot read"):
        load_mapping(tmp_path / "none.toml")


def other_source(tmp_path: Path) -> Path:
    """A source in another layout: cp1252, ';'-separated, other column names."""
    root = tmp_path / "other"
    (root / "pics").mkdir(parents=True)
    for index in range(4):
        (root / "pics" / f"img{index}.png").write_bytes(encode(xray_like(10 + index)))
    lines = [
        "imagename;case;Alter;Geschlecht;projection;diagnosis;site",
        "img0.png;A1;50+;M;AP erect;Covid;Zürich",
        "img1.png;A1;61;M;PA;Covid+ARDS;Zürich",
        "img2.png;B7;44;W;AP erect;Normal;Genève",
        "img3.png;C2;38;F;PA;Influenza;Genève",
    ]
    (root / "table.csv").write_bytes(("\n".join(lines) + "\n").encode("cp1252"))
    return root


OTHER_MAPPING = """
[source]
name = "other-hospital"
metadata = "table.csv"
images = "pics"
encoding = "cp1252"
delimiter = ";"
[columns]
filename = "imagename"
patientid = "case"
age = "Alter"
sex = "Geschlecht"
view = "projection"
finding = "diagnosis"
location = "site"
[constants]
modality = "X-ray"
[values.sex]
"W" = "F"
[values.finding]
"Covid" = "COVID-19"
[findings]
separator = "+"
"""


def test_ingest_other_layout_through_a_mapping(tmp_path: Path) -> None:
    root = other_source(tmp_path)
    mapping = load_mapping(write_toml(tmp_path, OTHER_MAPPING))
    with open_store(f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path / "data", create=True) as store:
        outcome = ingest_source(root, store, mapping=mapping)
        with store.read() as conn:
            rows = {r["filename"]: r for r in queries.list_records(conn)}
    assert outcome.scan.spec.name == "other-hospital"
    assert outcome.summary.counts["records_added"] == 4
    assert rows["img0.png"]["view"] == "AP Erect" and rows["img0.png"]["modality"] == "X-ray"
    assert rows["img0.png"]["findings"] == ["Pneumonia/Viral/COVID-19"]
    assert rows["img1.png"]["findings"] == ["Pneumonia/Viral/COVID-19", "ARDS"]
    assert rows["img2.png"]["sex"] == "F" and rows["img2.png"]["findings"] == ["No Finding"]
    assert rows["img2.png"]["location"] == "Genève"
    # "50+" is reported, not guessed.
    assert rows["img0.png"]["age_years"] is None
    (age_issue,) = [i for i in outcome.scan.report.issues if i.column == "age"]
    assert age_issue.value == "50+" and age_issue.row == 2 and age_issue.file == "table.csv"


def test_mapping_naming_a_missing_column_is_refused(tmp_path: Path) -> None:
    root = other_source(tmp_path)
    text = OTHER_MAPPING.replace('patientid = "case"', 'patientid = "Fall"')
    mapping = load_mapping(write_toml(tmp_path, text))
    with pytest.raises(MappingError, match="names column 'Fall' for patient_id"):
        check_source(root, mapping=mapping)


def test_source_without_required_column_is_refused(tmp_path: Path) -> None:
    root = other_source(tmp_path)
    text = OTHER_MAPPING.replace('patientid = "case"\n', "")
    mapping = load_mapping(write_toml(tmp_path, text))
    with pytest.raises(MetadataError, match=r"no patientid column \(required\)"):
        check_source(root, mapping=mapping)


def test_headers_are_matched_by_alias_without_a_mapping(tmp_path: Path) -> None:
    root = tmp_path / "aliases"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(encode(xray_like(1)))
    (root / "metadata.csv").write_text(
        "Patient ID,imagename,folder,Patient Age,WBC count,clinical notes\n"
        "9,a.png,images,40,7.5,stable\n",
        encoding="utf-8",
    )
    scan = check_source(root)
    (scanned,) = scan.records
    assert scanned.record.patient_id == "9" and scanned.record.age_years == 40
    assert scanned.record.leukocyte_count_k_per_ul == 7.5
    assert scanned.record.clinical_notes == "stable"
    assert scanned.image_status == "stored"


@pytest.mark.shared_data
def test_nih_subset_through_the_shipped_mapping(nih_dir: Path, tmp_path: Path) -> None:
    mapping = load_mapping(EXAMPLES / "nih-cxr14-subset.toml")
    scan = check_source(nih_dir, mapping=mapping)
    report = scan.report
    assert report.counts["records"] == 1000 and report.counts["images_stored"] == 1000
    assert report.errors == [] and report.warnings == []
    by_code = report.by_code()
    assert by_code["pediatric"] > 0  # NIH has children: flagged, never silently kept
    paths = {f.path_str for s in scan.records for f in s.record.findings}
    assert {"No Finding", "Pneumonia", "Infiltration"} <= paths
    first = scan.records[0]
    assert first.extra["Image Index"].endswith(".png")
    assert first.extra["OriginalImage[Width]"].isdigit()


# ---------------------------------------------------------------- files named their own way


def named_by_patient(tmp_path: Path) -> Path:
    """A source without a file column: each image is named after its patient id, with
    extensions that differ; one header feeds two of our columns."""
    root = tmp_path / "named"
    (root / "scans").mkdir(parents=True)
    (root / "scans" / "P-001.png").write_bytes(encode(xray_like(1)))
    (root / "scans" / "P-002.jpg").write_bytes(encode(xray_like(2), "JPEG"))
    (root / "scans" / "P-002.txt").write_text("notes, not an image\n")
    (root / "cases.csv").write_text(
        "Patient,Age,Ward\nP-001,50+,ICU 3\nP-002,early 40s,ER\nP-003,67,ER\n",
        encoding="utf-8",
    )
    return root


NAMED_MAPPING = """
[source]
metadata = "cases.csv"
images = "scans"
[columns]
patientid = "Patient"
filename = "{patientid}.*"
age = "Age"
location = "Ward"
clinical_notes = "Ward"
[constants]
modality = "X-ray"
[values.age]
"50+" = "50"
"""


def test_file_names_from_a_pattern_with_the_extension_looked_up(tmp_path: Path) -> None:
    root = named_by_patient(tmp_path)
    scan = check_source(root, mapping=load_mapping(write_toml(tmp_path, NAMED_MAPPING)))
    records = {s.record.patient_id: s for s in scan.records}
    assert records["P-001"].record.filename == "P-001.png"
    assert records["P-002"].record.filename == "P-002.jpg"  # an image wins over .txt
    assert records["P-001"].image_status == records["P-002"].image_status == "stored"
    assert records["P-003"].image_status == "missing"
    missing = [i for i in scan.report.issues if i.code == "image_missing"]
    assert [(i.row, i.value) for i in missing] == [(4, "scans/P-003.*")]
    # one header, two columns
    assert records["P-001"].record.location == records["P-001"].record.clinical_notes == "ICU 3"
    # an explicit value map for a free-text age; the others are reported, not guessed
    assert records["P-001"].record.age_years == 50
    assert records["P-002"].record.age_years is None
    (age_issue,) = [i for i in scan.report.issues if i.column == "age"]
    assert (age_issue.row, age_issue.value) == (3, "early 40s")


def test_patterns_take_format_specs_and_regular_expressions(tmp_path: Path) -> None:
    root = tmp_path / "study"
    (root / "files" / "p10" / "s77").mkdir(parents=True)
    (root / "files" / "p10" / "s77" / "ab12.png").write_bytes(encode(xray_like(3)))
    (root / "meta.csv").write_text(
        "subject,study,image,source_path\n"
        "10042,77,ab12,site/patient10042/x\n"
        "10042,77,zz99,nothing-to-match\n",
        encoding="utf-8",
    )
    text = """
[source]
metadata = "meta.csv"
[columns]
patientid = { header = "source_path", pattern = "(patient\\\\d+)" }
filename = "files/p{subject:.2}/s{study}/{image}.*"
"""
    scan = check_source(root, mapping=load_mapping(write_toml(tmp_path, text)))
    first = scan.records[0]
    assert first.record.patient_id == "patient10042"
    assert first.record.filename == "files/p10/s77/ab12.png" and first.image_status == "stored"
    blank = [i for i in scan.report.issues if i.code == "underived_value"]
    assert [(i.row, i.column) for i in blank] == [(3, "patientid")]
    assert "does not match" in blank[0].message


def test_a_list_of_headers_takes_the_first_value_present(tmp_path: Path) -> None:
    root = named_by_patient(tmp_path)
    (root / "cases.csv").write_text(
        "Patient,Projection,Orientation\nP-001,,Lateral\nP-002,AP,Frontal\n", encoding="utf-8"
    )
    text = (
        NAMED_MAPPING.replace('age = "Age"\nlocation = "Ward"\nclinical_notes = "Ward"\n', "")
        .replace('"{patientid}.*"', '"{patientid}.*"\nview = ["Projection", "Orientation"]')
        .replace('"50+" = "50"', '"50+" = "50"\n[values.view]\n"Lateral" = "L"')
    )
    scan = check_source(root, mapping=load_mapping(write_toml(tmp_path, text)))
    views = {s.record.patient_id: s.record.view for s in scan.records}
    assert views == {"P-001": "L", "P-002": "AP"}


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ('filename = "{nothere}.*"', r"derives filename from 'nothere', but cases.csv has no"),
        ('filename = { header = "Patient", pattern = "(" }', "pattern '\\(' is not valid"),
        ('filename = "{}.png"', "name a column in each"),
        ("filename = 3", "expected a string"),
    ],
)
def test_bad_patterns_are_refused(tmp_path: Path, columns: str, message: str) -> None:
    root = named_by_patient(tmp_path)
    text = NAMED_MAPPING.replace('filename = "{patientid}.*"', columns)
    with pytest.raises(MappingError, match=message):
        check_source(root, mapping=load_mapping(write_toml(tmp_path, text)))


def test_a_second_table_is_joined_row_by_row(tmp_path: Path) -> None:
    root = named_by_patient(tmp_path)
    (root / "diagnoses.csv").write_text("Patient,Diagnosis\nP-001,COVID-19\n", encoding="utf-8")
    text = NAMED_MAPPING.replace(
        'images = "scans"', 'images = "scans"\njoin = "diagnoses.csv"\njoin_on = "Patient"'
    ).replace('age = "Age"', 'age = "Age"\nfinding = "Diagnosis"')
    scan = check_source(root, mapping=load_mapping(write_toml(tmp_path, text)))
    findings = {s.record.patient_id: s.record.finding for s in scan.records}
    assert findings == {"P-001": "COVID-19", "P-002": None, "P-003": None}
    unmatched = [i.row for i in scan.report.issues if i.code == "join_missing"]
    assert unmatched == [3, 4]


def test_a_given_encoding_reports_the_row_and_byte_of_undecodable_values(
    tmp_path: Path,
) -> None:
    root = other_source(tmp_path)
    table = (root / "table.csv").read_bytes()
    # 0x81 is undefined in cp1252: a file mislabelled or damaged on the way
    (root / "table.csv").write_bytes(table.replace("Genève".encode("cp1252"), b"Gen\x81ve", 1))
    scan = check_source(root, mapping=load_mapping(write_toml(tmp_path, OTHER_MAPPING)))
    (issue,) = [i for i in scan.report.issues if i.code == "undecodable_value"]
    assert (issue.file, issue.row, issue.action) == ("table.csv", 4, Action.ROW_SKIPPED)
    assert "byte 0x81 at offset" in issue.message and "not valid cp1252" in issue.message
    assert sorted(s.record.filename for s in scan.records) == ["img0.png", "img1.png", "img3.png"]
    assert scan.records[0].record.location == "Zürich"  # the rest decoded as cp1252
