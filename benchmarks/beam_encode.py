#!/usr/bin/env python
"""Key encoding time per beam width, at the shapes of the embedded SmolLM2 and of Llama-3.1-8B.

    python benchmarks/beam_encode.py [--tokens 131072] [--beams 1,2,4,8,16] [--repeats 3]
        [--shapes smollm2-2,smollm2-1,llama-2,llama-1]

One layer's keys (``--tokens`` unit-norm random vectors per KV head, the prescaled keys' scale)
through the encoder the cache uses on this device (the Triton kernels on a GPU: greedy for beam 1,
the beam kernel otherwise; torch on a CPU), with codebooks of the right shape (12-bit codes; their
values do not change the work). Each width is timed after a warm-up call of the same sizes (Triton
compiles per size), median of ``--repeats``; a table and a last JSON line.
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

from commvq.codecs.key_codebook import encoder_for

# name: (KV heads, head_dim, stages of 12-bit codes)
SHAPES = {
    "smollm2-2": (3, 64, 11),
    "smollm2-1": (3, 64, 5),
    "llama-2": (8, 128, 21),
    "llama-1": (8, 128, 11),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_encode(enc, x: torch.Tensor, thetas: torch.Tensor, beam: int, repeats: int) -> float:
    """Median milliseconds of ``enc(x, thetas, beam)`` after one warm-up call."""
    enc(x, thetas, beam)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        enc(x, thetas, beam)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--beams", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = encoder_for("auto", device)
    gen = torch.Generator(device=device).manual_seed(0)
    beams = [int(b) for b in args.beams.split(",")]
    rows = []
    for name in args.shapes.split(","):
        h, d, r = SHAPES[name]
        x = torch.nn.functional.normalize(
            torch.randn(h, args.tokens, d, device=device, generator=gen), dim=-1
        )
        x = x / h**0.5
        thetas = torch.randn(h, r, 128, d // 2, device=device, generator=gen) * 0.05
        for b in beams:
            rows.append(
                {
                    "shape": name,
                    "heads": h,
                    "head_dim": d,
                    "stages": r,
                    "beam": b,
                    "ms": time_encode(enc, x, thetas, b, args.repeats),
                }
            )
        del x, thetas
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"card {card}  {args.tokens} tokens per layer  commit {commit_id()}")
    print(f"{'shape':<11}{'heads x dim':>12}{'stages':>8}{'beam':>6}{'ms':>10}{'x greedy':>10}")
    for row in rows:
        base = (
            next(r["ms"] for r in rows if r["shape"] == row["shape"] and r["beam"] == 1)
            if 1 in beams
            else None
        )
        ratio = f"{row['ms'] / base:>10.1f}" if base else f"{'-':>10}"
        print(
            f"{row['shape']:<11}{row['heads']:>7} x {row['head_dim']:<3}"
            f"{row['stages']:>8}{row['beam']:>6}{row['ms']:>10.1f}{ratio}"
        )
    print(
        json.dumps(
            {
                "bench": "beam_encode",
                "card": card,
                "tokens": args.tokens,
                "rows": rows,
                "commit": commit_id(),
            }
        )
    )


if __name__ == "__main__":
    main()
