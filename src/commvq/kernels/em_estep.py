"""Fused EM E-step for commutative codebooks (Triton): the N x E^2 soft assignment never
reaches memory.

Per chunk of tokens, ``uv = x @ W`` (cuBLAS, fp32) gives the separable distance terms. Kernel A
walks each token's ``E x E`` distance table twice: first for the minimum (hard code), then for
``exp((d_min - d) / tau)``, its sum ``Z`` and the two marginals. Kernel B walks it once more per
block of ``A`` rows and accumulates the soft counts ``N_AB`` into per-program partials, summed
afterwards in a fixed order (deterministic). Tiles whose weights all fall below ``2**-40`` of
the token's largest are skipped. The reference is :func:`commvq.quant.em.e_step`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from commvq.quant.commutative import decode, search_tables
from commvq.quant.em import EStats, _empty_stats

SKIP_LOG2 = 40.0  # weights below 2**-40 of the token's largest are dropped
SKIP = tl.constexpr(SKIP_LOG2)


@triton.jit
def _tile_d2(uv_ptr, g_ptr, n_ptr, t, tmask, a0, vb, xx, stride_uv_t, E: tl.constexpr, BA: tl.constexpr):
    a = a0 + tl.arange(0, BA)
    b = tl.arange(0, E)
    u = tl.load(uv_ptr + t[:, None] * stride_uv_t + a[None, :], mask=tmask[:, None], other=0.0)
    na = tl.load(n_ptr + a)
    ua = xx[:, None] + na[None, :] - 2.0 * u  # [BT, BA]
    g = tl.load(g_ptr + a[:, None] * E + b[None, :])  # [BA, E]
    return ua[:, :, None] + vb[:, None, :] + g[None, :, :]  # [BT, BA, E]


@triton.jit
def _pass_a(uv_ptr, xx_ptr, n_ptr, g_ptr, dmin_ptr, z_ptr, ga_ptr, gb_ptr, hard_ptr, T, c,
            stride_uv_h, stride_uv_t, E: tl.constexpr, BT: tl.constexpr, BA: tl.constexpr):
    h = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < T
    b = tl.arange(0, E)
    uv_h = uv_ptr + h * stride_uv_h
    n_h = n_ptr + h * E
    g_h = g_ptr + h * E * E
    v = tl.load(uv_h + t[:, None] * stride_uv_t + E + b[None, :], mask=tmask[:, None], other=0.0)
    vb = tl.load(n_h + b)[None, :] - 2.0 * v  # [BT, E]
    xx = tl.load(xx_ptr + h * T + t, mask=tmask, other=0.0)
    best = tl.full([BT], float("inf"), tl.float32)
    arg = tl.zeros([BT], tl.int32)
    for a0 in range(0, E, BA):
        d2 = tl.reshape(_tile_d2(uv_h, g_h, n_h, t, tmask, a0, vb, xx, stride_uv_t, E, BA), [BT, BA * E])
        m = tl.min(d2, axis=1)
        idx = tl.argmin(d2, axis=1)
        upd = m < best
        best = tl.where(upd, m, best)
        arg = tl.where(upd, a0 * E + idx, arg)
    dmin = tl.sqrt(tl.maximum(best, 0.0))
    lim = dmin + SKIP / c
    lim2 = lim * lim
    z = tl.zeros([BT], tl.float32)
    gb = tl.zeros([BT, E], tl.float32)
    for a0 in range(0, E, BA):
        a = a0 + tl.arange(0, BA)
        d2 = _tile_d2(uv_h, g_h, n_h, t, tmask, a0, vb, xx, stride_uv_t, E, BA)
        ga = tl.zeros([BT, BA], tl.float32)
        if tl.min(tl.min(tl.min(d2 - lim2[:, None, None], axis=2), axis=1), axis=0) < 0:
            d = tl.sqrt(tl.maximum(d2, 0.0))
            w = tl.exp2((dmin[:, None, None] - d) * c)
            ga = tl.sum(w, axis=2)
            gb += tl.sum(w, axis=1)
            z += tl.sum(ga, axis=1)
        tl.store(ga_ptr + h * T * E + t[:, None] * E + a[None, :], ga, mask=tmask[:, None])
    tl.store(gb_ptr + h * T * E + t[:, None] * E + b[None, :], gb, mask=tmask[:, None])
    tl.store(dmin_ptr + h * T + t, dmin, mask=tmask)
    tl.store(z_ptr + h * T + t, z, mask=tmask)
    tl.store(hard_ptr + h * T + t, arg, mask=tmask)


@triton.jit
def _pass_b(uv_ptr, xx_ptr, n_ptr, g_ptr, dmin_ptr, z_ptr, cnt_ptr, T, c, tokens_per_prog,
            stride_uv_h, stride_uv_t, E: tl.constexpr, BT: tl.constexpr, BA: tl.constexpr):
    r = tl.program_id(0)
    a0 = tl.program_id(1) * BA
    h = tl.program_id(2)
    b = tl.arange(0, E)
    uv_h = uv_ptr + h * stride_uv_h
    n_h = n_ptr + h * E
    g_h = g_ptr + h * E * E
    nb = tl.load(n_h + b)
    acc = tl.zeros([BA, E], tl.float32)
    start = r * tokens_per_prog
    for t0 in range(start, start + tokens_per_prog, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < T
        v = tl.load(uv_h + t[:, None] * stride_uv_t + E + b[None, :], mask=tmask[:, None], other=0.0)
        vb = nb[None, :] - 2.0 * v
        xx = tl.load(xx_ptr + h * T + t, mask=tmask, other=0.0)
        dmin = tl.load(dmin_ptr + h * T + t, mask=tmask, other=0.0)
        inv_z = tl.where(tmask, 1.0 / tl.load(z_ptr + h * T + t, mask=tmask, other=1.0), 0.0)
        lim = dmin + SKIP / c
        lim2 = tl.where(tmask, lim * lim, -1.0)
        d2 = _tile_d2(uv_h, g_h, n_h, t, tmask, a0, vb, xx, stride_uv_t, E, BA)
        if tl.min(tl.min(tl.min(d2 - lim2[:, None, None], axis=2), axis=1), axis=0) < 0:
            d = tl.sqrt(tl.maximum(d2, 0.0))
            w = tl.exp2((dmin[:, None, None] - d) * c) * inv_z[:, None, None]
            acc += tl.sum(w, axis=0)
    a = a0 + tl.arange(0, BA)
    tl.store(cnt_ptr + ((h * tl.num_programs(0) + r) * E + a[:, None]) * E + b[None, :], acc)


BT_A, BA_A, WARPS_A = 16, 8, 4
BT_B, BA_B, WARPS_B = 16, 8, 4
TOKENS_PER_PROG_B = 4096


def _chunk_stats(xc: torch.Tensor, sc: torch.Tensor, theta: torch.Tensor, w: torch.Tensor, n: torch.Tensor,
                 g: torch.Tensor, tau: float, stats: EStats) -> None:
    h, t, d = xc.shape
    e = n.shape[-1]
    uv = torch.bmm(xc, w).contiguous()  # [H, T, 2E]
    xx = (xc * xc).sum(-1).contiguous()
    c = math.log2(math.e) / tau
    dmin = torch.empty(h, t, device=xc.device, dtype=torch.float32)
    z = torch.empty_like(dmin)
    ga = torch.empty(h, t, e, device=xc.device, dtype=torch.float32)
    gb = torch.empty_like(ga)
    hard = torch.empty(h, t, device=xc.device, dtype=torch.int32)
    ba_a, ba_b = min(BA_A, e), min(BA_B, e)
    _pass_a[(triton.cdiv(t, BT_A), h)](uv, xx, n, g, dmin, z, ga, gb, hard, t, c, uv.stride(0), uv.stride(1),
                                       E=e, BT=BT_A, BA=ba_a, num_warps=WARPS_A)
    n_prog = triton.cdiv(t, TOKENS_PER_PROG_B)
    cnt = torch.empty(h, n_prog, e, e, device=xc.device, dtype=torch.float32)
    _pass_b[(n_prog, e // ba_b, h)](uv, xx, n, g, dmin, z, cnt, t, c, TOKENS_PER_PROG_B, uv.stride(0),
                                    uv.stride(1), E=e, BT=BT_B, BA=ba_b, num_warps=WARPS_B)
    inv_z = 1.0 / z
    stats.count += cnt.double().sum(1)
    stats.sum_a += torch.bmm((ga * inv_z[..., None]).transpose(1, 2), xc).double()
    stats.sum_b += torch.bmm((gb * inv_z[..., None]).transpose(1, 2), xc).double()
    stats.sum_xx += xx.double().sum(-1)
    err = ((xc - decode(theta, hard.long())) ** 2).sum(-1)
    stats.hard_sqerr += (err.double() * sc.double() ** 2).sum(-1)


def e_step_triton(x: torch.Tensor, s: torch.Tensor, theta: torch.Tensor, tau: float, chunk: int = 8192) -> EStats:
    """Same statistics as :func:`commvq.quant.em.e_step`, fused on the GPU (float32 inputs)."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("e_step_triton needs CUDA tensors; use commvq.quant.em.e_step on CPU")
    x = x.float()
    theta = theta.float()
    w, n, g = (t.contiguous() for t in search_tables(theta))
    h, big_n, d = x.shape
    stats = _empty_stats(h, n.shape[-1], d, x.device)
    step = max(chunk, 131072)  # the kernels need no chunking for memory; large chunks fill the GPU
    for i in range(0, big_n, step):
        _chunk_stats(x[:, i:i + step].contiguous(), s[i:i + step].float(), theta, w, n, g, tau, stats)
    return stats
