"""Built-in mappings (``--preset``) for the big public sets, each on a few synthetic rows
in that set's published layout (the real sets are not here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import encode, xray_like
from covidcxr.errors import MappingError
from covidcxr.ingest.mapping import UNCERTAIN_EXTRA, load_preset, preset_names
from covidcxr.ingest.pipeline import check_source
from covidcxr.ingest.scanned import ScannedRecord

CHEXPERT_LABELS = (
    "No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,"
    "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
MIMIC_LABELS = (
    "Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
    "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
    "Pneumothorax,Support Devices"
)
PADCHEST_HEADER = (
    "ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
    "ViewPosition_DICOM,Projection,MethodProjection,Pediatric,Modality_DICOM,"
    "Manufacturer_DICOM,PhotometricInterpretation_DICOM,PixelRepresentation_DICOM,"
    "PixelAspectRatio_DICOM,SpatialResolution_DICOM,BitsStored_DICOM,WindowCenter_DICOM,"
    "WindowWidth_DICOM,Rows_DICOM,Columns_DICOM,XRayTubeCurrent_DICOM,Exposure_DICOM,"
    "ExposureInuAs_DICOM,ExposureTime,RelativeXRayExposure_DICOM,ReportID,Report,"
    "MethodLabel,Labels,Localizations,LabelsLocalizationsBySentence,labelCUIS,"
    "LocalizationsCUIS"
)


def image(root: Path, relative: str, seed: int, fmt: str = "PNG") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(xray_like(seed), fmt))


def write(root: Path, name: str, lines: list[str]) -> None:
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def by_file(records: list[ScannedRecord]) -> dict[str, ScannedRecord]:
    return {Path(s.record.relative_path).name: s for s in records}


def test_the_presets_are_the_big_public_sets() -> None:
    assert preset_names() == ("chexpert", "mimic-cxr", "nih-cxr14", "openi", "padchest")
    for name in preset_names():
        assert load_preset(name).name == name
    with pytest.raises(MappingError, match="no preset 'chexpret'; built in: chexpert"):
        load_preset("chexpret")


def test_chexpert(tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    files = [
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00002/study2/view1_frontal.jpg",
        "train/patient00002/study1/view2_lateral.jpg",
    ]
    for seed, relative in enumerate(files):
        image(root, relative, seed, "JPEG")
    write(
        root,
        "train.csv",
        [
            f"Path,Sex,Age,Frontal/Lateral,AP/PA,{CHEXPERT_LABELS}",
            f"CheXpert-v1.0-small/{files[0]},Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
            f"CheXpert-v1.0-small/{files[1]},Female,87,Frontal,PA,,,-1.0,1.0,,-1.0,-1.0,,"
            "-1.0,,-1.0,,1.0,",
            f"CheXpert-v1.0-small/{files[2]},Unknown,83,Lateral,,,,,1.0,,,,1.0,,0.0,,,,",
        ],
    )
    scan = check_source(root, mapping=load_preset("chexpert"))
    rows = {s.record.relative_path: s for s in scan.records}
    assert sorted(rows) == sorted(files)
    first, second, lateral = (rows[f] for f in files)
    assert all(s.image_status == "stored" for s in rows.values())
    assert first.record.patient_id == "patient00001" and first.record.view == "AP"
    assert first.record.sex == "F" and first.record.age_years == 68
    assert [f.path_str for f in first.record.findings] == ["No Finding"]
    assert second.record.findings == () and second.record.view == "PA"
    assert second.extra[UNCERTAIN_EXTRA] == "Cardiomegaly|Edema|Consolidation|Atelectasis|Effusion"
    assert second.extra["Lung Opacity"] == "1.0"  # no node in the hierarchy: kept as is
    assert lateral.record.view == "L" and lateral.record.sex is None
    assert [f.path_str for f in lateral.record.findings] == ["Pneumonia"]
    assert UNCERTAIN_EXTRA not in lateral.extra


def test_mimic_cxr(tmp_path: Path) -> None:
    root = tmp_path / "mimic-cxr-jpg"
    ids = [
        ("02aa804e-bde0afdd", "10000032", "50414267"),
        ("174413ec-4ec4c1f7", "10000032", "53189527"),
    ]
    ids.append(("2a2277a9-b0ded155", "11000011", "56699142"))
    for seed, (dicom_id, subject, study) in enumerate(ids):
        image(root, f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg", seed, "JPEG")
    write(
        root,
        "mimic-cxr-2.0.0-metadata.csv",
        [
            "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,"
            "Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,"
            "ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning",
            f"{ids[0][0]},{ids[0][1]},{ids[0][2]},CHEST (PA AND LAT),PA,3056,2544,21800506,"
            "213014.531,CHEST (PA AND LAT),postero-anterior,Erect",
            f"{ids[1][0]},{ids[1][1]},{ids[1][2]},CHEST (PA AND LAT),LATERAL,3056,2544,"
            "21800626,165500.312,CHEST (PA AND LAT),lateral,Erect",
            f"{ids[2][0]},{ids[2][1]},{ids[2][2]},CHEST (PORTABLE AP),AP,2544,3056,21520708,"
            "224550.171,CHEST (PORTABLE AP),antero-posterior,",
        ],
    )
    write(
        root,
        "mimic-cxr-2.0.0-chexpert.csv",
        [
            f"subject_id,study_id,{MIMIC_LABELS}",
            "10000032,50414267,,,,,,,,,1.0,,,,,",
            "10000032,53189527,,,,-1.0,,,,,,1.0,,,,",
            "11000011,56699142,1.0,,,,,,,1.0,,,,-1.0,,1.0",
        ],
    )
    scan = check_source(root, mapping=load_preset("mimic-cxr"))
    rows = {s.record.patient_id + "/" + s.record.filename: s for s in scan.records}
    first = rows[f"10000032/files/p10/p10000032/s50414267/{ids[0][0]}.jpg"]
    second = rows[f"10000032/files/p10/p10000032/s53189527/{ids[1][0]}.jpg"]
    third = rows[f"11000011/files/p11/p11000011/s56699142/{ids[2][0]}.jpg"]
    assert all(s.image_status == "stored" for s in rows.values())
    assert [f.path_str for f in first.record.findings] == ["No Finding"]
    assert first.record.view == "PA" and second.record.view == "L"
    assert [f.path_str for f in second.record.findings] == ["Effusion"]
    assert second.extra[UNCERTAIN_EXTRA] == "Edema"
    assert [f.path_str for f in third.record.findings] == ["Atelectasis"]
    assert third.extra[UNCERTAIN_EXTRA] == "Pneumonia"
    assert (third.record.date, third.extra.get("StudyDate")) == ("21520708", None)


def test_nih_cxr14(tmp_path: Path) -> None:
    root = tmp_path / "ChestX-ray14"
    for seed, name in enumerate(["00000001_000.png", "00000001_001.png", "00000013_005.png"]):
        image(root, f"images/{name}", seed)
    write(
        root,
        "Data_Entry_2017_v2020.csv",
        [
            "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
            "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]",
            "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
            "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
            "00000013_005.png,Emphysema|Infiltration|Pleural_Thickening|Pneumothorax,5,13,"
            "60,M,AP,3056,2544,0.139,0.139",
        ],
    )
    scan = check_source(root, mapping=load_preset("nih-cxr14"))
    rows = by_file(scan.records)
    assert all(s.image_status == "stored" for s in rows.values())
    assert rows["00000001_001.png"].record.patient_id == "1"
    assert rows["00000001_001.png"].record.age_years == 58
    assert [f.path_str for f in rows["00000013_005.png"].record.findings] == [
        "Emphysema",
        "Infiltration",
        "Pleural Thickening",
        "Pneumothorax",
    ]
    assert rows["00000013_005.png"].record.view == "AP"


def padchest_row(image_id: str, folder: str, patient: str, projection: str, labels: str) -> str:
    cells = [image_id, folder, "20150910", "st1", patient, "1938", "M", "['PA']", projection]
    cells += ["Manual review of DICOM fields", "No", "CR", "PhilipsMedicalSystems"]
    cells += ["MONOCHROME2", "0", "\"['1', '1']\"", "0.139", "12", "2048", "4096", "2472"]
    cells += ["2496", "320", "4", "4000", "12.5", "1820", "4031", "normal report"]
    cells += ["Physician", f'"{labels}"', "[]", "[]", "[]", "[]"]
    return ",".join(cells)


def test_padchest(tmp_path: Path) -> None:
    root = tmp_path / "padchest"
    names = [("216840111366964012283393834152009033102258826_dtw5cn.png", "0", "P1")]
    names += [("216840111366964013076187734852011178154626671_y6gkj8.png", "7", "P2")]
    names += [("216840111366964013515416547122012024112618713_1pkglc.png", "12", "P2")]
    for seed, (name, folder, _) in enumerate(names):
        image(root, f"{folder}/{name}", seed)
    labels = [
        "['normal']",
        "['pneumonia', 'COVID 19 uncertain']",
        "['cardiomegaly', 'aortic elongation']",
    ]
    projections = ["PA", "AP_horizontal", "L"]
    rows = [PADCHEST_HEADER] + [
        padchest_row(name, folder, patient, projection, label)
        for (name, folder, patient), projection, label in zip(
            names, projections, labels, strict=True
        )
    ]
    write(root, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", rows)
    scan = check_source(root, mapping=load_preset("padchest"))
    records = by_file(scan.records)
    normal, covid, cardio = (records[name] for name, _, _ in names)
    assert all(s.image_status == "stored" for s in records.values())
    assert normal.record.relative_path == f"0/{names[0][0]}"
    assert [f.path_str for f in normal.record.findings] == ["No Finding"]
    assert [f.path_str for f in covid.record.findings] == ["Pneumonia"]
    assert covid.extra[UNCERTAIN_EXTRA] == "COVID-19"
    assert covid.record.view == "AP Supine" and cardio.record.view == "L"
    assert [f.path_str for f in cardio.record.findings] == ["Cardiomegaly"]
    assert normal.record.modality == "X-ray" and normal.record.sex == "M"
    unknown = [i for i in scan.report.issues if i.code == "unknown_finding"]
    assert [i.row for i in unknown] == [4]  # 'aortic elongation' is reported, not guessed


def test_openi(tmp_path: Path) -> None:
    root = tmp_path / "indiana"
    files = ["1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png", "2_IM-0652-1001.dcm.png"]
    for seed, name in enumerate(files):
        image(root, f"images/images_normalized/{name}", seed)
    write(
        root,
        "indiana_projections.csv",
        [
            "uid,filename,projection",
            f"1,{files[0]},Frontal",
            f"1,{files[1]},Lateral",
            f"2,{files[2]},Frontal",
        ],
    )
    write(
        root,
        "indiana_reports.csv",
        [
            "uid,MeSH,Problems,image,indication,comparison,findings,impression",
            '1,normal,normal,Xray Chest PA and Lateral,Positive TB test,None.,"The cardiac '
            'silhouette and mediastinum size are within normal limits.",Normal chest x-XXXX.',
            "2,Cardiomegaly/borderline;Pulmonary Atelectasis/base/left,Cardiomegaly;Pulmonary"
            " Atelectasis,PA and lateral chest,dyspnea,None.,Borderline heart size.,"
            "Left basilar atelectasis.",
        ],
    )
    scan = check_source(root, mapping=load_preset("openi"))
    records = by_file(scan.records)
    assert all(s.image_status == "stored" for s in records.values())
    frontal, lateral, second = (records[name] for name in files)
    assert [f.path_str for f in frontal.record.findings] == ["No Finding"]
    assert frontal.record.view is None and lateral.record.view == "L"
    assert frontal.record.clinical_notes is not None
    assert frontal.record.clinical_notes.startswith("The cardiac silhouette")
    assert [f.path_str for f in second.record.findings] == ["Atelectasis", "Cardiomegaly"]
    assert second.record.patient_id == "2"


def test_the_command_line_takes_a_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from covidcxr.cli import main

    root = tmp_path / "ChestX-ray14"
    image(root, "images/00000001_000.png", 1)
    write(
        root,
        "Data_Entry_2017_v2020.csv",
        [
            "Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position",
            "00000001_000.png,Cardiomegaly,1,57,M,PA",
        ],
    )
    assert main(["check", str(root), "--preset", "nih-cxr14"]) == 0
    assert "nih-cxr14" in capsys.readouterr().out
    assert main(["check", str(root), "--preset", "nih-cxr14", "--mapping", "x.toml"]) == 2
    assert "not both" in capsys.readouterr().err
