#!/usr/bin/env bash
# Create .venv (if needed) and install anomalib-contnet with its test extras, using the tested versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import anomalib_contnet, pytest" 2>/dev/null \
    || [ pyproject.toml -nt .venv/.installed ] || [ requirements-pinned.txt -nt .venv/.installed ]; then
    echo "[setup] installing dependencies (torch first; this takes a few minutes the first time)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c requirements-pinned.txt torch torchvision
    .venv/bin/python -m pip install --quiet -c requirements-pinned.txt -e '.[test]'
    touch .venv/.installed
fi
