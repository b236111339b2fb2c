"""The application factory: :func:`create_app` wires settings, store, routers and errors."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from covidcxr import __version__
from covidcxr.errors import CovidCxrError, MetadataError, StoreError
from covidcxr.serve.deps import TEMPLATES, RateLimiter, ServiceState, render
from covidcxr.serve.limits import BodyLimitMiddleware
from covidcxr.serve.routers import auth, cases, health, images, predict
from covidcxr.serve.settings import Settings
from covidcxr.store.db import open_store

log = logging.getLogger(__name__)


class QueryRedactingFilter(logging.Filter):
    """Cuts the query string from uvicorn's access log lines (``client - "METHOD PATH
    HTTP/x" status``): the predict API's clinical values travel in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record, its path without the query."""
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and "?" in str(args[2]):
            path = str(args[2]).split("?", 1)[0]
            record.args = (*args[:2], f"{path}?[query not logged]", *args[3:])
        return True


ACCESS_FILTER: Final = QueryRedactingFilter()


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get(
        "accept", ""
    )


def _error(request: Request, status: int, detail: Any, headers: Any = None) -> Response:
    if _wants_html(request) and status in (400, 401, 403, 404, 413, 415, 422, 429):
        if status == 401 and request.method == "GET":
            return Response(status_code=303, headers={"location": "/login"})
        response = render(
            request, "error.html", {"status": status, "detail": detail}, status_code=status
        )
        return response
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(request, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(MetadataError)
    async def bad_value(request: Request, exc: MetadataError) -> Response:
        return _error(request, 422, str(exc))

    @app.exception_handler(StoreError)
    async def store_down(request: Request, exc: StoreError) -> Response:
        log.error("store error: %s", exc)
        return JSONResponse({"detail": "the store is unavailable; try again later"}, 503)

    @app.exception_handler(CovidCxrError)
    async def other_error(request: Request, exc: CovidCxrError) -> Response:
        return _error(request, 422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return _error(request, 422, detail)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The web service: REST API under ``/api/v1``, pages, static files.

    Args:
        settings: how to run (default :class:`Settings`); the store is opened (and
            migrated) here, the model is loaded on the first prediction.

    Raises:
        StoreError: the store cannot be opened.
    """
    settings = settings or Settings()
    store = open_store(settings.db_url, settings.data_dir)
    secret = (settings.secret_key or secrets.token_hex(32)).encode("utf-8")
    state = ServiceState(
        settings=settings,
        store=store,
        secret=secret,
        limiter=anyio.CapacityLimiter(settings.predict_workers),
        rate=RateLimiter(settings.predict_per_minute),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(
        title="covidcxr second opinion",
        version=__version__,
        description="Chest X-ray second opinion and collection browser. "
        "Research use only, not a diagnosis.",
        lifespan=lifespan,
    )
    app.state.service = state
    access = logging.getLogger("uvicorn.access")
    if ACCESS_FILTER not in access.filters:
        access.addFilter(ACCESS_FILTER)
    TEMPLATES.env.globals["version"] = __version__
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    _install_errors(app)
    for module in (health, predict, images, cases, auth):
        app.include_router(module.router)
    static = Path(__file__).with_name("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


def app_from_environment() -> FastAPI:
    """The app as ``covidcxr serve`` configures it (through ``COVIDCXR_SERVE_*``
    variables, so that every uvicorn worker builds the same one)."""
    env = os.environ
    settings = Settings(
        db_url=env.get("COVIDCXR_SERVE_DB") or None,
        data_dir=env.get("COVIDCXR_SERVE_DATA_DIR") or None,
        model=env.get("COVIDCXR_SERVE_MODEL") or None,
        predict_workers=int(env.get("COVIDCXR_SERVE_THREADS") or 1),
        read_open=not env.get("COVIDCXR_SERVE_PRIVATE"),
        inference_threads=int(env.get("COVIDCXR_SERVE_INFERENCE_THREADS") or 0) or None,
        predict_per_minute=int(env.get("COVIDCXR_SERVE_PREDICT_PER_MINUTE") or 60),
        secret_key=env.get("COVIDCXR_SERVE_SECRET") or None,
    )
    return create_app(settings)
