"""A re-ingest never removes records silently: damaged tables, removals, dry runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults_helpers import table_rows

from conftest import MakeCollection, upstream_row, write_metadata
from covidcxr.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def ingested(
    make_collection: MakeCollection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, list[str], str]:
    root = make_collection()
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    store_args = ["--db", url, "--data-dir", str(tmp_path / "data")]
    assert run(["ingest", str(root), *store_args], capsys)[0] == 0
    return root, store_args, url


def test_header_only_table_is_an_error_and_removes_nothing(
    ingested: tuple[Path, list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, store_args, url = ingested
    before = table_rows(url)
    header = (root / "metadata.csv").read_text(encoding="utf-8").splitlines()[0]
    (root / "metadata.csv").write_text(header + "\n", encoding="utf-8")
    for strict in ([], ["--strict"]):
        code, _, err = run(["ingest", str(root), *store_args, *strict], capsys)
        assert code == 2
        assert "metadata.csv has a header but no data row" in err
        assert table_rows(url) == before
    code, _, err = run(["check", str(root)], capsys)
    assert code == 2 and "no data row" in err


def test_unclosed_quote_refuses_removals(
    ingested: tuple[Path, list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, store_args, url = ingested
    before = table_rows(url)
    lines = (root / "metadata.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    # An unclosed quote on row 3 swallows the rest of the file.
    lines[2] = lines[2].replace(",p1-day3.jpg,", ',"p1-day3.jpg,', 1)
    (root / "metadata.csv").write_text("".join(lines), encoding="utf-8")
    code, _, err = run(["ingest", str(root), *store_args], capsys)
    assert code == 1
    assert "refused, nothing written" in err and "could not be read" in err
    assert "malformed_csv" in err and "metadata.csv:3" in err  # the file and row
    assert "would change: records added 0" in err and "removed 3" in err
    assert table_rows(url) == before


def test_large_removal_needs_allow_removals_and_dry_run_writes_nothing(
    ingested: tuple[Path, list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, store_args, url = ingested
    before = table_rows(url)
    write_metadata(root / "metadata.csv", [upstream_row(patientid="1", filename="p1.png")])
    code, _, err = run(["ingest", str(root), *store_args], capsys)
    assert code == 1 and "remove 3 of 4 stored record(s), more than 10%" in err
    assert "--allow-removals" in err
    assert table_rows(url) == before

    code, out, _ = run(["ingest", str(root), *store_args, "--dry-run", "--allow-removals"], capsys)
    assert code == 0 and "dry run, nothing written" in out
    assert "would change: records added 0, updated 0, removed 3, unchanged 1" in out
    assert table_rows(url) == before

    code, out, _ = run(["ingest", str(root), *store_args, "--allow-removals"], capsys)
    assert code == 0 and "removed 3, unchanged 1" in out
    assert len(table_rows(url)["records"]) == 1


def test_reingest_keeps_record_ids(
    ingested: tuple[Path, list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, store_args, url = ingested
    ids = {row[0] for row in table_rows(url)["records"]}
    rows = [
        upstream_row(patientid="1", offset="0", filename="p1.png", survival="N"),  # updated
        upstream_row(patientid="1", offset="3", filename="p1-day3.jpg", view="AP"),
        upstream_row(patientid="2", sex="F", age="34", finding="Streptococcus", filename="p2.png"),
        upstream_row(patientid="3", sex="", age="", finding="No Finding", filename="p2.png"),
    ]
    write_metadata(root / "metadata.csv", rows)
    for _ in range(2):
        assert run(["ingest", str(root), *store_args], capsys)[0] == 0
        assert {row[0] for row in table_rows(url)["records"]} == ids
