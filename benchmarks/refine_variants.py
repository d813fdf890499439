#!/usr/bin/env python
"""Settings of the least-squares refinement side by side on one layer: the kept round's held-out
key error in the keys' own scale (what ``config.json`` records) for each variant (commit weight,
stochastic-relaxation noise, beam, vector weights ``weighted=1``: the squared prescales, untied
tables ``untied=1``: the start's tables untied, a second table for the B index, each solve
taken whole ``search=0`` (default 1: the fraction of the solve's step that the beam encodes best
on a training sample), and the order ``progressive=1``: the start's stages joined one at a time,
all of them refined after each join; ``progressive=2``: each new stage fitted by EM to what
the beam leaves of the training keys), as a ratio to the starting codebooks' greedy error on
the same rows; ``--eval_beams`` scores the kept codebooks at other encoder widths too.

    python benchmarks/refine_variants.py --keys KEYS.pt --codebooks DIR --layer 14
        [--variants "cw=0.25;weighted=1;cw=0,noise=0.5;progressive=1"] [--rounds 10] [--beam 8]
        [--eval_beams 16,32,64]
    python benchmarks/refine_variants.py --key_dir runs/dev/data/key --train 0:131072 \\
        --heldout 245760:262144 --codebooks DIR --layer 14 --save KEYS.pt   (writes the rows once)

``KEYS.pt``: ``{"train": [n, Hkv*D], "heldout": [m, Hkv*D], "num_heads": Hkv, "head_dim": D}``,
one layer's keys before RoPE (small enough to carry to a lent GPU). Every variant starts from the
same codebooks and runs the same number of rounds; the fused encoders on a GPU, torch on a CPU.
A table and a last JSON line.
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
from commvq.quant import commutative, em, refine, residual
from commvq.spec import ModelSpec


def rows(text: str) -> tuple[int, int]:
    a, b = (int(t) for t in text.split(":"))
    return a, b


def parse_variants(text: str) -> list[dict[str, float]]:
    """``"cw=0.25;cw=0,noise=0.5"`` -> ``[{"cw": 0.25}, {"cw": 0.0, "noise": 0.5}]``."""
    out = []
    for part in text.split(";"):
        kv = dict(item.split("=") for item in part.split(",") if item)
        known = {"cw", "noise", "beam", "revive", "weighted", "progressive", "untied", "search"}
        bad = set(kv) - known
        if bad:
            raise SystemExit(
                f"--variants: unknown setting(s) {sorted(bad)}; use cw, noise, beam, revive, "
                "weighted, progressive, untied, search"
            )
        v = {k: float(x) for k, x in kv.items()}
        if v.get("progressive", 0) not in (0, 1, 2):
            raise SystemExit(f"--variants: progressive={v['progressive']:g}; use 0, 1 or 2")
        out.append(v)
    return out


def load_keys(args) -> dict:
    if args.keys and Path(args.keys).is_file() and not args.key_dir:
        return torch.load(args.keys, weights_only=True)
    from commvq.data.kvstore import KVStore

    store = KVStore(args.key_dir)
    spec = ModelSpec.from_dict(store.settings["spec"])
    layer = store.layer(args.layer)
    keys = {
        "train": layer.read(*rows(args.train)).clone(),  # not views of the shards' storage
        "heldout": layer.read(*rows(args.heldout)).clone(),
        "num_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
    }
    if args.save:
        torch.save(keys, args.save)
    return keys


PROGRESSIVE_EM = em.EMSettings(max_iters=10)  # a new stage's fit under ``progressive=2``


def progressive(
    x: torch.Tensor,
    s_train: torch.Tensor,
    held: torch.Tensor,
    start: torch.Tensor,
    settings: refine.RefineSettings,
    how: int,
    **weights,
) -> refine.RefineResult:
    """Stages joined one at a time, every stage so far refined after each join: the start's next
    stage (``how`` 1) or one fitted by EM (10 iterations) to what the beam leaves of
    ``x`` (``how`` 2). The last join's refinement is the result (its history is the last join's)."""
    thetas = start[:, :1]
    gen = torch.Generator().manual_seed(settings.seed)
    for r in range(start.shape[1]):
        if r:
            if how == 1:
                new = start[:, r : r + 1]
            else:
                left = x - residual.decode(settings.encode_fn(x, thetas, settings.beam), thetas)
                fit = em.fit_stage(
                    left.contiguous(), s_train, start.shape[2] // 2, r, PROGRESSIVE_EM, gen
                )
                new = fit.theta[:, None].to(start.dtype)
            thetas = torch.cat((thetas, new), 1)
        res = refine.refine(x, held, thetas, settings, **weights)
        thetas = res.thetas
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", default="", help="one layer's rows, as --save writes them")
    ap.add_argument("--key_dir", default="", help="a collected key store (instead of --keys)")
    ap.add_argument("--train", default="0:131072")
    ap.add_argument("--heldout", default="245760:262144")
    ap.add_argument("--save", default="", help="write the rows read from --key_dir here")
    ap.add_argument("--codebooks", required=True, help="the starting codebook folder (e.g. EM's)")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--variants", default="cw=0.25;cw=0;cw=0,noise=0.5;cw=0.25,noise=0.5")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--beam", type=int, default=8)
    ap.add_argument(
        "--eval_beams", default="", help="more encoder widths to score the kept codebooks at"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wide = [int(t) for t in args.eval_beams.split(",") if t]  # more widths to score the kept at
    keys = load_keys(args)
    h = keys["num_heads"]
    x, s_train = residual.normalize(keys["train"].float().to(device), h)
    held, s_held = residual.normalize(keys["heldout"].float().to(device), h)
    x, held = x.contiguous(), held.contiguous()
    w_train, w_held = s_train**2, s_held**2  # the error in the keys' own scale
    spec = ModelSpec.from_dict(
        json.loads((Path(args.codebooks) / "config.json").read_text())["spec"]
    )
    start = io.load_layer(Path(args.codebooks), args.layer, spec).to(device)
    encode = encoder_for("auto", device)
    base = refine.relative_error(held, start, 1, encode_fn=encode, weights=w_held)
    results = []
    for v in parse_variants(args.variants):
        beam = int(v.get("beam", args.beam))
        settings = refine.RefineSettings(
            rounds=args.rounds,
            beam=beam,
            commit_weight=v.get("cw", 0.25),
            noise=v.get("noise", 0.0),
            revive=v.get("revive", 0.0),
            step="search" if v.get("search", 1) else "full",
            encode_fn=encode,
        )
        t0 = time.perf_counter()
        weighted = bool(v.get("weighted", 0))
        w = (w_train, w_held) if weighted else (None, None)
        how = int(v.get("progressive", 0))
        if how:
            res = progressive(
                x, s_train, held, start, settings, how, weights=w[0], heldout_weights=w[1]
            )
        else:
            first = commutative.untie(start) if v.get("untied", 0) else start
            res = refine.refine(x, held, first, settings, weights=w[0], heldout_weights=w[1])
        seconds = time.perf_counter() - t0
        own = refine.relative_error(held, res.thetas, beam, encode_fn=encode, weights=w_held)
        unit = refine.relative_error(held, res.thetas, beam, encode_fn=encode)
        results.append(
            {
                "variant": v,
                "beam": beam,
                "start_ratio": refine.relative_error(
                    held, start, beam, encode_fn=encode, weights=w_held
                )
                / base,
                "per_round": [r.heldout for r in res.history],  # in the variant's own metric
                "step_sizes": [r.step_size for r in res.history],
                "best_round": res.best_round,
                "best_ratio": own / base,
                "unit_error": unit,
                "seconds": seconds,
                "wider": {
                    b: refine.relative_error(held, res.thetas, b, encode_fn=encode, weights=w_held)
                    / base
                    for b in wide
                },
            }
        )
        print(json.dumps(results[-1]), flush=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"card {card}; commit {commit_id()}; layer {args.layer}; {x.shape[1]:,} training rows, "
        f"{held.shape[1]:,} held out; the start's greedy held-out relative MSE in the keys' own "
        f"scale {base:.5f} (= 1); 'unit': the kept round's error of the unit-norm keys"
    )
    print(
        f"{'variant':<24}{'beam':>5}{'start':>8}{'kept':>8}{'round':>6}{'unit':>9}{'s':>7}"
        + "".join(f"{'beam ' + str(b):>9}" for b in wide)
    )
    for r in results:
        name = ",".join(f"{k}={v:g}" for k, v in r["variant"].items()) or "defaults"
        print(
            f"{name:<24}{r['beam']:>5}{r['start_ratio']:>8.4f}{r['best_ratio']:>8.4f}"
            f"{r['best_round']:>6}{r['unit_error']:>9.5f}{r['seconds']:>7.1f}"
            + "".join(f"{r['wider'][b]:>9.4f}" for b in wide)
        )
    print(
        json.dumps(
            {
                "bench": "refine_variants",
                "card": card,
                "layer": args.layer,
                "base_greedy": base,
                "results": results,
                "commit": commit_id(),
            }
        )
    )


if __name__ == "__main__":
    main()
