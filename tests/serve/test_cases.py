"""Accounts, contributed cases and the curator's decisions, through the API and the CLI."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters here)
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from serve_helpers import (  # noqa: F401  (fixtures)
    MakeClient,
    add_user,
    bearer,
    client,
    engine,
    make_client,
    store_url,
    xray_png,
)

from covidcxr.cli import main
from covidcxr.store import accounts, queries
from covidcxr.store.db import open_store

CASE = {
    "patientid": "new-1",
    "offset": "2",
    "sex": "F",
    "age": "51",
    "finding": "COVID-19",
    "view": "PA",
    "modality": "X-ray",
    "license": "CC BY 4.0",
}


def _submit(client: TestClient, token: str, **changes: str) -> dict:  # type: ignore[type-arg]
    response = client.post(
        "/api/v1/cases",
        data={**CASE, **changes},
        files=[("file", ("mine.png", xray_png(11), "image/png"))],
        headers=bearer(token),
    )
    return {"http": response.status_code, **response.json()}


def test_contributed_case_waits_then_is_ingested_on_accept(client: TestClient) -> None:
    contributor = add_user(client, "carl", "contributor")
    curator = add_user(client, "cora", "curator")
    submitted = _submit(client, contributor)
    assert (submitted["http"], submitted["id"], submitted["status"]) == (201, 1, "pending")
    assert submitted["report"]["counts"]["records"] == 1
    assert client.get("/api/v1/patients/contributed-1/new-1").status_code == 404
    assert client.get("/api/v1/images").json()["total"] == 4

    pending = client.get("/api/v1/cases", params={"status": "pending"}, headers=bearer(curator))
    assert [(c["id"], c["submitted_by"]) for c in pending.json()["cases"]] == [(1, "carl")]

    no_reason = client.post("/api/v1/cases/1/accept", data={"reason": " "}, headers=bearer(curator))
    assert no_reason.status_code == 422
    assert no_reason.json() == {"detail": "cases: give a reason to accept case 1"}

    accepted = client.post(
        "/api/v1/cases/1/accept", data={"reason": "complete, licence ok"}, headers=bearer(curator)
    )
    assert accepted.json() == {"id": 1, "status": "accepted"}
    assert client.get("/api/v1/images").json()["total"] == 5  # not a stale cached page
    rows = client.get("/api/v1/patients/contributed-1/new-1").json()["records"]
    assert [(r["sex"], r["age_years"], r["findings"]) for r in rows] == [
        ("F", 51.0, ["Pneumonia/Viral/COVID-19"])
    ]
    again = client.post("/api/v1/cases/1/reject", data={"reason": "x"}, headers=bearer(curator))
    assert again.status_code == 422
    assert again.json() == {"detail": "cases: case 1 is already accepted"}

    store = client.app.state.service.store  # type: ignore[attr-defined]
    with store.read() as conn:
        log = accounts.audit_log(conn)
    assert [(e["actor"], e["action"], e["target"], e["reason"]) for e in log[:2]] == [
        ("cora", "case.accept", "case 1", "complete, licence ok"),
        ("carl", "case.submit", "case 1", None),
    ]


def test_rejected_case_leaves_the_store_alone(client: TestClient) -> None:
    contributor = add_user(client, "carl", "contributor")
    curator = add_user(client, "cora", "curator")
    case_id = _submit(client, contributor)["id"]
    response = client.post(
        f"/api/v1/cases/{case_id}/reject", data={"reason": "identifiable"}, headers=bearer(curator)
    )
    assert response.json() == {"id": case_id, "status": "rejected"}
    store = client.app.state.service.store  # type: ignore[attr-defined]
    with store.read() as conn:
        assert queries.count_records(conn) == 4
        decided = accounts.case(conn, case_id)
    assert decided is not None
    assert (decided["status"], decided["decided_by"], decided["reason"]) == (
        "rejected",
        "cora",
        "identifiable",
    )
    assert not (store.data_dir / "pending" / decided["folder"]).exists()


def test_case_with_errors_is_refused_with_the_ingest_report(client: TestClient) -> None:
    contributor = add_user(client, "carl", "contributor")
    refused = _submit(client, contributor, patientid="")
    assert refused["http"] == 422
    report = refused["detail"]["report"]
    assert any(i["severity"] == "error" for i in report["issues"])
    curator = add_user(client, "cora", "curator")
    assert client.get("/api/v1/cases", headers=bearer(curator)).json() == {"cases": []}


def test_case_with_a_non_image_is_415(client: TestClient) -> None:
    token = add_user(client, "carl", "contributor")
    response = client.post(
        "/api/v1/cases",
        data=CASE,
        files=[("file", ("x.png", b"%PDF-1.4 not an image", "image/png"))],
        headers=bearer(token),
    )
    assert response.status_code == 415


def test_users_add_prints_a_token_once_and_stores_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    args = ["--db", url, "--data-dir", str(tmp_path)]
    assert main(["users", "add", "ann", "--role", "curator", *args]) == 0
    token = capsys.readouterr().out.splitlines()[-1]
    assert token.startswith("cxr_")
    with open_store(url, tmp_path, create=True) as store, store.read() as conn:
        user = accounts.user_for_token(conn, token)
        stored = conn.exec_driver_sql("SELECT token_sha256 FROM api_tokens").scalars().all()
    assert user is not None and (user["name"], user["role"]) == ("ann", "curator")
    assert stored == [accounts.token_sha256(token)]
    assert main(["users", "add", "ann", "--role", "viewer", *args]) == 2
    assert "user 'ann' exists" in capsys.readouterr().err
    assert main(["users", "delete", "ann", *args]) == 0
    with open_store(url, tmp_path, create=True) as store, store.read() as conn:
        assert accounts.user_for_token(conn, token) is None


def test_passwords_are_argon2_hashes() -> None:
    stored = accounts.hash_password("correct horse")
    assert stored.startswith("$argon2id$")
    assert accounts.verify_password(stored, "correct horse")
    assert not accounts.verify_password(stored, "wrong")
    assert not accounts.verify_password(None, "anything")
