#!/usr/bin/env bash
# 2-bit value codec for the embedded SmolLM2-135M-Instruct; runs on a CPU in about 20 minutes.
# Run from training/ after: python collect_kv_for_e2e.py --model_path embedded --dataset embedded \
#   --num_samples 32768 --max_seq_length 1024 && python make_scale.py
set -euo pipefail
python finetune.py --model_path embedded --dataset embedded --scale_file data/learnable_scale.pt \
  --quant_bits 2 --output_dir value_codec_2bit --max_seq_length 512 --steps 400 --warmup_steps 40 \
  --save_every 100 --resume "$@"
