#!/usr/bin/env python
"""What coarse-to-fine decoding drops, per layer and context length, on a real model: held-out
speeches prefilled exactly, then ``--steps`` tokens of the same speech decoded one at a time
(teacher forcing) through an exact-mode cache and through each coarse setting in lockstep.

Per setting and length: the share of compressed tokens dropped, the attention mass the exact
softmax gives them against the mass the stored bound allows (mean and largest per query row),
the share each margin's safe bound alone would prune, and the next-token KL of the coarse cache
to the exact mode. Per layer: the same, pooled over lengths.

    python benchmarks/coarse_prune.py --key_dir runs/gpu2/codebook_e2e_12bits_64group_11residuals \\
        --value_dir runs/dev/value_codec_2bit --lengths 1024,2048,4096 --steps 16 \\
        --settings "2:0.03125:64;4:0.03125:64"

A setting is ``S:keep:min_tokens[:exact layers[:pairs[:fill]]]`` (``2:0.125:32:0,1``; no exact
layers when left out, every RoPE pair unless ``pairs`` is given, fill ``none`` unless given;
:class:`commvq.quant.coarse.CoarseSettings`). A table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

from commvq.integrations.hf.attention import cache_kwargs, use_commvq
from commvq.integrations.hf.cache import CommVQCache
from commvq.integrations.hf.loader import load_model
from commvq.pipeline.evaluate import heldout_docs
from commvq.quant.coarse import CoarseSettings


def parse_settings(text: str) -> list[CoarseSettings]:
    out = []
    for part in text.split(";"):
        s, keep, least, *rest = part.split(":")
        layers = tuple(int(i) for i in rest[0].split(",") if i) if rest else ()
        pairs = float(rest[1]) if len(rest) > 1 and rest[1] else 1.0
        fill = rest[2] if len(rest) > 2 else "none"
        out.append(
            CoarseSettings(
                int(s), float(keep), int(least), exact_layers=layers, pairs=pairs, fill=fill
            )
        )
    return out


@torch.no_grad()
def run_length(model, ids, n, steps, make, settings) -> dict:
    """Prefill ``ids[:n]`` exactly, then decode ``steps`` tokens with every cache in lockstep."""
    from commvq.evals.synthetic import exact_prefill

    class _P:  # exact_prefill takes a probe
        pass

    probe = _P()
    probe.ids = ids[:n]
    pre = exact_prefill(model, probe)
    caches = {"exact": make(None)}
    logs = {}
    for s in settings:
        caches[s] = make(s)
        logs[s] = []
        caches[s].record_coarse(logs[s])
    for cache in caches.values():
        cache.load_prefill(pre.keys, pre.values)
    kl = defaultdict(float)
    for t in range(n, n + steps):
        x = torch.tensor([[ids[t]]], device=model.device)
        logp = {
            k: torch.log_softmax(model(x, **cache_kwargs(model, c)).logits[0, -1].float(), -1)
            for k, c in caches.items()
        }
        for s in settings:
            kl[s] += float((logp["exact"].exp() * (logp["exact"] - logp[s])).sum()) / steps
    return {s: {"log": logs[s], "kl": kl[s]} for s in settings}


def summary(entries: list[dict]) -> dict:
    mean = lambda k: sum(e[k] for e in entries) / len(entries)  # noqa: E731
    return {
        "dropped_share": mean("dropped_share"),
        "mass_dropped": mean("mass_dropped"),
        "mass_dropped_max": max(e["mass_dropped_max"] for e in entries),
        "mass_bound": mean("mass_bound"),
        "mass_bound_max": max(e["mass_bound_max"] for e in entries),
        **{k: mean(k) for k in entries[0] if k.startswith(("bound_prunes", "mass_dropped_"))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--key_dir", required=True)
    ap.add_argument("--value_dir", default=None)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--settings", default="2:0.03125:64;4:0.03125:64")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device)
    use_commvq(lm.model)
    settings = parse_settings(args.settings)
    lengths = [int(x) for x in args.lengths.split(",")]
    docs = heldout_docs(lm.tokenizer, args.docs, max(lengths) + args.steps)
    loaded = {}

    def make(s):
        """A cache for setting ``s`` (None: exact mode); codebooks and codec read once per S."""
        key = None if s is None else (s.stages, s.pairs)
        if key in loaded:
            keys, values = loaded[key]
            return CommVQCache(len(lm.model.model.layers), keys, values, args.window, coarse=s)
        cache = CommVQCache.from_pretrained(
            lm.model,
            args.key_dir,
            args.value_dir,
            window=args.window,
            decode="exact" if s is None else "coarse",
            coarse=s,
        )
        loaded[key] = (cache.keys_part, cache.values_part)
        return cache

    rows = []
    t0 = time.perf_counter()
    for n in lengths:
        for d, ids in enumerate(docs):
            for s, res in run_length(lm.model, ids, n, args.steps, make, settings).items():
                rows.append(
                    {
                        "length": n,
                        "doc": d,
                        "setting": s.__dict__,
                        "kl": res["kl"],
                        "log": res["log"],
                    }
                )
            print(f"length {n} doc {d}: {time.perf_counter() - t0:.0f} s", flush=True)
    device = str(lm.model.device)
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"model {lm.name}; keys {args.key_dir}; values {args.value_dir}; {card}; "
        f"commit {commit_id()}; {args.steps} decode steps per length and speech"
    )
    print(
        f"{'S:keep:min':>12} {'length':>7} {'dropped':>8} {'mass dropped':>13} {'max':>8} "
        f"{'bound':>9} {'max':>9} {'safe m=0/5/10':>18} {'KL vs exact mode':>17} "
        f"{'oracle':>8} {'per head':>8} {'oracle/head':>11}"
    )
    out = []
    for s in settings:
        name = f"{s.stages}:{s.keep:g}:{s.min_tokens}:" + ",".join(map(str, s.exact_layers))
        name += f":{s.pairs:g}" if s.pairs < 1 or s.fill != "none" else ""
        name += f":{s.fill}" if s.fill != "none" else ""
        for n in lengths:
            sel = [r for r in rows if r["length"] == n and r["setting"] == s.__dict__]
            sm = summary([e for r in sel for e in r["log"]])
            kl = sum(r["kl"] for r in sel) / len(sel)
            out.append({"setting": name, "length": n, "kl_exact_mode": kl, **sm})
            print(
                f"{name:>12} {n:>7} {sm['dropped_share']:>8.3f} {sm['mass_dropped']:>13.5f} "
                f"{sm['mass_dropped_max']:>8.4f} {sm['mass_bound']:>9.3g} "
                f"{sm['mass_bound_max']:>9.3g} "
                f"{sm['bound_prunes_m0']:>6.3f}/{sm['bound_prunes_m5']:.3f}/"
                f"{sm['bound_prunes_m10']:.3f} {kl:>17.5f} {sm['mass_dropped_oracle']:>8.4f} "
                f"{sm['mass_dropped_per_head_coarse']:>8.4f} "
                f"{sm['mass_dropped_per_head_oracle']:>11.4f}"
            )
        per_layer = defaultdict(list)
        for r in rows:
            if r["setting"] == s.__dict__:
                for e in r["log"]:
                    per_layer[e["layer"]].append(e)
        layers = {layer: summary(v) for layer, v in sorted(per_layer.items())}
        out.append({"setting": name, "per_layer": layers})
        print(
            f"{name}: per layer, mass dropped (mean): "
            + ", ".join(f"{layer}: {v['mass_dropped']:.4f}" for layer, v in layers.items())
        )
    print(json.dumps({"bench": "coarse_prune", "card": card, "rows": out, "commit": commit_id()}))


if __name__ == "__main__":
    main()
