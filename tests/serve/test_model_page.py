"""The /model page: the bundle's Markdown model card rendered as HTML."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("markdown_it")
from fastapi.testclient import TestClient
from serve_helpers import (  # noqa: F401  (fixtures)
    client,
    engine,
    make_client,
    store_url,
)

from covidcxr import RESEARCH_USE_ONLY
from covidcxr.models.bundle import CARD_FILE, load_bundle


def _serve_bundle_at(client: TestClient, folder: Path) -> None:
    """Point the client's service at the shipped bundle moved to ``folder``."""
    bundle = dataclasses.replace(load_bundle(), path=folder)
    client.app.state.service.bundle = lambda: bundle  # type: ignore[attr-defined]


def _serve_card(client: TestClient, folder: Path, text: str) -> None:
    """Point the client's service at a copy of the shipped bundle whose card is ``text``."""
    folder.mkdir()
    (folder / CARD_FILE).write_text(text, encoding="utf-8")
    _serve_bundle_at(client, folder)


def test_model_page_renders_the_shipped_card_as_html(client: TestClient) -> None:
    bundle = load_bundle()
    response = client.get("/model")
    assert response.status_code == 200
    page = response.text
    assert f"<h1>Model card: {bundle.model_id}</h1>" in page
    assert page.count(RESEARCH_USE_ONLY) + page.count(RESEARCH_USE_ONLY.capitalize()) >= 2
    assert "<table>" in page and "<th>label</th>" in page
    assert "<strong>Research use only, not a diagnosis.</strong>" in page
    assert "**" not in page
    assert 'class="card-text"' not in page


def test_html_written_into_a_card_is_escaped(client: TestClient, tmp_path: Path) -> None:
    card = (
        "# Card\n\n**bold** and <script>alert('card')</script>\n\n"
        '<img src=x onerror="alert(1)">\n\n'
        "[link](javascript:alert(1))\n\n| a | b |\n|---|---|\n| 1 | <b>2</b> |\n"
    )
    _serve_card(client, tmp_path / "bundle", card)
    page = client.get("/model").text
    assert "<strong>bold</strong>" in page
    assert "&lt;script&gt;alert('card')&lt;/script&gt;" in page
    assert "<script" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "<img src=x" not in page
    assert 'href="javascript:' not in page
    assert "<td>&lt;b&gt;2&lt;/b&gt;</td>" in page


def test_a_bundle_without_a_card_says_so(client: TestClient, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    _serve_card(client, folder, "")
    (folder / CARD_FILE).unlink()
    response = client.get("/model")
    assert response.status_code == 200
    assert "(no model card shipped)" in response.text


def test_the_card_is_rendered_once_per_bundle(client: TestClient, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    _serve_card(client, folder, "first **version**\n")
    assert "first <strong>version</strong>" in client.get("/model").text
    (folder / CARD_FILE).write_text("second version\n", encoding="utf-8")
    assert "first <strong>version</strong>" in client.get("/model").text
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    _serve_bundle_at(client, other)
    assert "second version" in client.get("/model").text
