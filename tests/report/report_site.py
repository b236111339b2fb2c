"""A small labelled 'hospital' folder built from the shared collection, read in place."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

# A site's own headers: mapped with --column / a mapping file, as in ingest.
SITE_HEADER = [
    "Image Name",
    "Result",
    "Patient",
    "Age",
    "Gender",
    "View",
    "Hospital",
    "Study date",
    "geographic_mean",
]
WANTED = {"COVID-19": 14, "No Finding": 10, "Streptococcus": 4, "Pneumocystis": 4, "Klebsiella": 3}


@dataclass(frozen=True)
class Site:
    """A labelled local set: images folder, labels CSV, masks folder, the rows."""

    images: Path
    labels: Path
    masks: Path
    rows: list[dict[str, str]]
    lateral: str
    duplicate: tuple[str, str]


def _severity(covid_dir: Path) -> dict[str, str]:
    lines = (covid_dir / "annotations" / "covid-severity-scores.csv").read_text().splitlines()
    reader = csv.DictReader(line for line in lines if not line.startswith("##"))
    return {row["filename"]: row["geographic_mean"] for row in reader}


def build_site(covid_dir: Path, root: Path) -> Site:
    """Copy about 35 frontal X-rays (five findings), one lateral and one duplicate."""
    images = root / "images"
    images.mkdir(parents=True)
    masks = covid_dir / "annotations" / "lungVAE-masks"
    severity = _severity(covid_dir)
    taken = dict.fromkeys(WANTED, 0)
    rows: list[dict[str, str]] = []
    lateral = ""
    with (covid_dir / "metadata.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            source = covid_dir / "images" / row["filename"]
            if row["modality"] != "X-ray" or not source.is_file():
                continue
            finding = row["finding"]
            frontal = row["view"] in ("PA", "AP", "AP Supine")
            if frontal and finding in taken and taken[finding] < WANTED[finding]:
                taken[finding] += 1
            elif row["view"] == "L" and not lateral and finding == "COVID-19":
                lateral = row["filename"]
            else:
                continue
            shutil.copyfile(source, images / row["filename"])
            rows.append(
                {
                    "Image Name": row["filename"],
                    "Result": finding,
                    "Patient": row["patientid"],
                    "Age": row["age"],
                    "Gender": row["sex"],
                    "View": row["view"],
                    "Hospital": row["location"].split(",")[-1].strip(),
                    "Study date": row["date"],
                    "geographic_mean": severity.get(row["filename"], ""),
                }
            )
    first = rows[0]
    copy = dict(first, **{"Image Name": "copy-of-" + first["Image Name"]})
    shutil.copyfile(images / first["Image Name"], images / copy["Image Name"])
    rows.append(copy)
    labels = root / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, SITE_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return Site(images, labels, masks, rows, lateral, (first["Image Name"], copy["Image Name"]))


SITE_COLUMNS = [
    "--column",
    "filename=Image Name",
    "--column",
    "finding=Result",
    "--column",
    "acquired_on=Study date",
]
