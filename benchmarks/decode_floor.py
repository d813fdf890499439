#!/usr/bin/env python
"""What assembling the keys from 12-bit codes costs at least on this card, measured, against FP16 SDPA's
whole decode step at the same shape (Llama-3.1-8B: 32 query heads, 8 KV heads x 128, batch 1).

Rows: FP16 SDPA over dense bf16 keys and values; the library's scores kernel; then stripped kernels
that do only the gathers of the key assembly (``a_A + i a_B`` summed over the R stages, in fp16,
then one number per token and KV head so nothing is optimized away; no rotation, no query):
(1) codes read from the packed rows as the library does, (2) codes made up from the token index
(no code reads), (3) as (2) but every stage reading stage 0's rows (16 KB a head: every read hits
L1). And the tensor-core route (the key as a one-hot ``[tokens, 2R E]`` times the codebook
``[2R E, D]``): its multiply-adds at the fastest matmul rate measured here on a large square
product, fp16 and (where supported) fp8. None of these floors includes the values side.

    python benchmarks/decode_floor.py [--context 131072] [--bits 2]

Prints a table and a last JSON line (``--small``: tiny shapes, runs under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id
from decode_attention import fp16_sdpa_ms, make_state, timed

from commvq import rope
from commvq.kernels import decode
from commvq.kernels.decode import _load_code


@triton.jit
def _gathers_only(a_ptr, codes_ptr, out_ptr, N, row_bytes, R: tl.constexpr, E: tl.constexpr, D: tl.constexpr,
                  P: tl.constexpr, HKV: tl.constexpr, CODE_BITS: tl.constexpr, BN: tl.constexpr,
                  READ_CODES: tl.constexpr, TABLE_STAGES: tl.constexpr):
    """The library scores kernel's key assembly alone: per token and KV head the 2R half-rows its
    codes select, summed in fp16; ``READ_CODES`` 0 makes the codes up from the token index;
    ``TABLE_STAGES`` 1 reads stage 0's rows for every stage (all L1 hits)."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    t = pid_n * BN + tl.arange(0, BN)
    tmask = t < N
    f = tl.arange(0, P)
    row = codes_ptr + t * row_bytes
    kre = tl.zeros([BN, P], tl.float16)
    kim = tl.zeros([BN, P], tl.float16)
    for r in range(R):
        if READ_CODES:
            code = _load_code(row, (h * R + r) * CODE_BITS, row_bytes, tmask, CODE_BITS)
        else:
            code = (((t ^ (t >> 5)) * 1103 + r * 977 + h * 131) >> 3) & (E * E - 1)
        rs = r % TABLE_STAGES
        ra = a_ptr + ((h * R + rs) * E + code // E)[:, None] * D + f[None, :]
        rb = a_ptr + ((h * R + rs) * E + code % E)[:, None] * D + f[None, :]
        kre += tl.load(ra) - tl.load(rb + P)
        kim += tl.load(ra + P) + tl.load(rb)
    tl.store(out_ptr + h * N + t, tl.sum((kre + kim).to(tl.float32), axis=1), mask=tmask)


def gathers_only(table, packed, read_codes: bool, table_stages: int, block: int = 64) -> torch.Tensor:
    hkv, r, e, d = table.shape
    n = packed.shape[1]
    out = torch.empty(hkv, n, device=table.device, dtype=torch.float32)
    _gathers_only[(triton.cdiv(n, block), hkv)](table, packed, out, n, packed.shape[2], R=r, E=e, D=d, P=d // 2,
                                                HKV=hkv, CODE_BITS=12, BN=block, READ_CODES=read_codes,
                                                TABLE_STAGES=table_stages or r, num_warps=4)
    return out


def matmul_tflops(device, dtype_name: str, size: int) -> float:
    """The fastest dense matmul rate measured here: ``size`` cubed, fp16 or fp8 (e4m3, ``_scaled_mm``)."""
    a = torch.randn(size, size, device=device, dtype=torch.float16)
    b = torch.randn(size, size, device=device, dtype=torch.float16)
    if dtype_name == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        ms = timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.float16), device)
    else:
        ms = timed(lambda: a @ b, device)
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--bits", type=int, default=2, choices=(1, 2))
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hq, hkv, d = (32, 8, 128) if not args.small else (4, 2, 16)
    n = args.context if not args.small else 100
    r = round(args.bits * d / 12)
    e = 64
    gen = torch.Generator().manual_seed(0)
    freqs = rope.inv_freq(d, 5e5).to(device)
    st = make_state(1, n, hkv, d, r, args.bits, device, gen)
    q = torch.randn(1, hq, d, generator=gen).to(device)
    table = decode.prepare_tables(st["thetas"], "regdecode16")[0]
    rows = []

    def add(part, ms, note=""):
        rows.append({"part": part, "ms": ms, "note": note})

    if device.type == "cuda":
        add("FP16 SDPA, whole step (dense bf16 K/V)", fp16_sdpa_ms(1, n, hq, hkv, d, device, torch.bfloat16))
    add("library scores kernel (gathers, rotation, dot)", timed(lambda: decode.commvq_scores_triton(
        q, st["kcodes"], st["prescale"], st["pos"], st["thetas"], freqs, 12, tables=(table,)), device))
    for label, read_codes, stages in (("gathers only, codes read", True, 0),
                                      ("gathers only, codes made up", False, 0),
                                      ("gathers only, codes made up, stage 0 rows only (L1)", False, 1)):
        add(label, timed(lambda rc=read_codes, s=stages: gathers_only(table, st["kcodes"], rc, s), device))
    gathered = n * hkv * 2 * r * d * 2  # bytes of the 2R fp16 rows of D values gathered per step
    macs = n * hkv * 2 * r * e * d  # one-hot [n, 2R E] @ [2R E, D] per KV head
    if device.type == "cuda":
        for name in ("fp16", "fp8"):
            try:
                tflops = matmul_tflops(device, name, 8192)
            except (RuntimeError, AttributeError, TypeError) as exc:  # no fp8 matmul on this card or build
                print(f"{name} matmul: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            add(f"one-hot keys on tensor cores, {name}, at the measured peak", 2 * macs / (tflops * 1e12) * 1e3,
                f"{tflops:.0f} TFLOPS on 8192^3")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    commit = commit_id()
    print(f"card {card}; commit {commit}; {args.bits}-bit (R={r}), context {n}, batch 1; Hq {hq}, Hkv {hkv}, "
          f"head_dim {d}; gathers {gathered / 1e9:.2f} GB, one-hot {2 * macs / 1e12:.2f} TFLOP per step")
    print(f"{'part':>56} {'ms':>8} {'gather TB/s':>12}  note")
    for row in rows:
        rate = gathered / (row["ms"] * 1e-3) / 1e12 if row["part"].startswith(("gathers", "library")) else float("nan")
        row["gather_tb_s"] = rate
        print(f"{row['part']:>56} {row['ms']:>8.3f} {rate:>12.1f}  {row['note']}")
    print(json.dumps({"bench": "decode_floor", "card": card, "commit": commit, "bits": args.bits, "context": n,
                      "gathered_bytes": gathered, "onehot_macs": macs, "rows": rows}))


if __name__ == "__main__":
    main()
