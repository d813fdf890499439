#!/usr/bin/env python
"""Key-codebook training of one layer, every way side by side: held-out error against training time.

    python benchmarks/key_training.py [--key_dir runs/x/data/key --layer 14] [--residuals 11]
        [--beams 1,2,4,8,16] [--rounds 4] [--adam_budget_s 90] [--encode_tokens 131072]
        [--plot out.png]

Data: a collected store's layer, or without ``--key_dir`` synthetic key-like vectors at
Llama-3.1-8B shapes (benchmarks/em_layer.py): of the first ``--num_samples`` rows 95% train and 5%
validate, and the 16,384 rows after them are the held-out rows nobody trains on (as train-keys).
Methods, all from the same rows: the paper's EM (greedy codes, and the same codebooks under each
beam), E2E by joint least squares from EM's result for each beam width (``--solver lstsq``; with
the paper's tied tables and untied, ``--tables``; each round's step searched or taken whole,
``--steps``), and
E2E by Adam from a k-means++ start (the guide's settings, stopped after ``--adam_budget_s``).
Reports each method's time (its start included), held-out relative key error and peak GPU memory,
the encode time per beam width over ``--encode_tokens`` tokens, a PNG of held-out
(validation-row) error against training time, and a last JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

try:
    from _meta import commit_id
    from em_layer import add_layer_args, layer_keys
except ImportError:
    from benchmarks._meta import commit_id
    from benchmarks.em_layer import add_layer_args, layer_keys

from commvq.codecs.key_codebook import encoder_for
from commvq.pipeline.key_rows import EVAL_SAMPLES
from commvq.pipeline.train_keys import resolve_encoder, resolve_estep
from commvq.quant import e2e, em, refine
from commvq.quant.commutative import untie
from commvq.quant.residual import decode, normalize

CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0


def load_rows(args) -> tuple[torch.Tensor, ...]:
    """``(train x, train prescales, validation x, held-out x, held-out prescales, what)``,
    normalized, on the GPU."""
    if args.key_dir:
        from commvq.data.kvstore import KVStore

        store = KVStore(args.key_dir)
        heads = store.settings["spec"]["num_kv_heads"]
        n = min(args.num_samples, store.num_tokens - EVAL_SAMPLES)
        k = store.layer(args.layer).read(0, n + EVAL_SAMPLES).float().to("cuda" if CUDA else "cpu")
        x, s = normalize(k, heads)
        what = f"{Path(args.key_dir).parent.parent.name or args.key_dir} keys, layer {args.layer}"
    else:
        n = args.num_samples
        x, s = layer_keys(
            argparse.Namespace(**{**vars(args), "num_samples": n + EVAL_SAMPLES}),
            0,
            "cuda" if CUDA else "cpu",
        )
        what = f"synthetic {args.heads} x {args.head_dim}"
    n_val = int(n * 0.05)
    return (
        x[:, : n - n_val].contiguous(),
        s[: n - n_val],
        x[:, n - n_val : n].contiguous(),
        x[:, n : n + EVAL_SAMPLES].contiguous(),
        s[n : n + EVAL_SAMPLES],
        what,
    )


def rel(x: torch.Tensor, thetas: torch.Tensor, beam: int, enc) -> float:
    """Relative error of normalized keys (what training and selection see)."""
    return refine.relative_error(x, thetas, beam, encode_fn=enc)


def heldout(x: torch.Tensor, s: torch.Tensor, thetas: torch.Tensor, beam: int, enc) -> float:
    """``sum |k - k_hat|^2 / sum |k|^2`` in the keys' own scale (as config.json and
    compare-codebooks)."""
    left = x - decode(enc(x, thetas, beam), thetas)
    w = (s.double() ** 2)[None, :, None]
    return float((left.double() ** 2 * w).sum() / (x.double() ** 2 * w).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_args(ap)
    ap.add_argument("--key_dir", default="")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--code_bits", type=int, default=12)
    ap.add_argument("--max_iters", type=int, default=100)
    ap.add_argument(
        "--beams", default="1,2,4,8,16", help="beam widths for EM's codebooks and the encode timing"
    )
    ap.add_argument(
        "--lstsq_beams", default="", help="beam widths to train E2E lstsq with (default: --beams)"
    )
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tables", default="tied,untied", help="E2E lstsq table kinds to train")
    ap.add_argument(
        "--steps",
        default="search",
        help="E2E lstsq rounds' moves: search (the step size the beam encodes best), full (each "
        "solve as it is), or both",
    )
    ap.add_argument("--adam_budget_s", type=float, default=90.0, help="0: no Adam run")
    ap.add_argument("--encode_tokens", type=int, default=131072)
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    beams = [int(b) for b in args.beams.split(",")]
    beams = beams if 1 in beams else [1, *beams]  # EM's greedy error is every ratio's base
    if not set(args.tables.split(",")) <= {"tied", "untied"}:  # checked before EM's minute
        raise SystemExit(f"--tables {args.tables}: a comma list of tied, untied")
    if not set(args.steps.split(",")) <= set(refine.STEPS):
        raise SystemExit(f"--steps {args.steps}: a comma list of {', '.join(refine.STEPS)}")
    lstsq_beams = [int(b) for b in (args.lstsq_beams or args.beams).split(",")]
    e = 2 ** (args.code_bits // 2)
    x, s, xv, xh, sh, what = load_rows(args)
    h, n, d = x.shape
    enc = encoder_for("auto", x.device)
    estep, init_estep, nearest_fn = resolve_estep("auto", x.device)
    rows, curves = [], {}

    reset_peak()
    sync()
    t0 = time.perf_counter()
    fitted = em.fit(
        x,
        s,
        args.residuals,
        e,
        em.EMSettings(max_iters=args.max_iters),
        estep=estep,
        init_estep=init_estep,
        nearest_fn=nearest_fn,
    )
    sync()
    t_em = time.perf_counter() - t0
    em_peak = peak_gib()
    em_thetas = fitted.thetas
    curves["EM (greedy)"] = [(t_em, rel(xv, em_thetas, 1, enc))]
    for b in beams:
        rows.append(
            {
                "method": "em",
                "beam": b,
                "seconds": t_em,
                "heldout": heldout(xh, sh, em_thetas, b, enc),
                "peak_gib": em_peak,
            }
        )

    runs = [
        (k, b, st)
        for k in args.tables.split(",")
        for st in args.steps.split(",")
        for b in lstsq_beams
    ]
    for kind, b, step in runs:
        first = untie(em_thetas) if kind == "untied" else em_thetas
        reset_peak()
        points = [(t_em, rel(xv, em_thetas, b, enc))]
        sync()
        t1 = time.perf_counter()

        def on_round(log, best, points=points, t1=t1):
            sync()
            points.append((t_em + time.perf_counter() - t1, log.heldout))

        res = refine.refine(
            x,
            xv,
            first,
            refine.RefineSettings(rounds=args.rounds, beam=b, encode_fn=enc, step=step),
            on_round=on_round,
        )
        sync()
        seconds = t_em + time.perf_counter() - t1
        label = (
            f"E2E lstsq{', untied' if kind == 'untied' else ''}{', full steps' * (step == 'full')}"
        )
        curves[f"{label}, beam {b}"] = points
        peak = max(em_peak, peak_gib())
        rows.append(
            {
                "method": "e2e-lstsq" + "-untied" * (kind == "untied") + "-full" * (step == "full"),
                "beam": b,
                "seconds": seconds,
                "best_round": res.best_round,
                "step_sizes": [r.step_size for r in res.history],
                "heldout": heldout(xh, sh, res.thetas, b, enc),
                "peak_gib": peak,
            }
        )

    if args.adam_budget_s > 0:
        reset_peak()
        sync()
        t2 = time.perf_counter()
        start = e2e.init_kmeans(x, args.residuals, e, torch.Generator().manual_seed(0))
        sync()
        points = [(time.perf_counter() - t2, rel(xv, start, 1, enc))]
        kept = {"thetas": start}

        class OutOfTime(Exception):
            pass

        def on_epoch(log, best):
            sync()
            points.append((time.perf_counter() - t2, log.heldout))
            if best is not None:
                kept["thetas"] = best
            if points[-1][0] > args.adam_budget_s:
                raise OutOfTime

        settings = e2e.E2ESettings(
            epochs=100, lr=1e-3, batch_size=256, encode_fn=resolve_encoder("auto", x.device)
        )
        with contextlib.suppress(OutOfTime):
            e2e.train(x, xv, start, settings, on_epoch=on_epoch)
        curves["E2E Adam (k-means++ start)"] = points
        rows.append(
            {
                "method": "e2e-adam",
                "beam": 1,
                "seconds": points[-1][0],
                "epochs": len(points) - 1,
                "heldout": heldout(xh, sh, kept["thetas"], 1, enc),
                "peak_gib": peak_gib(),
            }
        )

    enc_rows = []
    xe = (
        torch.nn.functional.normalize(
            torch.randn(h, args.encode_tokens, d, device=x.device), dim=-1
        )
        / h**0.5
    )
    for b in beams:
        enc(
            xe, em_thetas, b
        )  # compiles: the same sizes as the timed call (triton specializes on them)
        sync()
        t3 = time.perf_counter()
        enc(xe, em_thetas, b)
        sync()
        enc_rows.append({"beam": b, "ms": (time.perf_counter() - t3) * 1e3})

    card, commit = torch.cuda.get_device_name() if CUDA else "cpu", commit_id()
    base = next(r["heldout"] for r in rows if r["method"] == "em" and r["beam"] == 1)
    print(
        f"\ncard {card}  {what}  train {n}  heads {h} x {d}  R {args.residuals}  "
        f"{args.code_bits}-bit codes  held-out rows {xh.shape[1]}  commit {commit}"
    )
    print(
        f"{'method':<23}{'beam':>5}{'seconds':>10}{'held-out rel. MSE':>19}{'x EM':>8}"
        f"{'peak GiB':>10}"
    )
    for r in rows:
        print(
            f"{r['method']:<23}{r['beam']:>5}{r['seconds']:>10.1f}{r['heldout']:>19.5f}"
            f"{r['heldout'] / base:>8.3f}{r['peak_gib']:>10.2f}"
        )
    print(f"\nencode {args.encode_tokens} tokens x {h} heads x {args.residuals} stages")
    print(f"{'beam':>5}{'ms':>10}")
    for r in enc_rows:
        print(f"{r['beam']:>5}{r['ms']:>10.1f}")
    if args.plot:
        plot(args.plot, curves, f"{what}, R={args.residuals}, {card}")
    print(
        json.dumps(
            {
                "bench": "key_training",
                "card": card,
                "data": what,
                "train_rows": n,
                "heads": h,
                "head_dim": d,
                "residuals": args.residuals,
                "code_bits": args.code_bits,
                "rows": rows,
                "encode": enc_rows,
                "curves": curves,
                "commit": commit,
            }
        )
    )


def plot(path: str, curves: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        t, v = zip(*pts, strict=True)
        ax.plot(t, v, marker="o" if len(pts) < 30 else None, label=name)
    ax.set_xlabel("training time (s), the start included")
    ax.set_ylabel("held-out relative key MSE (validation rows)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
