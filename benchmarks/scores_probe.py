#!/usr/bin/env python
"""Experiments on the decode kernels at Llama-3.1-8B shapes, one context, each variant timed against
the library's kernel in the same run. Round 1 (the variants measured at 577dcd9/8849ff3, which the
library then took up): a stage's two rows added in fp16, the query heads dotted one at a time, the
codebook read instead of the decode tables, stage groups, and a diagnostic that skips the rotation;
round 2: launch settings of the library's scores kernel and variants of the values kernel (fp16
weights written beforehand, bits as 0/1, wider bit blocks, pipeline stages); round 3: the values
kernel loading each bit's byte in the signs' shape, also with the product transposed (round 4, the
scores summed over stages in fp16 and the values' signs built by inline PTX, ran at commit 68fd2a7,
whose library kernels had those switches; none was adopted). Variants that
compute the true results print their largest difference from the library's, relative to the largest
score (or output).

    python benchmarks/scores_probe.py [--context 131072] [--round 3]

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
from decode_attention import make_state, timed

from commvq import rope
from commvq.kernels import decode
from commvq.kernels.decode import _load_code
from commvq.quant.commutative import decode_table


@triton.jit
def _probe_scores(m_ptr, codes_ptr, prescale_ptr, pos_ptr, freq_ptr, q_ptr, out_ptr, N, row_bytes, scale,
                  R: tl.constexpr, E: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
                  P: tl.constexpr, HKV: tl.constexpr, CODE_BITS: tl.constexpr, BN: tl.constexpr,
                  EPI: tl.constexpr, PAIR16: tl.constexpr, ROT: tl.constexpr, TAB: tl.constexpr,
                  GROUPS: tl.constexpr):
    """The library's regdecode16 scores with switches: ``PAIR16`` adds a stage's two fp16 rows in
    fp16 (its codeword) before the fp32 sum over stages; ``EPI`` 1 dots the key with each query head
    in turn (2-D sums) instead of one 3-D broadcast; ``ROT`` 0 skips the rotation (diagnostic);
    ``TAB`` 1 reads the codebook itself ``[Hkv, R, E, D]`` (``[Re a_e | Im a_e]``, half the bytes of
    the decode tables, so more of it stays in L1); ``GROUPS`` > 1 splits the stages over that many
    programs whose partial scores are added atomically (output zeroed first)."""
    pid_n = tl.program_id(0)
    hg = tl.program_id(1)
    b = tl.program_id(2)
    h = hg // GROUPS
    RG: tl.constexpr = (R + GROUPS - 1) // GROUPS
    t = pid_n * BN + tl.arange(0, BN)
    tmask = t < N
    f = tl.arange(0, P)
    row = codes_ptr + (b * N + t) * row_bytes
    kre = tl.zeros([BN, P], tl.float32)
    kim = tl.zeros([BN, P], tl.float32)
    for i in range(RG):
        r = (hg % GROUPS) * RG + i
        ok = tmask & (tl.zeros([BN], tl.int32) + r < R)
        code = _load_code(row, (h * R + r) * CODE_BITS, row_bytes, ok, CODE_BITS)
        if TAB:
            ra = m_ptr + ((h * R + r) * E + code // E)[:, None] * D + f[None, :]
            rb = m_ptr + ((h * R + r) * E + code % E)[:, None] * D + f[None, :]
            a_re = tl.load(ra, mask=ok[:, None], other=0.0)
            a_im = tl.load(ra + P, mask=ok[:, None], other=0.0)
            b_re = tl.load(rb, mask=ok[:, None], other=0.0)
            b_im = tl.load(rb + P, mask=ok[:, None], other=0.0)
            if PAIR16:
                kre += (a_re - b_im).to(tl.float32)
                kim += (a_im + b_re).to(tl.float32)
            else:
                kre += a_re.to(tl.float32) - b_im.to(tl.float32)
                kim += a_im.to(tl.float32) + b_re.to(tl.float32)
        else:
            ra = m_ptr + (((h * R + r) * 2 * E) + code // E)[:, None] * D + f[None, :]
            rb = m_ptr + (((h * R + r) * 2 * E) + E + code % E)[:, None] * D + f[None, :]
            if PAIR16:
                kre += (tl.load(ra, mask=ok[:, None], other=0.0) + tl.load(rb, mask=ok[:, None], other=0.0)).to(
                    tl.float32)
                kim += (tl.load(ra + P, mask=ok[:, None], other=0.0)
                        + tl.load(rb + P, mask=ok[:, None], other=0.0)).to(tl.float32)
            else:
                kre += (tl.load(ra, mask=ok[:, None], other=0.0).to(tl.float32)
                        + tl.load(rb, mask=ok[:, None], other=0.0).to(tl.float32))
                kim += (tl.load(ra + P, mask=ok[:, None], other=0.0).to(tl.float32)
                        + tl.load(rb + P, mask=ok[:, None], other=0.0).to(tl.float32))
    pre = tl.load(prescale_ptr + b * N + t, mask=tmask, other=0.0).to(tl.float32) * scale
    if ROT:
        pos = tl.load(pos_ptr + b * N + t, mask=tmask, other=0).to(tl.float32)
        ang = pos[:, None] * tl.load(freq_ptr + f)[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang)
        rre = kre * c - kim * s
        rim = kre * s + kim * c
    else:
        rre = kre
        rim = kim
    if EPI:
        for j in tl.static_range(G):
            q_re = tl.load(q_ptr + ((b * HKV + h) * G + j) * D + f)
            q_im = tl.load(q_ptr + ((b * HKV + h) * G + j) * D + P + f)
            score = tl.sum(rre * q_re[None, :] + rim * q_im[None, :], axis=1) * pre
            if GROUPS == 1:
                tl.store(out_ptr + ((b * HKV + h) * G + j) * N + t, score, mask=tmask)
            else:
                tl.atomic_add(out_ptr + ((b * HKV + h) * G + j) * N + t, score, mask=tmask)
    else:
        rre = rre * pre[:, None]
        rim = rim * pre[:, None]
        j = tl.arange(0, GQ)
        qmask = j[:, None] < G
        q_re = tl.load(q_ptr + ((b * HKV + h) * G + j[:, None]) * D + f[None, :], mask=qmask, other=0.0)
        q_im = tl.load(q_ptr + ((b * HKV + h) * G + j[:, None]) * D + P + f[None, :], mask=qmask, other=0.0)
        score = tl.sum(rre[:, None, :] * q_re[None, :, :] + rim[:, None, :] * q_im[None, :, :], axis=2)
        dst = out_ptr + ((b * HKV + h) * G + j[None, :]) * N + t[:, None]
        if GROUPS == 1:
            tl.store(dst, score, mask=tmask[:, None] & (j[None, :] < G))
        else:
            tl.atomic_add(dst, score, mask=tmask[:, None] & (j[None, :] < G))


def probe_scores(q, packed, prescale, positions, tables, inv_freq, r, scale, bn, warps, epi=0, pair16=0, rot=1, tab=0,
                 groups=1):
    """``tables``: (decode tables ``[Hkv, R, 2E, D]``, codebook ``[Hkv, R, E, D]``), both fp16."""
    table = tables[tab]
    b, hq, d = q.shape
    hkv = table.shape[0]
    n = packed.shape[1]
    g = hq // hkv
    out = (torch.zeros if groups > 1 else torch.empty)(b, hq, n, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(n, bn), hkv * groups, b)
    _probe_scores[grid](table, packed, prescale, positions, inv_freq.float().contiguous(), q.float().contiguous(),
                        out, n, packed.shape[2], scale, R=r, E=tables[1].shape[2], G=g,
                        GQ=triton.next_power_of_2(g), D=d, P=d // 2, HKV=hkv, CODE_BITS=12, BN=bn, EPI=epi,
                        PAIR16=pair16, ROT=rot, TAB=tab, GROUPS=groups, num_warps=warps)
    return out


@triton.jit
def _probe_values(p_ptr, factor_ptr, codes_ptr, out_ptr, N, row_bytes, tokens_per_prog,
                  HQ: tl.constexpr, HQP: tl.constexpr, NBITS: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
                  W16: tl.constexpr = False, ZERO_ONE: tl.constexpr = False):
    """The library's values kernel with each sign built as a float16 bit pattern (+-1.0: 0x3C00 with
    the sign bit set for a zero bit) instead of an integer-to-float conversion. ``W16``: ``p_ptr``
    holds the weights ``p * f`` already in fp16 (as a softmax could write them); ``ZERO_ONE``: the
    bits as {0, 1} (fewer operations), the +-1 sum recovered as ``2 acc - sum(w)``."""
    split = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2)
    k = kb * BF + tl.arange(0, BF)
    byte = kb * (BF // 8) + tl.arange(0, BF // 8)
    shift = (tl.arange(0, BF) % 8) ^ 1
    hq = tl.arange(0, HQP)
    acc = tl.zeros([HQP, BF], tl.float32)
    wsum = tl.zeros([HQP], tl.float32)
    start = split * tokens_per_prog
    for n0 in range(start, start + tokens_per_prog, BK):
        n = n0 + tl.arange(0, BK)
        nmask = n < N
        packed = tl.load(codes_ptr + (b * N + n[:, None]) * row_bytes + byte[None, :], mask=nmask[:, None],
                         other=0).to(tl.int32)
        wide = tl.reshape(tl.broadcast_to(packed[:, :, None], [BK, BF // 8, 8]), [BK, BF])
        bit = (wide >> shift[None, :]) & 1
        pattern = bit * 0x3C00 if ZERO_ONE else ((bit ^ 1) << 15) | 0x3C00
        signs = pattern.to(tl.int16).to(tl.float16, bitcast=True)
        if W16:
            w = tl.load(p_ptr + (b * HQ + hq[:, None]) * N + n[None, :], mask=(hq[:, None] < HQ) & nmask[None, :],
                        other=0.0)
        else:
            f = tl.load(factor_ptr + b * N + n, mask=nmask, other=0.0).to(tl.float32)
            p = tl.load(p_ptr + (b * HQ + hq[:, None]) * N + n[None, :], mask=(hq[:, None] < HQ) & nmask[None, :],
                        other=0.0)
            w = (p * f[None, :]).to(tl.float16)
        acc += tl.dot(w, signs)
        if ZERO_ONE:
            wsum += tl.sum(w.to(tl.float32), axis=1)
    if ZERO_ONE:
        acc = 2 * acc - wsum[:, None]
    tl.store(out_ptr + ((b * tl.num_programs(0) + split) * HQP + hq[:, None]) * NBITS + k[None, :], acc)


@triton.jit
def _probe_values_bytes(p_ptr, factor_ptr, codes_ptr, out_ptr, N, row_bytes, tokens_per_prog,
                        HQ: tl.constexpr, HQP: tl.constexpr, NBITS: tl.constexpr, BK: tl.constexpr,
                        BF: tl.constexpr, TRANS: tl.constexpr):
    """The values kernel with each bit's byte loaded in the signs' own shape (8 lanes read one byte;
    no broadcast-and-reshape of the packed bytes); ``TRANS``: the product taken as
    ``signs^T [BF, BK] @ w^T [BK, HQP]`` (the signs as the left operand)."""
    split = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2)
    hq = tl.arange(0, HQP)
    start = split * tokens_per_prog
    if TRANS:
        kt = kb * BF + tl.arange(0, BF)
        acc_t = tl.zeros([BF, HQP], tl.float32)
        for n0 in range(start, start + tokens_per_prog, BK):
            n = n0 + tl.arange(0, BK)
            nmask = n < N
            byte = tl.load(codes_ptr + (b * N + n[None, :]) * row_bytes + (kt // 8)[:, None], mask=nmask[None, :],
                           other=0).to(tl.int32)  # [BF, BK]
            bit = (byte >> ((kt % 8) ^ 1)[:, None]) & 1
            signs = (((bit ^ 1) << 15) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)
            f = tl.load(factor_ptr + b * N + n, mask=nmask, other=0.0).to(tl.float32)
            p = tl.load(p_ptr + (b * HQ + hq[None, :]) * N + n[:, None], mask=(hq[None, :] < HQ) & nmask[:, None],
                        other=0.0)  # [BK, HQP]
            acc_t += tl.dot(signs, (p * f[:, None]).to(tl.float16))
        tl.store(out_ptr + ((b * tl.num_programs(0) + split) * HQP + hq[None, :]) * NBITS + kt[:, None], acc_t)
    else:
        k = kb * BF + tl.arange(0, BF)
        acc = tl.zeros([HQP, BF], tl.float32)
        for n0 in range(start, start + tokens_per_prog, BK):
            n = n0 + tl.arange(0, BK)
            nmask = n < N
            byte = tl.load(codes_ptr + (b * N + n[:, None]) * row_bytes + (k // 8)[None, :], mask=nmask[:, None],
                           other=0).to(tl.int32)  # [BK, BF]
            bit = (byte >> ((k % 8) ^ 1)[None, :]) & 1
            signs = (((bit ^ 1) << 15) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)
            f = tl.load(factor_ptr + b * N + n, mask=nmask, other=0.0).to(tl.float32)
            p = tl.load(p_ptr + (b * HQ + hq[:, None]) * N + n[None, :], mask=(hq[:, None] < HQ) & nmask[None, :],
                        other=0.0)
            acc += tl.dot((p * f[None, :]).to(tl.float16), signs)
        tl.store(out_ptr + ((b * tl.num_programs(0) + split) * HQP + hq[:, None]) * NBITS + k[None, :], acc)


@triton.jit
def _bit_dot(acc, w, packed, BIT: tl.constexpr):
    """``acc += w @ signs`` for bit ``BIT`` of every byte column (bit ``BIT ^ 1`` of the byte, as the
    library's layout puts it): the packed bytes' own shape, no broadcast to one column per bit."""
    signs = (((((packed >> (BIT ^ 1)) & 1) ^ 1) << 15) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)
    return acc + tl.dot(w, signs)


@triton.jit
def _bytes_and_weights(p_ptr, factor_ptr, codes_ptr, b, n0, N, row_bytes, byte, hq, HQ: tl.constexpr,
                       BK: tl.constexpr):
    """One step of the values kernel's inputs: the packed bytes ``[BK, bytes]`` of tokens ``n0..``
    and the weights ``p f`` ``[HQP, BK]`` in fp16."""
    n = n0 + tl.arange(0, BK)
    nmask = n < N
    packed = tl.load(codes_ptr + (b * N + n[:, None]) * row_bytes + byte[None, :], mask=nmask[:, None],
                     other=0).to(tl.int32)
    f = tl.load(factor_ptr + b * N + n, mask=nmask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + (b * HQ + hq[:, None]) * N + n[None, :], mask=(hq[:, None] < HQ) & nmask[None, :], other=0.0)
    return packed, (p * f[None, :]).to(tl.float16)


@triton.jit
def _probe_values_pos(p_ptr, factor_ptr, codes_ptr, out_ptr, N, row_bytes, tokens_per_prog,
                      HQ: tl.constexpr, HQP: tl.constexpr, NBITS: tl.constexpr, BK: tl.constexpr,
                      BF: tl.constexpr, BATCHED: tl.constexpr):
    """The values kernel with one product per bit position of the bytes (``[HQP, BK] @ [BK, BF/8]``,
    8 of them) instead of one over ``BF`` bits broadcast from the bytes; ``BATCHED``: the 8 as one
    3-D product; else 8 accumulators."""
    split = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2)
    j = tl.arange(0, BF // 8)
    byte = kb * (BF // 8) + j
    hq = tl.arange(0, HQP)
    start = split * tokens_per_prog
    dst = out_ptr + ((b * tl.num_programs(0) + split) * HQP + hq[:, None]) * NBITS + kb * BF + 8 * j[None, :]
    if BATCHED:
        i = tl.arange(0, 8)
        acc = tl.zeros([8, HQP, BF // 8], tl.float32)
        for n0 in range(start, start + tokens_per_prog, BK):
            packed, w = _bytes_and_weights(p_ptr, factor_ptr, codes_ptr, b, n0, N, row_bytes, byte, hq, HQ, BK)
            bits = (packed[None, :, :] >> (i ^ 1)[:, None, None]) & 1
            signs = (((bits ^ 1) << 15) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)  # [8, BK, BF/8]
            acc += tl.dot(tl.broadcast_to(w[None, :, :], [8, HQP, BK]), signs)
        tl.store(dst[None, :, :] + i[:, None, None], acc)
    else:
        a0 = tl.zeros([HQP, BF // 8], tl.float32)
        a1 = tl.zeros([HQP, BF // 8], tl.float32)
        a2 = tl.zeros([HQP, BF // 8], tl.float32)
        a3 = tl.zeros([HQP, BF // 8], tl.float32)
        a4 = tl.zeros([HQP, BF // 8], tl.float32)
        a5 = tl.zeros([HQP, BF // 8], tl.float32)
        a6 = tl.zeros([HQP, BF // 8], tl.float32)
        a7 = tl.zeros([HQP, BF // 8], tl.float32)
        for n0 in range(start, start + tokens_per_prog, BK):
            packed, w = _bytes_and_weights(p_ptr, factor_ptr, codes_ptr, b, n0, N, row_bytes, byte, hq, HQ, BK)
            a0 = _bit_dot(a0, w, packed, 0)
            a1 = _bit_dot(a1, w, packed, 1)
            a2 = _bit_dot(a2, w, packed, 2)
            a3 = _bit_dot(a3, w, packed, 3)
            a4 = _bit_dot(a4, w, packed, 4)
            a5 = _bit_dot(a5, w, packed, 5)
            a6 = _bit_dot(a6, w, packed, 6)
            a7 = _bit_dot(a7, w, packed, 7)
        tl.store(dst, a0)
        tl.store(dst + 1, a1)
        tl.store(dst + 2, a2)
        tl.store(dst + 3, a3)
        tl.store(dst + 4, a4)
        tl.store(dst + 5, a5)
        tl.store(dst + 6, a6)
        tl.store(dst + 7, a7)


def probe_values_pos(probs, packed, factor, codebook, scale, hkv, bf=256, bk=64, warps=4, programs=512,
                     batched=False):
    b, hq, n = probs.shape
    nbits = codebook.shape[0]
    hqp = max(16, triton.next_power_of_2(hq))
    bf, tpp = decode.values_split(n, nbits, b, bf, bk, programs)
    splits = max(1, triton.cdiv(n, tpp))
    part = torch.empty(b, splits, hqp, nbits, device=probs.device, dtype=torch.float32)
    _probe_values_pos[(splits, nbits // bf, b)](probs.float().contiguous(), factor.contiguous(), packed.contiguous(),
                                                part, n, packed.shape[2], tpp, HQ=hq, HQP=hqp, NBITS=nbits, BK=bk,
                                                BF=bf, BATCHED=batched, num_warps=warps)
    return decode.mix_values(part, decode.value_table(codebook, scale, hkv), hq)


def probe_values(probs, packed, factor, codebook, scale, hkv, bf=256, bk=64, warps=4, programs=512, w16=False,
                 zero_one=False, stages=None, byte_loads=False, trans=False):
    b, hq, n = probs.shape
    nbits = codebook.shape[0]
    hqp = max(16, triton.next_power_of_2(hq))
    bf, tpp = decode.values_split(n, nbits, b, bf, bk, programs)
    splits = max(1, triton.cdiv(n, tpp))
    part = torch.empty(b, splits, hqp, nbits, device=probs.device, dtype=torch.float32)
    weights = (probs * factor[:, None, :]).half() if w16 else probs.float()  # w16: as a softmax could write
    extra = {"num_stages": stages} if stages else {}
    grid = (splits, nbits // bf, b)
    if byte_loads:
        _probe_values_bytes[grid](weights.contiguous(), factor.contiguous(), packed.contiguous(), part, n,
                                  packed.shape[2], tpp, HQ=hq, HQP=hqp, NBITS=nbits, BK=bk, BF=bf, TRANS=trans,
                                  num_warps=warps, **extra)
    else:
        _probe_values[grid](weights.contiguous(), factor.contiguous(), packed.contiguous(), part, n, packed.shape[2],
                            tpp, HQ=hq, HQP=hqp, NBITS=nbits, BK=bk, BF=bf, W16=w16, ZERO_ONE=zero_one,
                            num_warps=warps, **extra)
    return decode.mix_values(part, decode.value_table(codebook, scale, hkv), hq)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(bits, n, hq, hkv, d, freqs, device, gen, small) -> list[dict]:
    """Rows for one bit width: FP16 SDPA, the library's kernels and every variant."""
    rows = []
    r = round(bits * d / 12)
    st = make_state(1, n, hkv, d, r, bits, device, gen)
    q = torch.randn(1, hq, d, generator=gen).to(device)
    k16 = torch.randn(1, hkv, n, d, generator=gen).to(device, torch.bfloat16)
    v16 = torch.randn_like(k16)
    fp16 = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None].bfloat16(), k16, v16,
                                                                          enable_gqa=True), device)
    rows.append({"bits": bits, "part": "fp16_sdpa", "cfg": "", "ms": fp16, "rel": 0.0})
    table = decode.prepare_tables(st["thetas"], "regdecode16")[0]  # the codebook [Hkv, R, E, D], fp16
    tables = (decode_table(st["thetas"]).half().contiguous(), table)

    def lib(pos=st["pos"]):
        return decode.commvq_scores_triton(q, st["kcodes"], st["prescale"], pos, st["thetas"], freqs, 12, 0.1,
                                           tables=(table,))
    ref = lib()
    rows.append({"bits": bits, "part": "scores", "cfg": "library", "ms": timed(lib, device), "rel": 0.0})
    small_pos = (st["pos"] % 1000).contiguous()
    rows.append({"bits": bits, "part": "scores", "cfg": "library, positions < 1000",
                 "ms": timed(lambda: lib(small_pos), device), "rel": float("nan")})
    cfgs = [dict(bn=16, warps=4), dict(bn=16, warps=4, epi=1, pair16=1)]
    cfgs += [dict(bn=16, warps=4, epi=1, pair16=p, tab=1) for p in (0, 1)]
    cfgs += [dict(bn=32, warps=4, epi=1, pair16=1, tab=1), dict(bn=16, warps=8, epi=1, pair16=1, tab=1)]
    cfgs += [dict(bn=bn, warps=4, epi=1, pair16=1, tab=t, groups=gr) for t in (0, 1) for gr in (2, 3)
             for bn in (16, 32)]
    cfgs += [dict(bn=16, warps=4, epi=1, pair16=1, tab=1, rot=0)]
    if small:
        cfgs = [dict(bn=16, warps=4, epi=e, pair16=p, tab=t, groups=gr) for e in (0, 1) for p in (0, 1)
                for t in (0, 1) for gr in (1, 3)]
    for c in cfgs:
        def run(c=c):
            return probe_scores(q, st["kcodes"], st["prescale"], st["pos"], tables, freqs, r, 0.1, **c)
        ms = timed(run, device)
        diag = c.get("rot", 1) == 0
        rows.append({"bits": bits, "part": "scores", "cfg": " ".join(f"{k}={v}" for k, v in c.items()),
                     "ms": ms, "rel": float("nan") if diag else rel(run(), ref)})
    p = torch.softmax(ref, -1)
    vargs = (p, st["vcodes"], st["factor"], st["codebook"], st["scale"], hkv)
    vref = decode.commvq_values_triton(*vargs)
    rows.append({"bits": bits, "part": "values", "cfg": "library",
                 "ms": timed(lambda: decode.commvq_values_triton(*vargs), device), "rel": 0.0})
    vcfgs = [dict(), dict(programs=256)]
    for c in vcfgs[:1] if small else vcfgs:
        def run_v(c=c):
            return probe_values(*vargs, **c)
        rows.append({"bits": bits, "part": "values", "cfg": "f16 signs " + " ".join(f"{k}={v}" for k, v in c.items()),
                     "ms": timed(run_v, device), "rel": rel(run_v(), vref)})
    return rows


def library_scores(q, st, table, freqs, r, bn, warps, stages):
    """The library's scores kernel launched with a chosen block, warps and pipeline stages."""
    b, hq, d = q.shape
    hkv = table.shape[0]
    n = st["kcodes"].shape[1]
    out = torch.empty(b, hq, n, device=q.device, dtype=torch.float32)
    decode._scores_regdecode_kernel[(triton.cdiv(n, bn), hkv, b)](
        table, st["kcodes"], st["prescale"], st["pos"], freqs.float().contiguous(), q.float().contiguous(), out, n,
        st["kcodes"].shape[2], 0.1, R=r, E=table.shape[2], G=hq // hkv, D=d, P=d // 2, HKV=hkv, CODE_BITS=12,
        BN=bn, FAST=q.is_cuda, num_warps=warps, num_stages=stages)
    return out


def measure_round2(bits, n, hq, hkv, d, freqs, device, gen, small, rnd=2) -> list[dict]:
    """Round 2 (after the library took round 1's winners): launch settings of the scores kernel and
    variants of the values kernel, against the library's defaults; round 3: the values kernel with
    per-bit byte loads (and the product transposed)."""
    rows = []
    r = round(bits * d / 12)
    st = make_state(1, n, hkv, d, r, bits, device, gen)
    q = torch.randn(1, hq, d, generator=gen).to(device)
    table = decode.prepare_tables(st["thetas"], "regdecode16")[0]

    def lib():
        return decode.commvq_scores_triton(q, st["kcodes"], st["prescale"], st["pos"], st["thetas"], freqs, 12, 0.1,
                                           tables=(table,))
    ref = lib()
    rows.append({"bits": bits, "part": "scores", "cfg": "library", "ms": timed(lib, device), "rel": 0.0})
    cfgs = [(64, 4, 1), (64, 4, 2), (64, 4, 4), (128, 8, 3), (128, 4, 3), (32, 2, 3)]
    for bn, warps, stages in cfgs[:1] if small or rnd >= 3 else cfgs:
        def run(bn=bn, warps=warps, stages=stages):
            return library_scores(q, st, table, freqs, r, bn, warps, stages)
        try:
            ms, err = timed(run, device), rel(run(), ref)
        except Exception as exc:  # out of resources
            print(f"scores BN{bn} w{warps} s{stages}: {type(exc).__name__}: {str(exc)[:120]}")
            ms = err = float("nan")
        rows.append({"bits": bits, "part": "scores", "cfg": f"BN{bn} w{warps} stages{stages}", "ms": ms, "rel": err})
    p = torch.softmax(ref, -1)
    vargs = (p, st["vcodes"], st["factor"], st["codebook"], st["scale"], hkv)
    vref = decode.commvq_values_triton(*vargs)
    rows.append({"bits": bits, "part": "values", "cfg": "library",
                 "ms": timed(lambda: decode.commvq_values_triton(*vargs), device), "rel": 0.0})
    if rnd == 5:
        vcfgs = [dict(pos=True), dict(pos=True, batched=True), dict(pos=True, bf=512), dict(pos=True, bk=128),
                 dict(pos=True, bf=512, warps=8)]
    elif rnd == 2:
        vcfgs = [dict(w16=True), dict(zero_one=True), dict(w16=True, zero_one=True), dict(stages=1), dict(stages=2),
                 dict(stages=4), dict(bf=512, warps=8), dict(bf=512, warps=8, w16=True), dict(bk=128, w16=True)]
    else:
        vcfgs = [dict(byte_loads=True), dict(byte_loads=True, trans=True), dict(byte_loads=True, bk=32),
                 dict(byte_loads=True, trans=True, bk=32), dict(byte_loads=True, warps=8),
                 dict(byte_loads=True, trans=True, warps=8), dict(byte_loads=True, bf=128)]
    for c in vcfgs[:2] if small else vcfgs:
        def run_v(c=c):
            if c.get("pos"):
                return probe_values_pos(*vargs, **{k: v for k, v in c.items() if k != "pos"})
            return probe_values(*vargs, **c)
        cfg = " ".join(f"{k}={v}" for k, v in c.items())
        rows.append({"bits": bits, "part": "values", "cfg": cfg, "ms": timed(run_v, device), "rel": rel(run_v(), vref)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--round", type=int, default=5,
                    help="1: the kernel variants of 8849ff3; 2: launch settings; 3: values loads "
                         "(4: fp16 stage sums and signs by inline PTX, at commit 68fd2a7); 5: values "
                         "products per bit position")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hq, hkv, d = (32, 8, 128) if not args.small else (4, 2, 16)
    n = args.context if not args.small else 100
    freqs = rope.inv_freq(d, 5e5).to(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for bits in (2, 1):
        if args.round == 1:
            rows += measure(bits, n, hq, hkv, d, freqs, device, gen, args.small)
        else:
            rows += measure_round2(bits, n, hq, hkv, d, freqs, device, gen, args.small, args.round)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    commit = commit_id()
    print(f"card {card}; commit {commit}; context {n}, batch 1; Hq {hq}, Hkv {hkv}, head_dim {d}")
    print(f"{'bits':>4} {'part':>10} {'config':>42} {'ms':>8} {'rel diff':>9}")
    for r_ in rows:
        print(f"{r_['bits']:>4} {r_['part']:>10} {r_['cfg']:>42} {r_['ms']:>8.3f} {r_['rel']:>9.2e}")
    print(json.dumps({"bench": "scores_probe", "card": card, "commit": commit, "context": n, "rows": rows}))


if __name__ == "__main__":
    main()
