#!/usr/bin/env python
"""EM key-codebook training of one layer at Llama-3.1-8B shapes on a GPU.

    python benchmarks/em_layer.py [--num_samples 1000000] [--heads 8] [--head_dim 128] \
        [--residuals 21]

Data: synthetic key-like vectors (a decaying channel spectrum with a few outlier channels, per-token
norms over all heads), or ``--key_dir`` collected keys. Reports seconds per layer, peak GPU memory
and final error of commvq's EM (fused Triton E-step), and, on one head, the reference-style
unfused EM (a dense N x 4096 distance matrix per step, as the paper's code does) for
``--ref_iters`` iterations: time per iteration, and the stage-0 MSE of both on the same data
and initialization. Prints a table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

from commvq.quant import em
from commvq.quant.commutative import codewords
from commvq.quant.residual import normalize

KNOBS = (
    "bt",
    "warps_marginals",
    "warps_counts",
    "unroll",
    "tiles_per_prog_counts",
    "streams",
    "block",
)  # EStepTuning's sizes


def synthetic_keys(n: int, heads: int, head_dim: int, seed: int = 0, device="cuda") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    f = heads * head_dim
    spectrum = torch.exp(-torch.arange(f, device=device) / (f / 6))
    mix = torch.linalg.qr(torch.randn(f, f, device=device, generator=g))[0]
    k = (torch.randn(n, f, device=device, generator=g) * spectrum) @ mix.T
    k[:, torch.randperm(f, device=device, generator=g)[: f // 64]] *= 8.0  # outlier channels
    return k


def add_layer_args(ap: argparse.ArgumentParser, residuals: bool = True) -> None:
    """The layer options of the training benchmarks (Llama-3.1-8B shapes, 1M vectors by default)."""
    ap.add_argument("--num_samples", type=int, default=1_000_000)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=128)
    if residuals:
        ap.add_argument("--residuals", type=int, default=21)


def layer_keys(
    args: argparse.Namespace, seed: int = 0, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized synthetic keys ``x [H, N, D]`` (contiguous, as EM trains on) and prescales
    ``s``."""
    x, s = normalize(
        synthetic_keys(args.num_samples, args.heads, args.head_dim, seed, device), args.heads
    )
    return x.contiguous(), s


def reference_style_stage0(
    x: torch.Tensor, s: torch.Tensor, iters: int, seed: int
) -> tuple[float, float]:
    """The paper code's loop on one head: dense cdist, softmax, argmin, dense M-step.

    Returns (seconds per iteration, best hard MSE).
    """
    n, d = x.shape
    e = 64
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (1, e * e), generator=gen).to(x.device)
    centers = x[idx[0]]

    def dense_stats(centers_or_theta, tau, free):
        c = centers_or_theta if free else codewords(centers_or_theta)[0]
        dist = torch.cdist(x, c)
        gamma = torch.softmax(-dist / tau, 1)
        hard = dist.argmin(1)
        mse = (((x - c[hard]) * s[:, None]) ** 2).mean()
        g4 = gamma.view(n, e, e)
        stats = em.EStats(
            g4.sum(0)[None].double(),
            (g4.sum(2).T @ x)[None].double(),
            (g4.sum(1).T @ x)[None].double(),
            (x * x).sum()[None].double(),
            torch.zeros(1, dtype=torch.float64, device=x.device),
        )
        return stats, float(mse)

    stats, _ = dense_stats(centers, 1.0, True)
    theta = em.m_step(stats, dtype=x.dtype)
    best = math.inf
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(iters):
        tau = em.temperature(step, 100, 1e-3, 1e-5)
        stats, mse = dense_stats(theta, tau, False)
        best = min(best, mse)
        theta = em.m_step(stats, dtype=x.dtype)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters, best


def tune(x: torch.Tensor, s: torch.Tensor, base) -> tuple[dict, object]:
    """Time one unpruned fused E-step for a few kernel configurations of ``base`` (an
    ``EStepTuning``); the timings and the fastest configuration."""
    import dataclasses
    import itertools

    from commvq.kernels.em_estep import e_step_triton

    theta = torch.randn(x.shape[0], 128, x.shape[2] // 2, device=x.device) * 0.05
    results = []
    for bt, warps, unroll in itertools.product((32,), (4, 8), (1, 4)):
        tuning = dataclasses.replace(
            base, bt=bt, warps_marginals=warps, warps_counts=warps, unroll=unroll
        )
        e_step_triton(x, s, theta, 1e-3, prune=False, tuning=tuning)  # compile
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            e_step_triton(x, s, theta, 1e-3, prune=False, tuning=tuning)
        torch.cuda.synchronize()
        results.append(((time.perf_counter() - t0) / 3, (bt, warps, unroll), tuning))
        print(
            f"tune BT {bt:3d} warps {warps} unroll {unroll}: {results[-1][0] * 1e3:8.1f} ms",
            flush=True,
        )
    best = min(results, key=lambda r: r[0])
    return {"best_ms": best[0] * 1e3, "config": best[1]}, best[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_args(ap)
    ap.add_argument("--max_iters", type=int, default=100)
    ap.add_argument(
        "--ref_iters", type=int, default=5, help="reference-style iterations to time (0: skip)"
    )
    ap.add_argument("--estep", choices=("triton", "torch"), default="triton")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tune", action="store_true", help="try kernel block sizes first and use the fastest"
    )
    ap.add_argument(
        "--no_prune", action="store_true", help="evaluate every row of the distance table"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"an integer setting of commvq.kernels.em_estep ({', '.join(KNOBS)}); repeatable",
    )
    ap.add_argument(
        "--float32_products",
        action="store_true",
        help="x @ W in float32 on the CUDA cores instead of split float16 halves on tensor cores",
    )
    args = ap.parse_args()

    from commvq.kernels.em_estep import EStepTuning, e_step_triton

    knobs = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in KNOBS or not value.isdigit():
            raise SystemExit(
                f"--set {item}: expected NAME=INTEGER with NAME one of {', '.join(KNOBS)}"
            )
        knobs[name] = int(value)
    tuning = EStepTuning(split=not args.float32_products, **knobs)

    work = []

    def estep(*a, **kw):
        if args.estep == "torch":
            return em.e_step(*a, **kw)
        stats = e_step_triton(*a, **kw, prune=not args.no_prune, tuning=tuning)
        work.append(stats.work)
        return stats

    x, s = layer_keys(args, args.seed)
    tuned = None
    if args.tune:
        tuned, tuning = tune(x, s, tuning)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    stage_times = []
    t0 = time.perf_counter()

    def on_stage(r, res, err):
        torch.cuda.synchronize()
        stage_times.append((r, time.perf_counter() - t0, res.iters.tolist(), float(err.mean())))
        print(
            f"stage {r + 1:2d}: {stage_times[-1][1]:7.1f} s  iters {res.iters.tolist()}  "
            f"residual MSE {float(err.mean()):.6f}",
            flush=True,
        )

    from commvq.kernels.em_init import e_step_centers_triton
    from commvq.kernels.nearest import nearest_triton

    fitted = em.fit(
        x,
        s,
        args.residuals,
        64,
        em.EMSettings(max_iters=args.max_iters),
        seed=args.seed,
        estep=estep,
        on_stage=on_stage,
        init_estep=em.e_step_centers if args.estep == "torch" else e_step_centers_triton,
        nearest_fn=None if args.estep == "torch" else nearest_triton,
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
    peak_total = torch.cuda.max_memory_allocated() / 2**30
    final = float(fitted.residual_mse[-1].mean())
    rel = float(fitted.residual_mse[-1].sum() * args.head_dim / (s**2).mean())
    ours_stage0 = float(fitted.stage_mse[0, 0])
    total_iters = int(fitted.iters.sum())

    ref_iter_s, ref_stage0 = (float("nan"), float("nan"))
    if args.ref_iters:
        ref_iter_s, ref_stage0 = reference_style_stage0(x[0], s, args.ref_iters, args.seed)
    ours_iter_s = seconds / max(1, int(fitted.iters.max(1).values.sum()))
    card = torch.cuda.get_device_name()
    commit = commit_id()
    print(
        f"\ncard {card}  N {args.num_samples}  heads {args.heads} x {args.head_dim}  "
        f"R {args.residuals}  E-step {args.estep}  "
        f"products {'split float16' if tuning.split else 'float32'}"
    )
    print(f"{'what':<44}{'value':>14}")
    print(f"{'seconds per layer (all heads, all stages)':<44}{seconds:>14.1f}")
    print(f"{'EM iterations run (sum over heads, stages)':<44}{total_iters:>14d}")
    mean_work = float(sum(work) / len(work)) if work else 1.0
    print(f"{'share of distance-table rows evaluated':<44}{mean_work:>14.3f}")
    print(f"{'peak GPU memory during training (GiB)':<44}{peak:>14.2f}")
    print(f"{'peak GPU memory incl. data (GiB)':<44}{peak_total:>14.2f}")
    print(f"{'final MSE (original scale, mean of heads)':<44}{final:>14.6f}")
    print(f"{'relative key MSE':<44}{rel:>14.6f}")
    print(f"{'ours: seconds per batched iteration':<44}{ours_iter_s:>14.4f}")
    print(f"{'reference-style: seconds per iteration/head':<44}{ref_iter_s:>14.4f}")
    print(f"{'stage-0 MSE head 0: ours (full run)':<44}{ours_stage0:>14.6f}")
    print(
        f"{'stage-0 MSE head 0: reference-style':<44}{ref_stage0:>14.6f}  "
        f"(after {args.ref_iters} iterations)"
    )
    print(
        json.dumps(
            {
                "bench": "em_layer",
                "card": card,
                "num_samples": args.num_samples,
                "heads": args.heads,
                "head_dim": args.head_dim,
                "residuals": args.residuals,
                "estep": args.estep,
                "pruned": not args.no_prune,
                "split_products": tuning.split,
                "settings": knobs,
                "rows_evaluated": mean_work,
                "seconds_per_layer": round(seconds, 2),
                "total_iters": total_iters,
                "peak_gib": round(peak, 3),
                "peak_total_gib": round(peak_total, 3),
                "final_mse": final,
                "relative_mse": rel,
                "ours_iter_s": ours_iter_s,
                "ref_iter_s_per_head": ref_iter_s,
                "stage0_mse_ours": ours_stage0,
                "stage0_mse_ref": ref_stage0,
                "ref_iters": args.ref_iters,
                "stages": stage_times,
                "tuned": tuned,
                "commit": commit,
            }
        )
    )


if __name__ == "__main__":
    main()
