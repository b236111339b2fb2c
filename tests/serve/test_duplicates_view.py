"""Duplicate groups in the service: the image detail and patient API, and the case page
(the other records of each image's group, with links), kept up to date after a write."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import io

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import (  # noqa: F401  (fixtures)
    add_user,
    bearer,
    client,
    engine,
    make_client,
    store_url,
)

from covidcxr.serve.routers.images import other_copies


def _sha(client: TestClient, filename: str) -> str:
    items = client.get("/api/v1/images").json()["items"]
    return str(next(r["image_sha256"] for r in items if r["filename"] == filename))


def test_image_detail_lists_its_duplicate_groups(client: TestClient) -> None:
    shared = _sha(client, "p2.png")  # one file under patients 2 and 3
    groups = client.get(f"/api/v1/images/{shared}").json()["duplicate_groups"]
    assert [(g["kind"], g["max_distance"], g["crosses_patients"]) for g in groups] == [
        ("exact", 0, True)
    ]
    assert sorted((r["patient_id"], r["filename"]) for r in groups[0]["records"]) == [
        ("2", "p2.png"),
        ("3", "p2.png"),
    ]
    alone = _sha(client, "p1.png")
    assert client.get(f"/api/v1/images/{alone}").json()["duplicate_groups"] == []


def test_case_page_links_the_other_records_of_a_group(client: TestClient) -> None:
    page = " ".join(client.get("/patients/tiny/2").text.split())
    assert "the same picture is also filed as:" in page
    assert (
        'href="/patients/tiny/3">tiny · patient 3</a> <b class="warn">another patient</b>' in page
    )
    assert "same file" in page
    assert 'href="/patients/tiny/2">' not in page.split("also filed as:")[1]  # not itself
    assert "none found" in client.get("/patients/tiny/1").text


def test_a_near_duplicate_accepted_later_shows_on_the_case_page(client: TestClient) -> None:
    original = client.get(f"/api/v1/images/{_sha(client, 'p1.png')}/file").content
    with Image.open(io.BytesIO(original)) as image:
        smaller = image.resize((image.width - 8, image.height - 7), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    smaller.save(buffer, format="PNG")
    assert "none found" in client.get("/patients/tiny/1").text  # computed, then cached
    contributor, curator = (
        add_user(client, "carl", "contributor"),
        add_user(client, "cora", "curator"),
    )
    case = {"patientid": "copy-1", "finding": "COVID-19", "view": "PA", "modality": "X-ray"}
    submitted = client.post(
        "/api/v1/cases",
        data={**case, "license": "CC BY 4.0"},
        files=[("file", ("copy.png", buffer.getvalue(), "image/png"))],
        headers=bearer(contributor),
    )
    assert submitted.status_code == 201, submitted.text
    accepted = client.post("/api/v1/cases/1/accept", data={"reason": "ok"}, headers=bearer(curator))
    assert accepted.status_code == 200

    page = " ".join(client.get("/patients/tiny/1").text.split())
    assert 'href="/patients/contributed-1/copy-1">contributed-1 · patient copy-1</a>' in page
    assert "near duplicate (hashes within" in page
    groups = client.get("/api/v1/patients/tiny/1").json()["duplicate_groups"]
    assert [g["kind"] for gs in groups.values() for g in gs] == ["near"]


def test_other_copies_lists_each_record_once_exact_first() -> None:
    def record(number: int, sha: str) -> dict[str, object]:
        return {"record_id": number, "image_sha256": sha, "source": "s", "patient_id": str(number)}

    exact = {"kind": "exact", "max_distance": 0, "records": [record(1, "a"), record(2, "a")]}
    near = {
        "kind": "near",
        "max_distance": 6,
        "records": [record(1, "a"), record(2, "a"), record(3, "b")],
    }
    others = other_copies([near, exact], 1)
    assert [(o["record_id"], o["kind"], o["max_distance"]) for o in others] == [
        (2, "exact", 0),
        (3, "near", 6),
    ]
    assert other_copies([], 1) == []
