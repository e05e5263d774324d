#!/usr/bin/env bash
# Set up, then execute every chapter of the book at the ci profile and build the site offline.
# Executed chapters go to _build/notebooks, the site to _build/html, the run folder to runs/book-ci.
# Extra arguments go to `cliffkit reproduce`, e.g. `bash scripts/book.sh --from 03`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${CLIFFKIT_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cliffkit reproduce --profile ci "$@"
