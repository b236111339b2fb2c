"""Predictions: ``POST /api/v1/predict`` and the clinician's upload page."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse

from covidcxr.models.abnormality import ZONE_MAP_LABEL
from covidcxr.models.coherence import training_prevalence
from covidcxr.models.engines import quality_note
from covidcxr.models.prognosis_values import Values
from covidcxr.serve import outcomes, predicting
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

#: Why the clinical values are asked for (the API's parameter descriptions).
_RISK = "for the outcome risk (one image only; research estimate, not a diagnosis)"
Number = float | None


async def clinical_query(
    age: Annotated[Number, Query(description=f"age in years, {_RISK}")] = None,
    sex: Annotated[str | None, Query(description=f"M or F, {_RISK}")] = None,
    temperature: Annotated[Number, Query(description=f"body temperature (°C), {_RISK}")] = None,
    spo2: Annotated[Number, Query(description=f"oxygen saturation (%), {_RISK}")] = None,
    wbc: Annotated[Number, Query(description=f"leukocytes (10^3/uL), {_RISK}")] = None,
    neutrophils: Annotated[Number, Query(description=f"neutrophils (10^3/uL), {_RISK}")] = None,
    lymphocytes: Annotated[Number, Query(description=f"lymphocytes (10^3/uL), {_RISK}")] = None,
) -> Values | None:
    """The API's clinical values (the names of ``covidcxr predict``'s options), checked."""
    return outcomes.clinical_values(
        {
            "age": age,
            "sex": sex,
            "temperature": temperature,
            "spo2": spo2,
            "wbc": wbc,
            "neutrophils": neutrophils,
            "lymphocytes": lymphocytes,
        }
    )


async def clinical_form(
    age: Annotated[str, Form()] = "",
    sex: Annotated[str, Form()] = "",
    temperature: Annotated[str, Form()] = "",
    spo2: Annotated[str, Form()] = "",
    wbc: Annotated[str, Form()] = "",
    neutrophils: Annotated[str, Form()] = "",
    lymphocytes: Annotated[str, Form()] = "",
) -> Values | None:
    """The upload form's clinical values (blank: not given), checked."""
    return outcomes.clinical_values(
        {
            "age": age,
            "sex": sex,
            "temperature": temperature,
            "spo2": spo2,
            "wbc": wbc,
            "neutrophils": neutrophils,
            "lymphocytes": lymphocytes,
        }
    )


@router.post(
    "/api/v1/predict",
    dependencies=[Depends(require_reader), Depends(rate_limit)],
)
async def predict_api(
    state: State,
    file: Files,
    values: Annotated[Values | None, Depends(clinical_query)],
    heatmaps: bool = Query(False, description="include heatmaps as base64 PNG data URLs"),
    prevalence: Prevalence = None,
) -> dict[str, Any]:
    """One result per uploaded image, with the fields of ``covidcxr predict --format json``
    (plus ``heatmap_png`` when asked for). With clinical values (one image only), the
    outcome risk columns of ``covidcxr predict --age ... --format json`` too. Research
    use only, not a diagnosis."""
    rows, _, risks = await predicting.predict_uploads(
        state, file, heatmaps=heatmaps, prevalence=prevalence, values=values
    )
    return {"results": [predicting.api_result(row, risks) for row in rows]}


@router.get("/", response_class=HTMLResponse)
async def upload_page(request: Request, _reader: Reader) -> HTMLResponse:
    """The clinician's page: upload chest X-rays for a second opinion."""
    state = service(request)
    bundle = await anyio.to_thread.run_sync(state.bundle)
    context = {
        "max_files": state.settings.max_files,
        "model_prevalence": training_prevalence(bundle.training),
        "clinical_fields": outcomes.form_fields(),
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
    values: Annotated[Values | None, Depends(clinical_form)],
    csrf_token: Annotated[str, Form()] = "",
    prevalence: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """The results page for uploaded images (the uploads and clinical values are not
    kept)."""
    check_csrf(request, csrf_token)
    local = predicting.parse_prevalence(prevalence)
    rows, viewers, risks = await predicting.predict_uploads(
        state, file, heatmaps=True, prevalence=local, viewers=True, values=values
    )
    bundle = state.bundle()
    results = [
        predicting.page_result(row, viewer, bundle)
        for row, viewer in zip(rows, viewers, strict=True)
    ]
    if risks is not None:
        results[0]["outcome"] = outcomes.view(risks, values or {})
    downloads = {
        fmt: predicting.data_url(predicting.export_text(rows, state, fmt, risks), mime)
        for fmt, mime in (("csv", "text/csv"), ("json", "application/json"))
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
            "zone_map_label": ZONE_MAP_LABEL,
            "severity_headers": [
                predicting.SEVERITY_TEXT.get(name, name) for name in bundle.severity
            ],
        },
    )
