#!/usr/bin/env bash
# Every cache method side by side on the embedded SmolLM2, on a lent GPU: perplexity, KL to the exact
# cache, pass-key and needle retrieval up to the model's 8K context (docs/results.md).
# Run on the same warm machine right after
#   VALUES_DIR=/tmp/vals bash scripts/gpu_values.sh A B [steps]     (the GGUF and the value codecs)
# carrying the key codebook folders made by scripts/results_smollm2.sh:
#   bash scripts/gpu_results.sh /tmp/vals runs/results_smollm2
set -uo pipefail
V=$1 K=$2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader
W=/tmp/wk; rm -rf $W; mkdir -p $W
for d in "$K"/codebook_*; do ln -s "$PWD/$d" "$W/"; done
for b in 1 2; do ln -s "$V/value_codec_${b}bit" "$W/"; done
ls $W
start=$(date +%s)
timeout "${EVAL_TIMEOUT:-560}" python3 -m commvq -q eval compare --workdir $W --ppl_tokens 4096 --ppl_docs 2 \
  --lengths 1024,4096,8192 --depths 0,0.25,0.5,0.75,1 --samples 3 --output "$OUT/eval" 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|probe/s\]\|s/probe\]" | tail -20
echo "eval: $(( $(date +%s) - start )) s"
cat "$OUT/eval/compare.md"
