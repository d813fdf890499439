#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
. .venv/bin/activate
ruff check src tests benchmarks training evaluation
ruff format --check src tests benchmarks training evaluation
python -m pytest "$@"
