#!/usr/bin/env python
"""What each least-squares round does to the training error, on synthetic keys: the round's codes
under the tables they were encoded with, the same codes under the solved tables, and the codes the
beam finds from the solved tables (the next round's). Whole steps that the beam cannot follow show
as the third column rising above the second.

    python benchmarks/refine_trace.py [--num_samples 40000] [--heads 1] [--head_dim 128]
        [--residuals 21] [--code_bits 8] [--max_iters 10] [--rounds 8] [--beam 8]
        [--tables untied] [--step full]

EM (``--max_iters`` iterations per stage) gives the start; the rounds are those of
``commvq.quant.refine`` (commit weight 0.25, ridge 1e-6), the step whole (``full``) or searched.
A table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

try:
    from _meta import commit_id
    from em_layer import layer_keys
except ImportError:
    from benchmarks._meta import commit_id
    from benchmarks.em_layer import layer_keys

from commvq.quant import em, refine
from commvq.quant.beam import encode
from commvq.quant.commutative import untie
from commvq.quant.residual import decode


def relative(x: torch.Tensor, codes: torch.Tensor, thetas: torch.Tensor) -> float:
    return float(((x - decode(codes, thetas)).double() ** 2).sum() / (x.double() ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_samples", type=int, default=40000)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--residuals", type=int, default=21)
    ap.add_argument("--code_bits", type=int, default=8)
    ap.add_argument("--max_iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--beam", type=int, default=8)
    ap.add_argument("--tables", default="untied", choices=("tied", "untied"))
    ap.add_argument("--step", default="full", choices=refine.STEPS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, s = layer_keys(args, 0, device)
    e = 2 ** (args.code_bits // 2)
    thetas = em.fit(x, s, args.residuals, e, em.EMSettings(max_iters=args.max_iters)).thetas
    thetas = untie(thetas) if args.tables == "untied" else thetas
    settings = refine.RefineSettings(beam=args.beam, step=args.step)
    sample = x[:, refine.search_sample(x.shape[1], settings).to(x.device)]
    h, r, p = x.shape[0], args.residuals, x.shape[2] // 2
    rows = []
    codes = encode(x, thetas, args.beam)
    for rnd in range(1, args.rounds + 1):
        normal = refine.Normal.zeros(h, r, e, p, x.device, args.tables == "untied")
        normal.add(x, codes, thetas)
        solved = refine.solve(normal, thetas, settings.commit_weight, settings.ridge)
        size = 1.0
        if args.step == "search":
            solved, size = refine.search_step(thetas, solved, sample, settings)
        following = encode(x, solved, args.beam)
        rows.append(
            {
                "round": rnd,
                "encoded": relative(x, codes, thetas),
                "same_codes_solved": relative(x, codes, solved),
                "re_encoded": relative(x, following, solved),
                "step_size": size,
            }
        )
        codes, thetas = following, solved
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nsynthetic {h} x {args.head_dim}, {x.shape[1]:,} rows, R {r}, {args.code_bits}-bit "
        f"codes, {args.tables} tables, beam {args.beam}, {args.step} steps, {device}, "
        f"commit {commit_id()}"
    )
    print(f"{'round':>5}{'encoded':>12}{'same codes, solved':>20}{'re-encoded':>13}{'step':>7}")
    for row in rows:
        print(
            f"{row['round']:>5}{row['encoded']:>12.5f}{row['same_codes_solved']:>20.5f}"
            f"{row['re_encoded']:>13.5g}{row['step_size']:>7g}"
        )
    print(
        json.dumps(
            {"bench": "refine_trace", "args": vars(args), "rows": rows, "commit": commit_id()}
        )
    )


if __name__ == "__main__":
    main()
