"""Predictions: ``POST /api/v1/predict`` and the clinician's upload page."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse

from covidcxr.models.engines import quality_note
from covidcxr.serve import predicting
from covidcxr.serve.deps import (
    Reader,
    State,
    check_csrf,
    rate_limit,
    render,
    require_reader,
    service,
)

router = APIRouter()

Files = Annotated[list[UploadFile], File(alias="file", description="PNG or JPEG images")]


@router.post(
    "/api/v1/predict",
    dependencies=[Depends(require_reader), Depends(rate_limit)],
)
async def predict_api(
    state: State,
    file: Files,
    heatmaps: bool = Query(False, description="include heatmaps as base64 PNG data URLs"),
) -> dict[str, Any]:
    """One result per uploaded image, with the fields of ``covidcxr predict --format json``
    (plus ``heatmap_png`` when asked for). Research use only, not a diagnosis."""
    rows, _ = await predicting.predict_uploads(state, file, heatmaps=heatmaps)
    return {"results": [predicting.api_result(row) for row in rows]}


@router.get("/", response_class=HTMLResponse)
async def upload_page(request: Request, _reader: Reader) -> HTMLResponse:
    """The clinician's page: upload chest X-rays for a second opinion."""
    state = service(request)
    return render(request, "predict.html", {"max_files": state.settings.max_files})


@router.post(
    "/predict",
    response_class=HTMLResponse,
    dependencies=[Depends(require_reader), Depends(rate_limit)],
)
async def predict_page(
    state: State,
    request: Request,
    file: Files,
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """The results page for uploaded images (the uploads are not kept)."""
    check_csrf(request, csrf_token)
    rows, previews = await predicting.predict_uploads(state, file, heatmaps=True, previews=True)
    bundle = state.bundle()
    results = [
        predicting.page_result(row, preview, bundle)
        for row, preview in zip(rows, previews, strict=True)
    ]
    downloads = {
        "csv": predicting.data_url(predicting.export_text(rows, state, "csv"), "text/csv"),
        "json": predicting.data_url(
            predicting.export_text(rows, state, "json"), "application/json"
        ),
    }
    return render(
        request,
        "results.html",
        {
            "results": results,
            "downloads": downloads,
            "bundle": bundle,
            "quality": quality_note(bundle),
            "severity_headers": [
                predicting.SEVERITY_TEXT.get(name, name) for name in bundle.severity
            ],
        },
    )
