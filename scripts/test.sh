#!/usr/bin/env bash
# Set up (if needed) and run the whole offline test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/python -m ruff check anomalib_contnet tests benchmarks anomalib_contnet_autoload.py anomalib_contnet_entry.py
.venv/bin/python -m ruff format --check anomalib_contnet tests benchmarks anomalib_contnet_autoload.py anomalib_contnet_entry.py
.venv/bin/python -m pytest "$@"
