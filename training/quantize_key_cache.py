#!/usr/bin/env python
"""Step 3 of the guide: train the key codebooks of one layer (or all).

    python quantize_key_cache.py LAYER [--training_method em|e2e] \
        [--epochs 100 --lr 0.001 --batch_size 256]

LAYER is a layer index, a range A-B or `all`. A thin wrapper over `commvq train-keys`:
`--help` lists every option with its default. Outputs go to codebook_<b>bits_<D>group_<R>residuals
(EM) or codebook_e2e_... (E2E) in the current folder unless --output_dir is given.
"""

import sys

from commvq.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):
        args = ["--layers", args[0], *args[1:]]
    sys.exit(main(["train-keys", *args]))
