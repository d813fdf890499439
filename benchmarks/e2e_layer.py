#!/usr/bin/env python
"""E2E key-codebook training of one layer at Llama-3.1-8B shapes, the guide's defaults.

    python benchmarks/e2e_layer.py [--num_samples 1000000] [--epochs 100] [--batch_size 256]

Same synthetic key-like data as benchmarks/em_layer.py (same seed). Reports the k-means++ init
time, seconds per epoch, seconds per layer, peak GPU memory and held-out errors (relative, in
original scale). With ``--budget_s`` a run stops after the epoch that passes the budget and
projects the full run from the measured epochs (``complete: false`` in the JSON). Prints a table
and a last JSON line.
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
    from em_layer import add_layer_args, layer_keys
except ImportError:
    from benchmarks.em_layer import add_layer_args, layer_keys

from commvq.quant import e2e
from commvq.quant.residual import stage_errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_args(ap)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--holdout", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--torch_search", action="store_true", help="pure-torch codeword search (no Triton)"
    )
    ap.add_argument(
        "--budget_s",
        type=float,
        default=0.0,
        help=(
            "stop after the epoch that passes this many seconds and project the full run "
            "(0: no limit)"
        ),
    )
    args = ap.parse_args()

    x, s = layer_keys(args, args.seed)
    n_hold = int(args.num_samples * args.holdout)
    train_x, held_x, held_s = x[:, :-n_hold], x[:, -n_hold:], s[-n_hold:]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    thetas0 = e2e.init_kmeans(train_x, args.residuals, 64, torch.Generator().manual_seed(args.seed))
    torch.cuda.synchronize()
    t_init = time.perf_counter() - t0
    epoch_times = []
    kept = {"thetas": thetas0, "epoch": 0}

    class OutOfTime(Exception):
        pass

    def on_epoch(entry, best):
        torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - t0)
        if best is not None:
            kept["thetas"], kept["epoch"] = best, entry.epoch
        print(
            f"Epoch {entry.epoch}/{args.epochs} - Loss: {entry.loss:.4f}, "
            f"Recon: {entry.recon:.4f}, Commit: {entry.commit:.4f}  "
            f"held-out {entry.heldout:.5f}  {epoch_times[-1]:.1f} s",
            flush=True,
        )
        if args.budget_s and epoch_times[-1] > args.budget_s and entry.epoch < args.epochs:
            raise OutOfTime

    from commvq.kernels.encode import encode_triton_with_residuals

    settings = e2e.E2ESettings(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        encode_fn=None if args.torch_search else encode_triton_with_residuals,
    )
    complete = True
    try:
        e2e.train(train_x, held_x, thetas0, settings, seed=args.seed, on_epoch=on_epoch)
    except OutOfTime:
        complete = False
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    init_err = stage_errors(held_x, held_s, thetas0)[-1].sum() * args.head_dim / (held_s**2).mean()
    final_err = (
        stage_errors(held_x, held_s, kept["thetas"])[-1].sum() * args.head_dim / (held_s**2).mean()
    )
    per_epoch = (
        (epoch_times[-1] - epoch_times[0]) / max(1, len(epoch_times) - 1)
        if len(epoch_times) > 1
        else epoch_times[0] - t_init
    )
    epochs_run = len(epoch_times)
    projected = seconds if complete else epoch_times[0] + per_epoch * (args.epochs - 1)
    card = torch.cuda.get_device_name()
    commit = commit_id()
    print(
        f"\ncard {card}  N {args.num_samples}  heads {args.heads} x {args.head_dim}  "
        f"R {args.residuals}  epochs {args.epochs}  batch {args.batch_size}"
    )
    print(f"{'what':<46}{'value':>12}")
    print(f"{'k-means++ init (s)':<46}{t_init:>12.1f}")
    print(f"{'seconds per epoch':<46}{per_epoch:>12.2f}")
    print(f"{'epochs run':<46}{epochs_run:>12d}")
    print(f"{'seconds (init + epochs run)':<46}{seconds:>12.1f}")
    print(
        f"{'seconds per layer (' + ('measured' if complete else 'projected') + ')':<46}"
        f"{projected:>12.1f}"
    )
    print(f"{'peak GPU memory (GiB)':<46}{peak:>12.2f}")
    print(f"{'held-out relative key MSE, init':<46}{float(init_err):>12.5f}")
    print(f"{'held-out relative key MSE, best epoch':<46}{float(final_err):>12.5f}")
    print(f"{'best epoch':<46}{kept['epoch']:>12d}")
    print(
        json.dumps(
            {
                "bench": "e2e_layer",
                "card": card,
                "num_samples": args.num_samples,
                "heads": args.heads,
                "head_dim": args.head_dim,
                "residuals": args.residuals,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "init_s": round(t_init, 2),
                "epoch_s": round(per_epoch, 3),
                "seconds_per_layer": round(projected, 2),
                "complete": complete,
                "epochs_run": epochs_run,
                "seconds_run": round(seconds, 2),
                "peak_gib": round(peak, 3),
                "heldout_rel_mse_init": float(init_err),
                "heldout_rel_mse_best": float(final_err),
                "best_epoch": kept["epoch"],
                "commit": commit,
            }
        )
    )


if __name__ == "__main__":
    main()
