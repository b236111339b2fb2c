"""``covidcxr export`` in-process: formats, filters, options and errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import MakeCollection
from covidcxr.cli import main
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.schema.columns import JUNE_2020_UPSTREAM
from covidcxr.schema.findings import is_under, parse_finding
from covidcxr.store.db import open_store


@pytest.fixture
def store_args(make_collection: MakeCollection, tmp_path: Path) -> list[str]:
    """``--db``/``--data-dir`` of a store holding the default tiny collection."""
    url, data = f"sqlite:///{tmp_path / 'store.sqlite'}", tmp_path / "data"
    with open_store(url, data, create=True) as store:
        ingest_source(make_collection(), store)
    return ["--db", url, "--data-dir", str(data)]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_export_upstream_csv(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export" / "metadata.csv"

    code = main(["export", "--format", "upstream-csv", "--out", str(out), *store_args])

    assert code == 0
    assert capsys.readouterr().out == f"wrote 4 rows to {out}\n"
    headers, rows = read_csv(out)
    assert headers[:6] == ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive"]
    assert [(r["patientid"], r["filename"], r["finding"]) for r in rows] == [
        ("1", "p1.png", "COVID-19"),
        ("1", "p1-day3.jpg", "COVID-19"),
        ("2", "p2.png", "Streptococcus"),
        ("3", "p2.png", "No Finding"),
    ]
    assert rows[2]["survival"] == "Y" and rows[2]["age"] == "34"


def test_export_upstream_csv_options(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "june.csv"
    argv = [
        "export",
        "--format",
        "upstream-csv",
        "--out",
        str(out),
        "--layout",
        "june-2020",
        "--findings",
        "hierarchical",
        "--allow-formulas",
        *store_args,
    ]

    assert main(argv) == 0

    headers, rows = read_csv(out)
    assert headers == list(JUNE_2020_UPSTREAM)
    assert [r["finding"] for r in rows] == [
        "Pneumonia/Viral/COVID-19",
        "Pneumonia/Viral/COVID-19",
        "Pneumonia/Bacterial/Streptococcus",
        "No Finding",
    ]


def test_export_parquet(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "records.parquet"

    assert main(["export", "--format", "parquet", "--out", str(out), *store_args]) == 0

    assert capsys.readouterr().out == f"wrote 4 rows to {out}\n"
    table = pq.read_table(out)
    assert table.num_rows == 4
    assert table.column("geographic_mean").to_pylist() == [4.5, None, None, None]
    assert table.column("has_lung_mask").to_pylist() == [True, False, False, False]


@pytest.mark.parametrize("fmt", ["upstream-csv", "parquet"])
def test_filters_select_the_rows(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / f"covid.{fmt}"

    assert (
        main(["export", "--format", fmt, "--out", str(out), "--finding", "COVID-19", *store_args])
        == 0
    )

    assert capsys.readouterr().out == f"wrote 2 rows to {out}\n"
    if fmt == "upstream-csv":
        findings = [parse_finding(r["finding"]).paths for r in read_csv(out)[1]]
    else:
        findings = [tuple(f) for f in pq.read_table(out).column("findings").to_pylist()]
    assert len(findings) == 2
    assert all(any(is_under(path, "COVID-19") for path in paths) for paths in findings)

    assert (
        main(
            [
                "export",
                "--format",
                fmt,
                "--out",
                str(out),
                "--view",
                "AP",
                "--source",
                "tiny",
                *store_args,
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == f"wrote 1 rows to {out}\n"


def test_bad_format_is_rejected_by_argparse(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.xlsx"
    with pytest.raises(SystemExit) as exited:
        main(["export", "--format", "xlsx", "--out", str(out), *store_args])
    assert exited.value.code == 2
    assert "invalid choice: 'xlsx'" in capsys.readouterr().err
    assert not out.exists()


def test_format_option_for_another_format_is_an_error(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.parquet"
    code = main(
        ["export", "--format", "parquet", "--out", str(out), "--layout", "latest", *store_args]
    )
    assert code == 2
    assert "format 'parquet' does not take 'layout'" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_out_is_a_clear_error(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    blocker = folder / "a-file"
    blocker.write_text("keep me", encoding="utf-8")
    out = blocker / "export.csv"

    code = main(["export", "--format", "upstream-csv", "--out", str(out), *store_args])

    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"covidcxr export: error: export: cannot write {out}: ")
    assert blocker.read_text(encoding="utf-8") == "keep me"
    assert [p.name for p in folder.iterdir()] == ["a-file"]


def test_bad_filter_value_writes_nothing(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.csv"
    code = main(
        [
            "export",
            "--format",
            "upstream-csv",
            "--out",
            str(out),
            "--finding",
            "Nonsense",
            *store_args,
        ]
    )
    assert code == 2
    assert "'Nonsense' is not a known finding" in capsys.readouterr().err
    assert list(tmp_path.glob("*x.csv*")) == []


def test_help_lists_formats_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["export", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for word in (
        "upstream-csv",
        "parquet",
        "--layout",
        "--findings",
        "--allow-formulas",
        "--finding",
        "--db",
    ):
        assert word in text
