"""Every ```python block of README.md runs as printed, against a store where a user has it.

The user's set-up is what ``scripts/run.sh`` leaves: the store in the default data
directory (no ``COVIDCXR_DATA_DIR``, no ``COVIDCXR_DB``) with ``splits.csv`` beside it,
made from a small synthetic source; the working directory is the project root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from covidcxr.dataset.samples import build_samples
from covidcxr.dataset.splits import make_split
from covidcxr.dataset.tasks import get_task
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.db import open_store
from synthetic_sources import alpha_rows, beta_rows, write_source

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    """The ```python blocks of the README, in order."""
    text = README.read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def user_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XDG_DATA_HOME of a user who ran scripts/run.sh: store and splits.csv in place."""
    root = tmp_path_factory.mktemp("readme")
    xdg = root / "xdg"
    data = xdg / "covidcxr"  # platformdirs' user data directory under XDG_DATA_HOME
    rows, images, severity = alpha_rows()
    alpha = write_source(root / "alpha", rows, images, severity)
    beta = write_source(root / "beta", *beta_rows())
    with open_store(f"sqlite:///{data / 'covidcxr.sqlite'}", data, create=True) as store:
        ingest_source(alpha, store, workers=1)
        ingest_source(beta, store, workers=1)
        # As run.sh: covidcxr split --task covid-vs-other-pneumonia --folds 5 --seed 0
        samples = build_samples(store, get_task("covid-vs-other-pneumonia"))
        with store.read() as conn:
            make_split(samples, conn, folds=5, seed=0).save(data / "splits.csv")
    return xdg


def user_environment(xdg: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COVIDCXR_DATA_DIR", "COVIDCXR_DB")}
    env["XDG_DATA_HOME"] = str(xdg)
    return env


def test_the_readme_has_python_examples() -> None:
    assert python_blocks(), f"no ```python block in {README}"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_as_printed(index: int, user_home: Path) -> None:
    pytest.importorskip("torch")
    code = python_blocks()[index]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=user_environment(user_home),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        f"README.md python block {index + 1} failed:\n{code}\n--- stderr:\n{result.stderr}"
    )
