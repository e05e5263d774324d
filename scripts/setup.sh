#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install cliffkit with its test and book extras.
# Safe to rerun: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CLIFFKIT_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating virtual environment $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

python -m pip install --quiet --upgrade pip
# torch goes first, pinned: a bare or ranged requirement makes pip pull a
# multi-GB CUDA build on a machine that has no torch yet. Set TORCH_INDEX_URL
# to a CPU wheel index where plain PyPI would serve a CUDA build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"
python -m ipykernel install --user --name cliffkit --display-name "Python (cliffkit)" >/dev/null
echo "cliffkit installed in $VENV"
