#!/usr/bin/env bash
# 1-bit value codec for Llama-3.1-8B-Instruct (run from training/ after collection and scales).
set -euo pipefail
GPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
run() { if [ "$GPUS" -gt 1 ]; then python -m torch.distributed.run --standalone --nproc_per_node="$GPUS" finetune.py "$@"; else python finetune.py "$@"; fi; }
run --model_path "${MODEL:-meta-llama/Llama-3.1-8B-Instruct}" --dataset "${DATASET:-auto}" \
  --scale_file data/learnable_scale.pt --quant_bits 1 --output_dir value_codec_1bit \
  --max_seq_length 8192 --batch_size 1 --steps 1000 --warmup_steps 100 --lr 0.001 --weight_decay 0.1 \
  --save_every 200 --resume "$@"
