#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run the
# linters, the type checker and the whole test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Debian's chromium for the browser tests (never a browser downloaded at run time).
# Without root or apt the browser tests skip and say why.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || echo "scripts/test.sh: could not install chromium; browser tests will skip" >&2
    else
        echo "scripts/test.sh: no chromium (needs root to apt-get it); browser tests will skip" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch from this machine's disk where it lies there (pinned so every run gets the same).
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[dev,ml,runtime,bench,dicom,report,serve]"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/pytest "$@"
