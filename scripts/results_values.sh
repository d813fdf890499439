#!/usr/bin/env bash
# Regenerates the CPU figures of docs/results.md's value-codec section: value codecs (1 and 2 bit) on the embedded
# SmolLM2, trained on the CPU, evaluated on held-out speeches against KIVI-style quantization.
# Usage: bash scripts/results_values.sh [workdir] [steps]     (about 40 minutes on 2 CPU cores)
set -euo pipefail
W=${1:-runs/results_values}
STEPS=${2:-400}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
commvq -q collect --model embedded --dataset embedded --output_dir "$W/data/key" --num_samples 32768 \
  --max_seq_length 1024
commvq -q scale --key_dir "$W/data/key"
for b in 1 2; do
  commvq -q train-values --model embedded --dataset embedded --scale_file "$W/data/learnable_scale.pt" \
    --output_dir "$W/value_codec_${b}bit" --quant_bits "$b" --max_seq_length 512 --steps "$STEPS" \
    --warmup_steps $((STEPS / 10)) --save_every 100 --resume
done
commvq -q eval-values "$W/value_codec_1bit" "$W/value_codec_2bit" --scale_file "$W/data/learnable_scale.pt" \
  --num_sequences 4 --max_seq_length 1024 --output "$W/eval_values"
