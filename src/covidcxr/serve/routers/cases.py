"""Contributed cases: submit (contributor), review and decide (curator), API and pages."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse

from covidcxr.imaging.decode import sniff_format
from covidcxr.serve import contributions
from covidcxr.serve.deps import ServiceState, State, check_csrf, render, require_role
from covidcxr.serve.predicting import ACCEPTED, client_name
from covidcxr.store import accounts

router = APIRouter()

Contributor = Annotated[dict[str, Any], Depends(require_role("contributor"))]
Curator = Annotated[dict[str, Any], Depends(require_role("curator"))]


async def _images(files: list[UploadFile], max_files: int) -> list[tuple[str, bytes]]:
    """(extension, bytes) per upload, refusing what is not a PNG or JPEG (415)."""
    if not files:
        raise HTTPException(400, "a case needs at least one image (multipart field 'file')")
    if len(files) > max_files:
        raise HTTPException(400, f"{len(files)} images: at most {max_files} per case")
    images = []
    for index, upload in enumerate(files):
        data = await upload.read()
        kind = sniff_format(data[:512])
        if kind not in ACCEPTED:
            raise HTTPException(
                415,
                f"upload {index + 1} ({client_name(upload.filename, index)!r}) holds "
                f"{kind or 'unrecognised'} bytes, not a PNG or JPEG image",
            )
        images.append(("png" if kind == "PNG" else "jpg", data))
    return images


async def _submit(
    request: Request, state: ServiceState, user: dict[str, Any], files: list[UploadFile]
) -> tuple[int | None, dict[str, Any]]:
    form = await request.form()
    metadata = contributions.case_metadata(form)
    images = await _images(files, state.settings.max_files)
    return await anyio.to_thread.run_sync(
        contributions.submit_case, state.store, user["name"], metadata, images
    )


@router.post("/api/v1/cases", status_code=201)
async def submit_api(
    state: State,
    request: Request,
    user: Contributor,
    file: Annotated[list[UploadFile], File(alias="file")],
) -> dict[str, Any]:
    """Submit a case (images + upstream metadata fields); it waits for a curator."""
    case_id, report = await _submit(request, state, user, file)
    if case_id is None:
        raise HTTPException(422, {"message": "the case has errors; nothing kept", "report": report})
    return {"id": case_id, "status": "pending", "report": report}


@router.get("/api/v1/cases")
async def list_cases_api(_user: Curator, state: State, status: str | None = None) -> dict[str, Any]:
    """Contributed cases, newest first."""
    if status is not None and status not in accounts.CASE_STATUSES:
        raise HTTPException(
            422, f"status {status!r}: use one of {', '.join(accounts.CASE_STATUSES)}"
        )
    with state.store.read() as conn:
        return {"cases": accounts.cases(conn, status)}


async def _decide(
    state: ServiceState, case_id: int, user: dict[str, Any], accept: bool, reason: str
) -> None:
    if accept:
        await anyio.to_thread.run_sync(
            contributions.accept_case, state.store, case_id, user["name"], reason
        )
        state.answers.forget_generation()
    else:
        await anyio.to_thread.run_sync(
            contributions.reject_case, state.store, case_id, user["name"], reason
        )


@router.post("/api/v1/cases/{case_id}/accept")
async def accept_api(
    case_id: int, user: Curator, reason: Annotated[str, Form()], state: State
) -> dict[str, Any]:
    """Accept a pending case: it is ingested as source ``contributed-<id>``."""
    await _decide(state, case_id, user, True, reason)
    return {"id": case_id, "status": "accepted"}


@router.post("/api/v1/cases/{case_id}/reject")
async def reject_api(
    case_id: int, user: Curator, reason: Annotated[str, Form()], state: State
) -> dict[str, Any]:
    """Reject a pending case with a reason; its files are deleted."""
    await _decide(state, case_id, user, False, reason)
    return {"id": case_id, "status": "rejected"}


# --------------------------------------------------------------------------- pages


@router.get("/contribute", response_class=HTMLResponse)
async def contribute_page(request: Request, _user: Contributor) -> HTMLResponse:
    """The form to contribute a case."""
    return render(request, "contribute.html", {"fields": contributions.CASE_FIELDS})


@router.post("/contribute", response_class=HTMLResponse)
async def contribute(
    state: State,
    request: Request,
    user: Contributor,
    file: Annotated[list[UploadFile], File(alias="file")],
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """Validate and keep a contributed case as pending; shows the ingest report."""
    check_csrf(request, csrf_token)
    case_id, report = await _submit(request, state, user, file)
    return render(
        request,
        "contributed.html",
        {"case_id": case_id, "report": report},
        status_code=201 if case_id is not None else 422,
    )


@router.get("/review", response_class=HTMLResponse)
async def review_page(request: Request, _user: Curator, state: State) -> HTMLResponse:
    """Pending cases for a curator to accept or reject, and the decided ones."""
    with state.store.read() as conn:
        found = accounts.cases(conn)
    return render(request, "review.html", {"cases": found})


@router.post("/review/{case_id}")
async def review(
    state: State,
    request: Request,
    case_id: int,
    user: Curator,
    decision: Annotated[str, Form()],
    reason: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Accept or reject a case (form post)."""
    check_csrf(request, csrf_token)
    if decision not in ("accept", "reject"):
        raise HTTPException(422, f"decision {decision!r}: use accept or reject")
    await _decide(state, case_id, user, decision == "accept", reason)
    return RedirectResponse("/review", status_code=303)
