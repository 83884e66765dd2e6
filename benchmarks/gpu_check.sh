#!/usr/bin/env bash
# GPU check of ConTNetPaDiM: fit and predict images/s at batch 32, float32 and half-precision backbone.
#
# Usage (from anywhere; results go to the folder $OUT):
#   OUT=/path/to/results bash benchmarks/gpu_check.sh                 # CUDA, defaults (contnet_b, 512 images)
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh --device cpu --images 16 --batch 8 --backbone contnet_ti --n-features 64 --rounds 1
#
# Needs: a Python with torch (CUDA build) and anomalib 2.7 already installed. If anomalib is missing it is
# installed from PyPI ("anomalib>=2.7,<2.8", which does not replace an installed torch); this repository is
# then installed editable without dependencies, so nothing heavy is downloaded when torch/anomalib are there.
# Set PYTHON to choose the interpreter (default: python3). Writes $OUT/gpu_check.md, $OUT/gpu_check.log and
# $OUT/environment.txt (nvidia-smi, pip freeze of the relevant packages).
set -euo pipefail
: "${OUT:?set OUT to the folder that should receive the results}"
PYTHON="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"

"$PYTHON" -c "import torch" 2>/dev/null || { echo "torch is not installed for $PYTHON; install a CUDA build first" >&2; exit 2; }
"$PYTHON" -c "import anomalib" 2>/dev/null || "$PYTHON" -m pip install --quiet "anomalib>=2.7,<2.8"
if ! "$PYTHON" -c "import anomalib_contnet" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps -e "$REPO"
    "$PYTHON" -c "import timm, safetensors" 2>/dev/null || "$PYTHON" -m pip install --quiet timm safetensors
fi

{
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    "$PYTHON" -m pip freeze 2>/dev/null | grep -iE "^(torch|torchvision|anomalib|timm|lightning)[=@ ]" || true
} > "$OUT/environment.txt"

cd "$REPO"
HF_HUB_OFFLINE=1 ANOMALIB_CONTNET_OFFLINE=1 "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
