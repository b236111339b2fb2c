"""``covidcxr info``: which store and data directory are in use, and what they hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MakeCollection
from covidcxr.cli import main
from covidcxr.store.db import head_revision


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_missing_store_is_exit_3_after_saying_where_it_looked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = tmp_path / "nothing-here"
    code, out, err = run(["info", "--data-dir", str(folder)], capsys)
    assert code == 3
    assert f"path: {folder}" in out and "from: --data-dir" in out and "exists: N" in out
    assert f"no store at sqlite:///{folder / 'covidcxr.sqlite'}" in err
    assert "covidcxr ingest" in err
    assert not folder.exists()


def test_info_of_an_ingested_store(
    make_collection: MakeCollection,
    capsys: pytest.CaptureFixture[str],
    _isolated_data_dir: Path,
) -> None:
    assert main(["ingest", str(make_collection())]) == 0
    capsys.readouterr()
    code, out, _ = run(["info", "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert data["data_dir"] == {
        "path": str(_isolated_data_dir),
        "from": "$COVIDCXR_DATA_DIR",
        "exists": True,
        "size": data["data_dir"]["size"],
    }
    store = data["store"]
    assert store["exists"] and store["url"].endswith(str(_isolated_data_dir / "covidcxr.sqlite"))
    assert store["from"].startswith("default")
    assert store["schema_revision"] == head_revision()
    assert store["records"] == 4 and store["patients"] == 3 and store["sources"] == {"tiny": 4}
    assert data["blobs"]["path"] == str(_isolated_data_dir / "blobs")
    assert data["models"]["default"] in data["models"]
    assert data["models"][data["models"]["default"]] == "shipped"
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "tiny: 4" in out and "schema_revision: " in out


def test_an_empty_store_says_it_is_empty(capsys: pytest.CaptureFixture[str]) -> None:
    from covidcxr.store.db import open_store

    open_store(create=True).close()
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "records: 0" in out and "the store is empty" in out


def test_where_prints_the_data_directory(
    capsys: pytest.CaptureFixture[str], _isolated_data_dir: Path, tmp_path: Path
) -> None:
    assert run(["info", "--where"], capsys) == (0, f"{_isolated_data_dir}\n", "")
    assert run(["info", "--where", "--data-dir", str(tmp_path)], capsys)[1] == f"{tmp_path}\n"


def test_the_default_is_the_user_data_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from covidcxr import config

    monkeypatch.delenv("COVIDCXR_DATA_DIR")
    code, out, _ = run(["info"], capsys)
    assert code == 3
    assert f"path: {config.default_data_dir()}" in out and "from: default" in out
