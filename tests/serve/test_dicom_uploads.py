"""DICOM uploads to the service: accepted by content, answered like ``covidcxr predict``,
refused with the reader's reason, and no header identity in answers or logs."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("pydicom")
from fastapi.testclient import TestClient
from pydicom import uid
from serve_helpers import (  # noqa: F401  (fixtures)
    MakeClient,
    client,
    csrf,
    engine,
    make_client,
    store_url,
)

from conftest import xray_like
from covidcxr.cli import main
from dicom_files import IDENTITY, encapsulated, make_dataset, to_bytes


def _dicom(**attributes: object) -> bytes:
    """A synthetic chest-sized DX image (8-bit MONOCHROME2) carrying a patient identity."""
    stored = xray_like(7, (320, 288))
    return to_bytes(make_dataset(stored, bits_stored=8, **attributes))


def _assert_no_identity(*texts: str) -> None:
    for text in texts:
        for keyword, value in IDENTITY.items():
            assert value not in text, f"{keyword} leaked"
            assert value.replace("^", " ") not in text, f"{keyword} leaked"


def test_dicom_is_answered_like_covidcxr_predict_without_identity(
    client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = _dicom()
    assert IDENTITY["PatientName"].encode() in data  # the header does carry it
    (tmp_path / "scan.dcm").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "scan.dcm", "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    caplog.set_level(logging.DEBUG)

    response = client.post(
        "/api/v1/predict?heatmaps=true",
        files=[("file", ("scan.dcm", data, "application/dicom"))],
    )

    assert response.status_code == 200
    results = response.json()["results"]
    assert [{k: v for k, v in r.items() if k != "heatmap_png"} for r in results] == expected
    assert results[0]["file"] == "scan.dcm"
    _assert_no_identity(response.text, caplog.text)


def test_dicom_is_recognised_by_content_not_by_name(client: TestClient) -> None:
    response = client.post(
        "/api/v1/predict", files=[("file", ("photo.png", _dicom(), "image/png"))]
    )
    assert response.status_code == 200
    result = response.json()["results"][0]
    assert result["file"] == "photo.png"
    assert "decodable" in result["checks_passed"]  # read as DICOM, not refused as PNG


def test_results_page_shows_a_dicom_without_identity(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = client.post(
        "/predict",
        data={"csrf_token": csrf(client)},
        files=[("file", ("chest.dcm", _dicom(), "application/dicom"))],
    )
    assert response.status_code == 200
    assert "Results for 1 image(s)" in response.text
    assert 'alt="uploaded image"' in response.text  # the DICOM's pixels as a preview
    _assert_no_identity(response.text, caplog.text)


@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        (
            lambda: to_bytes(make_dataset(np.stack([xray_like(1)] * 2), bits_stored=8)),
            400,
            "holds 2 frames; X-ray tasks take single-frame images",
        ),
        (lambda: _without_pixels(), 400, "has no pixel data"),
        (
            lambda: _dicom(PhotometricInterpretation="PALETTE COLOR"),
            415,
            "has photometric interpretation 'PALETTE COLOR'",
        ),
        (lambda: _mpeg(), 415, "uses transfer syntax MPEG2"),
    ],
    ids=["multi-frame", "no-pixels", "palette", "video"],
)
def test_a_dicom_the_reader_cannot_take_is_refused_with_its_reason(
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
    make: object,
    status: int,
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    data = make()  # type: ignore[operator]
    response = client.post(
        "/api/v1/predict", files=[("file", ("study.dcm", data, "application/dicom"))]
    )
    assert response.status_code == status
    detail = response.json()["detail"]
    assert detail.startswith("upload 1 ('study.dcm'): read_dicom: 'study.dcm' ")
    assert reason in detail
    assert "upload-000" not in detail and "covidcxr-upload" not in detail  # no server path
    _assert_no_identity(response.text, caplog.text)


def _without_pixels() -> bytes:
    ds = make_dataset(xray_like(2), bits_stored=8)
    del ds.PixelData
    return to_bytes(ds)


def _mpeg() -> bytes:
    ds = make_dataset(xray_like(3), bits_stored=8)
    return to_bytes(encapsulated(ds, b"\x00\x00\x01\xb3" + bytes(60), uid.MPEG2MPML))


def test_a_dicom_over_the_pixel_limit_is_413(client: TestClient) -> None:
    ds = make_dataset(xray_like(4), bits_stored=8)
    ds.Rows, ds.Columns = 20_000, 20_000  # claimed: refused before decoding
    response = client.post(
        "/api/v1/predict", files=[("file", ("huge.dcm", to_bytes(ds), "application/dicom"))]
    )
    assert response.status_code == 413
    assert response.json() == {
        "detail": "upload 1 ('huge.dcm'): Downscale the image to under 80 megapixels."
    }


def test_a_dicom_over_the_upload_limit_is_413(make_client: MakeClient) -> None:
    data = _dicom()
    client = make_client(max_upload_bytes=len(data) // 2)
    response = client.post(
        "/api/v1/predict", files=[("file", ("scan.dcm", data, "application/dicom"))]
    )
    assert response.status_code == 413
    assert "request body over the" in response.json()["detail"]


def test_refusal_reasons_name_the_upload_not_the_server_path(client: TestClient) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(40)  # a PNG signature, then nothing decodable
    response = client.post("/api/v1/predict", files=[("file", ("cut.png", png, "image/png"))])
    assert response.status_code == 200
    result = response.json()["results"][0]
    assert result["input_check"] == "fail"
    assert "'cut.png'" in result["reason"]
    assert "upload-000" not in result["reason"] and "covidcxr-upload" not in result["reason"]


def test_the_upload_page_explains_a_refused_dicom(client: TestClient) -> None:
    frames = to_bytes(make_dataset(np.stack([xray_like(1)] * 3), bits_stored=8))
    response = client.post(
        "/predict",
        data={"csrf_token": csrf(client)},
        files=[("file", ("cine.dcm", frames, "application/dicom"))],
        headers={"accept": "text/html"},
    )
    assert response.status_code == 400
    assert "<h1>Error 400</h1>" in response.text
    assert "holds 3 frames; X-ray tasks take single-frame images" in response.text
