#!/usr/bin/env python
"""Prototype rankings of the coarse pass over a share of the RoPE pairs, measured by
``benchmarks/coarse_prune.py`` (which runs unchanged after this script swaps the torch reference of
``CommVQKeys.coarse_scores``; no kernel has them). ``--variant``:

- ``static``: the cache's own ranking (the pairs whose first-stage table entries carry the most
  energy, :func:`commvq.quant.coarse.coarse_pairs`);
- ``query_head``: each step, per sequence and KV head, the pairs with the most query energy (summed
  over the head's query rows) times table energy;
- ``query_seq``: the same, one choice per sequence shared by every KV head (one rotation per token
  would still serve every head in a kernel);
- ``cascade``: the static pairs rank every token, then the best ``--cand`` x budget of them are
  ranked again over every pair (same stages); only those can be picked.

    python benchmarks/coarse_rank_variants.py --variant cascade --cand 2 -- \\
        --key_dir runs/gpu2/codebook_e2e_12bits_64group_11residuals --lengths 2048 --steps 8 \\
        --settings "1:0.125:64:0:0.25" --device cpu

Everything after ``--`` goes to ``coarse_prune.py`` (one setting for ``cascade``: its budget sizes
the candidates). Its table and last JSON line.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch

from commvq.quant import coarse

HERE = Path(__file__).resolve().parent


def query_pairs(q: torch.Tensor, thetas: torch.Tensor, stages: int, share: float, shared: bool):
    """A 0/1 mask ``[B, Hq, 1, D]`` of the pairs each KV head (or, ``shared``, each sequence) keeps:
    the most query energy times first-``stages`` table energy."""
    h, _, _, p = thetas.shape
    b, hq, tq, _ = q.shape
    g = hq // h
    energy = coarse.pair_energy(thetas, stages).float()  # [H, P]
    qe = (q[..., :p] ** 2 + q[..., p:] ** 2).reshape(b, h, g, tq, p).sum(dim=(2, 3))
    imp = qe * energy
    if shared:
        imp = imp.sum(1, keepdim=True).expand(b, h, p)
    idx = imp.topk(max(1, round(p * share)), -1).indices
    mask = torch.zeros(b, h, p, device=q.device).scatter_(-1, idx, 1.0)
    return torch.cat((mask, mask), -1).repeat_interleave(g, 1)[:, :, None, :]


def patch(variant: str, cand: float, budget) -> None:
    from commvq.codecs import cache_parts

    original = cache_parts.CommVQKeys.coarse_scores

    def coarse_scores(self, layer, q, block):
        if variant == "static" or self.coarse_pairs >= 1:
            return original(self, layer, q, block)
        if variant in ("query_head", "query_seq"):
            shared, thetas = variant == "query_seq", self.codebooks[layer].thetas
            mask = query_pairs(q, thetas, self.coarse_stages, self.coarse_pairs, shared)
            return self.scores(layer, q * mask.to(q.dtype), block, self.coarse_stages)
        first = original(self, layer, q, block)  # cascade
        n = first.shape[-1]
        m = min(n, int(cand * budget(n)))
        rank = (first - first.amax(-1, keepdim=True)).amax(dim=(1, 2))  # [B, N]
        keep = torch.zeros_like(rank, dtype=torch.bool)
        keep.scatter_(-1, rank.topk(m, -1).indices, True)
        every = self.scores(layer, q, block, self.coarse_stages)
        return every.masked_fill(~keep[:, None, None, :], float("-inf"))

    cache_parts.CommVQKeys.coarse_scores = coarse_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--variant", required=True, choices=("static", "query_head", "query_seq", "cascade")
    )
    ap.add_argument("--cand", type=float, default=2.0, help="cascade: candidates per budget token")
    args, rest = ap.parse_known_args()
    rest = [a for a in rest if a != "--"]
    sys.path.insert(0, str(HERE))
    from coarse_prune import parse_settings

    text = rest[rest.index("--settings") + 1] if "--settings" in rest else ""
    settings = parse_settings(text) if text else []
    if args.variant == "cascade" and len(settings) != 1:
        raise SystemExit(f"--settings {text!r}: the cascade takes exactly one setting (its budget)")
    patch(args.variant, args.cand, settings[0].budget if settings else None)
    sys.argv = [str(HERE / "coarse_prune.py"), *rest]
    runpy.run_path(str(HERE / "coarse_prune.py"), run_name="__main__")


if __name__ == "__main__":
    main()
