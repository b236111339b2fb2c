"""Ingest and query speed, against a floor measured in the same run.

    python benchmarks/ingest.py [--shared ../shared/datasets] [--rows 100000] [--quick]
                                [--postgres URL] [--queries-only]

1. The shared collection: a plain decode of every referenced image once (PIL open +
   load, one process: the floor, measured right before each ingest), then
   ``covidcxr ingest`` into a fresh SQLite store with one worker process (like for
   like) and with the default workers. Prints rows/s,
   images/s and the ratio of the image part of the ingest to the floor.
   Goal: image part within 2x of the floor.
2. A synthetic collection of ``--rows`` metadata rows, one 256 x 256 JPEG each (small
   radiograph thumbnails; with tiny images the fixed per-file cost of validation and
   hashing, about 0.4 ms, dominates instead of decoding): the same numbers.
3. Queries on the synthetic store (100,000 rows by default): list/filter latency in ms.
   Goal: under 50 ms. With ``--postgres URL`` the synthetic collection is also ingested
   into a new schema of that PostgreSQL database (dropped at the end) and the same
   queries are timed there.

With ``--queries-only`` parts 1 and 2 are skipped and the query stores are filled
with the same synthetic metadata written straight into the tables (no images: the
queries never read blobs), which takes seconds instead of the ingest's minutes.

Everything is written to a temporary directory; ``../shared`` is only read.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import insert

from covidcxr.ingest.pipeline import IngestOutcome, ingest_source
from covidcxr.ingest.source import resolve_source
from covidcxr.ingest.table import read_table
from covidcxr.schema.findings import parse_finding
from covidcxr.store import queries
from covidcxr.store.db import open_store
from covidcxr.store.tables import Finding, Observation, Patient, Record, Source

FINDINGS = (
    "COVID-19",
    "Pneumonia/Viral/COVID-19",
    "Streptococcus",
    "Pneumocystis",
    "No Finding",
    "todo",
    "Pneumonia",
    "SARS",
    "COVID-19, ARDS",
    "Klebsiella",
)
VIEWS = ("PA", "AP", "AP Supine", "L", "PA", "PA")
HEADER = [
    "patientid",
    "offset",
    "sex",
    "age",
    "finding",
    "survival",
    "intubated",
    "went_icu",
    "needed_supplemental_O2",
    "temperature",
    "view",
    "modality",
    "date",
    "location",
    "folder",
    "filename",
    "doi",
    "url",
    "license",
    "clinical_notes",
]


def plain_decode(paths: list[Path]) -> float:
    """Seconds to open and fully decode every image once, in this process."""
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.load()
    return time.perf_counter() - started


def referenced_images(root: Path) -> list[Path]:
    """The distinct, present image files the metadata references."""
    spec = resolve_source(root)
    table = read_table(spec.metadata)
    folder = table.headers.index("folder")
    filename = table.headers.index("filename")
    paths = {root / row.cells[folder] / row.cells[filename] for row in table.rows}
    return sorted(p for p in paths if p.is_file())


def sqlite_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'store.sqlite'}"


def timed_ingest(
    root: Path, workdir: Path, workers: int | None, url: str | None = None
) -> tuple[IngestOutcome, float]:
    """Ingest into a fresh store (SQLite in ``workdir`` unless ``url`` names another
    empty database); returns the outcome and the wall time."""
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    with open_store(url or sqlite_url(workdir), workdir / "data", create=True) as store:
        outcome = ingest_source(root, store, workers=workers, report_dir=workdir / "reports")
    return outcome, time.perf_counter() - started


def ingest_rows(
    label: str, outcome: IngestOutcome, wall: float, floor: float, workers: str
) -> list[dict[str, Any]]:
    counts = outcome.scan.report.counts
    images = counts.get("images_stored", 0)
    image_part = outcome.timings["images"]
    return [
        {
            "case": label,
            "workers": workers,
            "rows": counts["rows"],
            "images": images,
            "wall_s": wall,
            "rows_per_s": counts["rows"] / wall,
            "images_per_s": images / wall,
            "image_part_s": image_part,
            "floor_s": floor,
            "ratio": image_part / floor,
            "phases": ", ".join(f"{k} {v:.1f}s" for k, v in outcome.timings.items()),
        }
    ]


def synthetic_collection(root: Path, rows: int, size: int, seed: int = 0) -> Path:
    """``rows`` metadata rows over ``rows`` distinct ``size`` x ``size`` JPEGs.

    The pictures are a smooth random field (like a small radiograph) shifted and
    marked per row, so every file differs; ~30,000 patients.
    """
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True)
    coarse = rng.normal(size=(size // 16 + 2, size // 16 + 2))
    field = np.asarray(
        Image.fromarray(coarse.astype(np.float32)).resize(
            (size * 2, size * 2), Image.Resampling.BICUBIC
        )
    )
    field = ((field - field.min()) / np.ptp(field) * 200 + 20).astype(np.uint8)
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for index in range(rows):
            dy, dx = divmod(index % (size * size), size)
            pixels = field[dy % size : dy % size + size, dx : dx + size].copy()
            pixels[:8, : (index % size) + 1] = 255
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
            name = f"img{index:06d}.jpg"
            (images / name).write_bytes(buffer.getvalue())
            writer.writerow(
                [
                    f"P{index % 30000}",
                    int(rng.integers(-5, 30)),
                    "MF"[index % 2],
                    int(rng.integers(18, 95)),
                    FINDINGS[index % len(FINDINGS)],
                    "YN"[index % 2] if index % 3 else "",
                    "Y" if index % 5 == 0 else "",
                    "N" if index % 7 == 0 else "",
                    "",
                    f"{36 + rng.random() * 4:.1f}",
                    VIEWS[index % len(VIEWS)],
                    "X-ray",
                    "2020",
                    "Somewhere, Italy",
                    "images",
                    name,
                    "10.0/synthetic",
                    "",
                    "CC BY 4.0",
                    "",
                ]
            )
    return root


def synthetic_store(url: str, data_dir: Path, rows: int, seed: int = 0) -> None:
    """Fill a new store with the metadata of :func:`synthetic_collection` (same
    patients, findings, views, sexes and outcomes per row), written straight into the
    tables: no image files, every record ``missing``."""
    rng = np.random.default_rng(seed)
    with open_store(url, data_dir, create=True) as store:
        with store.transaction() as conn:
            conn.execute(
                insert(Source),
                [{"id": 1, "name": "synthetic", "kind": "folder", "root": "/", "created_at": _NOW}],
            )
            conn.execute(
                insert(Patient),
                [
                    {"id": p + 1, "source_id": 1, "patient_id": f"P{p}"}
                    for p in range(min(rows, 30000))
                ],
            )
            paths = {f: parse_finding(f).paths for f in FINDINGS}
            statuses = {f: parse_finding(f).status for f in FINDINGS}
            for start in range(0, rows, 10_000):
                batch = range(start, min(rows, start + 10_000))
                conn.execute(insert(Record), [_record_row(i, statuses) for i in batch])
                conn.execute(insert(Observation), [_observation_row(i, rng) for i in batch])
                conn.execute(
                    insert(Finding),
                    [
                        {"record_id": i + 1, "position": n, "path": path, "token": path}
                        for i in batch
                        for n, path in enumerate(paths[FINDINGS[i % len(FINDINGS)]])
                    ],
                )
        store.analyze()


_NOW = dt.datetime.now(dt.UTC)


def _record_row(index: int, statuses: dict[str, str]) -> dict[str, Any]:
    finding = FINDINGS[index % len(FINDINGS)]
    return {
        "id": index + 1,
        "source_id": 1,
        "patient_pk": index % 30000 + 1,
        "row_key": f"images/img{index:06d}.jpg",
        "line": index + 2,
        "folder": "images",
        "filename": f"img{index:06d}.jpg",
        "image_status": "missing",
        "view": {"AP Supine": "AP Supine"}.get(
            VIEWS[index % len(VIEWS)], VIEWS[index % len(VIEWS)]
        ),
        "modality": "X-ray",
        "finding": finding,
        "finding_status": statuses[finding],
        "date": "2020",
        "location": "Somewhere, Italy",
        "doi": "10.0/synthetic",
        "license": "CC BY 4.0",
        "flags": "",
        "content_hash": "0" * 64,
    }


def _observation_row(index: int, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "record_id": index + 1,
        "offset_days": int(rng.integers(-5, 30)),
        "sex": "MF"[index % 2],
        "age_years": float(rng.integers(18, 95)),
        "survival": (index % 2 == 0) if index % 3 else None,
        "intubated": True if index % 5 == 0 else None,
        "went_icu": False if index % 7 == 0 else None,
        "temperature_c": round(36 + float(rng.random()) * 4, 1),
    }


def time_query(run: Callable[[], Any], repeat: int = 7) -> tuple[float, Any]:
    """Median milliseconds of ``repeat`` runs (after one warm-up) and the last result."""
    result = run()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def query_rows(url: str, data_dir: Path) -> list[dict[str, Any]]:
    filters = {
        "finding COVID-19 (any level) + view PA": queries.RecordFilter(
            findings=["COVID-19"], views=["PA"]
        ),
        "viral pneumonia, age 60-70, female": queries.RecordFilter(
            findings=["viral"], age_min=60, age_max=70, sexes=["F"]
        ),
        "survival N": queries.RecordFilter(outcomes={"survival": False}),
        "one patient": queries.RecordFilter(patients=["P123"]),
        "bacterial, lateral": queries.RecordFilter(findings=["bacterial"], views=["L"]),
        # Stress cases for the planner: a wide range (most rows match) and a rare match.
        "viral pneumonia, age 20-90": queries.RecordFilter(
            findings=["viral"], age_min=20, age_max=90
        ),
        "fungal pneumonia, CT, age 89+": queries.RecordFilter(
            findings=["fungal"], modalities=["CT"], age_min=89
        ),
    }
    rows = []
    with (
        open_store(url, data_dir, create=True) as store,
        store.read() as conn,
    ):
        for name, selection in filters.items():
            ms, result = time_query(lambda s=selection: queries.list_records(conn, s, limit=100))
            count_ms, count = time_query(lambda s=selection: queries.count_records(conn, s))
            rows.append({"query": f"list {name} (first 100)", "ms": ms, "rows": len(result)})
            rows.append({"query": f"count {name}", "ms": count_ms, "rows": count})
        ms, result = time_query(lambda: queries.list_records(conn), repeat=3)
        rows.append({"query": "list everything (not a filter)", "ms": ms, "rows": len(result)})
    return rows


@contextlib.contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema in the PostgreSQL database at ``url``, dropped afterwards."""
    from sqlalchemy import create_engine, text

    schema = f"covidcxr_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in url else "?"
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def text(value: Any) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    widths = [max(len(c), *(len(text(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(text(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


def queries_only(rows: int, postgres: str | None) -> int:
    """Part 3 alone, on stores filled by :func:`synthetic_store`."""
    with tempfile.TemporaryDirectory(prefix="covidcxr-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        synthetic_store(sqlite_url(work), work / "data", rows)
        print(f"filled a SQLite store with {rows:,} rows in {time.perf_counter() - started:.1f}s")
        print(f"\nQueries on the synthetic SQLite store ({rows:,} rows; goal < 50 ms)")
        print_table(query_rows(sqlite_url(work), work / "data"), ["query", "ms", "rows"])
        if postgres:
            with postgres_schema(postgres) as url:
                synthetic_store(url, work / "pg-data", rows)
                print(f"\nQueries on the synthetic PostgreSQL store ({rows:,} rows; goal < 50 ms)")
                print_table(query_rows(url, work / "pg-data"), ["query", "ms", "rows"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(__file__).resolve().parents[1].parent / "shared" / "datasets",
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="side of the synthetic JPEGs in pixels (default 256)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="also ingest the synthetic collection into a new schema of this PostgreSQL "
        "database (dropped afterwards) and time the queries there, e.g. "
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small synthetic collection (2,000 rows), for a smoke test",
    )
    parser.add_argument(
        "--queries-only",
        action="store_true",
        help="skip the ingests: time the queries on synthetic metadata written straight "
        "into the tables",
    )
    args = parser.parse_args(argv)
    rows = 2_000 if args.quick else args.rows
    if args.queries_only:
        return queries_only(rows, args.postgres)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="covidcxr-bench-") as tmp:
        work = Path(tmp)
        shared = args.shared / "covid-chestxray"
        if (shared / "metadata.csv").is_file():
            images = referenced_images(shared)
            for workers in (1, None):
                # The floor is measured again right before each ingest: this machine's
                # speed drifts by 20% over minutes, and a ratio of two timings taken
                # minutes apart would carry that drift.
                floor = plain_decode(images)
                outcome, wall = timed_ingest(shared, work / f"shared-{workers}", workers)
                results += ingest_rows(
                    "covid-chestxray", outcome, wall, floor, str(workers or os.cpu_count())
                )
        else:
            print(f"(shared collection not found at {shared}: skipped)", file=sys.stderr)
        started = time.perf_counter()
        synthetic = synthetic_collection(work / "synthetic", rows, args.image_size)
        print(
            f"built a synthetic collection of {rows:,} rows in "
            f"{time.perf_counter() - started:.1f}s",
            file=sys.stderr,
        )
        images = sorted((synthetic / "images").iterdir())
        for workers in (1, None):
            floor = plain_decode(images)
            outcome, wall = timed_ingest(synthetic, work / f"synthetic-{workers}", workers)
            results += ingest_rows(
                f"synthetic {rows:,}", outcome, wall, floor, str(workers or os.cpu_count())
            )
        print(
            "\nIngest (ratio = image part of the ingest / plain decode of every image once;"
            " goal <= 2.0)"
        )
        print_table(
            results,
            [
                "case",
                "workers",
                "rows",
                "images",
                "wall_s",
                "rows_per_s",
                "images_per_s",
                "image_part_s",
                "floor_s",
                "ratio",
            ],
        )
        print()
        for row in results:
            print(f"  {row['case']}, {row['workers']} worker(s): {row['phases']}")
        store_dir = work / "synthetic-None"
        print(f"\nQueries on the synthetic SQLite store ({rows:,} rows; goal < 50 ms)")
        print_table(query_rows(sqlite_url(store_dir), store_dir / "data"), ["query", "ms", "rows"])
        if args.postgres:
            with postgres_schema(args.postgres) as url:
                outcome, wall = timed_ingest(synthetic, work / "synthetic-postgres", None, url)
                print(f"\nPostgreSQL ingest of the synthetic collection: {wall:.1f}s")
                print("  " + ingest_rows("postgres", outcome, wall, floor, "")[0]["phases"])
                print(f"\nQueries on the synthetic PostgreSQL store ({rows:,} rows; goal < 50 ms)")
                print_table(
                    query_rows(url, work / "synthetic-postgres" / "data"), ["query", "ms", "rows"]
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
