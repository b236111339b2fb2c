"""Tabular exports: the upstream CSV layout round-trips through ingest; Parquet keeps types."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from conftest import MakeCollection, encode, upstream_row, write_metadata, xray_like
from covidcxr import __version__
from covidcxr.export import (
    FINDING_STYLES,
    FORMATS,
    UPSTREAM_LAYOUT_NAMES,
    ExportError,
    ExportFormat,
    ExportWriteError,
    export_records,
    register_format,
    tables,
)
from covidcxr.ingest.pipeline import IngestOutcome, ingest_source
from covidcxr.ingest.report import Issue
from covidcxr.schema.columns import BY_UPSTREAM, JUNE_2020_UPSTREAM, Kind
from covidcxr.schema.findings import all_nodes, format_finding, parse_finding
from covidcxr.schema.values import escape_formula, format_number
from covidcxr.store import queries
from covidcxr.store.db import Store, open_store

LATEST = tables.UPSTREAM_LAYOUTS["latest"]
FORMULA_NOTE = '=HYPERLINK("http://example.org/x","click")'


def latest_row(rt_pcr: str = "", **values: str) -> dict[str, str]:
    """An upstream row in the latest layout (with RT_PCR_positive)."""
    return {**upstream_row(**values), "RT_PCR_positive": rt_pcr}


def synthetic_rows() -> list[dict[str, str]]:
    """Rows covering every kind of value, plus an invalid and a rejected row."""
    return [
        latest_row(
            "Y",
            patientid="1",
            offset="-5",
            age="65",
            finding="COVID-19, ARDS",
            survival="Y",
            intubated="N",
            went_icu="Y",
            temperature="38.2",
            pO2_saturation="92.5",
            leukocyte_count="0.762",
            neutrophil_count="5",
            lymphocyte_count="0.81",
            date="January 22, 2020",
            location="Cho Ray Hospital, Ho Chi Minh City, Vietnam",
            filename="p1.png",
            doi="10.1056/nejmc2001272",
            url="https://www.nejm.org/doi/full/10.1056/NEJMc2001272",
            clinical_notes=FORMULA_NOTE,
            other_notes='said "hello", then\nleft',
        ),
        latest_row(
            "N",
            patientid="1",
            offset="3",
            age="65.0",
            finding="Pneumonia/Viral/COVID-19",
            temperature="37",
            view="AP Supine",
            date="2020",
            filename="b.jpg",
        ),
        latest_row(
            "Unclear",
            patientid="2",
            sex="F",
            age="0.5",
            offset="",
            finding="todo",
            date="3/4/2020",
            location="@home",
            filename="c.png",
        ),
        # '?' is an unknown marker: a warning, so this row is not compared.
        latest_row(patientid="3", survival="?", filename="d.png"),
        latest_row(
            patientid="4",
            sex="",
            age="",
            offset="",
            finding="Unknown",
            view="L",
            filename="e.png",
            other_notes="-not a formula either",
        ),
        latest_row(patientid="5", finding="", view="Axial", modality="CT", filename="f.png"),
        # An unknown finding is an error, but the row is kept (finding status invalid).
        latest_row(patientid="6", finding="ARDS, Nonsense", filename="g.png"),
        # No patient id: rejected, never exported.
        latest_row(patientid="", filename="h.png"),
    ]


@pytest.fixture
def synthetic(make_collection: MakeCollection) -> Path:
    """A tiny collection in the latest layout, with an extra column ``scanner``."""
    rows = [{**row, "scanner": f"S{n}"} for n, row in enumerate(synthetic_rows())]
    names = [row["filename"] for row in rows if row["filename"]]
    images = {
        name: encode(xray_like(seed), "JPEG" if name.endswith(".jpg") else "PNG")
        for seed, name in enumerate(names, start=1)
    }
    root = make_collection(rows, images=images)
    write_metadata(root / "metadata.csv", rows, header=[*LATEST, "scanner", ""])
    return root


@pytest.fixture
def ingested(synthetic: Path, db_url: str, tmp_path: Path) -> Iterable[tuple[Store, IngestOutcome]]:
    with open_store(db_url, tmp_path / "data", create=True) as store:
        yield store, ingest_source(synthetic, store)


def read_metadata(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of a metadata file with the line each starts on (as reports count)."""
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        start = 2
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    return rows


def read_export(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def invalid_lines(issues: Iterable[Issue | Mapping[str, Any]], metadata: str) -> set[int]:
    """Lines of ``metadata`` with an issue above info (from a Report or its JSON)."""
    lines = set()
    for issue in issues:
        item = issue if isinstance(issue, Mapping) else vars(issue)
        if item["file"] == metadata and item["row"] is not None and item["severity"] != "info":
            lines.add(int(item["row"]))
    return lines


def assert_round_trip(
    inputs: Sequence[tuple[int, Mapping[str, str]]],
    exported: Sequence[Mapping[str, str]],
    headers: Sequence[str],
    invalid: set[int],
    *,
    allow_formulas: bool = False,
) -> int:
    """Every valid input row is exported with equal values; returns how many were compared.

    Numeric columns are compared as numbers, everything else as text after stripping
    (escaped as the export escapes it).
    """
    by_key = {(row["patientid"], row["filename"]): row for row in exported}
    assert len(by_key) == len(exported), "exported (patientid, filename) pairs are unique"
    valid = {
        (row["patientid"].strip(), row["filename"].strip()): row
        for line, row in inputs
        if line not in invalid
    }
    assert set(valid) <= set(by_key), f"valid rows not exported: {set(valid) - set(by_key)}"
    for key, given in valid.items():
        got = by_key[key]
        for header in headers:
            column = BY_UPSTREAM[header]
            expected, actual = given.get(header, "").strip(), got[header]
            if column.kind in (Kind.INT, Kind.FLOAT) and expected:
                assert actual and float(actual) == float(expected), (key, header, actual)
            else:
                wanted = expected if allow_formulas else escape_formula(expected)
                assert actual == wanted, (key, header)
    return len(valid)


@pytest.mark.parametrize("layout", UPSTREAM_LAYOUT_NAMES)
def test_upstream_csv_round_trips(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path, layout: str
) -> None:
    store, outcome = ingested
    out = tmp_path / "export" / "metadata.csv"

    written = export_records(store, out, "upstream-csv", layout=layout)

    headers, exported = read_export(out)
    assert headers == list(tables.UPSTREAM_LAYOUTS[layout])
    if layout == "june-2020":
        assert headers == list(JUNE_2020_UPSTREAM)
    assert written == len(exported) == 7  # 8 rows, one rejected
    inputs = read_metadata(outcome.scan.spec.metadata)
    invalid = invalid_lines(outcome.scan.report.issues, "metadata.csv")
    # '?', the unknown finding, the rejected row (line 2's note spans two lines).
    assert invalid == {6, 9, 10}
    assert assert_round_trip(inputs, exported, headers, invalid) == 5
    # Rows come back in line order, the rejected row left out.
    assert [row["patientid"] for row in exported] == ["1", "1", "2", "3", "4", "5", "6"]
    first, second, third = exported[:3]
    assert (first["offset"], first["temperature"], first["leukocyte_count"]) == (
        "-5",
        "38.2",
        "0.762",
    )
    assert (first["age"], second["age"], third["age"]) == ("65", "65", "0.5")
    assert first["date"] == "January 22, 2020" and third["date"] == "3/4/2020"
    assert first["clinical_notes"] == "'" + FORMULA_NOTE
    assert first["other_notes"] == 'said "hello", then\nleft'
    assert third["location"] == "'@home"
    assert exported[4]["other_notes"] == "'-not a formula either"
    assert exported[3]["survival"] == ""  # '?' was stored as unknown
    if layout == "latest":
        assert [row["RT_PCR_positive"] for row in exported[:4]] == ["Y", "N", "Unclear", ""]


def test_reingesting_our_own_export_gives_back_the_values_that_went_in(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path
) -> None:
    store, _ = ingested
    exported = tmp_path / "again"
    (exported / "images").mkdir(parents=True)
    export_records(store, exported / "metadata.csv", "upstream-csv")
    assert "'@home" in (exported / "metadata.csv").read_text(encoding="utf-8")
    with open_store(None, tmp_path / "data2", create=True) as again:
        ingest_source(exported, again, name="again")
        with again.read() as conn:
            notes = {r["patient_id"]: r for r in queries.list_records(conn)}
    assert notes["2"]["location"] == "@home"
    assert notes["4"]["other_notes"] == "-not a formula either"


def test_unescape_formula_inverts_escape_formula() -> None:
    from covidcxr.schema.values import unescape_formula

    for text in ("=1+1", "+31 6", "-2", "@home", "plain", "'quoted", ""):
        assert unescape_formula(escape_formula(text)) == text


def test_allow_formulas_writes_text_as_given(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path
) -> None:
    store, outcome = ingested
    out = tmp_path / "raw.csv"

    export_records(store, out, "upstream-csv", allow_formulas=True)

    headers, exported = read_export(out)
    assert exported[0]["clinical_notes"] == FORMULA_NOTE
    assert exported[2]["location"] == "@home"
    assert exported[0]["offset"] == "-5"
    inputs = read_metadata(outcome.scan.spec.metadata)
    invalid = invalid_lines(outcome.scan.report.issues, "metadata.csv")
    assert assert_round_trip(inputs, exported, headers, invalid, allow_formulas=True) == 5


def test_june_2020_input_round_trips(
    make_collection: MakeCollection, db_url: str, tmp_path: Path
) -> None:
    rows = [
        upstream_row(patientid="1", offset="-2", temperature="39.1", filename="p1.png"),
        upstream_row(
            patientid="2",
            finding="Streptococcus",
            neutrophil_count="12.25",
            filename="p2.png",
            survival="N",
            extubated="Y",
        ),
    ]
    root = make_collection(
        rows, images={"p1.png": encode(xray_like(1)), "p2.png": encode(xray_like(2))}
    )
    with open_store(db_url, tmp_path / "data", create=True) as store:
        outcome = ingest_source(root, store)
        out = tmp_path / "june.csv"
        assert export_records(store, out, "upstream-csv", layout="june-2020") == 2
    headers, exported = read_export(out)
    assert headers == list(JUNE_2020_UPSTREAM)
    invalid = invalid_lines(outcome.scan.report.issues, "metadata.csv")
    assert invalid == set()
    assert assert_round_trip(read_metadata(root / "metadata.csv"), exported, headers, invalid) == 2


@pytest.mark.parametrize("style", ["hierarchical", "flat"])
def test_findings_rewritten_from_tokens(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path, style: str
) -> None:
    store, outcome = ingested
    out = tmp_path / f"{style}.csv"

    export_records(store, out, "upstream-csv", findings=style)

    _, exported = read_export(out)
    got = [row["finding"] for row in exported]
    if style == "hierarchical":
        assert got[:2] == ["Pneumonia/Viral/COVID-19, ARDS", "Pneumonia/Viral/COVID-19"]
    else:
        assert got[:2] == ["COVID-19, ARDS", "COVID-19"]
    # No tokens: the status text; an unparsable finding keeps its text.
    assert got[2:] == [
        "todo",
        "Pneumonia/Viral/COVID-19" if style == "hierarchical" else "COVID-19",
        "Unknown",
        "",
        "ARDS, Nonsense",
    ]
    # Each rewritten value parses back to the findings and status of the original.
    originals = {
        (r["patientid"], r["filename"]): r["finding"]
        for _, r in read_metadata(outcome.scan.spec.metadata)
    }
    for row in exported:
        before = parse_finding(originals[(row["patientid"], row["filename"])])
        after = parse_finding(row["finding"])
        assert (after.paths, after.status) == (before.paths, before.status)
        if before.status != "invalid":
            assert row["finding"] == format_finding(before, style)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (65.0, "65"),
        (38.2, "38.2"),
        (0.762, "0.762"),
        (-5, "-5"),
        (-5.0, "-5"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e-05, "0.00001"),
        (1.5e-07, "0.00000015"),
        (1e20, "100000000000000000000"),
    ],
)
def test_format_number_is_shortest_round_trip(value: float, text: str) -> None:
    assert format_number(value) == text
    assert float(text) == value


@pytest.mark.parametrize("fmt", ["upstream-csv", "parquet"])
def test_error_mid_write_leaves_target_untouched(
    ingested: tuple[Store, IngestOutcome],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    store, _ = ingested
    folder = tmp_path / "out"
    folder.mkdir()
    existing, fresh = folder / "existing.out", folder / "fresh.out"
    existing.write_text("the previous export\n", encoding="utf-8")
    if fmt == "upstream-csv":
        calls: list[int] = []
        real = tables.upstream_cells

        def failing_cells(*args: Any, **kwargs: Any) -> list[str]:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("row 3 cannot be formatted")
            return real(*args, **kwargs)

        monkeypatch.setattr(tables, "upstream_cells", failing_cells)
        error: type[Exception] = RuntimeError
    else:
        import pyarrow.parquet as pq

        def half_written(table: Any, where: str, **kwargs: Any) -> None:
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError("disk full")

        monkeypatch.setattr(pq, "write_table", half_written)
        error = OSError

    for target in (existing, fresh):
        if fmt == "upstream-csv":
            calls.clear()
        with pytest.raises(error):
            export_records(store, target, fmt)

    assert existing.read_text(encoding="utf-8") == "the previous export\n"
    assert sorted(p.name for p in folder.iterdir()) == ["existing.out"]


def test_unwritable_output_is_named_and_nothing_is_written(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path
) -> None:
    store, _ = ingested
    folder = tmp_path / "out"
    folder.mkdir()
    blocker = folder / "a-file"
    blocker.write_text("x", encoding="utf-8")
    target = blocker / "sub" / "out.csv"
    with pytest.raises(ExportWriteError, match=f"export: cannot write {re.escape(str(target))}: "):
        export_records(store, target, "upstream-csv")
    with pytest.raises(ExportWriteError, match="is a directory; give a file name"):
        export_records(store, folder, "upstream-csv")
    assert blocker.read_text(encoding="utf-8") == "x"
    assert [p.name for p in folder.iterdir()] == ["a-file"]


def test_parent_folders_are_created_and_a_connection_works(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path
) -> None:
    store, _ = ingested
    out = tmp_path / "a" / "b" / "covid.csv"
    with store.read() as conn:
        written = export_records(
            conn, out, "upstream-csv", selection=queries.RecordFilter(findings=["COVID-19"])
        )
    _, exported = read_export(out)
    assert written == 3
    assert [row["filename"] for row in exported] == ["p1.png", "b.jpg", "d.png"]


def test_bad_format_and_options_are_refused(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path
) -> None:
    store, _ = ingested
    out = tmp_path / "never.csv"
    with pytest.raises(
        ExportError, match=r"unknown format .xlsx.; choose one of: .*parquet, upstream-csv"
    ):
        export_records(store, out, "xlsx")
    with pytest.raises(ExportError, match="'parquet' does not take 'layout'; it takes: no opt"):
        export_records(store, out, "parquet", layout="latest")
    with pytest.raises(ExportError, match="layout 'may-2020' is not valid for 'upstream-csv'"):
        export_records(store, out, "upstream-csv", layout="may-2020")
    with pytest.raises(ExportError, match="allow_formulas 1 is not valid"):
        export_records(store, out, "upstream-csv", allow_formulas=1)
    assert not out.exists()


def test_registry_matches_the_writers() -> None:
    assert {"upstream-csv", "parquet"} <= set(FORMATS)
    assert tuple(tables.UPSTREAM_LAYOUTS) == UPSTREAM_LAYOUT_NAMES
    options = {o.name: o for o in FORMATS["upstream-csv"].options}
    assert options["findings"].choices == FINDING_STYLES
    for fmt in FORMATS.values():
        assert callable(fmt.load_writer())
    with pytest.raises(ValueError, match="'parquet' is already registered"):
        register_format(ExportFormat("parquet", "x:y", "again", ".parquet"))


def test_parquet_has_types_values_and_provenance(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, _ = ingested
    out = tmp_path / "records.parquet"
    selection = queries.RecordFilter(modalities=["X-ray"])

    written = export_records(store, out, "parquet", selection=selection)

    table = pq.read_table(out)
    assert written == table.num_rows == 6  # the CT row is filtered out
    schema = table.schema
    assert schema.names == list(tables.PARQUET_COLUMNS)
    assert schema.names[: len(queries.LIST_COLUMNS)] == list(queries.LIST_COLUMNS)
    expected_types = {
        "record_id": pa.int64(),
        "line": pa.int64(),
        "offset_days": pa.int64(),
        "acquired_year": pa.int64(),
        "age_years": pa.float64(),
        "temperature_c": pa.float64(),
        "survival": pa.bool_(),
        "intubated": pa.bool_(),
        "acquired_on": pa.date32(),
        "findings": pa.list_(pa.string()),
        "flags": pa.list_(pa.string()),
        "extra": pa.string(),
        "patient_id": pa.string(),
        "image_width": pa.int64(),
        "image_format": pa.string(),
        "geographic_mean": pa.float64(),
        "opacity_mean": pa.float64(),
        "has_lung_mask": pa.bool_(),
        "has_lung_box": pa.bool_(),
    }
    for name, arrow_type in expected_types.items():
        assert schema.field(name).type == arrow_type, name
    assert schema.field("temperature_c").metadata[b"unit"].decode() == "°C"
    metadata = schema.metadata
    assert metadata[b"covidcxr.version"].decode() == __version__
    recorded = json.loads(metadata[b"covidcxr.filter"])
    assert recorded["modalities"] == ["X-ray"] and recorded["findings"] == []
    assert json.loads(metadata[b"covidcxr.finding_vocabulary"]) == list(all_nodes())

    rows = table.to_pylist()
    first, second, third = rows[:3]
    assert first["patient_id"] == "1" and first["filename"] == "p1.png"
    assert first["offset_days"] == -5 and first["age_years"] == 65.0
    assert first["temperature_c"] == 38.2 and first["leukocyte_count_k_per_ul"] == 0.762
    assert first["survival"] is True and first["intubated"] is False
    assert first["extubated"] is None
    assert first["findings"] == ["Pneumonia/Viral/COVID-19", "ARDS"]
    assert first["clinical_notes"] == FORMULA_NOTE  # typed data is not escaped
    assert first["acquired_on"].isoformat() == "2020-01-22"
    assert json.loads(first["extra"]) == {"scanner": "S0"}
    assert (first["image_width"], first["image_height"], first["image_format"]) == (80, 96, "PNG")
    assert first["image_phash"]
    # The annotated image: severity scores, a mask and boxes.
    assert (first["geographic_mean"], first["opacity_mean"]) == (4.5, 3.0)
    assert first["has_lung_mask"] is True and first["has_lung_box"] is True
    assert second["geographic_mean"] is None and second["opacity_mean"] is None
    assert second["has_lung_mask"] is False and second["has_lung_box"] is False
    assert second["image_format"] == "JPEG" and second["acquired_year"] == 2020
    assert third["flags"] == ["pediatric"] and third["offset_days"] is None
    assert third["rt_pcr_positive"] == "Unclear" and third["acquired_on"] is None


def test_parquet_rows_lead_to_the_stored_image(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path
) -> None:
    import pandas as pd

    store, _ = ingested
    out = tmp_path / "records.parquet"
    written = export_records(store, out, "parquet")
    frame = pd.read_parquet(out)
    assert len(frame) == written
    stored = frame[frame["image_status"] == "stored"]
    assert (
        len(stored) > 0 and frame.loc[frame["image_status"] != "stored", "image_path"].isna().all()
    )
    for path, sha in zip(stored["image_path"], stored["image_sha256"], strict=True):
        data = (store.data_dir / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha


def test_parquet_of_an_empty_selection(
    ingested: tuple[Store, IngestOutcome], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    store, _ = ingested
    out = tmp_path / "none.parquet"
    selection = queries.RecordFilter(patients=["nobody"])
    assert export_records(store, out, "parquet", selection=selection) == 0
    table = pq.read_table(out)
    assert table.num_rows == 0 and table.schema.names == list(tables.PARQUET_COLUMNS)


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.parametrize(
    ("metadata", "layout", "least"),
    [("metadata.csv", "june-2020", 677), ("metadata-latest.csv", "latest", 698)],
)
def test_real_collection_round_trips(
    covid_dir: Path, tmp_path: Path, metadata: str, layout: str, least: int
) -> None:
    with open_store(
        f"sqlite:///{tmp_path / 'store.sqlite'}", tmp_path / "data", create=True
    ) as store:
        outcome = ingest_source(covid_dir, store, metadata=metadata)
        out = tmp_path / "export.csv"
        written = export_records(store, out, "upstream-csv", layout=layout)
    report = json.loads(outcome.report_json.read_text(encoding="utf-8"))
    invalid = invalid_lines(report["issues"], metadata)
    inputs = read_metadata(covid_dir / metadata)
    headers, exported = read_export(out)
    assert headers == list(tables.UPSTREAM_LAYOUTS[layout])
    assert written == len(exported) == report["counts"]["records"]
    compared = assert_round_trip(inputs, exported, headers, invalid)
    # Valid rows at the time of writing: 677 of 751 (June 2020), 698 of 950 (latest).
    assert compared >= least
    assert compared == sum(1 for line, _ in inputs if line not in invalid)
