#!/usr/bin/env python
"""LongBench predictions with a compressed KV cache (the guide's evaluation step).

    python pred.py --model /path/to/model [--codebook_dir DIR] [--value_dir DIR] [--method ...]
                   [--data_dir data] [--tasks all] [--max_length 7500]

Codebooks copied into <model dir>/<name>-CommVQ-2bit-codebook/ are found from --model alone.
A thin wrapper over `commvq longbench-pred`; `--help` lists every option with its default.
"""

import sys

from commvq.cli import main

if __name__ == "__main__":
    sys.exit(main(["longbench-pred", *sys.argv[1:]]))
