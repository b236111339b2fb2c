"""``covidcxr split``: exit 0 when made or verified, 1 when a split no longer holds, 2 on
errors."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import upstream_row, write_metadata
from covidcxr.cli import main
from covidcxr.dataset.splits import load_split
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.db import open_store
from synthetic_sources import NEAR_PAIR, Synthetic, _picture, alpha_rows, build_synthetic


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    return build_synthetic(tmp_path_factory.mktemp("synthetic-cli"))


@pytest.fixture
def store_args(synthetic: Synthetic, tmp_path: Path) -> list[str]:
    """--db and --data-dir of a private copy of the synthetic store."""
    copy = tmp_path / "store.sqlite"
    shutil.copyfile(synthetic.database, copy)
    return ["--db", f"sqlite:///{copy}", "--data-dir", str(synthetic.data_dir)]


def test_split_writes_a_file_that_verifies(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "splits.csv"
    assert main(["split", *store_args, "--view", "PA", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "task covid-vs-other-pneumonia; 66 samples of 66 patients" in printed
    assert "records excluded, by reason:" in printed
    assert "20  view not selected" in printed
    assert "fold  patients  samples  positive Pneumonia/Viral/COVID-19" in printed
    assert f"wrote {out}" in printed
    split = load_split(out)
    assert (split.scheme, split.seed, split.folds) == ("kfold", 3, ("0", "1", "2", "3", "4"))
    assert split.selection["views"] == ["PA"]
    assert main(["split", "--verify", str(out), *store_args]) == 0
    assert capsys.readouterr().out.startswith(f"split verified: {out}: 66 patients in 5 kfold")


def test_holdout_and_leave_one_out_schemes(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "holdout.csv"
    argv = ["split", *store_args, "--scheme", "holdout", "--fractions", "0.6,0.2,0.2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert load_split(out).fractions == (0.6, 0.2, 0.2)
    assert main(["split", *store_args, "--scheme", "source", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "patients left out of the split, by reason:" in printed
    assert "2  duplicate images link it to patients of another source" in printed
    assert main(["split", "--verify", str(out), *store_args]) == 0
    assert main(["split", *store_args, "--scheme", "region", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "region split, seed 0:" in printed and "\nunknown " in printed
    assert main(["split", "--verify", str(out), *store_args]) == 0


def test_a_leaking_file_fails_verify_with_exit_1(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "splits.csv"
    assert main(["split", *store_args, "--out", str(out)]) == 0
    split = load_split(out)
    moved = next(f for f in split.folds if f != split.assignment[NEAR_PAIR[0]])
    dataclasses.replace(split, assignment={**split.assignment, NEAR_PAIR[0]: moved}).save(out)
    capsys.readouterr()
    assert main(["split", "--verify", str(out), *store_args]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith(f"split NOT verified: {out}: 2 problem(s)")
    assert "  leak: patients linked by duplicate pictures sit in different folds" in printed


def test_a_changed_store_fails_verify_with_exit_1(
    synthetic: Synthetic, store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "splits.csv"
    assert main(["split", *store_args, "--out", str(out)]) == 0
    changed = tmp_path / "alpha"
    shutil.copytree(synthetic.alpha, changed)
    rows, _, _ = alpha_rows()
    rows.append(upstream_row(patientid="61", filename="a61.png"))
    (changed / "images" / "a61.png").write_bytes(_picture(61))
    write_metadata(changed / "metadata.csv", rows)
    with open_store(store_args[1], store_args[3], create=True) as store:
        ingest_source(changed, store, name="alpha", workers=1)
    capsys.readouterr()
    assert main(["split", "--verify", str(out), *store_args]) == 1
    assert "missing: 1 selected patient(s) are in no fold of the file: alpha:61" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--scheme", "holdout", "--folds", "3"], "--folds applies to --scheme kfold"),
        (["--fractions", "0.5,0.5"], "--fractions applies to --scheme holdout"),
        (["--scheme", "holdout", "--fractions", "0.5,0.4"], "give three, for train"),
        (["--scheme", "region", "--source", "beta"], "needs at least two regions"),
        (["--finding", "Tuberculosis"], "has no samples"),
        (["--view", "sideways"], "view 'sideways'"),
    ],
)
def test_bad_options_exit_2(
    store_args: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    message: str,
) -> None:
    out = tmp_path / "splits.csv"
    assert main(["split", *store_args, *options, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_file_errors_exit_2(
    store_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "splits.csv"
    assert main(["split", *store_args]) == 2
    assert "give --out FILE to make a split, or --verify FILE" in capsys.readouterr().err
    assert main(["split", *store_args, "--out", str(out), "--verify", str(out)]) == 2
    assert main(["split", *store_args, "--out", str(tmp_path)]) == 2
    assert f"cannot write {tmp_path}" in capsys.readouterr().err
    assert main(["split", *store_args, "--out", str(out)]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("alpha:1,"))
    fold = "1" if row.endswith(",0") else "0"
    out.write_text(text.replace(row + "\n", f"alpha:1,{fold}\n"))
    capsys.readouterr()
    assert main(["split", "--verify", str(out), *store_args]) == 2
    assert "content_sha256 does not match" in capsys.readouterr().err
    assert main(["split", "--verify", str(tmp_path / "nothing.csv"), *store_args]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_argparse_refusals_exit_2(store_args: list[str]) -> None:
    for argv in (["--task", "nope"], ["--fractions", "a,b,c"], ["--scheme", "random"]):
        with pytest.raises(SystemExit) as exited:
            main(["split", *store_args, *argv, "--out", "x.csv"])
        assert exited.value.code == 2


def test_same_split_whatever_the_hash_seed(store_args: list[str], tmp_path: Path) -> None:
    """String hashing differs between processes; the split file must not."""
    bodies = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"split-{hash_seed}.csv"
        subprocess.run(
            [sys.executable, "-m", "covidcxr", "split", *store_args, "--out", str(out)],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        bodies.append([x for x in out.read_text().splitlines() if not x.startswith("# created")])
    assert bodies[0] == bodies[1]
