#!/usr/bin/env python
"""Picking the k highest of each row as positions in increasing order, as the coarse decode step
does: torch's ``topk`` + ``sort`` (the reference, :func:`commvq.quant.coarse.pick`) against the
radix select kernel (:mod:`commvq.kernels.select`) at several chunk sizes, each replayed as one
CUDA graph, over rows of random scores. Also checks that the kernel picks the same values as
torch (positions may differ only where scores tie in their 24 highest bits).

    python benchmarks/select_topk.py [--rows 1,59] [--lengths 8192,32768,131072]
        [--keep 0.03125,0.125] [--chunks 1024,2048,4096,8192]

A table and a last JSON line. Needs a GPU; ``--small``: one tiny row on the CPU, run with
``TRITON_INTERPRET=1`` in the environment (Triton's interpreter).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id
from decode_attention import graphed, timed

from commvq.kernels.select import top_k_positions_triton
from commvq.quant.coarse import pick


def measure(x: torch.Tensor, k: int, chunks: list[int], device: torch.device) -> dict:
    """Milliseconds per pick of torch and of the kernel at each chunk size, and whether each
    kernel pick holds the same values as torch's (positions may differ where scores tie in their
    24 highest bits)."""
    want = x.gather(1, pick(x, k)).sort(1).values
    row = {"torch_ms": timed(graphed(lambda: pick(x, k), device) or (lambda: pick(x, k)), device)}
    for c in chunks:
        fn = lambda c=c: top_k_positions_triton(x, k, chunk=c)  # noqa: E731
        got = x.gather(1, fn()).sort(1).values
        row[f"select_{c}_same"] = bool(torch.allclose(got, want, rtol=2**-14, atol=0))
        row[f"select_{c}_ms"] = timed(graphed(fn, device) or fn, device)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,59")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--keep", default="0.03125,0.125")
    ap.add_argument("--chunks", default="1024,2048,4096,8192")
    ap.add_argument("--small", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    device = torch.device("cpu" if args.small else "cuda")
    rows_, lengths = (
        [int(x) for x in args.rows.split(",")],
        [int(x) for x in args.lengths.split(",")],
    )
    if args.small:
        rows_, lengths = [2], [5000]
    chunks = [int(x) for x in args.chunks.split(",")]
    gen = torch.Generator().manual_seed(0)
    out = []
    for b in rows_:
        for n in lengths:
            x = (torch.randn(b, n, generator=gen) * 3).to(device)
            for keep in (float(v) for v in args.keep.split(",")):
                k = max(1, math.ceil(keep * n))
                row = {"rows": b, "length": n, "k": k, **measure(x, k, chunks, device)}
                out.append(row)
                print(json.dumps(row), flush=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"card {card}; commit {commit_id()}; ms per pick (CUDA graph), differs: other values picked"
    )
    for r in out:
        sel = ", ".join(
            f"chunk {c}: {r[f'select_{c}_ms']:.4f}{'' if r[f'select_{c}_same'] else ' (differs)'}"
            for c in chunks
        )
        print(f"{r['rows']:>3} x {r['length']:>7}, k {r['k']:>6}: torch {r['torch_ms']:.4f}; {sel}")
    print(json.dumps({"bench": "select_topk", "card": card, "rows": out, "commit": commit_id()}))


if __name__ == "__main__":
    main()
