"""kill -9 during each ingest phase leaves the store as it was; a re-run then completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from faults_helpers import SRC, consistent, table_rows

from conftest import MakeCollection, encode, upstream_row, write_metadata, xray_like
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store import queries
from covidcxr.store.db import open_store

# Ingests, and at the first progress report of PHASE past DONE touches MARKER and
# waits to be killed.
CHILD = """
import pathlib, sys, time
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.db import open_store

root, url, data, phase, done_at, marker = sys.argv[1:]

def progress(name, done, total):
    if name == phase and done >= int(done_at):
        pathlib.Path(marker).touch()
        time.sleep(120)

with open_store(url, data, create=True) as store:
    ingest_source(root, store, workers=1, progress=progress, allow_removals=True)
"""


def records(url: str, data: Path) -> list[dict[str, Any]]:
    with open_store(url, data) as store, store.read() as conn:
        rows = queries.list_records(conn)
    return sorted(({k: v for k, v in r.items() if k != "record_id"} for r in rows), key=repr)


def grow(root: Path) -> None:
    """Change the source: one record changed, one removed, eight new images."""
    rows = [upstream_row(patientid="1", offset="0", filename="p1.png", survival="N")]
    rows += [upstream_row(patientid="2", filename="p2.png")]
    for i in range(8):
        (root / "images" / f"n{i}.png").write_bytes(encode(xray_like(10 + i)))
        rows.append(upstream_row(patientid=f"n{i}", filename=f"n{i}.png"))
    write_metadata(root / "metadata.csv", rows)


@pytest.mark.parametrize(("phase", "done_at"), [("scan", 3), ("blobs", 1), ("database", 3)])
def test_kill_during_ingest_leaves_the_store_consistent(
    phase: str, done_at: int, make_collection: MakeCollection, tmp_path: Path
) -> None:
    root = make_collection()
    url, data = f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path / "data"
    with open_store(url, data, create=True) as store:
        ingest_source(root, store, workers=1)
    before = table_rows(url)
    grow(root)
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    args = [str(root), url, str(data), phase, str(done_at), str(marker)]
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), *args], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, f"the ingest ended before reaching {phase}"
            assert time.monotonic() < deadline, f"the ingest never reached {phase}"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert consistent(url, data / "blobs") == []
    assert table_rows(url) == before  # nothing half-written
    with open_store(url, data) as store:
        ingest_source(root, store, workers=1, allow_removals=True)
    assert consistent(url, data / "blobs") == []
    clean_url, clean_data = f"sqlite:///{tmp_path / 'clean.sqlite'}", tmp_path / "clean"
    with open_store(clean_url, clean_data, create=True) as store:
        ingest_source(root, store, workers=1)
    assert records(url, data) == records(clean_url, clean_data)
