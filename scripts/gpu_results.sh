#!/usr/bin/env bash
# Every cache method side by side on the embedded SmolLM2, on a lent GPU: perplexity, KL to the exact
# cache, pass-key and needle retrieval up to the model's 8K context (docs/results.md).
# Run on the same warm machine right after scripts/gpu_values.sh (which leaves the GGUF and the value
# codecs in runs/device/), carrying the key codebook folders made by scripts/results_smollm2.sh:
#   bash scripts/gpu_results.sh [eval compare options ...]
# Options given override the defaults below (the last of a repeated option wins), e.g. the run in
# docs/results.md: --methods fp16,kivi2,commvq-e2e2,commvq-e2e1 --ppl_tokens 2048 --lengths 1024,8192
# --depths 0,0.5,1 --samples 2.
set -uo pipefail
. scripts/device_env.sh
K=${KEY_DIRS:-runs/results_smollm2}
W=$DEV/eval_workdir; rm -rf "$W"; mkdir -p "$W"
for d in "$K"/codebook_*; do ln -s "$(realpath "$d")" "$W/"; done
for b in 1 2; do ln -s "$DEV/values/value_codec_${b}bit" "$W/"; done
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
timeout "${EVAL_TIMEOUT:-560}" python3 -m commvq -q eval compare --workdir "$W" --ppl_tokens 4096 --ppl_docs 2 \
  --lengths 1024,4096,8192 --depths 0,0.25,0.5,0.75,1 --samples 3 "$@" --output "$OUT/eval" 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|probe/s\]\|s/probe\]" | tail -20
echo "eval: $(( $(date +%s) - start )) s"
cat "$OUT/eval/compare.md"
