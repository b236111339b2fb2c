"""Property-based: any table text and any image header give a result or a named error."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from faults_helpers import png_chunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import UPSTREAM_HEADER, encode, xray_like
from covidcxr.errors import ImageError, MetadataError
from covidcxr.imaging.decode import MAX_ASPECT_RATIO, decode_image
from covidcxr.ingest.table import read_table

GOOD_PNG = encode(xray_like(1, (64, 48)))
GOOD_JPEG = encode(xray_like(2, (64, 48)), "JPEG", quality=90)
# Characters that break CSV readers: quotes, separators, line ends, NUL, BOM, escapes.
NASTY = st.sampled_from(['"', ",", "\n", "\r", "\x00", "\ufeff", "\x1b", "#", " ", "a", "é", "["])
CELL = st.text(alphabet=st.one_of(NASTY, st.characters()), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.lists(CELL, min_size=1, max_size=6),
    rows=st.lists(st.lists(CELL, max_size=7), max_size=5),
    encoding=st.sampled_from(["utf-8", "utf-16", "cp1252"]),
)
def test_read_table_reads_or_names_the_problem(
    header: list[str], rows: list[list[str]], encoding: str
) -> None:
    text = "\n".join(",".join(cells) for cells in [header, *rows]) + "\n"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "metadata.csv"
        path.write_bytes(text.encode(encoding, errors="replace"))
        try:
            table = read_table(path)
        except MetadataError as exc:
            assert "metadata.csv" in str(exc)
            return
    assert table.rows, "a table with no rows must be an error"
    for row in table.rows:
        assert len(row.cells) == len(table.headers)
        assert not any("\x00" in cell for cell in row.cells)
    assert not any("\x00" in h for h in table.headers)


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(0, 2**32 - 1),
    height=st.integers(0, 2**32 - 1),
    depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]),
    colour=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
)
def test_png_header_lies_are_named_errors(width: int, height: int, depth: int, colour: int) -> None:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    # The good image's own pixel data behind a header that may lie about everything.
    idat = GOOD_PNG[GOOD_PNG.index(b"IDAT") - 4 : GOOD_PNG.index(b"IEND") - 4]
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + idat + png_chunk(b"IEND", b"")
    try:
        decoded = decode_image(data, name="lie.png", max_pixels=4_000_000)
    except ImageError as exc:
        assert "'lie.png'" in str(exc) and exc.code
        return
    info = decoded.info
    assert (info.width, info.height) == (width, height)
    assert max(width, height) <= MAX_ASPECT_RATIO * min(width, height)
    assert width * height <= 4_000_000


@settings(max_examples=150, deadline=None)
@given(offset=st.integers(2, 400), value=st.integers(0, 255), cut=st.integers(0, 4000))
def test_jpeg_byte_damage_is_a_named_error_or_a_faithful_image(
    offset: int, value: int, cut: int
) -> None:
    damaged = bytearray(GOOD_JPEG)
    damaged[offset % len(damaged)] = value
    data = bytes(damaged[: len(damaged) - cut])
    try:
        decoded = decode_image(data, name="hurt.jpg", max_pixels=4_000_000)
    except ImageError as exc:
        assert "'hurt.jpg'" in str(exc) and exc.code
        return
    assert decoded.info.width * decoded.info.height <= 4_000_000


def test_upstream_header_itself_is_read() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "metadata.csv"
        path.write_text(",".join(UPSTREAM_HEADER) + "\n" + ",".join(["1"] * 29) + "\n")
        assert len(read_table(path).rows) == 1
