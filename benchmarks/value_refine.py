#!/usr/bin/env python
"""Value encoding time with and without code refinement (:mod:`commvq.quant.value_refine`), at the
shapes of the embedded SmolLM2 and of Llama-3.1-8B, for a flush (128 tokens) and a prefill.

    python benchmarks/value_refine.py [--tokens 128,8192] [--sweeps 0,1,2,3] [--repeats 5]
        [--shapes smollm2-1,smollm2-2,llama-1,llama-2]

One layer's values (random, the codec started from their principal axes, its decoder then
perturbed so that the encoder no longer matches it, as after training) encoded by
``LayerValueCodec.encode`` on this device; each setting timed after a warm-up call, median of
``--repeats``. The error column is the relative value error of those random values (it shows that
each setting did its work, not what a trained codec on real values gains). A table and a last JSON
line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

from commvq.codecs.value_codec import LayerValueCodec

# name: (KV channels per layer, bits per channel)
SHAPES = {"smollm2-1": (192, 1), "smollm2-2": (192, 2), "llama-1": (1024, 1), "llama-2": (1024, 2)}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="128,8192")
    ap.add_argument("--sweeps", default="0,1,2,3")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rows = []
    print("| shape | tokens | sweeps | ms per encode | x no refinement | relative value error |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        width, bits = SHAPES[name]
        spread = torch.linspace(3.0, 0.2, width)
        codec = LayerValueCodec(width, bits, torch.rand(width, generator=g) + 0.5)
        codec.init_from_values(torch.randn(4 * width, width, generator=g) * spread)
        with torch.no_grad():
            codec.codebook.add_(0.2 * codec.codebook.std() * torch.randn_like(codec.codebook))
        codec = codec.to(device).eval()
        for tokens in _ints(args.tokens):
            v = (torch.randn(tokens, width, generator=g) * spread).to(device)
            base = None
            for sweeps in _ints(args.sweeps):
                codec.encode(v, sweeps)  # warm-up
                times = []
                for _ in range(args.repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    packed, factor = codec.encode(v, sweeps)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                ms = 1e3 * statistics.median(times)
                base = ms if base is None else base
                err = float(((codec.decode(packed, factor) - v) ** 2).sum() / (v**2).sum())
                rows.append(dict(shape=name, tokens=tokens, sweeps=sweeps, ms=ms, error=err))
                print(f"| {name} | {tokens} | {sweeps} | {ms:.2f} | {ms / base:.1f} | {err:.4f} |")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": device_name, "commit": commit_id(), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
