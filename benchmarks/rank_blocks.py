#!/usr/bin/env python
"""The coarse pass's rank kernel (:func:`commvq.kernels.coarse.commvq_rank_triton`) at each launch
shape: tokens per program (``block``) x warps, for each share of the RoPE pairs, at Llama-3.1-8B
shapes (32 query heads, 8 KV heads x 128) over random codes of one sequence, each replayed as one
CUDA graph. Checks that every launch shape writes the ranks of the default one (64 tokens, 4
warps); the fastest shape per share is what the kernel's defaults should be.

    python benchmarks/rank_blocks.py [--contexts 131072] [--bits 1] [--stages 1]
        [--pairs 1,0.5,0.25] [--blocks 32,64,128] [--warps 2,4,8]

A table and a last JSON line. Needs a GPU; ``--small``: tiny sizes on the CPU, run with
``TRITON_INTERPRET=1`` in the environment (Triton's interpreter).
"""

from __future__ import annotations

import argparse
import json

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id
from decode_attention import graphed, make_state, timed

from commvq import rope
from commvq.kernels.coarse import column_tables, commvq_rank_triton
from commvq.quant import coarse as cq


def rank_ms(st, q, off, freqs, stages, cols, block, warps, device):
    """``(ms, ranks)`` of one launch shape (the columns' table built once, as the cache does)."""
    tables = column_tables(st["thetas"], cols)

    def fn():
        return commvq_rank_triton(
            q, st["kcodes"], st["prescale"], st["pos"], st["thetas"], freqs, 12, off, stages,
            tables=tables, block=block, num_warps=warps, columns=cols,
        )  # fmt: skip

    ranks = fn()
    return timed(graphed(fn, device) or fn, device), ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--bits", type=int, default=1)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--pairs", default="1,0.5,0.25")
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--small", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    device = torch.device("cpu" if args.small else "cuda")
    hq, hkv, d = (8, 2, 32) if args.small else (32, 8, 128)
    contexts = [300] if args.small else [int(x) for x in args.contexts.split(",")]
    r = round(args.bits * d / 12)
    shapes = [(int(b), int(w)) for b in args.blocks.split(",") for w in args.warps.split(",")]
    gen = torch.Generator().manual_seed(0)
    freqs = rope.inv_freq(d, 500000.0).to(device)
    out = []
    for n in contexts:
        st = make_state(1, n, hkv, d, r, args.bits, device, gen)
        q = torch.randn(1, hq, d, generator=gen).to(device)
        off = torch.zeros(1, hq, device=device)
        for share in (float(x) for x in args.pairs.split(",")):
            cols = None
            if share < 1:
                pairs = cq.coarse_pairs(st["thetas"], args.stages, share).to(device)
                cols = torch.cat((pairs, pairs + d // 2))
            _, want = rank_ms(st, q, off, freqs, args.stages, cols, 64, 4, device)
            row = {"context": n, "pairs": share}
            for block, warps in shapes:
                ms, got = rank_ms(st, q, off, freqs, args.stages, cols, block, warps, device)
                row[f"{block}x{warps}_ms"] = ms
                row[f"{block}x{warps}_same"] = bool(torch.allclose(got, want, atol=1e-4))
            out.append(row)
            print(json.dumps(row), flush=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"card {card}; commit {commit_id()}; rank kernel ms per call (CUDA graph), "
        f"{args.bits}-bit codes, S={args.stages}; tokens per program x warps (differs: other ranks)"
    )
    for row in out:
        cells = ", ".join(
            f"{b}x{w} {row[f'{b}x{w}_ms']:.4f}{'' if row[f'{b}x{w}_same'] else ' (differs)'}"
            for b, w in shapes
        )
        best = min(shapes, key=lambda s: row[f"{s[0]}x{s[1]}_ms"])
        print(f"{row['context']:>7} pairs {row['pairs']:<5}: {cells}; best {best[0]}x{best[1]}")
    print(json.dumps({"bench": "rank_blocks", "card": card, "rows": out, "commit": commit_id()}))


if __name__ == "__main__":
    main()
