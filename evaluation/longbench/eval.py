#!/usr/bin/env python
"""Score LongBench predictions: per task (qa_f1, Rouge-L, classification, code similarity) and
average.

    python eval.py [--pred_dir pred] [--model NAME]

A thin wrapper over `commvq longbench-eval`; writes <pred_dir>/results.md and results.json.
"""

import sys

from commvq.cli import main

if __name__ == "__main__":
    sys.exit(main(["longbench-eval", *sys.argv[1:]]))
