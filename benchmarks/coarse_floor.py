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
and JSON, the '+coarse' row's KL to exact mode being the floor). Give it its own ``--output``: the
'+coarse' row written there is not a coarse result.
"""

from __future__ import annotations

import sys

from commvq.integrations.hf import coarse_step


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


def main() -> int:
    argv = sys.argv[1:]
    eps = 1e-6
    if argv[:1] == ["--eps"]:
        eps, argv = float(argv[1]), argv[2:]
    coarse_step.applies, coarse_step.attend = perturbed(eps)
    from commvq.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
