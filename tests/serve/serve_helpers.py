"""Fixtures and helpers shared by the service's tests (imported by each test module)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import MakeCollection, encode, xray_like
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.models.bundle import load_bundle
from covidcxr.models.engines import make_engine
from covidcxr.models.runtime import InferenceEngine
from covidcxr.serve.app import create_app
from covidcxr.serve.settings import Settings
from covidcxr.store import accounts
from covidcxr.store.db import open_store

MakeClient = Callable[..., TestClient]


@pytest.fixture(scope="session")
def engine() -> InferenceEngine:
    """The shipped model, loaded once for every test of the service."""
    return make_engine(load_bundle(None))


@pytest.fixture
def store_url(db_url: str, tmp_path: Path, make_collection: MakeCollection) -> tuple[str, Path]:
    """A store (SQLite, then PostgreSQL) holding the tiny collection."""
    data = tmp_path / "store-data"
    with open_store(db_url, data, create=True) as store:
        ingest_source(make_collection(), store, name="tiny")
    return db_url, data


@pytest.fixture
def make_client(store_url: tuple[str, Path], engine: InferenceEngine) -> Iterator[MakeClient]:
    """Build a TestClient on the tiny store; keyword arguments go to :class:`Settings`."""
    clients: list[TestClient] = []

    def build(**overrides: Any) -> TestClient:
        url, data = store_url
        settings = Settings(db_url=url, data_dir=str(data), secret_key="test-secret", **overrides)
        app = create_app(settings)
        app.state.service._engine = engine
        client = TestClient(app)
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()
        client.app.state.service.store.close()  # type: ignore[attr-defined]


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    """A client with the default settings."""
    return make_client()


def add_user(client: TestClient, name: str, role: str, password: str | None = None) -> str:
    """Create a user in the client's store; returns the API token."""
    store = client.app.state.service.store  # type: ignore[attr-defined]
    with store.transaction() as conn:
        return accounts.add_user(conn, name, role, password)


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


def csrf(client: TestClient, page: str = "/") -> str:
    """The CSRF token of the client's session (read from a page's form)."""
    response = client.get(page)
    found = re.search(r'name="csrf_token" value="([^"]+)"', response.text)
    assert found, f"no CSRF token on {page} ({response.status_code})"
    return found.group(1)


def login(client: TestClient, name: str, password: str) -> None:
    """Sign the client in through the login form."""
    response = client.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": csrf(client, "/login")},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text


def xray_png(seed: int = 1, size: tuple[int, int] = (320, 288)) -> bytes:
    """A synthetic greyscale PNG big enough for the gate's size check."""
    return encode(xray_like(seed, size))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_server(client: TestClient) -> Iterator[str]:
    """The client's app served by a real uvicorn on a free loopback port; yields its URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
