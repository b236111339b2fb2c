"""The collection commands through ``covidcxr.cli.main``, in-process."""

from __future__ import annotations

import argparse
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
    # The environment's database does not exist: a reading command refuses (exit 3,
    # naming it) and creates nothing.
    code, out, err = run(["list", "--format", "json"], capsys)
    assert code == 3 and out == ""
    assert str(tmp_path / "env.sqlite") in err and "covidcxr ingest" in err
    assert not (tmp_path / "env.sqlite").exists()


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
    assert code == 2 and "accepted: Y, N or unknown" in err


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


def test_every_enumerated_filter_refuses_unknown_values(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["ingest", str(make_collection())], capsys)
    code, out, err = run(["list", "--source", "tinny"], capsys)
    assert code == 2 and out == ""
    assert "unknown source 'tinny' (did you mean 'tiny'?); accepted: tiny" in err
    for option, value, accepted in (
        ("--view", "XYZ", "PA, AP"),
        ("--modality", "MRI", "X-ray, CT"),
        ("--sex", "X", "M, F"),
        ("--survival", "maybe", "Y, N or unknown"),
    ):
        code, _, err = run(["stats", option, value], capsys)
        assert code == 2 and repr(value) in err and accepted in err, (option, err)
    for option, value in (("--flag", "kids"), ("--image-status", "gone")):
        with pytest.raises(SystemExit) as exc:
            main(["list", option, value])
        assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    code, _, err = run(["duplicates", "--finding", "dragonpox"], capsys)
    assert code == 2 and "resolve_node" not in err
    assert err.startswith("covidcxr duplicates: error: --finding 'dragonpox': ")


def test_filters_are_checked_in_the_library_too(make_collection: MakeCollection) -> None:
    from covidcxr.errors import MetadataError
    from covidcxr.ingest.pipeline import ingest_source
    from covidcxr.store import queries
    from covidcxr.store.db import open_store

    with open_store(create=True) as store:
        ingest_source(make_collection(), store)
        with store.read() as conn:
            for selection, message in (
                (queries.RecordFilter(flags=["kids"]), "unknown flag 'kids'"),
                (queries.RecordFilter(image_status=["gone"]), "unknown image status"),
            ):
                with pytest.raises(MetadataError, match=message):
                    queries.list_records(conn, selection)
            pediatric = queries.RecordFilter(flags=["pediatric"])
            assert queries.list_records(conn, pediatric) == []


def test_show_a_patient_id_that_two_sources_use(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["ingest", str(make_collection())], capsys)
    run(["ingest", str(make_collection(name="other"))], capsys)
    code, out, _ = run(["show", "1"], capsys)
    assert code == 0
    assert "'1' matches 2 patients of different sources: other:1, tiny:1" in out
    assert out.count("== patient other:1: 2 record(s)") == 1
    assert out.count("== patient tiny:1: 2 record(s)") == 1
    assert "severity by " in out and "geographic_mean" in out and '{"' not in out
    code, out, _ = run(["show", "tiny:1"], capsys)
    assert code == 0 and "matches" not in out and "other:1" not in out


def test_list_never_cuts_in_a_pipe_and_wide_never_cuts(
    make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    long_name = "a-file-name-longer-than-any-table-cell-" + "x" * 40 + ".png"
    rows = [upstream_row(patientid="1", filename=long_name)]
    run(["ingest", str(make_collection(rows, images={long_name: encode(xray_like(1))}))], capsys)
    for extra in ([], ["--wide"]):
        code, out, _ = run(["list", *extra], capsys)
        assert code == 0 and long_name in out and "…" not in out


def test_stats_on_an_empty_store_says_so_and_where(capsys: pytest.CaptureFixture[str]) -> None:
    from covidcxr.store.db import open_store

    with open_store(create=True) as store:
        url = store.url
    code, out, err = run(["stats"], capsys)
    assert code == 0 and "records: 0" in out
    assert f"the store {url} is empty" in err and "covidcxr ingest" in err
    code, out, err = run(["list", "--format", "json"], capsys)
    assert code == 0 and json.loads(out) == [] and f"the store {url} is empty" in err


def test_messages_cut_long_values() -> None:
    from covidcxr.cli.collection import issue_line
    from covidcxr.ingest.report import Issue
    from covidcxr.schema.values import Severity

    value = "z" * 600
    issue = Issue(
        Severity.WARNING,
        "unrecognised_value",
        f"{value!r} is not a view",
        "m.csv",
        3,
        "view",
        value,
    )
    line = issue_line(issue)
    assert "(600 characters)" in line and value not in line and len(line) < 300
    assert line.count("z" * 80) == 2


def _commands() -> list[str]:
    from covidcxr.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(subparsers.choices)


@pytest.mark.parametrize("command", _commands())
def test_help_has_no_doubled_percent(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "%%" not in capsys.readouterr().out


def test_help_describes_list_show_and_train_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    helps = {}
    for command in ("list", "show", "train", "duplicates"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "One line per metadata row" in helps["list"]
    assert "--limit N print at most N records" in helps["list"]
    assert "--format {table,csv,json} table for people" in helps["list"]
    assert "a patient summary" in helps["show"]
    assert "maximum epochs (default: 30)" in helps["train"]
    assert "~2% per side" in helps["duplicates"]
