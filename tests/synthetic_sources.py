"""Synthetic multi-patient, multi-source stores shared by the dataset and export tests.

Two sources: ``alpha`` (60 patients, 20 with COVID-19, second films, severity scores,
a near-duplicate pair across patients) and ``beta`` (6 patients in another region, one
holding a copy of an alpha picture: a duplicate across sources).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import encode, upstream_row, write_metadata, xray_like
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.db import Store, open_store

LOCATIONS = ("Wuhan, China", "Milan, Italy", "Seattle, Washington", "", "Madrid, Spain ")
OTHER_FINDINGS = ("Streptococcus", "Pneumocystis", "Klebsiella", "SARS")
# alpha:5 and alpha:45 hold the same picture (the second resized and recompressed).
NEAR_PAIR = ("alpha:45", "alpha:5")
# beta:3 holds a copy of alpha:7's picture: a duplicate across sources.
CROSS_SOURCE_PAIR = ("alpha:7", "beta:3")
N_POSITIVE = 20
# Seeds of xray_like pictures whose resized copies hash within 3 bits of 128.
NEAR_SEED = 2012
CROSS_SEED = 2002


def _picture(seed: int) -> bytes:
    return encode(xray_like(seed))


def _copy_of(seed: int) -> tuple[bytes, bytes]:
    """A picture and a resized, recompressed copy (a near duplicate)."""
    original = xray_like(seed, size=(256, 224))
    smaller = np.asarray(Image.fromarray(original).resize((112, 128), Image.Resampling.BILINEAR))
    return encode(original), encode(smaller, "JPEG", quality=70)


def alpha_rows() -> tuple[list[dict[str, str]], dict[str, bytes], list[str]]:
    """60 patients, 20 with COVID-19, every third with a second film; severity lines."""
    rows, images, severity = [], {}, []
    near_original, near_copy = _copy_of(NEAR_SEED)
    cross_original, _ = _copy_of(CROSS_SEED)
    for patient in range(1, 61):
        finding = "COVID-19" if patient <= N_POSITIVE else OTHER_FINDINGS[patient % 4]
        location = LOCATIONS[patient % 5]
        if patient == 45:
            location = LOCATIONS[5 % 5]  # the same place as patient 5, whose copy it holds
        name = f"a{patient}.png"
        images[name] = _picture(patient)
        if patient == 5:
            name, images[name] = "a5-original.png", near_original
            del images["a5.png"]
        elif patient == 45:
            name, images[name] = "a45-copy.jpg", near_copy
            del images["a45.png"]
        elif patient == 7:
            name, images[name] = "a7-original.png", cross_original
            del images["a7.png"]
        rows.append(
            upstream_row(patientid=str(patient), finding=finding, location=location, filename=name)
        )
        severity.append(f"{name},{patient % 9},{patient % 7}")
        if patient % 3 == 0:
            second = f"a{patient}-day4.png"
            images[second] = _picture(100 + patient)
            rows.append(
                upstream_row(
                    patientid=str(patient),
                    offset="4",
                    view="AP",
                    finding=finding,
                    location=location,
                    filename=second,
                )
            )
    return rows, images, severity


def beta_rows() -> tuple[list[dict[str, str]], dict[str, bytes]]:
    """6 patients of another source in Hannover; beta:3 holds a copy of alpha:7's film."""
    rows, images = [], {}
    _, cross_copy = _copy_of(CROSS_SEED)
    for patient in range(1, 7):
        name = f"b{patient}.png"
        images[name] = cross_copy if patient == 3 else _picture(500 + patient)
        rows.append(
            upstream_row(
                patientid=str(patient),
                finding="COVID-19" if patient % 2 else "Klebsiella",
                location="Hannover Medical School, Hannover, Germany",
                filename=name,
            )
        )
    return rows, images


def write_source(
    root: Path, rows: list[dict[str, str]], images: dict[str, bytes], severity: list[str] = ()
) -> Path:
    (root / "images").mkdir(parents=True)
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    write_metadata(root / "metadata.csv", rows)
    if severity:
        (root / "annotations").mkdir()
        (root / "annotations" / "covid-severity-scores.csv").write_text(
            "filename,geographic_mean,opacity_mean\n" + "\n".join(severity) + "\n",
            encoding="utf-8",
        )
    return root


@dataclass(frozen=True)
class Synthetic:
    """Two ingested synthetic sources: the database file, the data dir, the folders."""

    database: Path
    data_dir: Path
    alpha: Path
    beta: Path

    def open_copy(self, folder: Path) -> Store:
        """A private copy of the database (blobs are shared: content-addressed)."""
        copy = folder / "store.sqlite"
        shutil.copyfile(self.database, copy)
        return open_store(f"sqlite:///{copy}", self.data_dir, create=True)


def build_synthetic(root: Path) -> Synthetic:
    """Write and ingest the alpha and beta sources under ``root``."""
    rows, images, severity = alpha_rows()
    alpha = write_source(root / "alpha", rows, images, severity)
    beta = write_source(root / "beta", *beta_rows())
    database = root / "store.sqlite"
    with open_store(f"sqlite:///{database}", root / "data", create=True) as store:
        ingest_source(alpha, store, workers=1)
        ingest_source(beta, store, workers=1)
    return Synthetic(database, root / "data", alpha, beta)
