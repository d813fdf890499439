#!/usr/bin/env python
"""Step 2 of the guide: per-channel scales of the collected KV -> data/learnable_scale.pt.

    python make_scale.py [--key_dir data/key] [--output data/learnable_scale.pt]

A thin wrapper over `commvq scale`; `--help` lists every option with its default.
"""

import sys

from commvq.cli import main

if __name__ == "__main__":
    sys.exit(main(["scale", *sys.argv[1:]]))
