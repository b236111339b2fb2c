"""Per-file work of a scan: read, hash, decode and fingerprint one file.

These functions run in worker processes (see :func:`process_files`), so they take
and return plain picklable values and never touch the database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from covidcxr.errors import ImageError
from covidcxr.imaging.decode import DEFAULT_MAX_PIXELS, ImageInfo, decode_image
from covidcxr.imaging.hashing import image_hashes
from covidcxr.store.blobs import sha256_hex


@dataclass(frozen=True)
class FileJob:
    """One file to process.

    Attributes:
        path: the file on disk.
        name: how reports name it (relative to the source root).
        kind: ``image`` (fingerprinted) or ``mask`` (pixel values summarised).
    """

    path: str
    name: str
    kind: str = "image"


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


def process_file(job: FileJob, max_pixels: int) -> FileOutcome:
    """Read, hash, decode and fingerprint one file."""
    try:
        data = Path(job.path).read_bytes()
    except IsADirectoryError:
        return FileOutcome(
            job,
            error_code="unreadable",
            error_message=f"{job.name} is a directory, not an image file",
        )
    except OSError as exc:
        return FileOutcome(
            job,
            error_code="unreadable",
            error_message=f"cannot read {job.name}: {exc.strerror or exc}",
        )
    sha = sha256_hex(data)
    try:
        decoded = decode_image(data, name=job.name, max_pixels=max_pixels)
    except ImageError as exc:
        return FileOutcome(job, sha256=sha, error_code=exc.code, error_message=str(exc))
    if job.kind == "mask":
        # The histogram is computed in C: far cheaper than np.unique on the pixels.
        histogram = decoded.image.convert("L").histogram()
        values = "/".join(str(v) for v, n in enumerate(histogram) if n)
        if len(values) > 40:
            values = "graded"
        outcome = FileOutcome(job, sha256=sha, info=decoded.info, mask_values=values)
    else:
        hashes = image_hashes(decoded.image)
        outcome = FileOutcome(
            job, sha256=sha, info=decoded.info, phash=hashes.phash, phash_detail=hashes.phash_detail
        )
    decoded.image.close()
    return outcome


def _process_chunk(jobs: Sequence[FileJob], max_pixels: int) -> list[FileOutcome]:
    return [process_file(job, max_pixels) for job in jobs]


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
