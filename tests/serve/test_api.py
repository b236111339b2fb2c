"""The REST API through the test client: exact statuses and bodies."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from serve_helpers import (  # noqa: F401  (fixtures)
    MakeClient,
    client,
    engine,
    make_client,
    store_url,
    xray_png,
)

from covidcxr import RESEARCH_USE_ONLY, __version__
from covidcxr.cli import main
from covidcxr.models.abnormality import ZONE_MAP_LABEL
from covidcxr.models.bundle import load_bundle
from covidcxr.store import queries


def test_health_names_the_model(client: TestClient) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["model"] == load_bundle().model_id
    assert body["version"] == __version__
    assert body["note"] == RESEARCH_USE_ONLY
    assert len(body["weights_sha256"]) == 64


def test_predict_gives_the_cli_json_fields(
    client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = xray_png(5)
    (tmp_path / "scan.png").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "scan.png", "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)

    response = client.post("/api/v1/predict", files=[("file", ("scan.png", data, "image/png"))])

    assert response.status_code == 200
    assert response.json() == {"results": expected}


def test_predict_heatmaps_as_base64_png(client: TestClient, covid_dir: Path) -> None:
    image = covid_dir / "images" / "000001-3.png"
    response = client.post(
        "/api/v1/predict?heatmaps=true",
        files=[("file", (image.name, image.read_bytes(), "image/png"))] * 2,
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["file"] for r in results] == [image.name, image.name]
    assert results[0]["input_check"] == "pass"
    heatmaps = results[0]["heatmap_png"]
    assert ZONE_MAP_LABEL in heatmaps  # the default model is lungs-first
    network_maps = set(heatmaps) - {ZONE_MAP_LABEL}
    assert network_maps == set(results[0]["positive_findings"]) or len(network_maps) == 1
    assert all(url.startswith("data:image/png;base64,iVBOR") for url in heatmaps.values())


def test_predict_without_file_is_422(client: TestClient) -> None:
    response = client.post("/api/v1/predict", data={"x": "1"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "file"]


def test_too_many_files_is_400(make_client: MakeClient) -> None:
    client = make_client(max_files=2)
    files = [("file", (f"{i}.png", xray_png(i), "image/png")) for i in range(3)]
    response = client.post("/api/v1/predict", files=files)
    assert response.status_code == 400
    assert response.json() == {"detail": "3 images: send at most 2 per request"}


def test_images_list_filters_like_covidcxr_list(client: TestClient) -> None:
    everything = client.get("/api/v1/images").json()
    assert everything["total"] == 4
    assert [r["patient_id"] for r in everything["items"]] == ["1", "1", "2", "3"]
    females = client.get("/api/v1/images", params={"sex": "F"}).json()
    assert [(r["patient_id"], r["sex"]) for r in females["items"]] == [("2", "F")]
    viral = client.get("/api/v1/images", params={"finding": "viral", "view": "PA"}).json()
    assert viral["total"] == 1
    assert viral["items"][0]["findings"] == ["Pneumonia/Viral/COVID-19"]
    paged = client.get("/api/v1/images", params={"limit": 2, "offset": 2}).json()
    assert (paged["total"], paged["limit"], paged["offset"]) == (4, 2, 2)
    assert [r["patient_id"] for r in paged["items"]] == ["2", "3"]
    blank = client.get("/api/v1/images", params={"finding": "", "sex": ""}).json()
    assert blank["total"] == 4


def test_images_bad_filter_values_are_422(client: TestClient) -> None:
    response = client.get("/api/v1/images", params={"view": "sideways"})
    assert response.status_code == 422
    assert "sideways" in response.json()["detail"]
    assert client.get("/api/v1/images", params={"limit": 0}).status_code == 422
    assert client.get("/api/v1/images", params={"age_min": "old"}).status_code == 422
    response = client.get("/api/v1/images", params={"has_mask": "maybe"})
    assert response.json() == {"detail": "filter: has_mask 'maybe': use true or false"}


def test_image_detail_file_and_404(client: TestClient) -> None:
    sha = next(
        r["image_sha256"]
        for r in client.get("/api/v1/images").json()["items"]
        if r["filename"] == "p2.png"
    )
    detail = client.get(f"/api/v1/images/{sha}").json()
    assert detail["image"]["sha256"] == sha
    assert sorted(r["patient_id"] for r in detail["records"]) == ["2", "3"]
    file = client.get(f"/api/v1/images/{sha}/file")
    assert file.status_code == 200
    assert file.headers["content-type"] == "image/png"
    assert hashlib.sha256(file.content).hexdigest() == sha
    missing = "0" * 64
    assert client.get(f"/api/v1/images/{missing}").json() == {
        "detail": f"no image {missing} in this store"
    }
    assert client.get(f"/api/v1/images/{missing}/file").status_code == 404
    assert client.get("/api/v1/images/not-a-hash").status_code == 422


def test_patient_in_day_offset_order(client: TestClient) -> None:
    body = client.get("/api/v1/patients/tiny/1").json()
    assert [(r["offset_days"], r["filename"]) for r in body["records"]] == [
        (0, "p1.png"),
        (3, "p1-day3.jpg"),
    ]
    assert any(a["kind"] == "severity" for items in body["annotations"].values() for a in items)
    response = client.get("/api/v1/patients/tiny/99")
    assert response.status_code == 404
    assert response.json() == {"detail": "no patient '99' in source 'tiny'"}


def test_stats_are_the_store_stats(client: TestClient) -> None:
    store = client.app.state.service.store  # type: ignore[attr-defined]
    with store.read() as conn:
        expected = json.loads(json.dumps(queries.stats(conn)))
    assert client.get("/api/v1/stats").json() == expected
    assert client.get("/api/v1/stats", params={"sex": "F"}).json()["records"] == 1


def test_openapi_and_docs_are_served(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/api/v1/predict" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_private_store_needs_an_account(make_client: MakeClient) -> None:
    from serve_helpers import add_user, bearer

    client = make_client(read_open=False)
    response = client.get("/api/v1/images")
    assert response.status_code == 401
    assert response.json() == {"detail": "sign in or send an API token to read this store"}
    token = add_user(client, "reader", "viewer")
    assert client.get("/api/v1/images", headers=bearer(token)).json()["total"] == 4
