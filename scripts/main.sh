#!/usr/bin/env bash
# Set up, then run the main job offline on the embedded default model: execute every chapter
# of the book at the ci profile and build the site. Executed chapters go to _build/notebooks,
# the site to _build/html and the shared run folder to runs/book-ci.
# Extra arguments go to `cliffkit reproduce`, e.g. `bash scripts/main.sh --from 03`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${CLIFFKIT_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cliffkit reproduce --profile ci "$@"
