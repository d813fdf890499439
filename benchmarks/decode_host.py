#!/usr/bin/env python
"""Where the host's time goes in one greedy decode step: a random model of real shapes (few layers),
a prompt, then ``--steps`` decode steps, for the default cache and CommVQCache (2-bit, default
kernels, with and without its decode steps as CUDA graphs). Prints the wall time per step and layer
for each (also under cProfile) and the functions with the most own time in CommVQ's eager steps;
last line JSON.

    python benchmarks/decode_host.py [--shape llama-3.1-8b] [--layers 4] [--prompt 4096] \
        [--steps 32]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id
from _shapes import SHAPES, random_model
from generate_speed import random_commvq_cache, run

from commvq.integrations.hf import use_commvq


def steps(lm, cache, ids, n: int, profiler: cProfile.Profile | None) -> float:
    """Prefill ``ids`` into ``cache``, then time ``n`` greedy decode steps (seconds per step)."""
    return 1.0 / run(lm, ids, n, cache, profiler)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_host.py needs a CUDA GPU (the CommVQ kernels run there)")
    from transformers import DynamicCache

    lm = random_model(args.shape, num_layers=args.layers)
    use_commvq(lm.model)
    ids = torch.randint(0, 1000, (1, args.prompt), device=lm.model.device)
    makers = {
        "default (bf16)": DynamicCache,
        "commvq-2": lambda: random_commvq_cache(lm, 2),
        "commvq-2 eager": lambda: random_commvq_cache(lm, 2, graphs=False),
    }
    for make in makers.values():
        steps(lm, make(), ids, 4, None)  # warm-up at the prompt's shapes (compilation, workspaces)
    per_layer = {}
    prof = cProfile.Profile()
    for name, make in makers.items():
        first = steps(lm, make(), ids, args.steps, None)
        second = steps(lm, make(), ids, args.steps, prof if name == "commvq-2 eager" else None)
        per_layer[name] = {
            "ms_per_step_layer": first * 1e3 / args.layers,
            "ms_per_step_layer_second": second * 1e3 / args.layers,
            "second_profiled": name == "commvq-2 eager",
        }
    stats = pstats.Stats(prof)
    calls = args.steps * args.layers
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]
    card = torch.cuda.get_device_name()
    commit = commit_id()
    print(
        f"card {card}; commit {commit}; random {args.shape} with {args.layers} layers; "
        f"prompt {args.prompt}; {args.steps} decode steps, batch 1"
    )
    for name, row in per_layer.items():
        how = "under cProfile" if row["second_profiled"] else "second run"
        print(
            f"{name:<16} {row['ms_per_step_layer']:.3f} ms per step and layer "
            f"({row['ms_per_step_layer_second']:.3f} {how})"
        )
    print(
        "commvq-2 eager, own time per step and layer (us) and calls per step and layer, "
        "under the profiler:"
    )
    print(f"{'us':>8} {'cum us':>8} {'calls':>6}  function")
    rows = []
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in top:
        where = f"{path.split('site-packages/')[-1].split('/src/')[-1]}:{line} {func}"
        rows.append(
            {
                "function": where,
                "us": tottime / calls * 1e6,
                "cum_us": cumtime / calls * 1e6,
                "calls": ncalls / calls,
            }
        )
        print(
            f"{rows[-1]['us']:>8.1f} {rows[-1]['cum_us']:>8.1f} {rows[-1]['calls']:>6.1f}  {where}"
        )
    ours = sorted(
        ((k, v) for k, v in stats.stats.items() if "commvq" in k[0]),
        key=lambda kv: kv[1][3],
        reverse=True,
    )[: args.top]
    print("commvq-2 eager, the package's own functions by cumulative time per step and layer (us):")
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in ours:
        where = f"{path.split('/src/')[-1]}:{line} {func}"
        print(
            f"{tottime / calls * 1e6:>8.1f} {cumtime / calls * 1e6:>8.1f} "
            f"{ncalls / calls:>6.1f}  {where}"
        )
    print(
        json.dumps(
            {
                "bench": "decode_host",
                "card": card,
                "commit": commit,
                "shape": args.shape,
                "layers": args.layers,
                "prompt": args.prompt,
                "steps": args.steps,
                "per_layer": per_layer,
                "top": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
