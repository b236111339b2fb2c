"""Predictions on uploads: safe saving, inference off the event loop, answers.

Uploads are checked by content (PNG or JPEG only, 415 otherwise), saved under
server-made names in a private temporary folder, predicted on with the library's
engine (the same rows as ``covidcxr predict``) in a bounded thread pool, and deleted
when the answer is ready. Nothing from an upload (name, pixels) is logged.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
import numpy as np
from fastapi import HTTPException, UploadFile
from numpy.typing import NDArray
from PIL import Image

from covidcxr.cli.output import write_rows
from covidcxr.imaging.decode import sniff_format
from covidcxr.models import saliency
from covidcxr.models.rows import PredictionRow, record_columns
from covidcxr.serve.deps import ServiceState

log = logging.getLogger(__name__)

ACCEPTED: Final = frozenset({"PNG", "JPEG"})
PREVIEW_SIDE: Final = 512
_CHUNK: Final = 1 << 20

#: What would make a refused image usable, by the gate's reason code.
USABLE_IF: Final[dict[str, str]] = {
    "empty_file": "The file is empty: export the image again.",
    "unsupported_format": "Export the image as PNG or JPEG.",
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
}


def client_name(raw: str | None, index: int) -> str:
    """The upload's base name, for the answer only (never a path on this server)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:200]
    return name if name not in ("", ".", "..") else f"upload-{index + 1}"


async def save_uploads(files: Sequence[UploadFile], folder: Path, max_files: int) -> list[Path]:
    """Copy uploads to ``folder`` as ``upload-NNN``, refusing anything not PNG/JPEG.

    Raises:
        HTTPException: 400 no file or too many; 415 an upload is not a PNG or JPEG.
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
                "not a PNG or JPEG image: export it as PNG or JPEG",
            )
        path = folder / f"upload-{index:03d}"
        with path.open("wb") as handle:
            handle.write(head)
            while chunk := await upload.read(_CHUNK):
                handle.write(chunk)
        paths.append(path)
    return paths


def _predict_sync(
    state: ServiceState, paths: Sequence[Path], names: Sequence[str], heatmaps: bool
) -> list[PredictionRow]:
    rows = state.engine().predict_files(paths, heatmaps=heatmaps)
    return [dataclasses.replace(row, file=name) for row, name in zip(rows, names, strict=True)]


async def predict_uploads(
    state: ServiceState, files: Sequence[UploadFile], *, heatmaps: bool, previews: bool = False
) -> tuple[list[PredictionRow], list[str | None]]:
    """Predict on uploads, in the bounded pool; the uploads are deleted before returning.

    Returns:
        The rows (``file`` is the upload's base name) and, when ``previews``, a small
        PNG data URL of each image (None where it cannot be read).

    Raises:
        HTTPException: 400/415 (see :func:`save_uploads`); 413 an image has more
            pixels than the ingest limit.
    """
    folder = Path(tempfile.mkdtemp(prefix="covidcxr-upload-"))
    started = time.perf_counter()
    try:
        paths = await save_uploads(files, folder, state.settings.max_files)
        names = [client_name(f.filename, i) for i, f in enumerate(files)]
        rows = await anyio.to_thread.run_sync(
            _predict_sync, state, paths, names, heatmaps, limiter=state.limiter
        )
        shown: list[str | None] = [None] * len(paths)
        if previews:
            shown = [await anyio.to_thread.run_sync(preview_png, path) for path in paths]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for index, row in enumerate(rows):
        if row.gate.code == "too_many_pixels":
            raise HTTPException(
                413, f"upload {index + 1} ({row.file!r}): {USABLE_IF['too_many_pixels']}"
            )
    log.info("predicted %d image(s) in %.2f s", len(rows), time.perf_counter() - started)
    return rows, shown


def preview_png(path: Path) -> str | None:
    """The image as a small greyscale PNG data URL (for the page), or None."""
    from covidcxr.imaging.decode import read_image_file

    try:
        _, decoded = read_image_file(path)
    except Exception:  # the row already says why it cannot be read
        return None
    image = decoded.image.convert("L")
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return _png_data_url(image)


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_png(heat: NDArray[np.float32]) -> str:
    """A [0, 1] heatmap as an RGBA PNG data URL: the colour map, transparent where cold."""
    image = Image.fromarray(np.asarray(heat * 255, dtype=np.uint8), mode="L")
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    levels = np.asarray(image)
    rgba = np.empty((*levels.shape, 4), dtype=np.uint8)
    rgba[..., :3] = saliency.COLOUR_MAP[levels]
    # Cold areas stay see-through so the anatomy shows; alpha rises from 20% heat on.
    alpha = (levels.astype(np.float32) - 51.0) * (255.0 / 150.0)
    rgba[..., 3] = np.clip(alpha, 0, 255).astype(np.uint8)
    return _png_data_url(Image.fromarray(rgba, mode="RGBA"))


def api_result(row: PredictionRow) -> dict[str, Any]:
    """A row as the API returns it: :meth:`PredictionRow.record`, plus the heatmaps as
    base64 PNG data URLs under ``heatmap_png`` (finding -> URL) when they were asked for."""
    result = row.record()
    if row.heatmaps:
        result["heatmap_png"] = {label: heatmap_png(h) for label, h in row.heatmaps.items()}
    return result


def export_text(rows: Sequence[PredictionRow], state: ServiceState, fmt: str) -> str:
    """The rows as ``covidcxr predict --format csv|json`` prints them."""
    buffer = io.StringIO()
    columns = record_columns(state.bundle())
    write_rows([row.record() for row in rows], columns, fmt, out=buffer)
    return buffer.getvalue()


SEVERITY_TEXT: Final = {
    "geographic_extent": "Geographic extent",
    "opacity": "Opacity",
}


def page_result(row: PredictionRow, preview: str | None, bundle: Any) -> dict[str, Any]:
    """What the results page shows for one image: verdict and reason (and what would
    make a refused image usable), findings with their operating points, severity on
    its scales, heatmaps."""
    findings = []
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
    return {
        "file": row.file,
        "passed": row.gate.passed,
        "reason": row.gate.reason,
        "check_failed": ", ".join(row.gate.checks_failed),
        "usable_if": "" if row.gate.passed else USABLE_IF.get(row.gate.code, ""),
        "findings": findings,
        "positive": list(row.positive or ()),
        "severity": severity,
        "preview": preview,
        "heatmaps": {label: heatmap_png(h) for label, h in row.heatmaps.items()},
        "model_id": row.model_id,
        "weights_sha256": row.weights_sha256,
        "note": row.note,
    }


def data_url(text: str, mime: str) -> str:
    """Text as a base64 data URL (the page's download links)."""
    return f"data:{mime};base64," + base64.b64encode(text.encode("utf-8")).decode("ascii")
