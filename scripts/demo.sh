#!/usr/bin/env bash
# The offline demo on a fresh machine: set up .venv (scripts/setup.sh), then train, test and export ConTNetPaDiM
# on a prepared dataset and write results/demo/report.md with figures. Extra arguments go to
# `anomalib-contnet demo` (see `.venv/bin/anomalib-contnet demo --help`), e.g. --tiny or --backbone contnet_b.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/anomalib-contnet demo --out results/demo "$@"
