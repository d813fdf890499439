#!/usr/bin/env python
"""End-to-end greedy generation speed: the default cache vs CommVQCache (2- and 1-bit keys and
values, Triton kernels, decode steps as CUDA graphs; "eager": without the graphs) on a randomly
initialized model of real shapes (weights need not be real for speed).

    python benchmarks/generate_speed.py [--shape llama-3.1-8b] [--prompt 4096] [--new 64] \\
        [--repeats 3]

Prints a table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

try:
    from _shapes import SHAPES, random_model
except ImportError:
    from benchmarks._shapes import SHAPES, random_model

from commvq.codecs import cache_parts as parts
from commvq.codecs.key_codebook import KeyCodebook
from commvq.codecs.value_codec import ValueCodec
from commvq.integrations.hf import use_commvq
from commvq.integrations.hf.attention import cache_kwargs
from commvq.integrations.hf.cache import CommVQCache


def random_commvq_cache(lm, bits: int, window: int = 128, graphs: bool = True) -> CommVQCache:
    spec = lm.spec
    dev = lm.model.device
    g = torch.Generator().manual_seed(0)
    r = round(bits * spec.head_dim / 12)
    books = [
        KeyCodebook(
            torch.randn(spec.num_kv_heads, r, 128, spec.head_dim // 2, generator=g) * 0.05
        ).to(dev)
        for _ in range(spec.num_layers)
    ]  # .to(a GPU): the fused Triton encoder
    codec = ValueCodec(spec.num_layers, spec.kv_dim, bits).to(dev)
    rotary = lm.model.base_model.rotary_emb
    keys = parts.CommVQKeys(books, rotary.inv_freq, 1.0)
    return CommVQCache(
        spec.num_layers, keys, parts.CommVQValues(codec, spec.num_kv_heads), window, graphs=graphs
    )


def run(lm, ids, new, cache, profiler=None) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second); ``profiler`` (a ``cProfile.Profile``) runs
    during the decode steps only."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = lm.model(ids, use_cache=True, **cache_kwargs(lm.model, cache))
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    nxt = out.logits[:, -1:].argmax(-1)
    if profiler is not None:
        profiler.enable()
    with torch.no_grad():
        for _ in range(new):
            nxt = (
                lm.model(nxt, use_cache=True, **cache_kwargs(lm.model, cache))
                .logits[:, -1:]
                .argmax(-1)
            )
    torch.cuda.synchronize()
    if profiler is not None:
        profiler.disable()
    return t1 - t0, new / (time.perf_counter() - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds, each running every cache once in turn (median and range reported)",
    )
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: use 1 or more")
    lm = random_model(args.shape)
    use_commvq(lm.model)
    ids = torch.randint(0, 1000, (1, args.prompt), device=lm.model.device)
    from transformers import DynamicCache

    makers = {
        "default (bf16)": DynamicCache,
        "commvq-2": lambda: random_commvq_cache(lm, 2),
        "commvq-2 eager": lambda: random_commvq_cache(lm, 2, graphs=False),
        "commvq-1": lambda: random_commvq_cache(lm, 1),
    }
    for make in makers.values():
        run(lm, ids[:, :256], 4, make())  # warm-up (compilation)
    runs = {name: [] for name in makers}
    held = {}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the host hits every cache alike
        for name, make in makers.items():
            cache = make()
            runs[name].append(run(lm, ids, args.new, cache))
            held[name] = (
                cache.nbytes()
                if hasattr(cache, "nbytes")
                else sum(
                    t.numel() * t.element_size()
                    for layer in cache.layers
                    for t in (layer.keys, layer.values)
                )
            )
            del cache
    rows = {}
    for name, got in runs.items():
        tps = sorted(t for _, t in got)
        rows[name] = {
            "prefill_s": sorted(p for p, _ in got)[len(got) // 2],
            "decode_tok_s": tps[len(tps) // 2],
            "decode_tok_s_min": tps[0],
            "decode_tok_s_max": tps[-1],
            "cache_bytes": held[name],
        }
    card = torch.cuda.get_device_name()
    commit = commit_id()
    print(
        f"card {card}; model random {args.shape}; prompt {args.prompt}; "
        f"{args.new} new tokens, batch 1; median of {args.repeats} interleaved runs"
    )
    print(f"{'cache':<16}{'prefill s':>10}{'decode tok/s':>14}{'range':>14}{'cache MiB':>11}")
    for name, r in rows.items():
        spread = f"{r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}"
        mib = r["cache_bytes"] / 2**20
        print(
            f"{name:<16}{r['prefill_s']:>10.3f}{r['decode_tok_s']:>14.1f}{spread:>14}{mib:>11.1f}"
        )
    print(
        json.dumps(
            {
                "bench": "generate_speed",
                "card": card,
                "shape": args.shape,
                "prompt": args.prompt,
                "new": args.new,
                "repeats": args.repeats,
                "rows": rows,
                "commit": commit,
            }
        )
    )


if __name__ == "__main__":
    main()
