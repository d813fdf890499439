#!/usr/bin/env bash
# E2E key codebooks for every layer from data already collected (data/key, run from training/).
#   bash quantize_key_cache_e2e.sh --epochs 100 --lr 0.001 [any `commvq train-keys` option]
# Uses all visible GPUs (one process each); finished layers are skipped when run again.
set -euo pipefail
case "${1:-}" in -h|--help) exec python -m commvq.cli train-keys --help ;; esac
GPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
if [ "$GPUS" -gt 1 ]; then
  exec python -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m commvq.cli \
    train-keys --method e2e --layers all "$@"
fi
exec python -m commvq.cli train-keys --method e2e --layers all "$@"
