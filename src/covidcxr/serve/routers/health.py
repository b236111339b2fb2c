"""``/api/v1/health`` and the model card page."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from covidcxr import RESEARCH_USE_ONLY, __version__
from covidcxr.markdown_html import markdown_html
from covidcxr.models.bundle import CARD_FILE
from covidcxr.models.engines import quality_note
from covidcxr.serve.deps import State, render

router = APIRouter()


@router.get("/api/v1/health")
async def health(state: State) -> dict[str, Any]:
    """Liveness and what answers: ``{"status": "ok", "model": ID, ...}``."""
    engine = await anyio.to_thread.run_sync(state.engine)
    with state.store.read() as conn:
        dialect = conn.dialect.name
    return {
        "status": "ok",
        "model": engine.bundle.model_id,
        "weights_sha256": engine.bundle.weights_sha256,
        "engine": engine.engine,
        "store": dialect,
        "version": __version__,
        "note": RESEARCH_USE_ONLY,
    }


@router.get("/model", response_class=HTMLResponse)
async def model_card(request: Request, state: State) -> HTMLResponse:
    """The model card (its Markdown as HTML) with the quality note."""
    bundle = await anyio.to_thread.run_sync(state.bundle)
    card_html = await anyio.to_thread.run_sync(_card_html, bundle.path / CARD_FILE)
    return render(
        request,
        "model.html",
        {"bundle": bundle, "card_html": card_html, "quality": quality_note(bundle)},
    )


@lru_cache(maxsize=16)
def _card_html(card: Path) -> str:
    """A bundle's card as HTML, rendered once per card file (bundles do not change while
    the service runs)."""
    if not card.is_file():
        return "<p>(no model card shipped)</p>"
    return markdown_html(card.read_text(encoding="utf-8"), extra="serve")
