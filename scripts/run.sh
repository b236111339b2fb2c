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
# torch from this machine's disk where it lies there (pinned so every run gets the same).
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[ml,runtime]"
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
step "covidcxr duplicates --cross-patient (the same picture filed under several patients)"
$cx duplicates --cross-patient
step "covidcxr split --task covid-vs-other-pneumonia --folds 5 --seed 0 (patient-grouped, duplicate-aware)"
$cx split --task covid-vs-other-pneumonia --folds 5 --seed 0 --out "$COVIDCXR_DATA_DIR/splits.csv"
$cx split --verify "$COVIDCXR_DATA_DIR/splits.csv"
step "covidcxr export --format webdataset --split splits.csv"
$cx export --format webdataset --split "$COVIDCXR_DATA_DIR/splits.csv" --out "$COVIDCXR_DATA_DIR/webdataset"
step "covidcxr predict (shipped model covidcxr-small-v1; heatmaps in data/heatmaps)"
$cx predict "$SHARED/covid-chestxray/images/auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg" \
    "$SHARED/covid-chestxray/images/000001-2.jpg" "$SHARED/nih-cxr14-subset/images/00000061_012.jpg" \
    --heatmaps "$COVIDCXR_DATA_DIR/heatmaps"
printf '\nstore: %s (reports in %s/reports)\n' "$COVIDCXR_DATA_DIR" "$COVIDCXR_DATA_DIR"
