#!/usr/bin/env bash
# The main job: install covidcxr, build the store from the real collection in
# ../shared/datasets, validate it, and show what is in it. Everything is written
# under ./data (override with COVIDCXR_DATA_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SHARED=${SHARED:-../shared/datasets}
export COVIDCXR_DATA_DIR=${COVIDCXR_DATA_DIR:-$PWD/data}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
cx=.venv/bin/covidcxr
step() { printf '\n== %s\n' "$*"; }

step "covidcxr check $SHARED/covid-chestxray (the collection's own CI; its known defects fail it)"
$cx check "$SHARED/covid-chestxray" --show 5 || true
step "covidcxr ingest $SHARED/covid-chestxray"
$cx ingest "$SHARED/covid-chestxray" --show 5
step "covidcxr ingest --metadata metadata-latest.csv (newer metadata, same images)"
$cx ingest "$SHARED/covid-chestxray" --metadata metadata-latest.csv --show 5
step "covidcxr ingest $SHARED/nih-cxr14-subset --mapping examples/mappings/nih-cxr14-subset.toml"
$cx ingest "$SHARED/nih-cxr14-subset" --mapping examples/mappings/nih-cxr14-subset.toml --show 5
step "covidcxr stats --view frontal --modality X-ray"
$cx stats --view frontal --modality X-ray
step "covidcxr list --finding COVID-19 --has-severity --limit 5"
$cx list --finding COVID-19 --has-severity --limit 5
printf '\nstore: %s (reports in %s/reports)\n' "$COVIDCXR_DATA_DIR" "$COVIDCXR_DATA_DIR"
