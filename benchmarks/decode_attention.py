#!/usr/bin/env python
"""Decode attention per layer per step at Llama-3.1-8B shapes (32 query heads, 8 KV heads x 128):
CommVQ kernels vs decode-then-attend vs FP16 SDPA, all in one run on one card; plus memory.
CommVQ's step is timed as launched from Python and as one CUDA graph (its GPU time alone).
Decode-then-attend twice: "naive", an unfused float32 torch decode; "fused", the strongest a user
would write, the decode in half precision compiled by ``torch.compile`` into fused kernels (on a
GPU), then SDPA.

    python benchmarks/decode_attention.py [--contexts 8192,32768,131072] \\
        [--batch 1 | --batch max] [--bits 2,1]

Random codes and codebooks (speed does not depend on their values). ``--batch max``: per context and
bit width, the largest batch whose cache fits beside Llama-3.1-8B's bf16 weights on this card (all
32 layers), timed for one layer; FP16 SDPA at that batch (one layer) and at its own largest batch.
Prints a table and a last JSON line. ``--small`` runs tiny shapes (also under TRITON_INTERPRET=1 on
a CPU, as a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from math import nan

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id
import torch.nn.functional as F

from commvq import rope
from commvq.codecs import cache_parts as parts
from commvq.kernels import decode
from commvq.quant import residual
from commvq.quant.binary import bits_from_index
from commvq.quant.commutative import decode_table
from commvq.quant.packing import pack_2bit, pack_codes, unpack_2bit, unpack_codes


def timed(fn, device, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def make_state(b, n, hkv, d, r, qbits, device, gen):
    """Random packed codes of ``b`` sequences of ``n`` tokens (random bytes are valid codes: every
    12-bit pattern is a code, every 2-bit pattern a value pattern), drawn on ``device``."""
    e = 64
    f = hkv * d
    dev_gen = torch.Generator(device=device).manual_seed(
        int(torch.randint(0, 2**31, (1,), generator=gen))
    )
    kbytes = pack_codes(torch.zeros(1, hkv * r, dtype=torch.long), 12).shape[-1]
    vbytes = pack_2bit(torch.zeros(1, f * qbits // 2, dtype=torch.long)).shape[-1]

    def rand_bytes(width):
        return torch.randint(
            0, 256, (b, n, width), generator=dev_gen, device=device, dtype=torch.uint8
        )

    st = {
        "thetas": (torch.randn(hkv, r, 2 * e, d // 2, generator=gen) * 0.1).to(device),
        "kcodes": rand_bytes(kbytes),
        "prescale": (torch.rand(b, n, generator=dev_gen, device=device) + 0.5).half(),
        "pos": torch.arange(n, dtype=torch.int32, device=device).expand(b, -1).contiguous(),
        "vcodes": rand_bytes(vbytes),
        "factor": torch.rand(b, n, generator=dev_gen, device=device).half(),
        "codebook": (torch.randn(f * qbits, f, generator=gen) / math.sqrt(f * qbits)).to(device),
        "scale": (torch.rand(f, generator=gen) + 0.5).to(device),
    }
    return st


def state_bytes(st) -> int:
    """What the compressed cache holds for ``st`` (codes and per-token scalars; not the
    codebooks)."""
    return sum(
        st[k].numel() * st[k].element_size()
        for k in ("kcodes", "prescale", "pos", "vcodes", "factor")
    )


def bytes_per_token(hkv, d, r, qbits) -> int:
    """What the compressed cache holds per token per layer."""
    return state_bytes(
        make_state(1, 1, hkv, d, r, qbits, torch.device("cpu"), torch.Generator().manual_seed(0))
    )


def graphed(fn, device):
    """``fn`` captured in a CUDA graph (replayed without the host's per-kernel launches), or None
    where it cannot be (no GPU)."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def ours(q, st, win_k, win_v, freqs, hkv, scaling, style="regdecode16"):
    """The cache's decode step: scores kernel (tables built once per layer, as the cache does),
    one softmax over compressed and window scores, values kernel, window values."""
    s_c = decode.commvq_scores_triton(
        q,
        st["kcodes"],
        st["prescale"],
        st["pos"],
        st["thetas"],
        freqs,
        12,
        scaling,
        style=style,
        tables=st["tables"][style],
    )
    s_w = parts.grouped(q.float()[:, :, None] * scaling, win_k.float().transpose(-1, -2))[:, :, 0]
    p = torch.softmax(torch.cat((s_c, s_w), -1), -1)
    n = s_c.shape[-1]
    out = parts.grouped(p[:, :, None, n:], win_v.float())[:, :, 0]
    return out + decode.commvq_values_triton(
        p[..., :n], st["vcodes"], st["factor"], st["codebook"], st["scale"], hkv, table=st["vtable"]
    )


def naive(q, st, win_k, win_v, freqs, hkv, r, qbits, dtype):
    """Decode every key and value to memory, rotate the keys, then SDPA."""
    b, n = st["kcodes"].shape[:2]
    d = q.shape[-1]
    codes = unpack_codes(st["kcodes"], hkv * r, 12).reshape(b * n, hkv, r).permute(1, 0, 2)
    k = residual.decode(codes, st["thetas"]).permute(1, 0, 2).reshape(b, n, hkv, d)
    k = scaled_rotated(k, st, freqs, dtype)
    v = dense_values(st, st["codebook"].to(dtype), qbits, hkv, dtype)
    kk, vv = torch.cat((k, win_k.to(dtype)), 2), torch.cat((v, win_v.to(dtype)), 2)
    return F.scaled_dot_product_attention(q[:, :, None].to(dtype), kk, vv, enable_gqa=True)


def scaled_rotated(k, st, freqs, dtype):
    """Decoded keys ``[B, n, Hkv, D]`` times their prescale, rotated to their positions:
    ``[B, Hkv, n, D]`` in ``dtype``."""
    k = k * st["prescale"].float()[..., None, None]
    ang = st["pos"].float()[..., None] * freqs
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    return rope.apply_rope(k, cos[:, :, None], sin[:, :, None]).transpose(1, 2).to(dtype)


def dense_values(st, codebook, qbits, hkv, dtype):
    """Every value decoded from its packed bits: ``[B, Hkv, n, D]`` in ``dtype``."""
    b, n = st["vcodes"].shape[:2]
    groups = codebook.shape[1] * qbits // 2
    bits = bits_from_index(unpack_2bit(st["vcodes"], groups)).to(dtype)
    v = (bits @ codebook) * (st["factor"].to(dtype)[..., None] * st["scale"].to(dtype))
    return v.reshape(b, n, hkv, -1).transpose(1, 2)


def dense_kv(st, table16, cb16, win_k, win_v, freqs, hkv, r, qbits, dtype):
    """The strongest decode-then-attend a user would write: every key and value decoded in ``dtype``
    from half-precision tables, rotated and scaled, the window appended; meant for ``torch.compile``
    (one fused kernel for the keys, the value bits expanded into one matrix product)."""
    b, n = st["kcodes"].shape[:2]
    e = table16.shape[2] // 2
    codes = unpack_codes(st["kcodes"], hkv * r, 12).reshape(b, n, hkv, r)
    heads = torch.arange(hkv, device=codes.device)[:, None]
    stages = torch.arange(r, device=codes.device)
    k = (
        table16[heads, stages, codes // e].float() + table16[heads, stages, e + codes % e].float()
    ).sum(-2)
    k = scaled_rotated(k, st, freqs, dtype)
    v = dense_values(st, cb16, qbits, hkv, dtype)
    return torch.cat((k, win_k.to(dtype)), 2), torch.cat((v, win_v.to(dtype)), 2)


_COMPILED = {}


def naive_fused(q, st, win_k, win_v, freqs, hkv, r, qbits, dtype, compiled=True):
    """:func:`dense_kv` (compiled once per bit width on a GPU), then SDPA (flash on an H100)."""
    fn = dense_kv
    if compiled and q.is_cuda:
        fn = _COMPILED.setdefault(qbits, torch.compile(dense_kv, dynamic=False))
    kk, vv = fn(st, st["table16"], st["codebook16"], win_k, win_v, freqs, hkv, r, qbits, dtype)
    return F.scaled_dot_product_attention(q[:, :, None].to(dtype), kk, vv, enable_gqa=True)


def measure(
    b, n, hq, hkv, d, r, bits, window, device, dtype, freqs, scaling, gen, extras=True
) -> dict:
    """One (bits, context) row: the three attentions timed on the same card (``extras=False``: not
    the fp32-table variant nor naive, whose dense keys and values do not fit at the largest
    batches)."""
    st = make_state(b, n, hkv, d, r, bits, device, gen)
    q = torch.randn(b, hq, d, generator=gen).to(device)
    win_k = torch.randn(b, hkv, window, d, generator=gen).to(device, dtype)
    win_v = torch.randn(b, hkv, window, d, generator=gen).to(device, dtype)
    k16, v16 = (
        torch.randn(b, hkv, n + window, d, device=device, dtype=dtype) for _ in range(2)
    )  # drawn there
    q16 = q[:, :, None].to(dtype)
    st["tables"] = {
        style: decode.prepare_tables(st["thetas"], style) for style in ("regdecode16", "regdecode")
    }
    st["vtable"] = decode.value_table(st["codebook"], st["scale"], hkv)
    t_ours = timed(lambda: ours(q, st, win_k, win_v, freqs, hkv, scaling), device)
    replay = graphed(lambda: ours(q, st, win_k, win_v, freqs, hkv, scaling), device)
    t_graph = timed(replay, device) if replay else nan
    t_fp32 = (
        timed(lambda: ours(q, st, win_k, win_v, freqs, hkv, scaling, "regdecode"), device)
        if extras
        else nan
    )
    t_naive = (
        timed(lambda: naive(q, st, win_k, win_v, freqs, hkv, r, bits, dtype), device)
        if extras
        else nan
    )
    st["table16"] = decode_table(st["thetas"]).to(torch.float16)
    st["codebook16"] = st["codebook"].to(dtype)
    t_fused = (
        timed(lambda: naive_fused(q, st, win_k, win_v, freqs, hkv, r, bits, dtype), device)
        if extras
        else nan
    )
    t_fp16 = timed(lambda: F.scaled_dot_product_attention(q16, k16, v16, enable_gqa=True), device)
    bytes_ours = state_bytes(st)
    bytes_fp16 = (k16.numel() + v16.numel()) * k16.element_size()
    return {
        "bits": bits,
        "context": n,
        "batch": b,
        "commvq_ms": t_ours,
        "commvq_graph_ms": t_graph,
        "commvq_fp32_tables_ms": t_fp32,
        "naive_ms": t_naive,
        "naive_fused_ms": t_fused,
        "fp16_sdpa_ms": t_fp16,
        "commvq_bytes": bytes_ours,
        "fp16_bytes": bytes_fp16,
        "commvq_GBps": bytes_ours / t_ours / 1e6,
        "fp16_GBps": bytes_fp16 / t_fp16 / 1e6,
        "ratio_vs_fp16": t_ours / t_fp16,
        "speedup_vs_naive": t_naive / t_ours,
        "speedup_vs_naive_fused": t_fused / t_ours,
    }


def parse_args(
    doc: str, contexts: str, extra: dict[str, str] | None = None
) -> tuple[argparse.Namespace, torch.device]:
    """The options the decode benchmarks share (plus ``extra``: option -> default), and the
    device they run on."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--contexts", default=contexts)
    ap.add_argument("--batch", default="1", help="sequences, or max (not decode_breakdown)")
    ap.add_argument("--bits", default="2,1", help="bit widths to run (not decode_breakdown)")
    ap.add_argument("--small", action="store_true")
    for name, default in (extra or {}).items():
        ap.add_argument(name, default=default)
    return ap.parse_args(), torch.device("cuda" if torch.cuda.is_available() else "cpu")


WEIGHTS = 16.06e9  # Llama-3.1-8B in bf16
LAYERS = 32


def largest_batch(total: int, n: int, per_token_layer: int) -> int:
    """Sequences of ``n`` tokens whose cache (all layers) fits beside the weights in ``total``
    bytes."""
    return int((total - WEIGHTS) // (per_token_layer * LAYERS * n)) if total else 1


def fp16_sdpa_ms(b, n, hq, hkv, d, device, dtype) -> float:
    """FP16 SDPA over ``b`` sequences of ``n`` dense keys and values."""
    k16, v16 = (torch.randn(b, hkv, n, d, device=device, dtype=dtype) for _ in range(2))
    q16 = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    return timed(lambda: F.scaled_dot_product_attention(q16, k16, v16, enable_gqa=True), device)


def main() -> None:
    args, device = parse_args(__doc__, "8192,32768,131072")
    hq, hkv, d, window = (32, 8, 128, 128) if not args.small else (4, 2, 16, 8)
    contexts = [int(c) for c in args.contexts.split(",")] if not args.small else [64, 200]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    freqs = rope.inv_freq(d, 5e5).to(device)
    scaling = d**-0.5
    gen = torch.Generator().manual_seed(0)
    total = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 0
    fp16_token = 2 * hkv * d * 2
    per_token = {bits: bytes_per_token(hkv, d, round(bits * d / 12), bits) for bits in (2, 1)}
    rows = []
    for bits in (int(x) for x in args.bits.split(",")):
        r = round(bits * d / 12)
        for n in contexts:
            b = largest_batch(total, n, per_token[bits]) if args.batch == "max" else int(args.batch)
            row = measure(
                b,
                n,
                hq,
                hkv,
                d,
                r,
                bits,
                window,
                device,
                dtype,
                freqs,
                scaling,
                gen,
                extras=args.batch != "max",
            )
            if args.batch == "max":
                b16 = max(1, largest_batch(total, n, fp16_token))
                t16 = fp16_sdpa_ms(b16, n + window, hq, hkv, d, device, dtype)
                row.update(
                    fp16_max_batch=b16,
                    fp16_at_max_ms=t16,
                    seq_per_ms_commvq=b / row["commvq_ms"],
                    seq_per_ms_fp16=b16 / t16,
                )
            rows.append(row)
            print(json.dumps(row), flush=True)  # progress, in case a long run is cut short
            if device.type == "cuda":
                torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    commit = commit_id()
    print(
        f"card {card}; commit {commit}; per layer per decode step; "
        f"Hq {hq}, Hkv {hkv}, head_dim {d}, window {window}"
    )
    print(
        f"{'bits':>4} {'context':>8} {'batch':>5} {'commvq ms':>10} {'graph ms':>9} "
        f"{'fp32tab ms':>10} {'naive ms':>9} {'fused ms':>9} {'fp16 ms':>8} {'vs fp16':>8} "
        f"{'vs naive':>9} {'vs fused':>9} {'commvq GB/s':>12} {'fp16 GB/s':>10}"
    )
    for r_ in rows:
        print(
            f"{r_['bits']:>4} {r_['context']:>8} {r_['batch']:>5} {r_['commvq_ms']:>10.3f} "
            f"{r_['commvq_graph_ms']:>9.3f} "
            f"{r_['commvq_fp32_tables_ms']:>10.3f} {r_['naive_ms']:>9.3f} "
            f"{r_['naive_fused_ms']:>9.3f} {r_['fp16_sdpa_ms']:>8.3f} {r_['ratio_vs_fp16']:>8.2f} "
            f"{r_['speedup_vs_naive']:>9.1f} "
            f"{r_['speedup_vs_naive_fused']:>9.1f} "
            f"{r_['commvq_GBps']:>12.0f} {r_['fp16_GBps']:>10.0f}"
        )
    if args.batch == "max":
        print("at each one's largest batch (whole model on this card): sequences per ms per layer")
        for r_ in rows:
            print(
                f"{r_['bits']:>4} {r_['context']:>8}  "
                f"CommVQ batch {r_['batch']}: {r_['seq_per_ms_commvq']:.2f}; "
                f"FP16 batch {r_['fp16_max_batch']} ({r_['fp16_at_max_ms']:.3f} ms): "
                f"{r_['seq_per_ms_fp16']:.2f}"
            )
    print(
        f"bytes per token per layer: fp16 {fp16_token}, commvq-2 {per_token[2]:.0f}, "
        f"commvq-1 {per_token[1]:.0f} "
        "(tokens that fit, every part counted: benchmarks/cache_memory.py)"
    )
    print(
        json.dumps(
            {
                "bench": "decode_attention",
                "card": card,
                "rows": rows,
                "bytes_per_token_layer": {
                    "fp16": fp16_token,
                    **{f"commvq{k}": v for k, v in per_token.items()},
                },
                "commit": commit,
            }
        )
    )


if __name__ == "__main__":
    main()
