#!/usr/bin/env bash
# The main job: install covidcxr, build the store from ../shared/datasets on first use
# (the collection, its newest metadata, the NIH subset, a leak-proof split), then serve
# the second opinion and the collection at http://127.0.0.1:8000 (Ctrl-C stops it).
#
#   bash scripts/run.sh          # build on first use, then serve
#   bash scripts/run.sh tour     # the command-line tour instead: check, ingest, stats,
#                                # duplicates, split, export, predict with heatmaps
#
# The store lives where every covidcxr command looks for it: $COVIDCXR_DATA_DIR if set,
# else the user data directory (~/.local/share/covidcxr); `covidcxr info` says which.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SHARED=${SHARED:-../shared/datasets}
MODE=${1:-serve}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch from this machine's disk where it lies there (pinned so every run gets the same).
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[ml,runtime,serve,report,dicom]"
cx=.venv/bin/covidcxr
DATA=$(.venv/bin/python -c "from covidcxr.config import data_dir; print(data_dir())")
step() { printf '\n== %s\n' "$*"; }

build_store() {
    step "covidcxr ingest $SHARED/covid-chestxray"
    $cx ingest "$SHARED/covid-chestxray" --show 5
    step "covidcxr ingest --metadata metadata-latest.csv (newer metadata, same images)"
    $cx ingest "$SHARED/covid-chestxray" --metadata metadata-latest.csv --show 5
    step "covidcxr ingest $SHARED/nih-cxr14-subset --mapping examples/mappings/nih-cxr14-subset.toml"
    $cx ingest "$SHARED/nih-cxr14-subset" --mapping examples/mappings/nih-cxr14-subset.toml --show 5
    step "covidcxr split --task covid-vs-other-pneumonia (patient-grouped, duplicate-aware)"
    $cx split --task covid-vs-other-pneumonia --folds 5 --seed 0 --out "$DATA/splits.csv"
}

if [ "$MODE" = "tour" ]; then
    step "covidcxr check $SHARED/covid-chestxray (the collection's own CI; its known defects fail it)"
    $cx check "$SHARED/covid-chestxray" --show 5 || true
    build_store
    step "covidcxr info"
    $cx info
    step "covidcxr stats --view frontal --modality X-ray"
    $cx stats --view frontal --modality X-ray
    step "covidcxr list --finding COVID-19 --has-severity --limit 5"
    $cx list --finding COVID-19 --has-severity --limit 5
    step "covidcxr duplicates --cross-patient (the same picture filed under several patients)"
    $cx duplicates --cross-patient
    step "covidcxr split --verify"
    $cx split --verify "$DATA/splits.csv"
    step "covidcxr export --format webdataset --split splits.csv"
    $cx export --format webdataset --split "$DATA/splits.csv" --out "$DATA/webdataset"
    step "covidcxr predict (shipped model covidcxr-small-v2; heatmaps in $DATA/heatmaps)"
    $cx predict "$SHARED/covid-chestxray/images/auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg" \
        "$SHARED/covid-chestxray/images/000001-2.jpg" "$SHARED/nih-cxr14-subset/images/00000061_012.jpg" \
        --heatmaps "$DATA/heatmaps" --prevalence 0.1
    printf '\nstore: %s (reports in %s/reports)\n' "$DATA" "$DATA"
    exit 0
fi

if ! $cx info >/dev/null 2>&1; then
    printf 'No store at %s yet: building it from %s (about two minutes on 2 cores).\n' "$DATA" "$SHARED"
    build_store
fi
step "covidcxr serve (the store in $DATA; research use only, not a diagnosis)"
exec $cx serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
