"""Signing in and out (session cookie), and the audit log for curators."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from covidcxr.serve.deps import (
    ServiceState,
    State,
    check_csrf,
    new_session,
    render,
    require_role,
    set_session_cookie,
)
from covidcxr.store import accounts

router = APIRouter()


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> HTMLResponse:
    """The sign-in form."""
    return render(request, "login.html")


def _check_password(state: ServiceState, name: str, password: str) -> dict[str, Any] | None:
    with state.store.read() as conn:
        user = accounts.find_user(conn, name.strip())
    if user is None or not accounts.verify_password(user["password_hash"], password):
        return None
    return user


@router.post("/login", response_model=None)
async def login(
    state: State,
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse | RedirectResponse:
    """Sign in: a new session bound to the user (303 to the home page)."""
    check_csrf(request, csrf_token)
    user = await anyio.to_thread.run_sync(_check_password, state, username, password)
    if user is None:
        return render(
            request, "login.html", {"error": "wrong user name or password"}, status_code=401
        )
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(response, state, new_session(user["id"]))
    return response


@router.post("/logout")
async def logout(
    state: State,
    request: Request,
    csrf_token: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Sign out: the session is replaced by an anonymous one."""
    check_csrf(request, csrf_token)
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(response, state, new_session())
    return response


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(
    state: State,
    request: Request,
    _user: Annotated[dict[str, Any], Depends(require_role("curator"))],
) -> HTMLResponse:
    """The newest audit entries (who, when, what, why)."""
    with state.store.read() as conn:
        entries = accounts.audit_log(conn)
    return render(request, "audit.html", {"entries": entries})
