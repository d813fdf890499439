#!/usr/bin/env bash
# E2E-CommVQ, fully automatic: KV collection -> scales -> E2E key codebooks for every layer.
# Run from training/. Everything resumes: run the same command again after an interruption.
set -euo pipefail

MODEL=auto            # hub id, local folder, .gguf, 'embedded', or auto (Llama-3.1-8B-Instruct if the hub answers)
DATASET=auto          # hub dataset, local files, 'embedded', or auto (HuggingFaceFW/fineweb-edu if the hub answers)
OUTPUT_DIR=""         # default: codebook_e2e_<code bits>bits_<head_dim>group_<R>residuals
QUANT_BITS=2
SOLVER=""            # default: lstsq (train-keys --help); adam is the gradient path the next three options set
EPOCHS=""
LR=""
BATCH_SIZE=""
ROUNDS=""
BEAM=""
NUM_SAMPLES=1000000
EVAL_ROWS=16384      # collected beyond NUM_SAMPLES: the held-out rows config.json's key errors are measured on
LAYER=all
MAX_SEQ_LENGTH=8192
GPUS=auto             # processes (one per GPU); auto: all visible GPUs, 1 without GPU

usage() {
  cat <<USAGE
Usage: bash train_e2e_key_codebook.sh [options]
  --model M            model (default: $MODEL)
  --dataset D          corpus (default: $DATASET)
  --output_dir O       codebook directory (default: codebook_e2e_12bits_<head_dim>group_<R>residuals)
  --quant_bits 1|2     bits per channel (default: $QUANT_BITS)
  --solver S           lstsq (encode with a beam, solve all stages jointly) or adam (default: lstsq)
  --rounds N           lstsq: rounds of encode + solve (default: train-keys')
  --beam B             beam width of the key encoder, in training and in the cache (default: train-keys')
  --epochs N           adam: epochs per layer (default: 100)
  --lr X               adam: learning rate (default: 0.001)
  --batch_size N       adam: key vectors per step (default: 256)
  --num_samples N      key/value vectors collected per layer (default: $NUM_SAMPLES)
  --layer L            one layer, A-B, or all (default: $LAYER)
  --max_seq_length N   tokens per packed sequence for collection (default: $MAX_SEQ_LENGTH)
  --gpus N             processes, one per GPU (default: $GPUS)
  --help               this text
Writes data/key, data/value, data/query, data/learnable_scale.pt and the codebook directory,
all relative to the current folder. Finished layers are skipped when run again.
USAGE
}

need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "train_e2e_key_codebook.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --model) need "$@"; MODEL=$2; shift 2 ;;
    --dataset) need "$@"; DATASET=$2; shift 2 ;;
    --output_dir) need "$@"; OUTPUT_DIR=$2; shift 2 ;;
    --quant_bits) need "$@"; QUANT_BITS=$2; shift 2 ;;
    --solver) need "$@"; SOLVER=$2; shift 2 ;;
    --rounds) need "$@"; ROUNDS=$2; shift 2 ;;
    --beam) need "$@"; BEAM=$2; shift 2 ;;
    --epochs) need "$@"; EPOCHS=$2; shift 2 ;;
    --lr) need "$@"; LR=$2; shift 2 ;;
    --batch_size) need "$@"; BATCH_SIZE=$2; shift 2 ;;
    --num_samples) need "$@"; NUM_SAMPLES=$2; shift 2 ;;
    --layer) need "$@"; LAYER=$2; shift 2 ;;
    --max_seq_length) need "$@"; MAX_SEQ_LENGTH=$2; shift 2 ;;
    --gpus) need "$@"; GPUS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "train_e2e_key_codebook.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$GPUS" = auto ]; then
  GPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
commvq_run() {
  if [ "$GPUS" -gt 1 ]; then
    python -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m commvq.cli "$@"
  else
    python -m commvq.cli "$@"
  fi
}

echo "== 1/3 KV collection ($NUM_SAMPLES vectors per layer and $EVAL_ROWS held-out, $GPUS process(es)) =="
commvq_run collect --model "$MODEL" --dataset "$DATASET" --output_dir data/key \
  --num_samples "$((NUM_SAMPLES + EVAL_ROWS))" \
  --max_seq_length "$MAX_SEQ_LENGTH" --quant_bits "$QUANT_BITS" --with_queries
echo "== 2/3 scales =="
python -m commvq.cli scale --key_dir data/key
echo "== 3/3 E2E key codebooks (layers: $LAYER) =="
out_args=()
[ -n "$OUTPUT_DIR" ] && out_args=(--output_dir "$OUTPUT_DIR")
for opt in solver rounds beam epochs lr batch_size; do  # given options only: train-keys' defaults otherwise
  val=$(eval echo "\${$(echo "$opt" | tr a-z A-Z)}")
  [ -n "$val" ] && out_args+=("--$opt" "$val")
done
commvq_run train-keys --method e2e --key_dir data/key --layers "$LAYER" --quant_bits "$QUANT_BITS" \
  --num_samples "$NUM_SAMPLES" "${out_args[@]}"
echo
echo "Done."
echo "  keys, values, queries: $(pwd)/data/key, data/value, data/query"
echo "  scales:                $(pwd)/data/learnable_scale.pt"
CB=$(python - "$QUANT_BITS" "$OUTPUT_DIR" <<'PY'
import sys
from pathlib import Path

from commvq.data.kvstore import KVStore
from commvq.pipeline.train_keys import TrainKeysConfig, resolve_layout
from commvq.spec import ModelSpec

spec = ModelSpec.from_dict(KVStore("data/key").settings["spec"])
cfg = TrainKeysConfig(method="e2e", quant_bits=float(sys.argv[1]), output_dir=Path(sys.argv[2]) if sys.argv[2] else None)
print(resolve_layout(cfg, spec)[1])
PY
)
echo "  E2E codebooks:         $(pwd)/$CB (training curves in $CB/curves, metrics in $CB/config.json)"
