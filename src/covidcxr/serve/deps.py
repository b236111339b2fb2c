"""Dependencies shared by the routers: the service state, who is asking, roles, CSRF,
the predict rate limit, and page rendering (sessions ride on a signed cookie)."""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import anyio
import anyio.to_thread
from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from covidcxr import RESEARCH_USE_ONLY
from covidcxr.models.bundle import ModelBundle
from covidcxr.models.runtime import InferenceEngine
from covidcxr.serve.cache import AnswerCache
from covidcxr.serve.settings import Settings
from covidcxr.store import accounts
from covidcxr.store.db import Store

SESSION_COOKIE: Final = "covidcxr_session"
SESSION_SECONDS: Final = 8 * 3600
ROLE_RANK: Final = {"viewer": 0, "contributor": 1, "curator": 2}
TEMPLATES: Final = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


class RateLimiter:
    """At most ``per_minute`` calls per key in any 60 s window (in memory, per process)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._calls: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> int:
        """0 when the call may go ahead (and is counted), else seconds to wait."""
        now = time.monotonic()
        with self._lock:
            calls = self._calls.setdefault(key, collections.deque())
            while calls and now - calls[0] >= 60.0:
                calls.popleft()
            if len(calls) >= self.per_minute:
                return max(1, int(60.0 - (now - calls[0])) + 1)
            calls.append(now)
            return 0


@dataclass
class ServiceState:
    """What every request may use: settings, the open store, the model (loaded on first
    use), the inference pool's limiter, the rate limiter, the signing key, and answers
    cached until the store's data changes."""

    settings: Settings
    store: Store
    secret: bytes
    limiter: anyio.CapacityLimiter
    rate: RateLimiter
    answers: AnswerCache = field(default_factory=AnswerCache)
    #: Duplicate groups by image sha256, with the data generation they were found at.
    duplicate_index: tuple[int, dict[str, list[dict[str, Any]]]] | None = None
    _engine: InferenceEngine | None = None
    _engine_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Engines of other image models (those the prognosis models were fitted on).
    _other_engines: dict[str, InferenceEngine] = field(default_factory=dict)

    def engine(self) -> InferenceEngine:
        """The prediction engine, loaded once (thread-safe)."""
        with self._engine_lock:
            if self._engine is None:
                from covidcxr.models.bundle import load_bundle
                from covidcxr.models.engines import make_engine

                bundle = load_bundle(self.settings.model)
                threads = self.settings.inference_threads
                self._engine = make_engine(bundle, self.settings.engine, threads=threads)
            return self._engine

    def bundle(self) -> ModelBundle:
        """The model's bundle."""
        return self.engine().bundle

    def engine_for(self, model_id: str) -> InferenceEngine:
        """The engine of image model ``model_id``: the service's own when it is that
        model, else one loaded once (thread-safe).

        Raises:
            MetadataError: no such model.
        """
        engine = self.engine()
        if engine.bundle.model_id == model_id:
            return engine
        with self._engine_lock:
            if model_id not in self._other_engines:
                from covidcxr.models.bundle import load_bundle
                from covidcxr.models.engines import make_engine

                threads = self.settings.inference_threads
                self._other_engines[model_id] = make_engine(
                    load_bundle(model_id), self.settings.engine, threads=threads
                )
            return self._other_engines[model_id]


def service(request: Request) -> ServiceState:
    """The app's :class:`ServiceState`."""
    state: ServiceState = request.app.state.service
    return state


# The dependencies below are ``async``: FastAPI runs a plain ``def`` dependency in its
# thread pool, a round trip per dependency per request; only database work goes there.


async def _service(request: Request) -> ServiceState:
    return service(request)


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Session:
    """A browser session: its id (CSRF tokens derive from it) and the signed-in user id
    (0 when anonymous)."""

    sid: str
    user_id: int
    expires: int


def _sign(secret: bytes, text: str) -> str:
    digest = hmac.new(secret, text.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def encode_session(secret: bytes, session: Session) -> str:
    """The cookie value: ``sid.user_id.expires.signature``."""
    body = f"{session.sid}.{session.user_id}.{session.expires}"
    return f"{body}.{_sign(secret, body)}"


def decode_session(secret: bytes, value: str | None) -> Session | None:
    """The session in a cookie value, or None when absent, forged or expired."""
    parts = (value or "").split(".")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    body = ".".join(parts[:3])
    if not hmac.compare_digest(_sign(secret, body), parts[3]):
        return None
    session = Session(parts[0], int(parts[1]), int(parts[2]))
    return session if session.expires > time.time() else None


def new_session(user_id: int = 0) -> Session:
    """A fresh session (a new id, so a signed-in session never reuses an anonymous one)."""
    return Session(secrets.token_urlsafe(16), user_id, int(time.time()) + SESSION_SECONDS)


def csrf_token(secret: bytes, session: Session) -> str:
    """The CSRF token of a session (HMAC of its id)."""
    return _sign(secret, f"csrf:{session.sid}")


def request_session(request: Request) -> Session | None:
    """The request's valid session cookie, if any."""
    return decode_session(service(request).secret, request.cookies.get(SESSION_COOKIE))


def check_csrf(request: Request, token: str | None) -> Session:
    """The session of a form post whose CSRF token matches it.

    Raises:
        HTTPException: 403 when the session or the token is missing or wrong.
    """
    session = request_session(request)
    state = service(request)
    if (
        session is None
        or not token
        or not hmac.compare_digest(csrf_token(state.secret, session), token)
    ):
        raise HTTPException(
            403, "missing or wrong CSRF token: reload the page and submit the form again"
        )
    return session


def set_session_cookie(response: Any, state: ServiceState, session: Session) -> None:
    """Set the session cookie (HttpOnly, SameSite=Lax, Secure when configured)."""
    response.set_cookie(
        SESSION_COOKIE,
        encode_session(state.secret, session),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="lax",
        secure=state.settings.cookie_secure,
        path="/",
    )


# --------------------------------------------------------------------------- users


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return None
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401, "Authorization must be 'Bearer TOKEN'", headers={"WWW-Authenticate": "Bearer"}
        )
    return token.strip()


async def current_user(request: Request) -> dict[str, Any] | None:
    """The user of a request: by ``Authorization: Bearer TOKEN`` (API), else by the
    session cookie (pages); None when anonymous.

    Raises:
        HTTPException: 401 for a token that is unknown (or whose user was deleted).
    """
    token = _bearer(request)
    session = None if token is not None else request_session(request)
    if token is None and (session is None or not session.user_id):
        return None  # anonymous: no database round trip
    user_id = 0 if session is None else session.user_id
    return await anyio.to_thread.run_sync(_look_up_user, service(request), token, user_id)


def _look_up_user(state: ServiceState, token: str | None, user_id: int) -> dict[str, Any] | None:
    with state.store.read() as conn:
        if token is None:
            return accounts.user_by_id(conn, user_id)
        user = accounts.user_for_token(conn, token)
    if user is None:
        raise HTTPException(
            401, "unknown or revoked API token", headers={"WWW-Authenticate": "Bearer"}
        )
    return user


CurrentUser = Annotated[dict[str, Any] | None, Depends(current_user)]


async def require_reader(request: Request, user: CurrentUser) -> dict[str, Any] | None:
    """Reading the store: open, or any signed-in role when ``read_open`` is off.

    Raises:
        HTTPException: 401 when reading needs an account and there is none.
    """
    if user is None and not service(request).settings.read_open:
        raise HTTPException(401, "sign in or send an API token to read this store")
    return user


def require_role(role: str) -> Callable[..., Awaitable[dict[str, Any]]]:
    """A dependency that lets only users of ``role`` or above through (401 / 403)."""

    async def dependency(user: CurrentUser) -> dict[str, Any]:
        if user is None:
            raise HTTPException(
                401,
                f"this needs a {role} account: sign in or send an API token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if ROLE_RANK[user["role"]] < ROLE_RANK[role]:
            raise HTTPException(403, f"user {user['name']} is a {user['role']}; this needs {role}")
        return user

    return dependency


async def rate_limit(request: Request, user: CurrentUser) -> None:
    """Count a predict call against its client (user, else address).

    Raises:
        HTTPException: 429 with ``Retry-After`` when over the limit.
    """
    key = f"user:{user['id']}" if user else f"ip:{request.client.host if request.client else '-'}"
    wait = service(request).rate.retry_after(key)
    if wait:
        raise HTTPException(
            429,
            f"too many predictions: at most {service(request).rate.per_minute} a minute; "
            f"retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )


# --------------------------------------------------------------------------- pages


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    session: Session | None = None,
) -> HTMLResponse:
    """A page with the user, the CSRF token and the research-use note in its context;
    starts an anonymous session (for the CSRF token) when there is none."""
    state = service(request)
    fresh = session is not None
    session = session or request_session(request)
    if session is None:
        session, fresh = new_session(), True
    with state.store.read() as conn:
        user = accounts.user_by_id(conn, session.user_id) if session.user_id else None
    page = {
        "request": request,
        "user": user,
        "csrf_token": csrf_token(state.secret, session),
        "research_note": RESEARCH_USE_ONLY,
        **(context or {}),
    }
    response = TEMPLATES.TemplateResponse(request, template, page, status_code=status_code)
    if fresh:
        set_session_cookie(response, state, session)
    return response


State = Annotated[ServiceState, Depends(_service)]
Reader = Annotated[dict[str, Any] | None, Depends(require_reader)]


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def json_bytes(data: Any) -> bytes:
    """Plain data (store rows: dates become ISO text) as JSON, by :func:`json.dumps`:
    several times faster than FastAPI's generic encoder on store rows."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=_json_default)
    return text.encode("utf-8")


def json_response(data: Any, status_code: int = 200) -> Response:
    """Plain data (or already encoded JSON bytes) as a JSON response."""
    body = data if isinstance(data, bytes) else json_bytes(data)
    return Response(body, status_code, media_type="application/json")
