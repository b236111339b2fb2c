"""Per-file work of a scan: read, hash, decode and fingerprint one file.

These functions run in worker processes (see :func:`process_files`), so they take
and return plain picklable values and never touch the database.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from covidcxr.errors import ImageError, MissingExtraError
from covidcxr.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    decode_image,
    read_regular_file,
    sniff_format,
)
from covidcxr.imaging.hashing import image_hashes
from covidcxr.store.blobs import sha256_hex


@dataclass(frozen=True)
class FileJob:
    """One file to process.

    Attributes:
        path: the file on disk.
        name: how reports name it (relative to the source root).
        kind: ``image`` (fingerprinted) or ``mask`` (pixel values summarised).
        deid_dir: the folder of the de-identification key; DICOM files are
            de-identified and kept as a PNG of their displayed pixels
            (:func:`covidcxr.imaging.deid.deidentify_image`).
    """

    path: str
    name: str
    kind: str = "image"
    deid_dir: str | None = None


@dataclass(frozen=True)
class FileOutcome:
    """What processing one file gave: ``info`` on success, ``error_*`` otherwise."""

    job: FileJob
    sha256: str | None = None
    info: ImageInfo | None = None
    phash: str | None = None
    phash_detail: str | None = None
    mask_values: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    dicom: DicomFields | None = None


@dataclass(frozen=True)
class DicomFields:
    """What a de-identified DICOM header gives a record (nothing identifying but the
    study's day, which the scan turns into an offset and drops)."""

    patient_pseudonym: str
    modality: str | None
    view_position: str | None
    sex: str | None
    age_years: float | None
    study_day: int | None  # date.toordinal(); turned into offset_days by the scan
    warnings: tuple[str, ...] = ()


def dicom_png(data: bytes, name: str, deid_dir: str, max_pixels: int) -> tuple[bytes, DicomFields]:
    """A DICOM file's displayed pixels as PNG bytes (what is stored) and its
    de-identified header fields.

    Raises:
        ImageError: the file cannot be decoded (see :func:`covidcxr.imaging.dicom.read_dicom`).
        MissingExtraError: the ``dicom`` extra is not installed.
    """
    from covidcxr.imaging import deid  # the dicom extra, only when a DICOM comes

    kept = deid.deidentify_image(data, _key(deid_dir), name=name, max_pixels=max_pixels)
    meta = kept.metadata
    fields = DicomFields(
        patient_pseudonym=kept.patient_pseudonym,
        modality=meta.modality,
        view_position=meta.view_position,
        sex=meta.sex,
        age_years=meta.age_years,
        study_day=meta.study_date.toordinal() if meta.study_date else None,
        warnings=kept.warnings,
    )
    return kept.png, fields


@functools.cache
def _key(deid_dir: str) -> bytes:
    from covidcxr.imaging import deid

    return deid.load_key(deid_dir)


def is_dicom(head: bytes) -> bool:
    """Whether bytes (the first 132 are enough) are a DICOM file, by content."""
    return sniff_format(head) == "DICOM"


def process_file(job: FileJob, max_pixels: int) -> FileOutcome:
    """Read, hash, decode and fingerprint one file.

    Never raises for the file's own sake: anything that goes wrong with it, a
    ``MemoryError`` included, becomes this file's ``error_*`` and the batch goes on.
    """
    try:
        data = read_regular_file(job.path, function="scan")
    except ImageError as exc:
        message = str(exc).replace(repr(job.path), repr(job.name))
        return FileOutcome(job, error_code=exc.code, error_message=message)
    sha = sha256_hex(data)
    try:
        if job.deid_dir is not None and is_dicom(data):
            png, fields = dicom_png(data, job.name, job.deid_dir, max_pixels)
            outcome = _fingerprint(job, sha256_hex(png), png, max_pixels)
            return dataclasses.replace(outcome, dicom=fields)
        return _fingerprint(job, sha, data, max_pixels)
    except (ImageError, MissingExtraError) as exc:
        code = exc.code if isinstance(exc, ImageError) else "missing_extra"
        return FileOutcome(job, sha256=sha, error_code=code, error_message=str(exc))
    except MemoryError:
        return FileOutcome(
            job,
            sha256=sha,
            error_code="out_of_memory",
            error_message=f"{job.name}: ran out of memory decoding it; not stored",
        )
    except Exception as exc:  # one file's bug must not end the batch
        return FileOutcome(
            job,
            sha256=sha,
            error_code="undecodable",
            error_message=f"{job.name}: cannot be processed ({type(exc).__name__}: {exc})",
        )


def _fingerprint(job: FileJob, sha: str, data: bytes, max_pixels: int) -> FileOutcome:
    decoded = decode_image(data, name=job.name, max_pixels=max_pixels)
    try:
        if job.kind == "mask":
            # The histogram is computed in C: far cheaper than np.unique on the pixels.
            histogram = decoded.image.convert("L").histogram()
            values = "/".join(str(v) for v, n in enumerate(histogram) if n)
            if len(values) > 40:
                values = "graded"
            return FileOutcome(job, sha256=sha, info=decoded.info, mask_values=values)
        hashes = image_hashes(decoded.image)
        return FileOutcome(
            job, sha256=sha, info=decoded.info, phash=hashes.phash, phash_detail=hashes.phash_detail
        )
    finally:
        decoded.image.close()


def _process_chunk(jobs: Sequence[FileJob], max_pixels: int) -> list[FileOutcome]:
    return [process_file(job, max_pixels) for job in jobs]


_PROGRESS: contextvars.ContextVar[Callable[[str, int, int], None] | None] = contextvars.ContextVar(
    "covidcxr_scan_progress", default=None
)


@contextlib.contextmanager
def files_progress(progress: Callable[[str, int, int], None] | None) -> Iterator[None]:
    """Report ``("scan", done, total)`` from every :func:`process_files` in the block.

    A context rather than an argument so that each of a scan's file batches
    (images, masks, DICOM files) reports without threading it through every step.
    """
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def process_files(
    jobs: Sequence[FileJob],
    *,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[FileOutcome]:
    """Process files in parallel; outcomes come back in the order of ``jobs``.

    Args:
        jobs: the files.
        workers: processes to use; None = one per CPU; 1 = in this process.
        max_pixels: decompression-bomb limit per image.
    """
    progress = _PROGRESS.get()
    for done, outcome in enumerate(_outcomes(jobs, workers, max_pixels), start=1):
        if progress is not None:
            progress("scan", done, len(jobs))
        yield outcome


def _outcomes(
    jobs: Sequence[FileJob], workers: int | None, max_pixels: int
) -> Iterator[FileOutcome]:
    count = workers if workers is not None else (os.cpu_count() or 1)
    if count <= 1 or len(jobs) < 16:
        for job in jobs:
            yield process_file(job, max_pixels)
        return
    # Chunks amortise the inter-process overhead; many chunks per worker keep
    # them all busy when image sizes vary a lot (200 px to 2,000+ px).
    size = max(1, min(64, len(jobs) // (count * 8)))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    with ProcessPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(_process_chunk, chunk, max_pixels) for chunk in chunks]
        for future in futures:
            yield from future.result()
