"""Hostile inputs made in code, and a child-process runner, for the fault tests."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from conftest import encode, xray_like

SRC = Path(__file__).resolve().parents[2] / "src"


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def blank_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of ``width`` x ``height`` zeros, compressed in pieces so
    that a 79,000,000-pixel image is ~80 KB on disk and never whole in memory here."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" * (1 + width)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    parts: list[bytes] = []
    rows_per_piece = max(1, (1 << 20) // len(row))
    for start in range(0, height, rows_per_piece):
        parts.append(compressor.compress(row * min(rows_per_piece, height - start)))
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def real_jpeg(seed: int = 1, size: tuple[int, int] = (256, 224)) -> bytes:
    """A baseline JPEG with X-ray-like content."""
    return encode(xray_like(seed, size), "JPEG", quality=90)


def cut_jpeg_with_eoi(data: bytes, fraction: float) -> bytes:
    """``data`` cut at ``fraction`` of its length, with an end-of-image marker appended."""
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def jpeg_claiming(data: bytes, width: int, height: int) -> bytes:
    """``data`` with its frame header patched to claim ``width`` x ``height``."""
    from PIL import Image

    assert Image.open(io.BytesIO(data)).format == "JPEG"
    pos = 2
    while True:
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in (0xC0, 0xC1, 0xC2):
            patched = bytearray(data)
            struct.pack_into(">HH", patched, pos + 5, height, width)
            return bytes(patched)
        pos += 2 + length


def run_child(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (Python source; ``sys.argv[1:]`` are ``args``) in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(SRC.parent / "tests")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def table_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every covidcxr data table (the ingest log left out), sorted."""
    tables = ("sources", "patients", "images", "records", "observations", "findings", "annotations")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                name: sorted(
                    (tuple(r) for r in conn.execute(text(f"SELECT * FROM {name}"))), key=repr
                )
                for name in tables
            }
    finally:
        engine.dispose()


def consistent(url: str, blob_root: Path) -> list[str]:
    """What is wrong with a store: SQLite's own check, and stored records or masks
    whose blob is missing or does not hash to its name (empty: consistent)."""
    from covidcxr.store.blobs import BlobStore

    problems: list[str] = []
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                check = conn.execute(text("PRAGMA integrity_check")).scalar()
                if check != "ok":
                    problems.append(f"integrity_check: {check}")
                fk = conn.execute(text("PRAGMA foreign_key_check")).fetchall()
                problems += [f"foreign key: {row}" for row in fk]
            shas = conn.execute(
                text(
                    "SELECT image_sha256 FROM records WHERE image_sha256 IS NOT NULL "
                    "UNION SELECT mask_sha256 FROM annotations WHERE mask_sha256 IS NOT NULL"
                )
            ).scalars()
            blobs = BlobStore(blob_root)
            problems += [
                f"blob {sha}: {blobs.verify(sha)}" for sha in shas if blobs.verify(sha) != "ok"
            ]
    finally:
        engine.dispose()
    return problems
