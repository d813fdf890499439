#!/usr/bin/env python
"""The coarse pass's rank kernel (:func:`commvq.kernels.coarse.commvq_rank_triton`) at each launch
shape: tokens per program (``block``) x warps, for each share of the RoPE pairs, at Llama-3.1-8B
shapes (32 query heads, 8 KV heads x 128) over random codes of one sequence, each replayed as one
CUDA graph; each with the query dots summed per row and as tensor-core products (``dot``). Checks
that every launch writes the ranks of the default one (64 tokens, 4 warps, no dot; the tensor
cores' tf32 within 1e-3 of the ranks' size); the fastest per share is what the kernel's defaults
should be. Then the exact scores kernel (every stage, every token; what exact mode runs) with the
query dots summed per row and as tensor-core products.

    python benchmarks/rank_blocks.py [--contexts 131072] [--bits 1] [--stages 1]
        [--pairs 1,0.5,0.25] [--blocks 32,64,128] [--warps 2,4,8] [--dots 0,1]

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
from commvq.kernels.decode import commvq_scores_triton, prepare_tables
from commvq.quant import coarse as cq


def rank_ms(st, q, off, freqs, stages, cols, block, warps, device, dot=False):
    """``(ms, ranks)`` of one launch shape (the columns' table built once, as the cache does)."""
    tables = column_tables(st["thetas"], cols)

    def fn():
        return commvq_rank_triton(
            q, st["kcodes"], st["prescale"], st["pos"], st["thetas"], freqs, 12, off, stages,
            tables=tables, block=block, num_warps=warps, columns=cols, dot=dot,
        )  # fmt: skip

    ranks = fn()
    return timed(graphed(fn, device) or fn, device), ranks


def scores_ms(st, q, freqs, device, dot):
    """``(ms, scores)`` of the exact scores kernel (its default launch)."""
    tables = prepare_tables(st["thetas"], "regdecode16")

    def fn():
        return commvq_scores_triton(
            q, st["kcodes"], st["prescale"], st["pos"], st["thetas"], freqs, 12,
            tables=tables, dot=dot,
        )  # fmt: skip

    scores = fn()
    return timed(graphed(fn, device) or fn, device), scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--bits", type=int, default=1)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--pairs", default="1,0.5,0.25")
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--dots", default="0,1")
    ap.add_argument("--small", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    device = torch.device("cpu" if args.small else "cuda")
    hq, hkv, d = (8, 2, 32) if args.small else (32, 8, 128)
    contexts = [300] if args.small else [int(x) for x in args.contexts.split(",")]
    r = round(args.bits * d / 12)
    shapes = [
        (int(b), int(w), bool(int(x)))
        for b in args.blocks.split(",")
        for w in args.warps.split(",")
        for x in args.dots.split(",")
    ]
    label = lambda b, w, x: f"{b}x{w}{' dot' if x else ''}"  # noqa: E731
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
            tol = 1e-3 * float(want.abs().max())
            for shape in shapes:
                ms, got = rank_ms(
                    st, q, off, freqs, args.stages, cols, *shape[:2], device, shape[2]
                )
                row[label(*shape) + "_ms"] = ms
                row[label(*shape) + "_same"] = bool(torch.allclose(got, want, atol=tol))
            out.append(row)
            print(json.dumps(row), flush=True)
        want_ms, want = scores_ms(st, q, freqs, device, False)
        dot_ms, got = scores_ms(st, q, freqs, device, True)
        tol = 1e-3 * float(want.abs().max())
        row = {"context": n, "scores_ms": want_ms, "scores_dot_ms": dot_ms}
        row["scores_dot_same"] = bool(torch.allclose(got, want, atol=tol))
        out.append(row)
        print(json.dumps(row), flush=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"card {card}; commit {commit_id()}; rank kernel ms per call (CUDA graph), "
        f"{args.bits}-bit codes, S={args.stages}; tokens per program x warps (differs: other ranks)"
    )
    for row in out:
        if "scores_ms" in row:
            same = "" if row["scores_dot_same"] else " (differs)"
            print(
                f"{row['context']:>7} exact scores: summed per row {row['scores_ms']:.4f}, "
                f"tensor cores {row['scores_dot_ms']:.4f}{same}"
            )
            continue
        names = [label(*shape) for shape in shapes]
        cells = ", ".join(
            f"{k} {row[k + '_ms']:.4f}{'' if row[k + '_same'] else ' (differs)'}" for k in names
        )
        best = min(names, key=lambda k: row[k + "_ms"])
        print(f"{row['context']:>7} pairs {row['pairs']:<5}: {cells}; best {best}")
    print(json.dumps({"bench": "rank_blocks", "card": card, "rows": out, "commit": commit_id()}))


if __name__ == "__main__":
    main()
