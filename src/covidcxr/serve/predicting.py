"""Predictions on uploads: safe saving, inference off the event loop, answers.

Uploads are checked by content (PNG, JPEG or DICOM, 415 otherwise), saved under
server-made names in a private temporary folder, predicted on with the library's
engine (the same rows as ``covidcxr predict``) in a bounded thread pool, and deleted
when the answer is ready. Nothing from an upload (name, pixels, DICOM header) is logged
or kept; answers name an upload by its base name only.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
import numpy as np
from fastapi import HTTPException, UploadFile
from numpy.typing import NDArray
from PIL import Image

from covidcxr.errors import ImageError, MissingExtraError
from covidcxr.imaging.decode import read_image_file, sniff_format
from covidcxr.models import coherence, prognosis_risk, saliency
from covidcxr.models.bundle import ModelBundle
from covidcxr.models.engines import covid_at_chance, restate
from covidcxr.models.inputs import grey_levels
from covidcxr.models.prognosis_risk import OutcomeRisk
from covidcxr.models.prognosis_values import Values
from covidcxr.models.rows import PredictionRow, record_columns
from covidcxr.serve import outcomes
from covidcxr.serve.deps import ServiceState
from covidcxr.tabular import write_rows

log = logging.getLogger(__name__)

ACCEPTED: Final = frozenset({"PNG", "JPEG", "DICOM"})
PREVIEW_SIDE: Final = 512
_CHUNK: Final = 1 << 20

#: Reader codes that refuse the whole request (an image the service cannot take at
#: all), and the status each gets; other failures are answered as refused rows.
REFUSED_STATUS: Final[dict[str, int]] = {
    "too_many_pixels": 413,
    "unsupported_format": 415,
    "unsupported_transfer_syntax": 415,
    "multi_frame": 400,
    "no_pixel_data": 400,
}

#: What would make a refused image usable, by the gate's reason code.
USABLE_IF: Final[dict[str, str]] = {
    "empty_file": "The file is empty: export the image again.",
    "unsupported_format": "Export the image as PNG, JPEG or single-frame DICOM.",
    "too_many_pixels": "Downscale the image to under 80 megapixels.",
    "truncated": "The file is cut short: export or download it again.",
    "undecodable": "The file is damaged: export it again from the viewer or PACS.",
    "unreadable": "The file could not be read: upload it again.",
    "tiny": "Upload the full-resolution radiograph, not a thumbnail.",
    "colourful": "Upload the radiograph itself (greyscale), not a photo, slide or figure.",
    "lateral_xray": "Upload the frontal (PA or AP) view of the same study.",
    "ct": "This model reads chest X-rays only: upload a frontal chest radiograph.",
    "inverted": "Invert the grey levels (bone white, air black) and upload again.",
    "not_medical": "Upload a frontal chest X-ray.",
    "equalised": "Export the image without histogram equalisation (the viewer's or PACS's "
    "unprocessed or default export) and upload again.",
    "not_two_lungs": "Read this image yourself: a lung may be whited out. If both lungs are "
    "plainly visible, upload the unprocessed PA or AP export.",
}


#: The outcome risks of the one image predicted on, or None (no clinical values given).
Risks = list[OutcomeRisk] | None


@dataclass(frozen=True)
class Viewer:
    """What the results page lays over each other for one image, as PNG data URLs.

    Attributes:
        preview: the whole image in grey, at most :data:`PREVIEW_SIDE` px a side.
        lines: the lung outline (transparent elsewhere), or None.
        square: the border of the centre square the network saw (transparent
            elsewhere), or None when the image is square; it belongs with the
            network's maps, not with the lung-zone map.
        heatmaps: per explained finding, the colour map (transparent where cold).
        lungs: whether ``lines`` holds the lung outline.
        cropped: whether the network saw only a centre square (the image is not square).
    """

    preview: str | None = None
    lines: str | None = None
    square: str | None = None
    heatmaps: Mapping[str, str] = field(default_factory=dict)
    lungs: bool = False
    cropped: bool = False


def client_name(raw: str | None, index: int) -> str:
    """The upload's base name, for the answer only (never a path on this server)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:200]
    return name if name not in ("", ".", "..") else f"upload-{index + 1}"


async def save_uploads(files: Sequence[UploadFile], folder: Path, max_files: int) -> list[Path]:
    """Copy uploads to ``folder`` as ``upload-NNN``, refusing anything not PNG, JPEG or
    DICOM (by content: the DICOM ``DICM`` marker at byte 128, whatever the name says).

    Raises:
        HTTPException: 400 no file or too many; 415 an upload is not an accepted image.
    """
    if not files:
        raise HTTPException(400, "no image: send one or more multipart fields named 'file'")
    if len(files) > max_files:
        raise HTTPException(400, f"{len(files)} images: send at most {max_files} per request")
    paths = []
    for index, upload in enumerate(files):
        head = await upload.read(512)
        kind = sniff_format(head)
        if kind not in ACCEPTED:
            what = f"{kind} bytes" if kind else ("no bytes" if not head else "unrecognised bytes")
            raise HTTPException(
                415,
                f"upload {index + 1} ({client_name(upload.filename, index)!r}) holds {what}, "
                "not a PNG, JPEG or DICOM image: export it as PNG or JPEG",
            )
        path = folder / f"upload-{index:03d}"
        with path.open("wb") as handle:
            handle.write(head)
            while chunk := await upload.read(_CHUNK):
                handle.write(chunk)
        paths.append(path)
    return paths


def _as_uploaded(row: PredictionRow, path: Path, name: str) -> PredictionRow:
    """The row naming the upload as the client did: the server's path never leaves."""
    reason = row.gate.reason.replace(str(path), name)
    return dataclasses.replace(row, file=name, gate=dataclasses.replace(row.gate, reason=reason))


def _predict_sync(
    state: ServiceState,
    paths: Sequence[Path],
    names: Sequence[str],
    *,
    heatmaps: bool,
    prevalence: float | None,
    viewers: bool,
    values: Values | None,
) -> tuple[list[PredictionRow], list[Viewer], Risks]:
    engine = state.engine()
    rows = engine.predict_files(paths, heatmaps=heatmaps)
    risks = None if values is None else outcomes.risks(state, paths[0], rows[0], values)
    if prevalence is not None:
        rows = restate(rows, engine.bundle, prevalence)
    rows = [_as_uploaded(*parts) for parts in zip(rows, paths, names, strict=True)]
    shown = [
        make_viewer(path, row) if viewers else Viewer()
        for path, row in zip(paths, rows, strict=True)
    ]
    return rows, shown, risks


async def predict_uploads(
    state: ServiceState,
    files: Sequence[UploadFile],
    *,
    heatmaps: bool,
    prevalence: float | None = None,
    viewers: bool = False,
    values: Values | None = None,
) -> tuple[list[PredictionRow], list[Viewer], Risks]:
    """Predict on uploads, in the bounded pool; the uploads are deleted before returning.

    Args:
        state: the service.
        files: the uploads.
        heatmaps: keep each explained finding's map in the rows.
        prevalence: the local COVID-19 prevalence the coherent summary assumes (None:
            the model's training prevalence), as ``covidcxr predict --prevalence``.
        viewers: also make the results page's images (:class:`Viewer`).
        values: one patient's clinical values (:func:`outcomes.clinical_values`) for
            the outcome risks of the one upload; None: no risks.

    Returns:
        The rows (``file`` is the upload's base name), one :class:`Viewer` per
        upload (empty unless ``viewers``), and the outcome risks (None without values).

    Raises:
        MetadataError: values with other than one upload.
        HTTPException: 400/415 (see :func:`save_uploads`); 413 an image has more
            pixels than the ingest limit; 415 or 400 a DICOM the reader cannot take
            (unsupported encoding, several frames, no pixel data), with its reason.
    """
    outcomes.require_one_image(values, len(files))
    folder = Path(tempfile.mkdtemp(prefix="covidcxr-upload-"))
    started = time.perf_counter()
    try:
        paths = await save_uploads(files, folder, state.settings.max_files)
        names = [client_name(f.filename, i) for i, f in enumerate(files)]
        rows, shown, risks = await anyio.to_thread.run_sync(
            lambda: _predict_sync(
                state,
                paths,
                names,
                heatmaps=heatmaps,
                prevalence=prevalence,
                viewers=viewers,
                values=values,
            ),
            limiter=state.limiter,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for index, row in enumerate(rows):
        _refuse_unreadable(index, row)
    log.info("predicted %d image(s) in %.2f s", len(rows), time.perf_counter() - started)
    return rows, shown, risks


def _refuse_unreadable(index: int, row: PredictionRow) -> None:
    """Raise the status of :data:`REFUSED_STATUS` for a row whose file cannot be taken."""
    status = REFUSED_STATUS.get(row.gate.code)
    if status is None:
        return
    if row.gate.code == "too_many_pixels":
        raise HTTPException(
            status, f"upload {index + 1} ({row.file!r}): {USABLE_IF[row.gate.code]}"
        )
    raise HTTPException(status, f"upload {index + 1} ({row.file!r}): {row.gate.reason}")


def decoded_image(path: Path) -> Image.Image | None:
    """An upload's decoded image (PNG, JPEG or DICOM, its header dropped), or None."""
    try:
        with path.open("rb") as handle:
            kind = sniff_format(handle.read(512))
        if kind == "DICOM":
            from covidcxr.imaging import dicom

            return dicom.read_dicom_file(path)[1].image
        return read_image_file(path)[1].image
    except (ImageError, MissingExtraError, OSError):  # the row already says why
        return None


def make_viewer(path: Path, row: PredictionRow) -> Viewer:
    """The results page's images for one upload: the grey preview, and for explained
    findings the heatmaps with the lung outline over the whole image."""
    image = decoded_image(path)
    if image is None:
        return Viewer()
    grey = Image.fromarray(grey_levels(image), mode="L")
    grey.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    preview = png_data_url(grey)
    if not row.heatmaps:
        return Viewer(preview)
    levels = np.asarray(grey)
    lungs = saliency.lung_mask(levels)
    cropped = image.width != image.height
    outline = saliency.line_layer(grey.height, grey.width, lungs, seen_box=False)
    square = saliency.line_layer(grey.height, grey.width) if cropped else None
    return Viewer(
        preview=preview,
        lines=None if lungs is None else png_data_url(Image.fromarray(outline, mode="RGBA")),
        square=None if square is None else png_data_url(Image.fromarray(square, mode="RGBA")),
        heatmaps={label: heatmap_png(h, grey.size) for label, h in row.heatmaps.items()},
        lungs=lungs is not None,
        cropped=cropped,
    )


def png_data_url(image: Image.Image) -> str:
    """An image as a PNG data URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_png(heat: NDArray[np.float32], size: tuple[int, int] | None = None) -> str:
    """A [0, 1] heatmap as an RGBA PNG data URL: the colour map, transparent where cold.

    Args:
        heat: the map on the whole image.
        size: the (width, height) to draw it at (default: at most :data:`PREVIEW_SIDE`
            px a side, in the image's proportions).
    """
    image = Image.fromarray(np.asarray(heat * 255, dtype=np.uint8), mode="L")
    if size is None:
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    else:
        image = image.resize(size, Image.Resampling.BILINEAR)
    levels = np.asarray(image)
    rgba = np.empty((*levels.shape, 4), dtype=np.uint8)
    rgba[..., :3] = saliency.COLOUR_MAP[levels]
    rgba[..., 3] = _heat_alpha(levels)
    return png_data_url(Image.fromarray(rgba, mode="RGBA"))


def _heat_alpha(levels: NDArray[Any]) -> NDArray[np.uint8]:
    """Opacity per heat level (0-255): cold areas stay see-through so the anatomy shows;
    the colour fades in from 20% heat and is opaque from 79%."""
    alpha = (np.asarray(levels, dtype=np.float32) - 51.0) * (255.0 / 150.0)
    result: NDArray[np.uint8] = np.clip(alpha, 0, 255).astype(np.uint8)
    return result


def legend_gradient(stops: int = 11) -> str:
    """The heatmap layer's colours and opacity from no heat to full heat, as a CSS
    ``linear-gradient`` (the legend's colour bar)."""
    levels = np.linspace(0, 255, stops).round().astype(np.intp)
    alphas = _heat_alpha(levels)
    parts = [
        f"rgba({r}, {g}, {b}, {alpha / 255:.2f}) {100 * level / 255:.0f}%"
        for (r, g, b), alpha, level in zip(saliency.COLOUR_MAP[levels], alphas, levels, strict=True)
    ]
    return "linear-gradient(to right, " + ", ".join(parts) + ")"


def api_result(row: PredictionRow, risks: Risks = None) -> dict[str, Any]:
    """A row as the API returns it: :meth:`PredictionRow.record` with the outcome risk
    columns when there are risks (as ``covidcxr predict --format json --age ...``), plus
    the heatmaps as base64 PNG data URLs under ``heatmap_png`` (finding -> URL) when they
    were asked for."""
    result = {**row.record(), **prognosis_risk.risk_record(risks)}
    if row.heatmaps:
        result["heatmap_png"] = {label: heatmap_png(h) for label, h in row.heatmaps.items()}
    return result


def export_text(
    rows: Sequence[PredictionRow], state: ServiceState, fmt: str, risks: Risks = None
) -> str:
    """The rows as ``covidcxr predict --format csv|json`` prints them (with the outcome
    risk columns when there are risks: one row, as ``predict --age ...``)."""
    buffer = io.StringIO()
    columns = record_columns(state.bundle())
    records = [row.record() for row in rows]
    if risks is not None:
        columns = [*columns, *prognosis_risk.risk_columns([r.outcome for r in risks])]
        records = [{**record, **prognosis_risk.risk_record(risks)} for record in records]
    write_rows(records, columns, fmt, out=buffer)
    return buffer.getvalue()


SEVERITY_TEXT: Final = {
    "geographic_extent": "Geographic extent",
    "opacity": "Opacity",
}


def parse_prevalence(text: str | None) -> float | None:
    """The upload form's local COVID-19 prevalence: blank is None, else a fraction
    strictly between 0 and 1 (``5%`` and ``0.05`` are the same).

    Raises:
        HTTPException: 422 naming the value and what to give instead.
    """
    value = (text or "").strip()
    if not value:
        return None
    percent = value.endswith("%")
    try:
        number = float(value.rstrip("%").strip()) / (100.0 if percent else 1.0)
    except ValueError:
        number = -1.0
    if not 0.0 < number < 1.0:
        raise HTTPException(
            422,
            f"prevalence {value!r}: give the share of your patients with COVID-19 strictly "
            "between 0 and 1 (0.05) or as a percentage (5%), or leave it blank",
        )
    return number


def summary_steps(summary: coherence.Summary | None, bundle: ModelBundle) -> dict[str, Any] | None:
    """The coherent answer in the order a clinician asks: pneumonia at all, if so viral,
    if so COVID-19, with the prevalence it assumes (None when the model cannot say)."""
    if summary is None:
        return None
    pneumonia = summary.pneumonia
    return {
        "pneumonia": pneumonia,
        "viral_if_pneumonia": summary.viral / pneumonia if pneumonia > 0 else 0.0,
        "covid_if_pneumonia": summary.covid_if_pneumonia,
        "covid": summary.covid,
        "prevalence": summary.prevalence,
        "model_prevalence": coherence.training_prevalence(bundle.training),
        "covid_at_chance": covid_at_chance(bundle),
    }


def _findings(row: PredictionRow, bundle: ModelBundle) -> list[dict[str, Any]]:
    findings: list[dict[str, Any]] = []
    for index, label in enumerate(bundle.findings):
        probability = row.probabilities.get(label)
        if probability is None:
            continue
        if label in row.no_call:
            call = "no call"
        elif row.positive is not None and label in row.positive:
            call = "positive"
        else:
            call = "below threshold"
        findings.append(
            {
                "label": label,
                "probability": probability,
                "threshold": bundle.thresholds[index],
                "call": call,
            }
        )
    findings.sort(key=lambda f: -float(f["probability"]))
    return findings


def _severity(row: PredictionRow, bundle: ModelBundle) -> list[dict[str, Any]]:
    severity = []
    for index, (name, score) in enumerate(row.severity.items()):
        if score is None:
            continue
        low, high = bundle.severity_ranges[index]
        severity.append(
            {
                "name": SEVERITY_TEXT.get(name, name.replace("_", " ").capitalize()),
                "mean": score.mean,
                "low": score.low,
                "high": score.high,
                "range_low": low,
                "range_high": high,
                "level": score.level,
            }
        )
    return severity


def page_result(row: PredictionRow, viewer: Viewer, bundle: ModelBundle) -> dict[str, Any]:
    """What the results page shows for one image: verdict and reason (and what would
    make a refused image usable), the coherent summary, findings with their operating
    points, severity on its scales, the image with heatmaps and the lung outline."""
    return {
        "file": row.file,
        "passed": row.gate.passed,
        "reason": row.gate.reason,
        "check_failed": ", ".join(row.gate.checks_failed)
        + (f" ({row.gate.code.replace('_', ' ')})" if row.gate.code else ""),
        "lungs_first": bool(bundle.extra.get("abnormality")),
        "usable_if": "" if row.gate.passed else USABLE_IF.get(row.gate.code, ""),
        "summary": summary_steps(row.summary, bundle),
        "findings": _findings(row, bundle),
        "positive": list(row.positive or ()),
        "severity": _severity(row, bundle),
        "viewer": viewer,
        "model_id": row.model_id,
        "weights_sha256": row.weights_sha256,
        "note": row.note,
    }


def data_url(text: str, mime: str) -> str:
    """Text as a base64 data URL (the page's download links)."""
    return f"data:{mime};base64," + base64.b64encode(text.encode("utf-8")).decode("ascii")
