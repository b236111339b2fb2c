"""Hostile and careless clients: sizes, bombs, lies, names, roles, CSRF, injection."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import asyncio
import logging
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from serve_helpers import (  # noqa: F401  (fixtures)
    MakeClient,
    add_user,
    bearer,
    client,
    csrf,
    engine,
    make_client,
    store_url,
    xray_png,
)

from covidcxr.serve.limits import BodyLimitMiddleware
from covidcxr.store import accounts


def _png_claiming(width: int, height: int) -> bytes:
    """A small, valid PNG whose header claims ``width`` x ``height`` (a pixel bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; the header decides
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _run_asgi(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> list[Any]:
    """Drive an ASGI app with a POST whose body arrives in ``chunks``; returns what it sent."""
    sent: list[Any] = []
    pending = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    pending[-1]["more_body"] = False

    async def receive() -> Any:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent


async def _reads_everything(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"read"})


def test_lying_content_length_is_cut_off_while_streaming() -> None:
    app = BodyLimitMiddleware(_reads_everything, max_bytes=1000)
    sent = _run_asgi(app, [(b"content-length", b"10")], [b"x" * 600, b"x" * 600])
    assert sent[0]["status"] == 413
    assert b"over the" in sent[1]["body"]


def test_declared_oversize_is_refused_before_reading() -> None:
    app = BodyLimitMiddleware(_reads_everything, max_bytes=1000)
    sent = _run_asgi(app, [(b"content-length", b"5000")], [b"x"])
    assert sent[0]["status"] == 413


def test_body_within_the_limit_goes_through() -> None:
    app = BodyLimitMiddleware(_reads_everything, max_bytes=1000)
    sent = _run_asgi(app, [], [b"x" * 500, b"x" * 500])
    assert sent[0]["status"] == 200


def test_oversized_streamed_upload_without_length_is_413(make_client: MakeClient) -> None:
    client = make_client(max_upload_bytes=100_000)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body() -> Any:
        yield head + b"\x89PNG\r\n\x1a\n"
        for _ in range(50):
            yield b"\x00" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/api/v1/predict",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413
    assert response.json() == {
        "detail": "request body over the 0.0953674 MB limit: send fewer or smaller images "
        "per request"
    }


def test_decompression_bomb_is_413(client: TestClient) -> None:
    bomb = _png_claiming(100_000, 100_000)
    response = client.post("/api/v1/predict", files=[("file", ("big.png", bomb, "image/png"))])
    assert response.status_code == 413
    assert response.json() == {
        "detail": "upload 1 ('big.png'): Downscale the image to under 80 megapixels."
    }


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"just some text, not an image\n", "TEXT bytes"),
        (b"<html><body>hi</body></html>", "HTML bytes"),
        (b"", "no bytes"),
        (b"GIF89a" + b"\x00" * 20, "GIF bytes"),
    ],
)
def test_not_an_image_named_png_is_415(client: TestClient, data: bytes, what: str) -> None:
    response = client.post("/api/v1/predict", files=[("file", ("scan.png", data, "image/png"))])
    assert response.status_code == 415
    assert response.json() == {
        "detail": f"upload 1 ('scan.png') holds {what}, not a PNG, JPEG or DICOM image: "
        "export it as PNG or JPEG"
    }


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("../../etc/passwd.png", "passwd.png"),
        ("C:\\Users\\x\\..\\scan.png", "scan.png"),
        ("/abs/path/x.png", "x.png"),
        ("..", "upload-1"),
        ("a\x1b[31mred.png", "a[31mred.png"),
    ],
)
def test_path_like_names_are_only_echoed_as_base_names(
    client: TestClient, name: str, shown: str
) -> None:
    before = set(Path(tempfile.gettempdir()).glob("covidcxr-upload-*"))
    response = client.post("/api/v1/predict", files=[("file", (name, xray_png(2), "image/png"))])
    assert response.status_code == 200
    assert response.json()["results"][0]["file"] == shown
    # The upload folder (server-made names) is gone once the answer is sent.
    assert set(Path(tempfile.gettempdir()).glob("covidcxr-upload-*")) == before


def test_upload_names_never_reach_the_logs(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_name = "Jane-Doe-MRN-123456.png"
    response = client.post(
        "/api/v1/predict", files=[("file", (secret_name, xray_png(3), "image/png"))]
    )
    assert response.status_code == 200
    assert any("predicted 1 image(s)" in r.getMessage() for r in caplog.records)
    assert not any("Jane" in r.getMessage() or "123456" in r.getMessage() for r in caplog.records)


def test_predict_is_rate_limited(make_client: MakeClient) -> None:
    client = make_client(predict_per_minute=2)
    files = [("file", ("a.png", b"not an image", "image/png"))]
    assert [client.post("/api/v1/predict", files=files).status_code for _ in range(2)] == [415, 415]
    response = client.post("/api/v1/predict", files=files)
    assert response.status_code == 429
    assert response.json()["detail"].startswith("too many predictions: at most 2 a minute")
    assert 1 <= int(response.headers["retry-after"]) <= 61


def _case_files() -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", ("case.png", xray_png(7), "image/png"))]


def test_writes_need_the_role(client: TestClient) -> None:
    form = {"patientid": "p", "finding": "COVID-19", "license": "CC BY 4.0"}
    response = client.post("/api/v1/cases", data=form, files=_case_files())
    assert response.status_code == 401
    assert response.json() == {
        "detail": "this needs a contributor account: sign in or send an API token"
    }
    viewer = add_user(client, "vera", "viewer")
    response = client.post("/api/v1/cases", data=form, files=_case_files(), headers=bearer(viewer))
    assert response.status_code == 403
    assert response.json() == {"detail": "user vera is a viewer; this needs contributor"}
    contributor = add_user(client, "carl", "contributor")
    response = client.post(
        "/api/v1/cases/1/accept", data={"reason": "fine"}, headers=bearer(contributor)
    )
    assert response.status_code == 403
    assert response.json() == {"detail": "user carl is a contributor; this needs curator"}


def test_bad_and_deleted_tokens_are_401(client: TestClient) -> None:
    token = add_user(client, "gone", "curator")
    assert client.get("/api/v1/cases", headers=bearer(token)).status_code == 200
    store = client.app.state.service.store  # type: ignore[attr-defined]
    with store.transaction() as conn:
        accounts.delete_user(conn, "gone")
    response = client.get("/api/v1/cases", headers=bearer(token))
    assert response.status_code == 401
    assert response.json() == {"detail": "unknown or revoked API token"}
    assert client.get("/api/v1/cases", headers={"Authorization": "Basic abc"}).json() == {
        "detail": "Authorization must be 'Bearer TOKEN'"
    }


def test_forms_without_the_csrf_token_are_403(client: TestClient) -> None:
    add_user(client, "cur", "curator", password="correct horse")
    token = csrf(client, "/login")
    missing = client.post("/login", data={"username": "cur", "password": "correct horse"})
    assert missing.status_code == 403
    wrong = client.post(
        "/login", data={"username": "cur", "password": "correct horse", "csrf_token": "x" + token}
    )
    assert wrong.status_code == 403
    upload = client.post("/predict", files=[("file", ("a.png", xray_png(1), "image/png"))])
    assert upload.status_code == 403
    assert upload.json() == {
        "detail": "missing or wrong CSRF token: reload the page and submit the form again"
    }
    other = TestClient(client.app)  # another browser: its own session, so the token fails
    response = other.post(
        "/login", data={"username": "cur", "password": "correct horse", "csrf_token": token}
    )
    assert response.status_code == 403


def test_session_cookie_is_httponly_and_samesite(client: TestClient) -> None:
    cookie = client.get("/").headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie


SQL_METACHARACTERS = ["' OR '1'='1", "1; DROP TABLE records; --", '"', "%", "_", "\\", "\x00"]
FILTERS = [
    "finding",
    "view",
    "modality",
    "sex",
    "source",
    "age_min",
    "age_max",
    "has_mask",
    "has_box",
    "has_severity",
    "survival",
    "intubated",
    "went_icu",
    "needed_supplemental_o2",
]


@pytest.mark.parametrize("name", FILTERS)
def test_sql_metacharacters_in_every_filter(client: TestClient, name: str) -> None:
    for value in SQL_METACHARACTERS:
        for path in ("/api/v1/images", "/api/v1/stats"):
            response = client.get(path, params={name: value})
            assert response.status_code in (200, 422), (name, value, response.text)
            if response.status_code == 200 and path == "/api/v1/images":
                assert response.json()["total"] == 0
    assert client.get("/api/v1/images").json()["total"] == 4  # nothing was dropped
    for value in SQL_METACHARACTERS[:3]:
        assert client.get(f"/api/v1/patients/{value}/1").status_code == 404
