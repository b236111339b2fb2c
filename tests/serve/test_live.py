"""The service on a real uvicorn, over loopback HTTP."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import socket

import httpx
from serve_helpers import (  # noqa: F401  (fixtures)
    client,
    engine,
    live_server,
    make_client,
    store_url,
    xray_png,
)


def test_real_server_answers_health_list_and_predict(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as http:
        assert http.get("/api/v1/health").json()["status"] == "ok"
        assert http.get("/api/v1/images", params={"limit": 1}).json()["total"] == 4
        response = http.post(
            "/api/v1/predict", files=[("file", ("a.png", xray_png(3), "image/png"))]
        )
        assert response.status_code == 200
        assert response.json()["results"][0]["file"] == "a.png"


def test_real_server_refuses_a_lying_content_length(live_server: str) -> None:
    """Chunked transfer: no Content-Length at all, and a body past the 50 MB default."""
    host, port = live_server.removeprefix("http://").split(":")
    boundary = "xyz"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n"
    ).encode("latin-1")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
        )
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = b"\x00" * (1 << 20)
        answer = b""
        try:
            for _ in range(60):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection after answering
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
