"""The store on SQLite and PostgreSQL: schema, idempotent ingest, transactions, queries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select, text
from sqlalchemy.exc import IntegrityError

from conftest import MakeCollection, encode, upstream_row, write_metadata, xray_like
from covidcxr.errors import IngestRefusedError, MetadataError, StoreError
from covidcxr.ingest import writer
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.ingest.writer import RemovalsRefusedError
from covidcxr.store import accounts, queries
from covidcxr.store.db import current_revision, head_revision, open_store, table_names
from covidcxr.store.tables import Base, Image, IngestLog, Observation, Record

DATA_TABLES = (
    "sources",
    "patients",
    "images",
    "records",
    "observations",
    "findings",
    "annotations",
)


def snapshot(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every data table, sorted (the ingest log is left out)."""
    return {
        name: sorted(
            (tuple(row) for row in conn.execute(select(Base.metadata.tables[name]))), key=repr
        )
        for name in DATA_TABLES
    }


@pytest.fixture
def store(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    with open_store(db_url, tmp_path / "data", create=True) as opened:
        yield opened


def test_new_store_is_at_the_newest_migration(store) -> None:  # type: ignore[no-untyped-def]
    with store.read() as conn:
        assert current_revision(conn) == head_revision()
    service = {table.__tablename__ for table in accounts.SERVICE_TABLES}
    expected = set(DATA_TABLES) | service | {"ingest_log", "alembic_version"}
    assert expected == set(table_names(store.engine))


def test_models_and_migrations_agree(store) -> None:  # type: ignore[no-untyped-def]
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.read() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_unmigrated_database_is_refused_without_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    with pytest.raises(StoreError, match="is at schema revision None"):
        open_store(url, tmp_path, migrate=False, create=True)


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        open_store("postgresql://postgres@127.0.0.1:1/test", tmp_path, create=True)
    with pytest.raises(StoreError, match="cannot use nope://x"):
        open_store("nope://x", tmp_path, create=True)


def test_ingest_then_reingest_changes_nothing(store, make_collection: MakeCollection) -> None:  # type: ignore[no-untyped-def]
    root = make_collection()
    first = ingest_source(root, store)
    assert first.summary.counts["records_added"] == 4
    assert first.summary.counts["images_added"] == 3
    assert first.summary.counts["annotations_added"] == 4  # severity, mask, two boxes
    with store.read() as conn:
        before = snapshot(conn)
    second = ingest_source(root, store)
    assert not second.summary.changed
    assert second.summary.counts["records_unchanged"] == 4
    with store.read() as conn:
        assert snapshot(conn) == before
        logs = conn.execute(select(IngestLog.id, IngestLog.counts)).all()
    assert len(logs) == 2


def test_changed_metadata_is_synchronised(
    store,
    make_collection: MakeCollection,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    root = make_collection()
    ingest_source(root, store)
    rows = [
        upstream_row(patientid="1", offset="0", filename="p1.png", survival="N"),  # changed
        upstream_row(patientid="1", offset="3", filename="p1-day3.jpg", view="AP"),  # same
        upstream_row(patientid="4", filename="p4.png"),  # new patient, new image
    ]
    (root / "images" / "p4.png").write_bytes(encode(xray_like(4)))
    write_metadata(root / "metadata.csv", rows)
    with store.read() as conn:
        before = snapshot(conn)
    # Two of four records would go: refused unless removals are allowed.
    with pytest.raises(RemovalsRefusedError, match="remove 2 of 4 stored record") as refused:
        ingest_source(root, store)
    assert refused.value.counts["records_removed"] == 2
    with store.read() as conn:
        assert snapshot(conn) == before
    outcome = ingest_source(root, store, allow_removals=True)
    counts = outcome.summary.counts
    assert (
        counts["records_added"],
        counts["records_updated"],
        counts["records_removed"],
        counts["records_unchanged"],
    ) == (1, 1, 2, 1)
    assert counts["patients_added"] == 1 and counts["patients_removed"] == 2
    with store.read() as conn:
        listed = {(r["patient_id"], r["filename"]): r for r in queries.list_records(conn)}
    assert set(listed) == {("1", "p1.png"), ("1", "p1-day3.jpg"), ("4", "p4.png")}
    assert listed[("1", "p1.png")]["survival"] is False


def test_error_mid_ingest_leaves_the_store_as_it_was(  # type: ignore[no-untyped-def]
    store, make_collection: MakeCollection, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_collection()
    ingest_source(root, store)
    with store.read() as conn:
        before = snapshot(conn)
    write_metadata(root / "metadata.csv", [upstream_row(patientid="9", filename="p2.png")])

    def crash(*args: Any, **kwargs: Any) -> dict[str, int]:
        raise RuntimeError("simulated crash after records were written")

    monkeypatch.setattr(writer, "_sync_annotations", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest_source(root, store)
    with store.read() as conn:
        assert snapshot(conn) == before
        assert len(conn.execute(select(IngestLog.id)).all()) == 1


def test_strict_ingest_refuses_and_writes_nothing(store, make_collection: MakeCollection) -> None:  # type: ignore[no-untyped-def]
    rows = [
        upstream_row(patientid="1", filename="p1.png"),
        upstream_row(patientid="2", filename="../../etc/passwd"),
    ]
    root = make_collection(rows, annotations=False)
    with pytest.raises(IngestRefusedError, match=r"1 error\(s\).*nothing written") as caught:
        ingest_source(root, store, strict=True)
    issue = caught.value.report.errors[0]  # type: ignore[union-attr]
    assert (issue.code, issue.row, issue.column) == ("unsafe_path", 3, "filename")
    with store.read() as conn:
        assert all(not rows for rows in snapshot(conn).values())
    assert list(store.blobs.root.glob("*/*")) == []
    assert len(list(store.reports_dir.glob("*.json"))) == 1


def test_shared_image_is_stored_once_listed_twice(store, make_collection: MakeCollection) -> None:  # type: ignore[no-untyped-def]
    ingest_source(make_collection(), store)
    with store.read() as conn:
        rows = [r for r in queries.list_records(conn) if r["filename"] == "p2.png"]
        images = conn.execute(select(Image.sha256)).scalars().all()
    assert len(rows) == 2 and rows[0]["image_sha256"] == rows[1]["image_sha256"]
    assert all("shared_image" in r["flags"] for r in rows)
    assert len(images) == 3


def test_blobs_match_the_source_files(store, make_collection: MakeCollection) -> None:  # type: ignore[no-untyped-def]
    root = make_collection()
    ingest_source(root, store)
    with store.read() as conn:
        rows = queries.list_records(conn)
    for row in rows:
        if row["image_sha256"]:
            source = root / row["folder"] / row["filename"]
            assert store.blobs.path(row["image_sha256"]).read_bytes() == source.read_bytes()


def test_annotations_are_stored_with_their_image(store, make_collection: MakeCollection) -> None:  # type: ignore[no-untyped-def]
    ingest_source(make_collection(), store)
    with store.read() as conn:
        (p1,) = [r for r in queries.list_records(conn) if r["filename"] == "p1.png"]
        found = queries.annotations_for(conn, [p1["image_sha256"]])[p1["image_sha256"]]
    kinds = sorted((a["kind"], a.get("label", "")) for a in found)
    assert kinds == [
        ("lung_box", "Left Lung"),
        ("lung_box", "Right Lung"),
        ("lung_mask", ""),
        ("severity", ""),
    ]
    severity = next(a for a in found if a["kind"] == "severity")
    assert (severity["geographic_mean"], severity["opacity_mean"]) == (4.5, 3.0)
    mask = next(a for a in found if a["kind"] == "lung_mask")
    assert mask["mask_values"] == "0/255" and store.blobs.has(mask["mask_sha256"])


def test_database_constraints_hold(store, make_collection: MakeCollection) -> None:  # type: ignore[no-untyped-def]
    ingest_source(make_collection(), store)
    with store.read() as conn:
        record_id = conn.execute(select(Record.id).limit(1)).scalar_one()
    with pytest.raises(IntegrityError), store.transaction() as conn:
        conn.execute(
            text("UPDATE records SET image_sha256 = :sha WHERE id = :id"),
            {"sha": "0" * 64, "id": record_id},
        )
    with pytest.raises(IntegrityError), store.transaction() as conn:
        conn.execute(
            text("UPDATE observations SET age_years = 300 WHERE record_id = :id"), {"id": record_id}
        )
    with pytest.raises(IntegrityError), store.transaction() as conn:
        conn.execute(insert(Observation).values(record_id=10**9))


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (queries.RecordFilter(), {"p1.png", "p1-day3.jpg", "p2.png"}),
        (queries.RecordFilter(findings=["covid-19"]), {"p1.png", "p1-day3.jpg"}),
        (queries.RecordFilter(findings=["bacterial"]), {"p2.png"}),
        (queries.RecordFilter(findings=["Pneumonia"]), {"p1.png", "p1-day3.jpg", "p2.png"}),
        (queries.RecordFilter(findings=["No Finding"]), {"p2.png"}),
        (queries.RecordFilter(views=["AP"]), {"p1-day3.jpg"}),
        (queries.RecordFilter(views=["frontal"]), {"p1.png", "p1-day3.jpg", "p2.png"}),
        (queries.RecordFilter(sexes=["female"]), {"p2.png"}),
        (queries.RecordFilter(age_min=40, age_max=70), {"p1.png", "p1-day3.jpg"}),
        (queries.RecordFilter(has_severity=True), {"p1.png"}),
        (queries.RecordFilter(has_mask=False), {"p1-day3.jpg", "p2.png"}),
        (queries.RecordFilter(outcomes={"survival": True}), {"p2.png"}),
        (queries.RecordFilter(flags=["shared_image"]), {"p2.png"}),
        (queries.RecordFilter(patients=["3"]), {"p2.png"}),
        (queries.RecordFilter(sources=["elsewhere"]), set()),
        # Findings with observation columns only: counted over observations alone.
        (queries.RecordFilter(findings=["covid-19"], age_min=40), {"p1.png", "p1-day3.jpg"}),
        (queries.RecordFilter(findings=["bacterial"], sexes=["M"]), set()),
        (
            queries.RecordFilter(findings=["Pneumonia"], outcomes={"survival": None}),
            {"p1.png", "p1-day3.jpg"},
        ),
        (queries.RecordFilter(views=["AP"], age_min=40), {"p1-day3.jpg"}),
    ],
)
def test_list_filters(
    store,
    make_collection: MakeCollection,  # type: ignore[no-untyped-def]
    selection: queries.RecordFilter,
    expected: set[str],
) -> None:
    ingest_source(make_collection(), store)
    with store.read() as conn:
        rows = queries.list_records(conn, selection)
        assert queries.count_records(conn, selection) == len(rows)
    assert {r["filename"] for r in rows} == expected


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (queries.RecordFilter(findings=["dragonpox"]), "dragonpox"),
        (queries.RecordFilter(views=["sideways"]), "view 'sideways'"),
        (queries.RecordFilter(outcomes={"mood": True}), "not an outcome field"),
    ],
)
def test_bad_filters_raise(store, selection: queries.RecordFilter, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MetadataError, match=message), store.read() as conn:
        queries.list_records(conn, selection)


def test_show_by_hash_prefix_file_and_patient(store, make_collection: MakeCollection) -> None:  # type: ignore[no-untyped-def]
    ingest_source(make_collection(), store)
    with store.read() as conn:
        p2 = queries.find_records(conn, "p2.png")
        assert {r["patient_id"] for r in p2} == {"2", "3"}
        by_hash = queries.find_records(conn, p2[0]["image_sha256"][:10])
        assert {r["record_id"] for r in by_hash} == {r["record_id"] for r in p2}
        patient = queries.find_records(conn, "tiny:1")
        assert {r["filename"] for r in patient} == {"p1.png", "p1-day3.jpg"}
        assert queries.find_records(conn, f"#{patient[0]['record_id']}")[0]["patient_id"] == "1"
        with pytest.raises(MetadataError, match="nothing matches 'nobody'"):
            queries.find_records(conn, "nobody")


def test_stats(store, make_collection: MakeCollection) -> None:  # type: ignore[no-untyped-def]
    ingest_source(make_collection(), store)
    with store.read() as conn:
        data = queries.stats(conn)
    assert (data["records"], data["patients"], data["images"]) == (4, 3, 3)
    assert data["findings"]["Pneumonia"] == 3 and data["findings"]["Pneumonia/Viral"] == 2
    assert data["view"] == {"PA": 3, "AP": 1}
    assert data["annotated_images"] == {"severity": 1, "lung_mask": 1, "lung_box": 1}
    assert data["outcomes"]["survival"] == {"unknown": 3, "Y": 1}


def test_pages_follow_ingest_order_of_sources_then_line(
    store,  # type: ignore[no-untyped-def]
    make_collection: MakeCollection,
) -> None:
    # "zeta" is ingested first, so its rows come first although "alpha" sorts before it.
    ingest_source(make_collection(name="zeta"), store)
    ingest_source(make_collection(name="alpha"), store)
    selections = [
        queries.RecordFilter(),
        queries.RecordFilter(findings=["covid-19"]),
        queries.RecordFilter(findings=["viral", "bacterial"], sexes=["F", "M"]),
        queries.RecordFilter(age_min=20, sources=["alpha", "zeta"], patients=["1", "2", "3"]),
    ]
    with store.read() as conn:
        everything = queries.list_records(conn)
        assert [r["source"] for r in everything] == ["zeta"] * 4 + ["alpha"] * 4
        assert [r["line"] for r in everything[:4]] == sorted(r["line"] for r in everything[:4])
        for selection in selections:
            full = queries.list_records(conn, selection)
            assert len(full) == queries.count_records(conn, selection) > 0
            for limit, offset in ((1, 0), (2, 1), (3, 5), (100, 2), (2, 50)):
                page = queries.list_records(conn, selection, limit=limit, offset=offset)
                assert page == full[offset : offset + limit], (selection, limit, offset)
            for page_size in (1, 3, 1000):
                pages = list(queries.iter_records(conn, selection, page_size=page_size))
                assert all(0 < len(page) <= page_size for page in pages)
                assert [row for page in pages for row in page] == full, (selection, page_size)
        with pytest.raises(ValueError, match="page_size must be at least 1"):
            next(queries.iter_records(conn, page_size=0))


def test_hierarchy_filter_reads_the_paths_in_the_store(
    store, make_collection: MakeCollection
) -> None:  # type: ignore[no-untyped-def]
    ingest_source(make_collection(), store)
    with store.read() as conn:
        assert queries.stored_paths_under(conn, ["Pneumonia"]) == [
            "Pneumonia/Bacterial/Streptococcus",
            "Pneumonia/Viral/COVID-19",
        ]
        assert queries.stored_paths_under(conn, ["Pneumonia/Viral"]) == ["Pneumonia/Viral/COVID-19"]
        # A prefix of a name is not an ancestor: "Pneumonia/Vir" is no node.
        assert queries.stored_paths_under(conn, ["Pneumonia/Vir"]) == []
        # A node with nothing stored below it selects nothing rather than failing.
        fungal = queries.RecordFilter(findings=["fungal"])
        assert queries.list_records(conn, fungal) == []
        assert queries.count_records(conn, fungal) == 0


def test_empty_store_has_no_paths(store) -> None:  # type: ignore[no-untyped-def]
    with store.read() as conn:
        assert queries.stored_paths_under(conn, ["Pneumonia"]) == []


def test_ingest_refreshes_planner_statistics(
    tmp_path: Path, make_collection: MakeCollection
) -> None:
    with open_store(
        f"sqlite:///{tmp_path / 'store.sqlite'}", tmp_path / "data", create=True
    ) as store:
        with store.read() as conn:
            stat_tables = text("SELECT name FROM sqlite_master WHERE name = 'sqlite_stat1'")
            assert conn.execute(stat_tables).all() == []
        ingest_source(make_collection(), store)
        with store.read() as conn:
            tables = {row[0] for row in conn.execute(text("SELECT tbl FROM sqlite_stat1"))}
    assert {"records", "findings", "observations", "patients"} <= tables


@pytest.mark.postgres
def test_ingest_vacuums_and_analyzes_on_postgresql(
    postgres_url: str, tmp_path: Path, make_collection: MakeCollection
) -> None:
    # Fresh pages are not all-visible until VACUUM: index-only scans would still read
    # the table behind every index entry.
    with open_store(postgres_url, tmp_path / "data", create=True) as store:
        ingest_source(make_collection(), store)
        with store.read() as conn:
            done = conn.execute(
                text(
                    "SELECT relname FROM pg_stat_user_tables WHERE schemaname = "
                    "current_schema() AND last_vacuum IS NOT NULL AND last_analyze IS NOT NULL"
                )
            )
            vacuumed = {row[0] for row in done}
    assert {"records", "findings", "observations", "patients"} <= vacuumed


def test_store_at_the_first_migration_is_upgraded_with_its_data(
    db_url: str, tmp_path: Path, make_collection: MakeCollection
) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from covidcxr.store.db import alembic_config, create_store_engine

    with open_store(db_url, tmp_path / "data", create=True) as store:
        ingest_source(make_collection(), store)
        with store.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0001")
        with store.read() as conn:
            assert current_revision(conn) == "0001"
            before = snapshot(conn)
    engine = create_store_engine(db_url)
    indexes = {i["name"] for i in inspect(engine).get_indexes("findings")}
    engine.dispose()
    assert "ix_findings_path" in indexes and "ix_findings_path_record" not in indexes
    with open_store(db_url, tmp_path / "data", create=True) as store, store.read() as conn:
        assert current_revision(conn) == head_revision()
        assert snapshot(conn) == before
        assert {
            r["filename"] for r in queries.list_records(conn, queries.RecordFilter(patients=["3"]))
        } == {"p2.png"}


@pytest.mark.parametrize("field_name", ["findings", "views", "sources", "patients"])
def test_a_filter_value_with_a_nul_byte_is_refused(field_name: str) -> None:
    from covidcxr.store.queries import RecordFilter

    with pytest.raises(MetadataError, match="contains a NUL byte"):
        RecordFilter(**{field_name: ["x\x00y"]})
