#!/usr/bin/env bash
# Install (into .venv) and run the main job on the embedded model and corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
commvq pipeline "$@"
