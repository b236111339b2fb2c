"""Two ingests of one source at once, on a new database: they serialise, both succeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from faults_helpers import SRC, consistent

from conftest import MakeCollection, upstream_row, write_metadata
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store import queries
from covidcxr.store.db import open_store

CHILD = """
import json, pathlib, sys, time
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.db import open_store

root, url, data, go = sys.argv[1:]
while not pathlib.Path(go).exists():
    time.sleep(0.01)
with open_store(url, data, create=True) as store:
    outcome = ingest_source(root, store, workers=1)
print(json.dumps(outcome.summary.counts))
"""


def ingest_twice_at_once(root: Path, url: str, data: Path, tmp_path: Path) -> list[dict[str, int]]:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CHILD), str(root), url, str(data), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(3)  # both imported and waiting
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err
        assert "Traceback" not in err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def check_serialised(results: list[dict[str, int]], url: str, data: Path) -> None:
    added = sorted(r["records_added"] for r in results)
    unchanged = sorted(r["records_unchanged"] for r in results)
    assert added == [0, 4] and unchanged == [0, 4]  # one wrote, the other found it done
    assert consistent(url, data / "blobs") == []
    with open_store(url, data) as store, store.read() as conn:
        rows = queries.list_records(conn)
        assert len(rows) == 4
        assert queries.stats(conn, queries.RecordFilter())["records"] == 4


def test_concurrent_ingests_on_a_new_sqlite_database(
    make_collection: MakeCollection, tmp_path: Path
) -> None:
    root = make_collection()
    url, data = f"sqlite:///{tmp_path / 'new.sqlite'}", tmp_path / "data"
    results = ingest_twice_at_once(root, url, data, tmp_path)
    check_serialised(results, url, data)


@pytest.mark.postgres
def test_concurrent_ingests_on_postgresql(
    make_collection: MakeCollection, tmp_path: Path, postgres_url: str
) -> None:
    root = make_collection()
    data = tmp_path / "data"
    results = ingest_twice_at_once(root, postgres_url, data, tmp_path)
    check_serialised(results, postgres_url, data)


def test_readers_never_see_half_an_ingest(
    make_collection: MakeCollection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that looks while an ingest is between its steps sees the old store."""
    root = make_collection()
    url, data = f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path / "data"
    seen: list[int] = []

    def look(phase: str, done: int, total: int) -> None:
        if phase == "database" and 0 < done < total:
            with open_store(url, data) as reader, reader.read() as conn:
                seen.append(len(queries.list_records(conn)))

    with open_store(url, data, create=True) as store:
        ingest_source(root, store, workers=1)  # creates the store, with 4 records
        rows = [upstream_row(patientid="1", filename="p1.png"), upstream_row(patientid="2")]
        write_metadata(root / "metadata.csv", rows)
        ingest_source(root, store, workers=1, progress=look, allow_removals=True)
        with store.read() as conn:
            assert len(queries.list_records(conn)) == 2
    assert seen and set(seen) == {4}
