#!/usr/bin/env python
"""How far a wider encoder goes with fixed codebooks: held-out key error per beam width, and after
iterated conditional modes (ICM) on the beam's codes.

    python benchmarks/beam_width.py DIR [DIR ...] --key_dir runs/heldout/data/key --layer 14
        [--rows 0:2048] [--beams 1,8,16,32,64] [--icm 2]

For each codebook folder, one layer's keys (rows of a collected store, prescaled as the cache
does) are encoded with each beam width (torch on a CPU, the Triton kernels where they apply on a
GPU); ICM then re-picks each stage's code given all the others (the exact nearest codeword of what
they leave), ``--icm`` sweeps, which never raises the error. If the error stops falling with the
width, the encoder is no longer what limits these codebooks. A table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

from commvq import io
from commvq.codecs.key_codebook import encoder_for
from commvq.data.kvstore import KVStore
from commvq.quant import residual
from commvq.quant.commutative import decode, nearest
from commvq.spec import ModelSpec


def relative_error(x: torch.Tensor, codes: torch.Tensor, thetas: torch.Tensor) -> float:
    return float(((x - residual.decode(codes, thetas)) ** 2).sum() / (x * x).sum())


def icm(x: torch.Tensor, codes: torch.Tensor, thetas: torch.Tensor, sweeps: int) -> torch.Tensor:
    """``sweeps`` passes over the stages; each stage's code becomes the nearest codeword of what the
    other stages leave of ``x``."""
    codes = codes.clone()
    approx = residual.decode(codes, thetas)
    for _ in range(sweeps):
        for r in range(thetas.shape[1]):
            mine = decode(thetas[:, r], codes[..., r])
            codes[..., r] = nearest(x - approx + mine, thetas[:, r])
            approx = approx - mine + decode(thetas[:, r], codes[..., r])
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--key_dir", required=True)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--rows", default="0:2048", help="start:end rows of the layer")
    ap.add_argument("--beams", default="1,8,16,32,64")
    ap.add_argument("--icm", type=int, default=2, help="ICM sweeps after each beam (0: none)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = encoder_for("auto", device)
    store = KVStore(args.key_dir)
    start, end = (int(v) for v in args.rows.split(":"))
    spec = ModelSpec.from_dict(store.settings["spec"])
    x, _ = residual.normalize(
        store.layer(args.layer).read(start, end).float().to(device), spec.num_kv_heads
    )
    x = x.contiguous()
    rows = []
    for folder in args.dirs:
        thetas = io.load_layer(Path(folder), args.layer, spec).to(device)
        for b in (int(v) for v in args.beams.split(",")):
            t0 = time.perf_counter()
            codes = enc(x, thetas, b)
            seconds = time.perf_counter() - t0
            row = {
                "dir": Path(folder).name,
                "beam": b,
                "error": relative_error(x, codes, thetas),
                "seconds": seconds,
            }
            if args.icm:
                row["error_icm"] = relative_error(x, icm(x, codes, thetas, args.icm), thetas)
            rows.append(row)
            print(
                f"{row['dir']:<44}{b:>5}{row['error']:>11.5f}"
                f"{row.get('error_icm', float('nan')):>11.5f}{seconds:>9.1f}",
                flush=True,
            )
    print(
        f"\n{device}  layer {args.layer}  rows {start}:{end} of {args.key_dir}  "
        f"commit {commit_id()}"
    )
    print(f"{'codebooks':<44}{'beam':>5}{'rel. MSE':>11}{'+ICM':>11}{'x greedy':>10}")
    for r in rows:
        base = next((q["error"] for q in rows if q["dir"] == r["dir"] and q["beam"] == 1), None)
        ratio = f"{r['error'] / base:>10.3f}" if base else f"{'-':>10}"
        print(
            f"{r['dir']:<44}{r['beam']:>5}{r['error']:>11.5f}"
            f"{r.get('error_icm', float('nan')):>11.5f}{ratio}"
        )
    print(
        json.dumps(
            {
                "bench": "beam_width",
                "device": device,
                "layer": args.layer,
                "rows": [start, end],
                "key_dir": args.key_dir,
                "results": rows,
                "icm_sweeps": args.icm,
                "commit": commit_id(),
            }
        )
    )


if __name__ == "__main__":
    main()
