#!/usr/bin/env python
"""Coarse-to-fine decode against exact decode and FP16 SDPA, per layer per step, at Llama-3.1-8B
shapes (32 query heads, 8 KV heads x 128, window 128), all in one run on one card. Both CommVQ
modes run the cache's own step (``CommVQLayer._mixed`` on state built directly): launched from
Python and as one CUDA graph.

    python benchmarks/decode_coarse.py [--contexts 8192,32768,131072] [--batch 1 | --batch max]
        [--bits 2,1] [--variants "1:0.03125;2:0.03125;2:0.125"]

A variant is ``S:keep[:pairs[:fill[:select[:rerank]]]]``: the coarse pass sums the first S stages
(over ``pairs`` of the RoPE pairs, default all; ``fill``, ``select`` and ``rerank`` as
:class:`CoarseSettings` has them), and ``keep`` of the compressed tokens (at least
``--min_tokens``, default 256), picked by one top-k (or the radix select kernel), are rescored
exactly. Random codes, codebooks and codec (speed does not depend on their values; which tokens
are picked does not change the work).
``--mix``: the values' mix on its Triton kernel (``kernel``, the cache's default) or in torch (a
sum and a batched product); ``--fused 1`` (the default) or ``0``: the window's scores and the
softmax merge on their kernels or in torch (``CoarseSettings.fused``). ``--profile 1``: each
variant's kernels, launched (torch.profiler): per step how many of each and their GPU time, whose
sum set beside the graph's time shows what the gaps between kernels cost.
``--batch max``: the largest batch whose coarse cache fits beside Llama-3.1-8B's bf16 weights (all
32 layers), and FP16 SDPA at that batch and at its own largest.
A table and a last JSON line; ``--small``: tiny shapes (a CPU smoke test).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

try:
    from _meta import commit_id
    from _profile import kernel_times
except ImportError:
    from benchmarks._meta import commit_id
    from benchmarks._profile import kernel_times
from decode_attention import (
    bytes_per_token,
    fp16_sdpa_ms,
    graphed,
    largest_batch,
    make_state,
    parse_args,
    timed,
)

from commvq import rope
from commvq.codecs import cache_parts as parts
from commvq.codecs.key_codebook import KeyCodebook
from commvq.codecs.value_codec import ValueCodec
from commvq.integrations.hf import coarse_step
from commvq.integrations.hf.cache import CommVQLayer
from commvq.quant import coarse as cq
from commvq.quant.coarse import CoarseSettings


def make_layer(
    st, b, hkv, d, bits, window, freqs, device, dtype, gen, stages, pairs=1.0, mix_kernel=False
):
    """A cache layer holding ``st``'s codes (and a random bound byte per token and KV head)."""
    keys = parts.CommVQKeys(
        [KeyCodebook(st["thetas"], 12)], freqs, 1.0, coarse_stages=stages, coarse_pairs=pairs
    )
    codec = ValueCodec(1, hkv * d, bits, {0: st["scale"].cpu()}).to(device)
    values = parts.CommVQValues(codec, hkv, mix_kernel=mix_kernel)
    layer = CommVQLayer(0, keys, values, window=window)
    n = st["kcodes"].shape[1]
    tail = torch.randint(120, 220, (b, n, hkv), generator=gen, dtype=torch.uint8).to(device)
    layer.store = {
        "k": {"codes": st["kcodes"], "prescale": st["prescale"], "pos": st["pos"], "tail": tail},
        "v": {"codes": st["vcodes"], "factor": st["factor"]},
    }
    layer.num_compressed = n
    layer.win_k, layer.win_v = (
        torch.randn(b, hkv, window, d, generator=gen).to(device, dtype) for _ in range(2)
    )
    layer.win_pos = torch.arange(n, n + window, device=device).expand(b, -1)
    return layer


def step_ms(layer, q, scaling, device) -> tuple[float, float]:
    """The layer's decode step: launched, and replayed as one CUDA graph (nan without a GPU)."""
    fn = lambda: layer._mixed(q, None, scaling)  # noqa: E731
    replay = graphed(fn, device)
    return timed(fn, device), (timed(replay, device) if replay else float("nan"))


def parts_ms(layer, q, scaling, k, device) -> tuple[float, float, float]:
    """Parts of a coarse step: the coarse pass alone (ranks written, as the step runs it), and
    picking ``k`` tokens by those ranks with the radix select kernel (on a GPU) and by torch's
    top-k and sort, each replayed as a CUDA graph."""
    qs, store = q.float() * scaling, layer.store["k"]
    off = torch.zeros(qs.shape[0], qs.shape[1], 1, 1, device=qs.device)
    rank = layer.keys_part.coarse_rank(0, qs, store, off)

    def graph_timed(fn):  # a pick is several short kernels: launched, the host's time dominates
        return timed(graphed(fn, device) or fn, device)

    return (
        timed(lambda: layer.keys_part.coarse_rank(0, qs, store, off), device),
        graph_timed(lambda: coarse_step.pick(layer.keys_part, rank, k, "radix")),
        graph_timed(lambda: cq.pick(rank, k)),
    )


def kernels_per_step(fn, steps: int = 10) -> list[tuple[str, float, float]]:
    """``fn``'s GPU kernels, launched ``steps`` times under torch.profiler: ``(name, launches per
    step, microseconds per step)``, the costliest first (names cut to 70 characters)."""
    short = lambda n: n if len(n) <= 70 else n[:67] + "..."  # noqa: E731
    times = kernel_times(fn, steps)
    return sorted(((short(k), c, us) for k, (c, us) in times.items()), key=lambda x: -x[2])


def names(s, keep, pairs, fill="none", select="topk", rerank=0.0) -> tuple[str, str]:
    """The row keys of a variant and of its coarse pass."""
    tag = f"coarse_S{s}" + (f"_pairs{pairs:g}" if pairs < 1 else "")
    key = f"{tag}_keep{keep:g}" + (f"_fill{fill}" if fill != "none" else "")
    key += f"_rerank{rerank:g}" if rerank else ""
    return key + (f"_{select}" if select != "topk" else ""), f"{tag}_pass_ms"


def parse_variants(text: str) -> list[tuple[int, float, float, str, str, float]]:
    """``"1:0.03125;1:0.03125:0.5;2:0.125:1:coarse;1:0.03125:0.25:none:radix:2"`` ->
    ``[(S, keep, pairs, fill, select, rerank)]``."""
    out = []
    for v in text.split(";"):
        s, keep, *rest = v.split(":")
        rest += ["1", "none", "topk", "0"][len(rest) :]
        out.append((int(s), float(keep), float(rest[0]), rest[1], rest[2], float(rest[3])))
    return out


def measure(
    b, n, bits, variants, shapes, device, dtype, freqs, gen, profile=False, mix=False, fused=False,
    min_tokens=256,
) -> dict:  # fmt: skip
    hq, hkv, d, window = shapes
    r = round(bits * d / 12)
    st = make_state(b, n, hkv, d, r, bits, device, gen)
    q = torch.randn(b, hq, 1, d, generator=gen).to(device, dtype)
    layer = make_layer(st, b, hkv, d, bits, window, freqs, device, dtype, gen, None, 1.0, mix)
    exact, exact_graph = step_ms(layer, q, d**-0.5, device)
    row = {"bits": bits, "context": n, "batch": b, "exact_ms": exact, "exact_graph_ms": exact_graph}
    for s, pairs in sorted({(v[0], v[2]) for v in variants if v[0] < r}):
        layer.keys_part = make_layer(
            st, b, hkv, d, bits, window, freqs, device, dtype, gen, s, pairs
        ).keys_part
        layer.store["k"]["tail"] = torch.randint(120, 220, (b, n, hkv), dtype=torch.uint8).to(
            device
        )
        for s_, keep, p_, fill, select, rerank in variants:
            if (s_, p_) != (s, pairs):
                continue
            layer.coarse = CoarseSettings(
                stages=s,
                keep=keep,
                min_tokens=min_tokens,
                exact_layers=(),
                pairs=pairs,
                fill=fill,
                select=select,
                rerank=rerank,
                fused=fused,
            )
            key, pass_key = names(s, keep, pairs, fill, select, rerank)
            row[key + "_ms"], row[key + "_graph_ms"] = step_ms(layer, q, d**-0.5, device)
            row[key + "_tokens"] = k = layer.coarse.budget(n)
            timings = parts_ms(layer, q, d**-0.5, k, device)
            row[pass_key], row[key + "_pick_ms"], row[key + "_topk_ms"] = timings
            if profile and device.type == "cuda":
                row[key + "_kernels"] = kernels_per_step(lambda: layer._mixed(q, None, d**-0.5))
        layer.coarse = None
    layer.store = st = None  # free the codes before FP16's dense keys and values
    k16, v16 = (torch.randn(b, hkv, n + window, d, device=device, dtype=dtype) for _ in range(2))
    row["fp16_sdpa_ms"] = timed(
        lambda: F.scaled_dot_product_attention(q, k16, v16, enable_gqa=True), device
    )
    return row


def main() -> None:
    args, device = parse_args(
        __doc__,
        "8192,32768,131072",
        {
            "--variants": "1:0.03125;2:0.03125;1:0.0625;2:0.125",
            "--profile": "",
            "--mix": "kernel",
            "--fused": "1",
            "--min_tokens": "256",
        },
    )
    small = args.small
    if args.mix not in ("kernel", "torch") or args.fused not in ("0", "1"):
        raise SystemExit(f"--mix {args.mix} --fused {args.fused}: use kernel|torch and 1|0")
    fused = args.fused == "1"
    shapes = (32, 8, 128, 128) if not small else (4, 2, 16, 8)
    hq, hkv, d, window = shapes
    contexts = [int(c) for c in args.contexts.split(",")] if not small else [600]
    variants = (
        parse_variants(args.variants)
        if not small
        else parse_variants(
            "1:0.5;1:0.25;1:0.25:0.5;1:0.25:1:coarse;1:0.25:1:none:radix;1:0.25:0.5:none:topk:2"
        )
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    freqs = rope.inv_freq(d, 5e5).to(device)
    gen = torch.Generator().manual_seed(0)
    total = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 0
    rows = []
    for bits in (int(x) for x in args.bits.split(",")):
        per_token = bytes_per_token(hkv, d, round(bits * d / 12), bits) + hkv  # + the bound byte
        for n in contexts:
            b = largest_batch(total, n, per_token) if args.batch == "max" else int(args.batch)
            row = measure(
                b,
                n,
                bits,
                variants,
                shapes,
                device,
                dtype,
                freqs,
                gen,
                bool(args.profile),
                args.mix == "kernel",
                fused,
                int(args.min_tokens),
            )
            if args.batch == "max":
                b16 = max(1, largest_batch(total, n, 2 * hkv * d * 2))
                row.update(
                    fp16_max_batch=b16,
                    fp16_at_max_ms=fp16_sdpa_ms(b16, n + window, hq, hkv, d, device, dtype),
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"card {card}; commit {commit_id()}; values mixed by {args.mix}; window and merge "
        f"{'fused' if fused else 'in torch'}; per layer per decode step, ms (graph: one CUDA "
        "graph)"
    )
    for r_ in rows:
        fp16 = r_["fp16_sdpa_ms"]
        print(
            f"{r_['bits']}-bit {r_['context']:>7} x {r_['batch']:<4} FP16 SDPA {fp16:.3f}; "
            f"exact {r_['exact_ms']:.3f} / {r_['exact_graph_ms']:.3f} "
            f"({r_['exact_graph_ms'] / fp16:.2f}x)"
        )
        for s, keep, pairs, fill, select, rerank in variants:
            key, pass_key = names(s, keep, pairs, fill, select, rerank)
            if key + "_ms" in r_:
                g = r_[key + "_graph_ms"]
                print(
                    f"    S={s} keep {keep:g} pairs {pairs:g} fill {fill} {select} "
                    f"rerank {rerank:g} "
                    f"({r_[key + '_tokens']} tokens): "
                    f"{r_[key + '_ms']:.3f} / {g:.3f} ({g / fp16:.2f}x FP16); coarse pass "
                    f"{r_[pass_key]:.3f}, radix pick {r_[key + '_pick_ms']:.3f} (torch top-k "
                    f"{r_[key + '_topk_ms']:.3f})"
                )
                for name, count, us in r_.get(key + "_kernels", []):
                    print(f"        {count:5.1f} x {us:7.1f} us  {name}")
                if key + "_kernels" in r_:
                    ks = r_[key + "_kernels"]
                    print(
                        f"        kernels per step {sum(k[1] for k in ks):.1f}, their GPU time "
                        f"{sum(k[2] for k in ks) / 1e3:.3f} ms (graph {g:.3f})"
                    )
        if "fp16_max_batch" in r_:
            best = min(r_[k] for k in r_ if k.startswith("coarse") and k.endswith("_graph_ms"))
            print(
                f"    sequences/ms: coarse (best variant) {r_['batch'] / best:.2f}, FP16 at its "
                f"batch {r_['fp16_max_batch']}: {r_['fp16_max_batch'] / r_['fp16_at_max_ms']:.2f}"
            )
    print(
        json.dumps(
            {"bench": "decode_coarse", "card": card, "mix": args.mix, "fused": fused}
            | {"rows": rows}
            | {"commit": commit_id()}
        )
    )


if __name__ == "__main__":
    main()
