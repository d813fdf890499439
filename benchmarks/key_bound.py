#!/usr/bin/env python
"""Key-codebook errors against the Gaussian rate-distortion bound of the same keys, per layer.

    python benchmarks/key_bound.py DIR [DIR ...] --key_dir runs/heldout/data/key
        [--rows 0:4096] [--layers 0,14,29] [--baseline DIR] [--plot PNG]

For each layer the held-out keys (rows of a collected store, in their own scale) give the
relative MSE a Gaussian source with their per-head mean and covariance reaches at the bits each
folder spends per head and token (12-bit codes x R stages, plus the 16-bit prescale shared by the
heads; ``--bound_rows`` may take the covariance from more rows than are encoded): no code does
better on such a source, and a key error near it leaves little to a better codebook of the same
rate unless it exploits the keys' shape beyond their covariance. Each folder
is scored on the same rows with the beam its config.json records (as the cache encodes). Ratios to
``--baseline`` (e.g. EM's folder of the same width) show what a target like "0.8x EM" asks of the
bound. A table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

from commvq import io
from commvq.data.kvstore import KVStore
from commvq.evals.keys import gaussian_bound, key_errors
from commvq.spec import ModelSpec


def bits_per_head(folder: Path, spec: ModelSpec) -> float:
    layout = io.check_fits(folder, spec)
    return layout.code_bits * layout.residuals + 16 / spec.num_kv_heads


def plot(path: str, rows: list[dict], dirs: list[Path], base: Path | None) -> None:
    """Each folder's error as a multiple of the bound, per layer (and 0.8x the baseline's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    for d in dirs:
        ax.plot(
            layers, [r["errors"][d.name] / r["bounds"][d.name] for r in rows], "o-", label=d.name
        )
    if base is not None:
        ratio = [0.8 * r["errors"][base.name] / r["bounds"][base.name] for r in rows]
        ax.plot(layers, ratio, "k--", label=f"0.8 x {base.name}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="layer", ylabel="held-out relative MSE / Gaussian bound")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="codebook folders")
    ap.add_argument(
        "--key_dir", required=True, help="held-out keys (`commvq collect --split heldout`)"
    )
    ap.add_argument("--rows", default="0:4096", help="start:end rows of each layer")
    ap.add_argument(
        "--bound_rows",
        default="",
        help="start:end rows the covariance is taken from (default: --rows)",
    )
    ap.add_argument("--layers", default="", help="comma-separated layers (default: every layer)")
    ap.add_argument("--baseline", default="", help="a folder among DIRS the others are divided by")
    ap.add_argument("--plot", default="", help="a PNG of each folder's error / bound per layer")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    store = KVStore(args.key_dir)
    spec = ModelSpec.from_dict(store.settings["spec"])
    start, end = (int(v) for v in args.rows.split(":"))
    b0, b1 = (int(v) for v in (args.bound_rows or args.rows).split(":"))
    layers = (
        [int(v) for v in args.layers.split(",")] if args.layers else list(range(spec.num_layers))
    )
    dirs = [Path(d) for d in args.dirs]
    bits = {d: bits_per_head(d, spec) for d in dirs}
    base = Path(args.baseline) if args.baseline else None
    if base is not None and base not in dirs:
        raise SystemExit(f"--baseline {base}: not among the folders; list it with the others")
    rows = []
    for layer in layers:
        keys = store.layer(layer).read(start, end).float().to(device)
        keys = keys[torch.isfinite(keys).all(-1)]
        cov_keys = store.layer(layer).read(b0, b1).float()
        cov_keys = cov_keys[torch.isfinite(cov_keys).all(-1)]
        row = {"layer": layer, "errors": {}, "bounds": {}}
        for d in dirs:
            book = io.load_key_codebook(d, layer, spec).to(device)
            row["errors"][d.name] = key_errors(keys, book)["relative_mse"]
            row["bounds"][d.name] = gaussian_bound(cov_keys, spec.num_kv_heads, bits[d])
        rows.append(row)
        print(
            f"layer {layer:>3}  "
            + "  ".join(
                f"{d.name}: {row['errors'][d.name]:.5f} (bound {row['bounds'][d.name]:.5f})"
                for d in dirs
            ),
            flush=True,
        )

    def mean(key: str, name: str) -> float:
        return sum(r[key][name] for r in rows) / len(rows)

    print(
        f"\n{device}  rows {start}:{end} (bound from {b0}:{b1}) of {args.key_dir}  "
        f"layers {layers}  commit {commit_id()}"
    )
    head = f"{'codebooks':<44}{'bits/head':>10}{'rel. MSE':>10}{'bound':>10}{'x bound':>9}"
    print(head + (f"{'x base':>8}{'0.8 base / bound':>18}" if base else ""))
    summary = {}
    for d in dirs:
        err, bound = mean("errors", d.name), mean("bounds", d.name)
        summary[d.name] = {"bits_per_head": bits[d], "relative_mse": err, "bound": bound}
        line = f"{d.name:<44}{bits[d]:>10.1f}{err:>10.5f}{bound:>10.5f}{err / bound:>9.3f}"
        if base:
            b = mean("errors", base.name)
            summary[d.name]["x_baseline"] = err / b
            line += f"{err / b:>8.3f}{0.8 * b / bound:>18.3f}"
        print(line)
    if args.plot:
        plot(args.plot, rows, dirs, base)
    print(
        json.dumps(
            {
                "bench": "key_bound",
                "device": device,
                "rows": [start, end],
                "bound_rows": [b0, b1],
                "key_dir": args.key_dir,
                "layers": rows,
                "summary": summary,
                "baseline": base.name if base else None,
                "commit": commit_id(),
            }
        )
    )


if __name__ == "__main__":
    main()
