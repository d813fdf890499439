#!/usr/bin/env python
"""The EM E-step's two float32 products at Llama-3.1-8B shapes: cuBLAS vs 3xTF32 Triton configs.

    python benchmarks/em_matmul.py [--tokens 1000000]

Per head (the E-step works a head at a time): ``uv = x @ W`` (``[N, 128] @ [128, 128]``) and the
marginal sums ``M^T x`` split over 4,096-token blocks. Prints microseconds per product and the
error against float64 on a slice, and a last JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

from commvq.kernels import matmul


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def split_cublas(a: torch.Tensor, b: torch.Tensor, split: int) -> torch.Tensor:
    t = a.shape[1] // split * split
    pa = a[:, :t].reshape(-1, split, a.shape[-1])
    pb = b[:, :t].reshape(-1, split, b.shape[-1])
    return torch.bmm(pa.transpose(1, 2), pb).double().sum(0, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.tokens // 4096 * 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, n, 128, device="cuda", generator=g)
    w = torch.randn(1, 128, 128, device="cuda", generator=g)
    marg = torch.rand(1, n, 128, device="cuda", generator=g)
    ref_uv = (x[:, :65536].double() @ w.double())
    ref_s = split_cublas(marg[:, :65536].double(), x[:, :65536].double(), 4096)
    err_cublas_uv = float((torch.bmm(x, w)[:, :65536].double() - ref_uv).abs().max() / ref_uv.abs().max())
    rows = [("cublas", "uv", timed(lambda: torch.bmm(x, w)), err_cublas_uv),
            ("cublas", "sums", timed(lambda: split_cublas(marg, x, 4096)),
             float((split_cublas(marg[:, :65536], x[:, :65536], 4096) - ref_s).abs().max() / ref_s.abs().max()))]
    for bm, bn, bk, warps, stages in itertools.product((64, 128), (128,), (16, 32), (4, 8), (3, 4)):
        matmul.BM, matmul.BN, matmul.BK, matmul.WARPS, matmul.STAGES = bm, bn, bk, warps, stages
        name = f"tf32x3 BM{bm} BN{bn} BK{bk} W{warps} S{stages}"
        try:
            us_uv = timed(lambda: matmul.bmm(x, w))
            err_uv = float((matmul.bmm(x[:, :65536], w).double() - ref_uv).abs().max() / ref_uv.abs().max())
            us_s = timed(lambda: matmul.split_sum_tn(marg, x, 4096))
            err_s = float((matmul.split_sum_tn(marg[:, :65536], x[:, :65536], 4096) - ref_s).abs().max()
                          / ref_s.abs().max())
        except Exception as err:  # noqa: BLE001 - a configuration that does not fit
            print(f"{name}: failed ({type(err).__name__})", flush=True)
            continue
        rows += [(name, "uv", us_uv, err_uv), (name, "sums", us_s, err_s)]
        print(f"{name}: uv {us_uv:8.0f} us (err {err_uv:.1e})  sums {us_s:8.0f} us (err {err_s:.1e})", flush=True)
    best = {p: min((r for r in rows if r[1] == p), key=lambda r: r[2]) for p in ("uv", "sums")}
    print(f"\n{'product':<8}{'cuBLAS us':>12}{'best 3xTF32 us':>16}  config")
    for p in ("uv", "sums"):
        cub = next(r for r in rows if r[0] == "cublas" and r[1] == p)
        print(f"{p:<8}{cub[2]:>12.0f}{best[p][2]:>16.0f}  {best[p][0]}")
    print(json.dumps({"bench": "em_matmul", "card": torch.cuda.get_device_name(), "tokens": n, "rows": rows,
                      "commit": commit_id()}))


if __name__ == "__main__":
    main()
