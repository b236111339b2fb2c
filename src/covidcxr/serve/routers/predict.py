"""Predictions: ``POST /api/v1/predict`` and the clinician's upload page."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse

from covidcxr.models.coherence import training_prevalence
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

Files = Annotated[list[UploadFile], File(alias="file", description="PNG, JPEG or DICOM images")]
Prevalence = Annotated[
    float | None,
    Query(
        gt=0,
        lt=1,
        description="your COVID-19 prevalence (0-1): the coherent summary is re-stated for "
        "it, as `covidcxr predict --prevalence` (default: the model's training prevalence)",
    ),
]


@router.post(
    "/api/v1/predict",
    dependencies=[Depends(require_reader), Depends(rate_limit)],
)
async def predict_api(
    state: State,
    file: Files,
    heatmaps: bool = Query(False, description="include heatmaps as base64 PNG data URLs"),
    prevalence: Prevalence = None,
) -> dict[str, Any]:
    """One result per uploaded image, with the fields of ``covidcxr predict --format json``
    (plus ``heatmap_png`` when asked for). Research use only, not a diagnosis."""
    rows, _ = await predicting.predict_uploads(
        state, file, heatmaps=heatmaps, prevalence=prevalence
    )
    return {"results": [predicting.api_result(row) for row in rows]}


@router.get("/", response_class=HTMLResponse)
async def upload_page(request: Request, _reader: Reader) -> HTMLResponse:
    """The clinician's page: upload chest X-rays for a second opinion."""
    state = service(request)
    bundle = await anyio.to_thread.run_sync(state.bundle)
    context = {
        "max_files": state.settings.max_files,
        "model_prevalence": training_prevalence(bundle.training),
    }
    return render(request, "predict.html", context)


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
    prevalence: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """The results page for uploaded images (the uploads are not kept)."""
    check_csrf(request, csrf_token)
    local = predicting.parse_prevalence(prevalence)
    rows, viewers = await predicting.predict_uploads(
        state, file, heatmaps=True, prevalence=local, viewers=True
    )
    bundle = state.bundle()
    results = [
        predicting.page_result(row, viewer, bundle)
        for row, viewer in zip(rows, viewers, strict=True)
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
            "legend_gradient": predicting.legend_gradient(),
            "severity_headers": [
                predicting.SEVERITY_TEXT.get(name, name) for name in bundle.severity
            ],
        },
    )
