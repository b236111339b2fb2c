"""Hostile files in a source: each is that file's error with its reason, never the batch's."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from faults_helpers import blank_png, cut_jpeg_with_eoi, jpeg_claiming, real_jpeg

from conftest import MakeCollection, upstream_row
from covidcxr.cli import main
from covidcxr.errors import ImageError, MetadataError
from covidcxr.imaging.decode import decode_image, read_image_file
from covidcxr.ingest.pipeline import check_source


def issues_for(root: Path) -> dict[str, tuple[str, str]]:
    """file -> (code, message) of each error of a check of ``root``."""
    scan = check_source(root, workers=1)
    return {i.file: (i.code, i.message) for i in scan.report.errors}


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_jpeg_with_appended_eoi_is_rejected(fraction: float) -> None:
    data = cut_jpeg_with_eoi(real_jpeg(), fraction)
    with pytest.raises(ImageError, match=r"'cut\.jpg' is truncated .*flat grey") as caught:
        decode_image(data, name="cut.jpg")
    assert caught.value.code == "truncated"


def test_jpeg_whose_header_lies_about_its_size_is_rejected() -> None:
    data = jpeg_claiming(real_jpeg(), 2000, 2000)
    with pytest.raises(ImageError, match="claims more rows than it holds") as caught:
        decode_image(data, name="big.jpg")
    assert caught.value.code == "truncated"
    # The intact file still decodes.
    assert decode_image(real_jpeg(), name="ok.jpg").info.width == 224


@pytest.mark.parametrize("size", [(79_000_000, 1), (1, 79_000_000), (30_000, 2)])
def test_extreme_shapes_are_refused_from_the_header(size: tuple[int, int]) -> None:
    with pytest.raises(
        ImageError, match=r"claims \d+x\d+ pixels, a shape more than 20:1"
    ) as caught:
        decode_image(blank_png(*size), name="strip.png")
    assert caught.value.code == "extreme_shape"


def test_odd_directory_entries_are_reported_and_good_files_kept(
    make_collection: MakeCollection, tmp_path: Path
) -> None:
    names = ["fifo.png", "socket.png", "dangling.png", "loop.png", "device.png"]
    rows = [upstream_row(patientid="1", filename="p1.png")]
    rows += [upstream_row(patientid=str(i + 2), filename=name) for i, name in enumerate(names)]
    root = make_collection(rows, annotations=False)
    images = root / "images"
    os.mkfifo(images / "fifo.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(images / "socket.png"))
    (images / "dangling.png").symlink_to(images / "nowhere.png")
    (images / "loop.png").symlink_to(images / "loop.png")
    (images / "device.png").symlink_to("/dev/zero")  # outside the source: never opened
    try:
        scan = check_source(root, workers=1)  # a FIFO would hang a plain open()
    finally:
        server.close()
    status = {s.record.filename: s.image_status for s in scan.records}
    assert status == {
        "p1.png": "stored",
        "fifo.png": "rejected",
        "socket.png": "rejected",
        "dangling.png": "missing",
        "loop.png": "rejected",
        "device.png": "rejected",
    }
    by_file = {(i.file, i.code): i.message for i in scan.report.issues}
    assert "not a regular file" in by_file[("images/fifo.png", "not_a_file")]
    assert "not a regular file" in by_file[("images/socket.png", "not_a_file")]
    assert "symbolic links" in by_file[("images/loop.png", "unreadable")]
    unsafe = [i.value for i in scan.report.issues if i.code == "unsafe_path"]
    assert unsafe == ["images/device.png"]


def test_read_image_file_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(ImageError, match="not a regular file") as caught:
        read_image_file(tmp_path / "x.png")
    assert caught.value.code == "not_a_file"


def test_nul_byte_in_the_header_is_an_error(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_collection(annotations=False)
    text = (root / "metadata.csv").read_text(encoding="utf-8")
    (root / "metadata.csv").write_text(text.replace(",sex,", ",s\x00ex,", 1), encoding="utf-8")
    with pytest.raises(MetadataError, match=r"header cell 3 on line 1 \('s\\x00ex'\)"):
        check_source(root)
    assert main(["check", str(root)]) == 2


def test_control_characters_in_names_are_escaped_in_output(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = "x\x1b[2J\x1b[31mOK\nfake.png"
    root = make_collection([upstream_row(patientid="1", filename=evil)], annotations=False)
    assert main(["check", str(root), "--show", "5"]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out
    assert "fake.png" in out and "\nfake.png" not in out
