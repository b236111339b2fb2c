"""Scanning a source: each kind of bad input is reported with file, row, column, value."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import MakeCollection, encode, upstream_row, xray_like
from covidcxr.errors import MetadataError
from covidcxr.ingest.pipeline import check_source
from covidcxr.ingest.report import Issue
from covidcxr.ingest.source import resolve_source
from covidcxr.schema.values import Action, Severity


def issues_with(code: str, issues: list[Issue]) -> list[Issue]:
    return [i for i in issues if i.code == code]


def test_clean_collection_has_no_errors(make_collection: MakeCollection) -> None:
    scan = check_source(make_collection())
    report = scan.report
    assert report.errors == []
    assert report.counts["records"] == 4 and report.counts["patients"] == 3
    assert report.counts["images_stored"] == 3
    assert [i.code for i in report.warnings] == ["shared_image"]
    assert report.counts["annotations_severity"] == 1


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"just some text\n", "unsupported_format"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "unsupported_format"),
    ],
)
def test_bad_image_bytes_reject_the_image_not_the_row(
    make_collection: MakeCollection, data: bytes, code: str
) -> None:
    images = {"p1.png": data, "p2.png": encode(xray_like(3))}
    rows = [
        upstream_row(patientid="1", filename="p1.png"),
        upstream_row(patientid="2", filename="p2.png"),
    ]
    scan = check_source(make_collection(rows, images=images, annotations=False))
    (issue,) = issues_with(code, scan.report.issues)
    assert issue.severity is Severity.ERROR and issue.action is Action.IMAGE_REJECTED
    assert issue.file == "images/p1.png" and "p1.png" in issue.message
    statuses = {s.record.filename: s.image_status for s in scan.records}
    assert statuses == {"p1.png": "rejected", "p2.png": "stored"}


def test_truncated_png_is_rejected(make_collection: MakeCollection) -> None:
    data = encode(xray_like(1))
    images = {"p1.png": data[: len(data) // 2]}
    scan = check_source(make_collection([upstream_row()], images=images, annotations=False))
    (issue,) = scan.report.errors
    assert issue.code == "truncated" and issue.file == "images/p1.png"


def test_jpg_name_holding_png_bytes_is_decoded_and_flagged(make_collection: MakeCollection) -> None:
    images = {"x.jpg": encode(xray_like(1), "PNG")}
    rows = [upstream_row(filename="x.jpg")]
    scan = check_source(make_collection(rows, images=images, annotations=False))
    (issue,) = issues_with("format_mismatch", scan.report.issues)
    assert "holds PNG bytes" in issue.message and scan.records[0].image_status == "stored"


def test_missing_image_keeps_the_record(make_collection: MakeCollection) -> None:
    rows = [upstream_row(filename="p1.png"), upstream_row(patientid="2", filename="gone.png")]
    scan = check_source(
        make_collection(rows, images={"p1.png": encode(xray_like(1))}, annotations=False)
    )
    (issue,) = issues_with("image_missing", scan.report.issues)
    assert (issue.file, issue.row, issue.column, issue.value) == (
        "metadata.csv",
        3,
        "filename",
        "images/gone.png",
    )
    assert issue.action is Action.IMAGE_MISSING
    assert {s.record.filename: s.image_status for s in scan.records}["gone.png"] == "missing"


@pytest.mark.parametrize("filename", ["../../x.png", "/etc/passwd", "images\\x.png"])
def test_unsafe_filename_rows_are_skipped(make_collection: MakeCollection, filename: str) -> None:
    rows = [upstream_row(filename="p1.png"), upstream_row(patientid="2", filename=filename)]
    scan = check_source(
        make_collection(rows, images={"p1.png": encode(xray_like(1))}, annotations=False)
    )
    (issue,) = scan.report.errors
    assert (issue.code, issue.row, issue.column, issue.value) == (
        "unsafe_path",
        3,
        "filename",
        filename,
    )
    assert issue.action is Action.ROW_SKIPPED
    assert [s.record.filename for s in scan.records] == ["p1.png"]


def test_symlink_out_of_the_source_is_not_followed(
    make_collection: MakeCollection, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(encode(xray_like(5)))
    root = make_collection([upstream_row(filename="link.png")], images={}, annotations=False)
    (root / "images" / "link.png").symlink_to(outside)
    scan = check_source(root)
    (issue,) = scan.report.errors
    assert issue.code == "unsafe_path" and "outside the source folder" in issue.message
    assert scan.records[0].image_status == "rejected"


def test_symlinked_folder_out_of_the_source_is_not_followed(
    make_collection: MakeCollection, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "p1.png").write_bytes(encode(xray_like(5)))
    rows = [upstream_row(filename="p1.png", folder="linked")]
    root = make_collection(rows, images={}, annotations=False)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    scan = check_source(root)
    (issue,) = scan.report.errors
    assert (issue.code, issue.value) == ("unsafe_path", "linked/p1.png")
    assert scan.records[0].image_status == "rejected"


def test_symlink_within_the_source_is_followed(make_collection: MakeCollection) -> None:
    rows = [upstream_row(filename="link.png"), upstream_row(patientid="2", filename="gone.png")]
    root = make_collection(rows, images={"real.png": encode(xray_like(5))}, annotations=False)
    (root / "images" / "link.png").symlink_to(root / "images" / "real.png")
    (root / "images" / "gone.png").symlink_to(root / "images" / "nothing-here.png")
    scan = check_source(root)
    assert scan.report.errors == []
    statuses = {s.record.filename: s.image_status for s in scan.records}
    assert statuses == {"link.png": "stored", "gone.png": "missing"}
    (stored,) = scan.images.values()
    assert stored.path == root / "images" / "real.png"


def test_directory_in_place_of_an_image(make_collection: MakeCollection) -> None:
    root = make_collection([upstream_row(filename="dir.png")], images={}, annotations=False)
    (root / "images" / "dir.png").mkdir()
    scan = check_source(root)
    assert scan.records[0].image_status == "missing"
    assert issues_with("image_missing", scan.report.issues)


def test_duplicate_rows_and_unreferenced_files(make_collection: MakeCollection) -> None:
    rows = [upstream_row(filename="p1.png"), upstream_row(filename="p1.png", offset="5")]
    images = {"p1.png": encode(xray_like(1)), "stray.png": encode(xray_like(2))}
    scan = check_source(make_collection(rows, images=images, annotations=False))
    (duplicate,) = issues_with("duplicate_row", scan.report.issues)
    assert duplicate.row == 3 and "line 2" in duplicate.message
    (stray,) = issues_with("unreferenced_image", scan.report.issues)
    assert stray.file == "images/stray.png" and stray.action is Action.FILE_SKIPPED


def test_values_are_reported_with_row_column_value(make_collection: MakeCollection) -> None:
    rows = [
        upstream_row(
            filename="p1.png",
            age="9",
            temperature="101.3",
            survival="?",
            clinical_notes='=HYPERLINK("http://x")',
            finding="Dragonpox",
            view="Axial",
        )
    ]
    scan = check_source(
        make_collection(rows, images={"p1.png": encode(xray_like(1))}, annotations=False)
    )
    found = {(i.code, i.column, i.value) for i in scan.report.issues}
    assert ("pediatric", "age", "9") in found
    assert ("out_of_range", "temperature", "101.3") in found
    assert ("unknown_marker", "survival", "?") in found
    assert ("formula_like_value", "clinical_notes", '=HYPERLINK("http://x")') in found
    assert ("unknown_finding", "finding", "Dragonpox") in found
    assert ("view_modality_mismatch", "view", "Axial") in found
    assert all(i.row == 2 and i.file == "metadata.csv" for i in scan.report.issues)
    record = scan.records[0].record
    assert record.flags == {"pediatric", "has_warnings"} and record.temperature_c is None


def test_annotation_problems_are_reported(make_collection: MakeCollection) -> None:
    root = make_collection()
    folder = root / "annotations"
    (folder / "covid-severity-scores.csv").write_text(
        "filename,geographic_mean,opacity_mean\np1.png,9.5,3\nnothere.png,2,2\np2.png,2,1\n",
        encoding="utf-8",
    )
    (folder / "lungVAE-masks" / "p2_mask.png").write_bytes(encode(np.zeros((10, 10), np.uint8)))
    (folder / "lungVAE-masks" / "ghost_mask.png").write_bytes(encode(np.zeros((10, 10), np.uint8)))
    boxes = json.loads((folder / "imageannotation_ai_lung_bounding_boxes.json").read_text())
    boxes["annotations"].append({"id": 3, "image_id": 1, "category_id": 1, "bbox": None})
    boxes["annotations"].append(
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [70, 90, 50, 50]}
    )
    (folder / "imageannotation_ai_lung_bounding_boxes.json").write_text(json.dumps(boxes))
    (folder / "README.md").write_text("notes")
    scan = check_source(root)
    by_code = scan.report.by_code()
    assert by_code["bad_severity"] == 1
    assert by_code["annotation_image_missing"] == 2  # nothere.png score, ghost mask
    assert by_code["mask_size_mismatch"] == 1
    assert by_code["bad_box"] == 1 and by_code["box_outside_image"] == 1
    assert by_code["annotation_not_read"] == 1
    assert sorted(a.kind for a in scan.annotations) == [
        "lung_box",
        "lung_box",
        "lung_mask",
        "severity",
    ]
    (bad,) = issues_with("bad_severity", scan.report.issues)
    assert (bad.file, bad.row, bad.column, bad.value) == (
        "annotations/covid-severity-scores.csv",
        2,
        "geographic_mean",
        "9.5",
    )


def test_broken_annotation_json_is_reported(make_collection: MakeCollection) -> None:
    root = make_collection()
    (root / "annotations" / "imageannotation_ai_lung_bounding_boxes.json").write_text("{not json")
    scan = check_source(root)
    (issue,) = issues_with("bad_annotation_file", scan.report.issues)
    assert issue.action is Action.FILE_SKIPPED


def test_resolve_source_variants(make_collection: MakeCollection) -> None:
    root = make_collection()
    (root / "newer.csv").write_bytes((root / "metadata.csv").read_bytes())
    assert resolve_source(root).metadata == (root / "metadata.csv").resolve()
    assert resolve_source(root / "metadata.csv").root == root.resolve()
    assert resolve_source(root, metadata="newer.csv").metadata.name == "newer.csv"
    assert resolve_source(root, name="mine").name == "mine"
    with pytest.raises(MetadataError, match="does not exist"):
        resolve_source(root / "nothing")
    with pytest.raises(MetadataError, match="no metadata file"):
        resolve_source(root, metadata="absent.csv")


def test_reports_are_written_as_json_and_csv(
    make_collection: MakeCollection, tmp_path: Path
) -> None:
    rows = [upstream_row(filename="p1.png", clinical_notes="=cmd|' /C calc'!A0", survival="?")]
    scan = check_source(
        make_collection(rows, images={"p1.png": encode(xray_like(1))}, annotations=False)
    )
    json_path, csv_path = scan.report.write(tmp_path / "out", "report")
    data = json.loads(json_path.read_text())
    assert data["counts"]["records"] == 1
    assert data["issue_counts"]["warning"] == {"unknown_marker": 1}
    text = csv_path.read_text()
    assert text.splitlines()[0] == "severity,code,file,row,column,value,action,message"
    assert "'=cmd|' /C calc'!A0" in text  # escaped for spreadsheets


@pytest.mark.parametrize("enabled", [True, False])
def test_scan_restores_the_garbage_collector(
    make_collection: MakeCollection, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    # The image phase pauses the cyclic collector; it must come back as it was, also
    # when the phase fails.
    import gc

    from covidcxr.ingest import scan as scan_module

    root = make_collection()
    seen: list[bool] = []
    real = scan_module.process_files

    def watching(*args: Any, **kwargs: Any) -> Iterator[Any]:
        seen.append(gc.isenabled())
        yield from real(*args, **kwargs)

    (gc.enable if enabled else gc.disable)()
    try:
        monkeypatch.setattr(scan_module, "process_files", watching)
        check_source(root)
        assert seen[0] is False and gc.isenabled() is enabled  # images, then masks

        def failing(*args: Any, **kwargs: Any) -> Iterator[Any]:
            raise RuntimeError("worker died")
            yield

        monkeypatch.setattr(scan_module, "process_files", failing)
        with pytest.raises(RuntimeError, match="worker died"):
            check_source(root)
        assert gc.isenabled() is enabled
    finally:
        gc.enable()
