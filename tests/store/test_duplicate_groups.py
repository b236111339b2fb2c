"""Duplicate groups in the store, and the duplicates command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MakeCollection, encode, upstream_row, xray_like
from covidcxr.cli import main
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.db import open_store
from covidcxr.store.duplicates import duplicate_groups, group_rows


def collection_with_copies(make_collection: MakeCollection) -> Path:
    original = xray_like(7, size=(256, 224))
    smaller = np.asarray(Image.fromarray(original).resize((112, 128), Image.Resampling.BILINEAR))
    rows = [
        upstream_row(patientid="1", filename="a.png"),
        upstream_row(patientid="2", filename="a.png"),  # same file, other patient
        upstream_row(patientid="3", filename="a-small.jpg"),  # resized, recompressed
        upstream_row(patientid="4", filename="other.png"),
    ]
    images = {
        "a.png": encode(original),
        "a-small.jpg": encode(smaller, "JPEG", quality=70),
        "other.png": encode(xray_like(99, size=(256, 224))),
    }
    return make_collection(rows, images=images, annotations=False)


def test_exact_and_near_groups(make_collection: MakeCollection, tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path / "d", create=True) as store:
        ingest_source(collection_with_copies(make_collection), store)
        with store.read() as conn:
            groups = duplicate_groups(conn)
    kinds = [(g.kind, g.patients) for g in groups]
    assert kinds == [
        ("exact", ["tiny:1", "tiny:2"]),
        ("near", ["tiny:1", "tiny:2", "tiny:3"]),
    ]
    assert all(g.crosses_patients for g in groups)
    assert len(groups[1].images) == 2
    rows = group_rows(groups)
    assert [r["group"] for r in rows] == [1, 1, 2, 2, 2]


def test_duplicates_command(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ingest", str(collection_with_copies(make_collection))]) == 0
    capsys.readouterr()
    assert main(["duplicates", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["patient_id"] for r in rows} == {"1", "2", "3"}
    assert main(["duplicates", "--max-distance", "0"]) == 0
    captured = capsys.readouterr()
    assert "1 exact and 0 near-duplicate group(s)" in captured.err
    assert main(["duplicates", "--patient", "4", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
