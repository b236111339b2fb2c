"""covidcxr verify finds missing and damaged blobs by record; ingest repairs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faults_helpers import consistent

from conftest import MakeCollection
from covidcxr.cli import main
from covidcxr.store.blobs import BlobStore


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_verify_reports_damage_by_record_and_ingest_repairs_it(
    make_collection: MakeCollection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_collection()
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    args = ["--db", url, "--data-dir", str(tmp_path / "data")]
    assert run(["ingest", str(root), *args], capsys)[0] == 0
    code, _, err = run(["verify", *args], capsys)
    assert code == 0 and "0 missing, 0 damaged" in err

    blobs = BlobStore(tmp_path / "data" / "blobs")
    shas = {p.name: p for p in blobs.root.glob("*/*") if not p.name.startswith(".")}
    p2 = next(
        sha
        for sha, path in shas.items()
        if path.read_bytes() == (root / "images/p2.png").read_bytes()
    )
    p1 = next(
        sha
        for sha, path in shas.items()
        if path.read_bytes() == (root / "images/p1.png").read_bytes()
    )
    shas[p2].write_bytes(shas[p2].read_bytes()[:100])  # truncated on disk
    shas[p1].unlink()

    code, out, err = run(["verify", *args, "--format", "json"], capsys)
    assert code == 1 and "1 missing, 1 damaged" in err
    bad = {(row["state"], row["file"], row["patient_id"]) for row in json.loads(out)}
    assert bad == {
        ("damaged", "p2.png", "2"),
        ("damaged", "p2.png", "3"),
        ("missing", "p1.png", "1"),
    }

    code, out, _ = run(["ingest", str(root), *args], capsys)
    assert code == 0 and "damaged blobs repaired 1" in out
    assert run(["verify", *args], capsys)[0] == 0
    assert consistent(url, blobs.root) == []


def test_verify_sample_checks_only_that_many(
    make_collection: MakeCollection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--db", str(tmp_path / "s.sqlite"), "--data-dir", str(tmp_path / "data")]
    assert run(["ingest", str(make_collection()), *args], capsys)[0] == 0
    code, _, err = run(["verify", *args, "--sample", "2"], capsys)
    assert code == 0 and "verified 2 blob(s)" in err
