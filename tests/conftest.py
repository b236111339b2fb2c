"""Shared fixtures: isolated data directories, database URLs, synthetic collections.

Unit tests build tiny collections in code (:func:`make_collection`); integration
tests read ``../shared/datasets`` in place and skip when it is absent.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
COVID_DIR = SHARED_DATASETS / "covid-chestxray"
NIH_DIR = SHARED_DATASETS / "nih-cxr14-subset"
POSTGRES_URL = os.environ.get(
    "COVIDCXR_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

UPSTREAM_HEADER = [
    "patientid",
    "offset",
    "sex",
    "age",
    "finding",
    "survival",
    "intubated",
    "intubation_present",
    "went_icu",
    "in_icu",
    "needed_supplemental_O2",
    "extubated",
    "temperature",
    "pO2_saturation",
    "leukocyte_count",
    "neutrophil_count",
    "lymphocyte_count",
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
    "other_notes",
    "",
]


@pytest.fixture(autouse=True)
def _isolated_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point every default data directory and database at a fresh temp dir."""
    data = tmp_path_factory.mktemp("covidcxr-data")
    monkeypatch.setenv("COVIDCXR_DATA_DIR", str(data))
    monkeypatch.delenv("COVIDCXR_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(data / "xdg"))
    return data


@pytest.fixture
def covid_dir() -> Path:
    """The real collection snapshot (skips when ../shared is absent)."""
    if not (COVID_DIR / "metadata.csv").is_file():
        pytest.skip(f"shared data not found at {COVID_DIR}")
    return COVID_DIR


@pytest.fixture
def nih_dir() -> Path:
    """The NIH subset (skips when ../shared is absent)."""
    if not (NIH_DIR / "metadata.csv").is_file():
        pytest.skip(f"shared data not found at {NIH_DIR}")
    return NIH_DIR


def _postgres_schema_url() -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.orig}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for an empty store: SQLite file, then a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite'}"
    else:
        yield from _postgres_schema_url()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL schema's URL (tests using it are marked ``postgres``)."""
    yield from _postgres_schema_url()


def xray_like(seed: int, size: tuple[int, int] = (96, 80)) -> np.ndarray:
    """A smooth, noisy grayscale picture (uint8) that differs clearly per seed."""
    rng = np.random.default_rng(seed)
    height, width = size
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    picture = np.zeros((height, width))
    for _ in range(6):
        cy, cx, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.4)
        picture += rng.uniform(-1, 1) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / radius**2)
    picture += rng.normal(0, 0.03, size=picture.shape)
    picture = (picture - picture.min()) / (np.ptp(picture) or 1.0)
    return (picture * 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG", **params: Any) -> bytes:
    """Encode an array as PNG or JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def upstream_row(**values: str) -> dict[str, str]:
    """A metadata row in the June-2020 layout; unspecified cells are blank."""
    row = dict.fromkeys(UPSTREAM_HEADER[:-1], "")
    row.update(
        patientid="1",
        offset="0",
        sex="M",
        age="60",
        finding="COVID-19",
        view="PA",
        modality="X-ray",
        folder="images",
        filename="p1.png",
        license="CC BY 4.0",
    )
    unknown = set(values) - set(row)
    assert not unknown, f"unknown upstream columns {unknown}"
    row.update(values)
    return row


def write_metadata(
    path: Path, rows: Sequence[dict[str, str]], header: Sequence[str] = UPSTREAM_HEADER
) -> Path:
    """Write rows as the upstream writes them (trailing comma in the header)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(h, "") for h in header])
    return path


MakeCollection = Callable[..., Path]


@pytest.fixture
def make_collection(tmp_path: Path) -> MakeCollection:
    """Build a tiny upstream-layout collection and return its folder.

    Default: 3 patients, 4 PNG/JPEG images (one file referenced by two patients),
    severity scores, a lung mask and lung boxes for the first image.
    """

    def build(
        rows: Sequence[dict[str, str]] | None = None,
        *,
        name: str = "tiny",
        images: dict[str, bytes] | None = None,
        annotations: bool = True,
    ) -> Path:
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        if rows is None:
            rows = [
                upstream_row(patientid="1", offset="0", filename="p1.png"),
                upstream_row(patientid="1", offset="3", filename="p1-day3.jpg", view="AP"),
                upstream_row(
                    patientid="2",
                    sex="F",
                    age="34",
                    finding="Streptococcus",
                    filename="p2.png",
                    survival="Y",
                ),
                upstream_row(
                    patientid="3", sex="", age="", finding="No Finding", filename="p2.png"
                ),
            ]
        if images is None:
            images = {
                "p1.png": encode(xray_like(1)),
                "p1-day3.jpg": encode(xray_like(2), "JPEG", quality=90),
                "p2.png": encode(xray_like(3)),
            }
        for filename, data in images.items():
            (root / "images" / filename).write_bytes(data)
        write_metadata(root / "metadata.csv", rows)
        if annotations:
            folder = root / "annotations"
            (folder / "lungVAE-masks").mkdir(parents=True)
            (folder / "covid-severity-scores.csv").write_text(
                "## severity scores,,\nfilename,geographic_mean,opacity_mean\np1.png,4.5,3.0\n",
                encoding="utf-8",
            )
            mask = np.zeros((96, 80), dtype=np.uint8)
            mask[20:70, 10:35] = 255
            mask[20:70, 45:70] = 255
            (folder / "lungVAE-masks" / "p1_mask.png").write_bytes(encode(mask))
            boxes = {
                "images": [{"id": 1, "file_name": "p1.png", "width": 80, "height": 96}],
                "categories": [{"id": 1, "name": "Right Lung"}, {"id": 2, "name": "Left Lung"}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 25, 50]},
                    {"id": 2, "image_id": 1, "category_id": 2, "bbox": [45, 20, 25, 50]},
                ],
            }
            (folder / "imageannotation_ai_lung_bounding_boxes.json").write_text(
                json.dumps(boxes), encoding="utf-8"
            )
        return root

    return build
