#!/usr/bin/env python
"""Step 4 of the guide: train the value codec against the frozen model.

    python finetune.py --model_path M --scale_file data/learnable_scale.pt --quant_bits 2 \
        --output_dir value_codec_2bit [--steps 1000 --lr 0.001 --max_seq_length 8192]

A thin wrapper over `commvq train-values`; `--help` lists every option with its default.
Several GPUs: torchrun --nproc_per_node=N finetune.py ...
"""

import sys

from commvq.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-values", *sys.argv[1:]]))
