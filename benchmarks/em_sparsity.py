#!/usr/bin/env python
"""How sparse the EM soft assignment is, iteration by iteration (what a pruned E-step can skip).

    python benchmarks/em_sparsity.py [--num_samples 1000000] [--stages 3] [--every 10]

Runs commvq's EM at Llama-3.1-8B shapes on synthetic key-like data and, every ``--every``
iterations, measures on one chunk of ``--probe`` tokens: the share of (token, row A) pairs whose
best distance in the row lies within ``cut * tau`` of the token's nearest codeword (rows whose
weights are not all below float32's range), the share of (tile, row) pairs a tile of ``--tile``
tokens sorted by hard code needs, and the share of non-negligible single weights. Prints a table
and a last JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

try:
    from _meta import commit_id
    from em_layer import add_layer_args, layer_keys
except ImportError:
    from benchmarks._meta import commit_id
    from benchmarks.em_layer import add_layer_args, layer_keys

from commvq.quant import em
from commvq.quant.commutative import decode, nearest, squared_distances


def probe(x: torch.Tensor, theta: torch.Tensor, tau: float, cut: float, tile: int, slice_: int = 8192) -> dict:
    e = theta.shape[-2] // 2
    rowmins, hits = [], 0.0
    for i in range(0, x.shape[1], slice_):
        xc = x[:, i:i + slice_]
        d = squared_distances(xc, theta).unflatten(-1, (e, e)).clamp_min(0).sqrt()  # [H, t, A, B]
        dmin = d.flatten(-2).amin(-1)
        hits += float(((d - dmin[..., None, None]) < cut * tau).float().sum())
        rowmins.append(d.amin(-1))
    rowmin = torch.cat(rowmins, 1)  # [H, T, E]
    dmin, hard_a = rowmin.min(-1)
    need = (rowmin - dmin[..., None]) < cut * tau
    order = torch.argsort(hard_a, dim=-1)
    sorted_need = torch.gather(need, 1, order[..., None].expand(-1, -1, e))
    t = need.shape[1] // tile * tile
    union = sorted_need[:, :t].reshape(need.shape[0], -1, tile, e).any(2).float().mean()
    return {"rows": float(need.float().mean()), "tile_rows": float(union), "weights": hits / (need.numel() * e)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_args(ap, residuals=False)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--max_iters", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--probe", type=int, default=131072)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--cut", type=float, default=104.0, help="in units of tau: exp(-cut) underflows float32")
    args = ap.parse_args()
    from commvq.kernels.em_estep import e_step_triton
    from commvq.kernels.em_init import e_step_centers_triton

    x, s = layer_keys(args)
    settings = em.EMSettings(max_iters=args.max_iters)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'stage':>5}{'iter':>6}{'tau':>11}{'rows':>9}{'tile rows':>11}{'weights':>10}")
    for stage in range(args.stages):
        counter = [0]

        def estep(xh, sh, theta, tau, chunk, hint=None, stage=stage, counter=counter, **kw):
            it = counter[0]
            counter[0] += 1
            if it % args.every == 0 or it == args.max_iters - 1:
                r = probe(xh[:, : args.probe], theta, tau, args.cut, args.tile)
                rows.append({"stage": stage, "iter": it, "tau": tau, **r})
                print(f"{stage:>5}{it:>6}{tau:>11.2e}{r['rows']:>9.4f}{r['tile_rows']:>11.4f}{r['weights']:>10.5f}",
                      flush=True)
            return e_step_triton(xh, sh, theta, tau, chunk, hint, **kw)

        res = em.fit_stage(x, s, 64, stage, settings, gen, estep, e_step_centers_triton)
        for i in range(0, x.shape[1], 65536):
            part = x[:, i:i + 65536]
            part -= decode(res.theta, nearest(part, res.theta))
    print(json.dumps({"bench": "em_sparsity", "card": torch.cuda.get_device_name(), "cut": args.cut,
                      "tile": args.tile, "probe": args.probe, "rows": rows, "commit": commit_id()}))


if __name__ == "__main__":
    main()
