#!/usr/bin/env python
"""Step 1 of the guide: collect pre-RoPE keys and values with the base model.

    python collect_kv_for_e2e.py --model_path M --dataset D --output_dir data/key \
        --num_samples 1000000 --max_seq_length 8192 --quant_bits 2 [--batch_size B]

A thin wrapper over `commvq collect`; `--help` lists every option with its default.
"""

import sys

from commvq.cli import main

if __name__ == "__main__":
    sys.exit(main(["collect", *sys.argv[1:]]))
