#!/usr/bin/env bash
# Regenerates docs/results.md's SmolLM2 figures on a CPU: key codebooks (EM and E2E, 2 and 1 bit,
# 8-bit codes so that the paper's EM schedule fits a CPU), held-out key errors, and every cache
# method side by side (value codecs from scripts/results_values.sh).
# Usage: bash scripts/results_smollm2.sh [workdir] [values_workdir]     (about an hour on 2 CPU cores)
set -euo pipefail
W=${1:-runs/results_smollm2}
V=${2:-runs/results_values}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
commvq -q collect --model embedded --dataset embedded --output_dir "$W/data/key" --num_samples 32768 \
  --max_seq_length 1024 --with_queries --num_queries 8192
commvq -q scale --key_dir "$W/data/key"
for b in 2 1; do
  r=$(( b == 2 ? 16 : 8 ))
  commvq -q train-keys --key_dir "$W/data/key" --method em --code_bits 8 --residuals $r --num_samples 8192 \
    --max_iters 10 --output_dir "$W/codebook_8bits_64group_${r}residuals"
  commvq -q train-keys --key_dir "$W/data/key" --method e2e --code_bits 8 --residuals $r --num_samples 8192 \
    --epochs 8 --output_dir "$W/codebook_e2e_8bits_64group_${r}residuals"
done
commvq -q compare-codebooks "$W"/codebook_8bits_64group_16residuals "$W"/codebook_e2e_8bits_64group_16residuals \
  "$W"/codebook_8bits_64group_8residuals "$W"/codebook_e2e_8bits_64group_8residuals --key_dir "$W/data/key" \
  --eval_samples 16384 --output "$W/compare_keys"
for b in 1 2; do
  [ -e "$W/value_codec_${b}bit" ] || ln -s "$(cd "$V" && pwd)/value_codec_${b}bit" "$W/value_codec_${b}bit"
done
# transformers' own quantized cache joins the table where optimum-quanto is installed
methods=fp16,kivi2,kivi1,commvq-em2,commvq-e2e2,commvq-em1,commvq-e2e1
python -c "import optimum.quanto" 2>/dev/null && methods=$methods,hf-quanto2,hf-quanto4
commvq -q eval compare --workdir "$W" --methods "$methods" --ppl_tokens 2048 --ppl_docs 2 --lengths 512,1024,2048 \
  --depths 0,0.25,0.5,0.75,1 --samples 2 --output "$W/eval"
