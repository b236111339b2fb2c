"""The real collection snapshot in ../shared/datasets, read in place (never copied)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from covidcxr.cli import main
from covidcxr.ingest.pipeline import check_source, ingest_source
from covidcxr.store import queries
from covidcxr.store.db import Store, open_store
from covidcxr.store.tables import Base

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def snapshot(store: Store) -> dict[str, list[tuple[object, ...]]]:
    with store.read() as conn:
        return {
            name: sorted((tuple(r) for r in conn.execute(select(table))), key=repr)
            for name, table in Base.metadata.tables.items()
            if name != "ingest_log"
        }


@pytest.fixture(scope="module")
def june_ingest(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One ingest of the June snapshot per module (it takes a while on 2 cores)."""
    from conftest import COVID_DIR

    if not (COVID_DIR / "metadata.csv").is_file():
        pytest.skip(f"shared data not found at {COVID_DIR}")
    folder = tmp_path_factory.mktemp("real")
    with open_store(f"sqlite:///{folder / 'real.sqlite'}", folder / "data", create=True) as store:
        outcome = ingest_source(COVID_DIR, store)
    return folder, outcome


@pytest.fixture
def june_store(june_ingest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private copy of the ingested database (blobs are shared: content-addressed)."""
    folder, outcome = june_ingest
    copy = tmp_path / "real.sqlite"
    shutil.copyfile(folder / "real.sqlite", copy)
    with open_store(f"sqlite:///{copy}", folder / "data", create=True) as store:
        yield store, outcome


def test_june_snapshot_ingest_counts(june_store) -> None:  # type: ignore[no-untyped-def]
    store, outcome = june_store
    counts = outcome.scan.report.counts
    assert (counts["rows"], counts["records"], counts["patients"]) == (751, 751, 380)
    # 14 images are missing from images/ and 21 rows point at CT volumes never shipped.
    assert (counts["images_stored"], counts["images_missing"], counts["images_rejected"]) == (
        711,
        35,
        0,
    )
    assert counts["images_unreferenced"] == 13
    # 94 scored images, one of them (covid-19-pneumonia-14-PA.png) missing here.
    assert counts["annotations_severity"] == 93
    report = outcome.scan.report
    assert report.errors == []
    by_code = report.by_code()
    assert by_code["shared_image"] == 5  # the same file filed under two patients
    assert by_code["format_mismatch"] == 17  # .jpg names holding PNG bytes
    assert by_code["overflow_values"] == 5
    with store.read() as conn:
        rows = queries.list_records(conn)
        assert len(rows) == 751  # one per metadata row, shared files listed twice
        shared = queries.list_records(conn, queries.RecordFilter(flags=["shared_image"]))
        assert len(shared) == 10 and len({r["image_sha256"] for r in shared}) == 5
        ct = queries.count_records(conn, queries.RecordFilter(modalities=["CT"]))
        assert ct == 84
        severity = queries.count_records(conn, queries.RecordFilter(has_severity=True))
        assert severity >= 93


def test_reingest_changes_nothing(june_store, covid_dir: Path) -> None:  # type: ignore[no-untyped-def]
    store, _ = june_store
    before = snapshot(store)
    again = ingest_source(covid_dir, store)
    assert not again.summary.changed
    assert again.summary.counts["records_unchanged"] == 751
    assert snapshot(store) == before


def test_latest_metadata_against_the_same_images(june_store, covid_dir: Path) -> None:  # type: ignore[no-untyped-def]
    store, _ = june_store
    outcome = ingest_source(covid_dir, store, metadata="metadata-latest.csv")
    counts = outcome.scan.report.counts
    assert (counts["rows"], counts["records"], counts["patients"]) == (950, 950, 472)
    assert counts["images_missing"] == 247  # rows newer than the snapshot's images
    with store.read() as conn:
        assert queries.count_records(conn) == 950
        missing = queries.list_records(conn, queries.RecordFilter(image_status=["missing"]))
        assert len(missing) == 247 and all(r["image_sha256"] is None for r in missing)
        covid = queries.count_records(conn, queries.RecordFilter(findings=["COVID-19"]))
        assert covid == 584
        pcr = {r["rt_pcr_positive"] for r in queries.list_records(conn)}
        assert pcr == {"Y", "Unclear", None}


def test_check_on_the_real_collection_fails_with_its_known_defects(
    covid_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check", str(covid_dir), "--show", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert "image_missing 35" in out and "unreferenced_image 13" in out


def test_check_writes_nothing_into_shared(covid_dir: Path) -> None:
    before = sorted(p.name for p in covid_dir.iterdir())
    check_source(covid_dir)
    assert sorted(p.name for p in covid_dir.iterdir()) == before


@pytest.mark.postgres
def test_real_ingest_on_postgresql(covid_dir: Path, tmp_path: Path) -> None:
    from conftest import _postgres_schema_url

    urls = _postgres_schema_url()
    url = next(urls)
    try:
        with open_store(url, tmp_path / "data", create=True) as store:
            first = ingest_source(covid_dir, store)
            assert first.summary.counts["records_added"] == 751
            before = snapshot(store)
            assert not ingest_source(covid_dir, store).summary.changed
            assert snapshot(store) == before
    finally:
        urls.close()


def test_duplicates_across_patients_in_the_real_collection(june_store) -> None:  # type: ignore[no-untyped-def]
    from covidcxr.store.duplicates import duplicate_groups

    store, _ = june_store
    with store.read() as conn:
        groups = duplicate_groups(conn)
    exact = [g for g in groups if g.kind == "exact"]
    near = [g for g in groups if g.kind == "near"]
    # Five files each filed under two patients (285/339, 287/340), one file twice
    # under patient 364.
    assert sorted(tuple(g.patients) for g in exact if g.crosses_patients) == sorted(
        [("covid-chestxray:285", "covid-chestxray:339")] * 3
        + [("covid-chestxray:287", "covid-chestxray:340")] * 2
    )
    assert sum(1 for g in exact if not g.crosses_patients) == 1
    cross = {tuple(g.patients) for g in near if g.crosses_patients}
    assert {
        ("covid-chestxray:178", "covid-chestxray:97"),
        ("covid-chestxray:192", "covid-chestxray:196"),
        ("covid-chestxray:201", "covid-chestxray:78"),
    } <= cross
    assert sum(1 for g in near if g.crosses_patients) >= 6


def test_the_shipped_segmenter_on_its_held_out_patients(june_store) -> None:  # type: ignore[no-untyped-def]
    """Dice on the test patients of the shipped segmenter's own split, per annotator:
    the goal (0.95) on the masks people drew, and the numbers its model.json records."""
    pytest.importorskip("onnxruntime")
    from covidcxr.dataset.split_file import load_split
    from covidcxr.models import lung_dice, lungs, lungs_training

    store, _ = june_store
    segmenter = lungs.LungSegmenter.load(backend="onnx")
    sample_set = lungs_training.masked_sample_set(store)
    chosen, unknown = lung_dice.held_out(
        sample_set, load_split(lungs.WEIGHTS_DIR / "split.csv"), "test"
    )
    assert unknown == 0 and len(chosen) == 72
    scores = lung_dice.dice_by_reference(segmenter, sample_set, chosen)
    card = segmenter.card
    for measured, recorded in (
        (scores["all"], card["test_dice_full_size"]),
        *(
            (scores["by_reference"][k], v)
            for k, v in card["test_dice_full_size_by_reference"].items()
        ),
    ):
        assert measured["n"] == recorded["n"]
        assert measured["mean"] == pytest.approx(recorded["mean"], abs=2e-3)  # ONNX vs torch
    assert scores["by_reference"]["v7labs"]["mean"] >= lung_dice.GOAL
    agreement = lung_dice.reference_agreement(store, sample_set)["lungVAE vs v7labs"]
    assert agreement["mean"] < 0.9  # the two annotators draw different lungs
