#!/usr/bin/env python
"""The noise floor of a coarse method's KL to exact mode: ``commvq eval`` with the '+coarse'
method's step replaced by the exact step times ``1 + eps`` (``--eps``, default 1e-6), so that its
"KL vs exact mode" is what a perturbation far below any coarse error costs the model in its dtype
(a bfloat16 model rounds each layer's output, and a tiny change moves some roundings by a whole
unit, which later layers carry on). Compare it with the coarse setting's own KL in the same dtype.

    python benchmarks/coarse_floor.py [--eps 1e-6] eval ppl --methods commvq,commvq+coarse \\
        --key_dir DIR --model_dtype bfloat16 --ppl_tokens 8192 --ppl_prefill 8064 --ppl_chunk 1 \\
        --ppl_docs 1 --coarse_stages 1 --coarse_keep 0.03125 --coarse_min_tokens 4096 \\
        --output runs/floor

Everything after the script's own option goes to ``commvq``; the results are the eval's (its table
and JSON, the '+coarse' row's KL to exact mode being the floor). The stand-in's results are kept in
the eval's results cache under their own key (``floor_eps``), so a genuine coarse run in the same
``--output`` never reads them back as its own.
"""

from __future__ import annotations

import argparse
import sys

from commvq.integrations.hf import coarse_step
from commvq.pipeline import eval_cache


def perturbed(eps: float):
    """``(applies, attend)`` for :mod:`coarse_step`: every decoding step of a coarse layer attends
    exactly, its output times ``1 + eps``."""

    def applies(layer, nc, copies, tq) -> bool:
        return layer.coarse is not None and nc > 0 and copies is None and tq == 1

    def attend(layer, qs, mask, win_k, win_v, length):
        settings, layer.coarse = layer.coarse, None
        try:
            out = layer._mixed(qs, mask, 1.0, window=(win_k, win_v, length))
        finally:
            layer.coarse = settings
        return out * (1 + eps)

    return applies, attend


def keyed(common_key, eps: float):
    """:func:`eval_cache.common_key` with the stand-in's ``eps`` added to a coarse method's key."""

    def key(method, *args, **kwargs) -> dict:
        out = common_key(method, *args, **kwargs)
        return {**out, "floor_eps": eps} if getattr(method, "coarse", None) else out

    return key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--eps", type=float, default=1e-6, help="relative perturbation of each step")
    args, rest = ap.parse_known_args()
    coarse_step.applies, coarse_step.attend = perturbed(args.eps)
    eval_cache.common_key = keyed(eval_cache.common_key, args.eps)
    from commvq.cli import main as cli

    return cli(rest)


if __name__ == "__main__":
    sys.exit(main())
