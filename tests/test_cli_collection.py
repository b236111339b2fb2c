"""The collection commands through ``covidcxr.cli.main``, in-process."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from conftest import MakeCollection, encode, upstream_row, xray_like
from covidcxr.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ingest_uses_the_environment_data_dir_and_is_idempotent(
    make_collection: MakeCollection,
    capsys: pytest.CaptureFixture[str],
    _isolated_data_dir: Path,
) -> None:
    root = make_collection()
    code, out, _ = run(["ingest", str(root)], capsys)
    assert code == 0
    assert "records 4; patients 3" in out and "records added 4" in out
    assert (_isolated_data_dir / "covidcxr.sqlite").is_file()
    assert len(list((_isolated_data_dir / "reports").glob("tiny-*.csv"))) == 1
    code, out, _ = run(["ingest", str(root)], capsys)
    assert code == 0 and "nothing changed" in out and "unchanged 4" in out


def test_db_option_wins_over_the_environment(
    make_collection: MakeCollection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COVIDCXR_DB", str(tmp_path / "env.sqlite"))
    url = f"sqlite:///{tmp_path / 'explicit.sqlite'}"
    assert run(["ingest", str(make_collection()), "--db", url], capsys)[0] == 0
    assert (tmp_path / "explicit.sqlite").exists() and not (tmp_path / "env.sqlite").exists()
    code, out, _ = run(["list", "--db", url, "--format", "json"], capsys)
    assert code == 0 and len(json.loads(out)) == 4
    assert run(["list", "--format", "json"], capsys)[1].strip() != ""  # env DB: empty store
    assert json.loads(run(["list", "--format", "json"], capsys)[1]) == []


def test_strict_ingest_exit_code_and_message(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [upstream_row(filename="p1.png"), upstream_row(patientid="2", filename="../x.png")]
    root = make_collection(rows, images={"p1.png": encode(xray_like(1))}, annotations=False)
    code, _, err = run(["ingest", str(root), "--strict"], capsys)
    assert code == 1
    assert "refused" in err and "metadata.csv:3 [filename]" in err and "unsafe_path" in err
    assert json.loads(run(["list", "--format", "json"], capsys)[1]) == []


def test_check_exit_codes(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    clean = make_collection(
        [upstream_row(filename="p1.png")], name="clean", images={"p1.png": encode(xray_like(1))}
    )
    code, out, _ = run(["check", str(clean)], capsys)
    assert code == 0 and "check passed" in out
    shared = make_collection(name="shared")  # one file referenced by two patients: a warning
    code, out, _ = run(["check", str(shared)], capsys)
    assert code == 1 and "check failed" in out and "shared_image" in out
    code, out, _ = run(["check", str(shared), "--fail-on", "error"], capsys)
    assert code == 0
    broken = make_collection(
        [upstream_row(filename="p1.png")], name="broken", images={"p1.png": b""}, annotations=False
    )
    code, out, _ = run(["check", str(broken), "--report", str(tmp_path / "r" / "check")], capsys)
    assert code == 1 and "empty_file" in out
    assert (tmp_path / "r" / "check.json").is_file() and (tmp_path / "r" / "check.csv").is_file()
    code, out, _ = run(["check", str(broken), "--format", "json"], capsys)
    assert code == 1 and json.loads(out)["issue_counts"]["error"] == {"empty_file": 1}
    code, out, _ = run(["check", str(broken), "--fail-on", "never", "--format", "csv"], capsys)
    assert code == 0 and out.startswith("severity,code,file")


def test_check_writes_nothing(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str], _isolated_data_dir: Path
) -> None:
    run(["check", str(make_collection())], capsys)
    assert list(_isolated_data_dir.iterdir()) == []


def test_list_formats_and_filters(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["ingest", str(make_collection())], capsys)
    code, out, err = run(["list"], capsys)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["record_id", "source", "patient_id"]
    assert "4 record(s)" in err
    rows = list(csv.DictReader(io.StringIO(run(["list", "--format", "csv"], capsys)[1])))
    assert len(rows) == 4 and rows[0]["findings"] == "Pneumonia/Viral/COVID-19"
    covid = json.loads(run(["list", "--finding", "COVID-19", "--format", "json"], capsys)[1])
    assert {r["filename"] for r in covid} == {"p1.png", "p1-day3.jpg"}
    both = json.loads(
        run(
            ["list", "--finding", "bacterial", "--finding", "No Finding", "--format", "json"],
            capsys,
        )[1]
    )
    assert [r["patient_id"] for r in both] == ["2", "3"]
    adults = json.loads(
        run(
            [
                "list",
                "--age-min",
                "40",
                "--sex",
                "M",
                "--view",
                "PA",
                "--has-severity",
                "--format",
                "json",
            ],
            capsys,
        )[1]
    )
    assert [r["filename"] for r in adults] == ["p1.png"]
    survived = json.loads(run(["list", "--survival", "Y", "--format", "json"], capsys)[1])
    assert [r["patient_id"] for r in survived] == ["2"]
    unknown = json.loads(run(["list", "--survival", "unknown", "--format", "json"], capsys)[1])
    assert len(unknown) == 3
    assert len(json.loads(run(["list", "--limit", "1", "--format", "json"], capsys)[1])) == 1


def test_list_bad_filter_is_exit_2_with_reason(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["ingest", str(make_collection())], capsys)
    code, _, err = run(["list", "--finding", "dragonpox"], capsys)
    assert code == 2 and "dragonpox" in err
    code, _, err = run(["list", "--survival", "maybe"], capsys)
    assert code == 2 and "use Y, N or unknown" in err


def test_show_and_stats(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["ingest", str(make_collection())], capsys)
    code, out, _ = run(["show", "p1.png", "--format", "json"], capsys)
    (record,) = json.loads(out)["records"]
    assert record["image"]["width"] == 80 and Path(record["image"]["path"]).is_file()
    assert {a["kind"] for a in record["annotations"]} == {"severity", "lung_mask", "lung_box"}
    code, out, _ = run(["show", "tiny:1"], capsys)
    assert code == 0 and out.count("record #") == 2
    code, _, err = run(["show", "nobody"], capsys)
    assert code == 2 and "nothing matches" in err
    code, out, _ = run(["stats", "--format", "json"], capsys)
    data = json.loads(out)
    assert data["records"] == 4 and data["findings"]["Pneumonia/Bacterial/Streptococcus"] == 1
    code, out, _ = run(["stats", "--finding", "viral"], capsys)
    assert code == 0 and "records: 2" in out


def test_missing_source_is_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(["ingest", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "covidcxr" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
