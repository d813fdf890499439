"""Fused EM E-step for commutative codebooks (Triton): the N x E^2 soft assignment never
reaches memory.

Per chunk of tokens, ``uv = x @ W`` (cuBLAS, fp32) gives the separable distance terms. Kernel A
walks each token's ``E x E`` distance table twice: first for the minimum (hard code), then for
``exp((d_min - d) / tau)``, its sum ``Z`` and the two marginals. Kernel B walks it once more per
row ``A`` and accumulates the soft counts ``N_AB`` into per-program partials, summed afterwards
in a fixed order (deterministic). The reference is :func:`commvq.quant.em.e_step`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from commvq.quant.commutative import decode, search_tables
from commvq.quant.em import EStats, _empty_stats


@triton.jit
def _pass_a(uv_ptr, xx_ptr, n_ptr, g_ptr, dmin_ptr, z_ptr, ga_ptr, gb_ptr, hard_ptr, T, c,
            stride_uv_h, stride_uv_t, E: tl.constexpr, BT: tl.constexpr):
    """Per token: hard code, d_min, Z = sum w, and the marginals (unnormalized), w = 2^((d_min-d) c).

    Tiles are [BT tokens, E values of B], one row A at a time: running minima and the B-marginal
    accumulate elementwise; only the A-marginal needs a reduction per row.
    """
    h = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < T
    b = tl.arange(0, E)
    uv_h = uv_ptr + h * stride_uv_h + t * stride_uv_t
    v = tl.load(uv_h[:, None] + E + b[None, :], mask=tmask[:, None], other=0.0)
    vb = tl.load(n_ptr + h * E + b)[None, :] - 2.0 * v  # [BT, E]
    xx = tl.load(xx_ptr + h * T + t, mask=tmask, other=0.0)
    m = tl.full([BT, E], float("inf"), tl.float32)
    am = tl.zeros([BT, E], tl.int32)
    for a in range(E):
        ua = xx + tl.load(n_ptr + h * E + a) - 2.0 * tl.load(uv_h + a, mask=tmask, other=0.0)
        d2 = ua[:, None] + vb + tl.load(g_ptr + (h * E + a) * E + b)[None, :]
        better = d2 < m
        m = tl.where(better, d2, m)
        am = tl.where(better, a, am)
    best = tl.min(m, axis=1)
    bstar = tl.argmin(m, axis=1)
    astar = tl.sum(tl.where(b[None, :] == bstar[:, None], am, 0), axis=1)
    dmin = tl.sqrt(tl.maximum(best, 0.0))
    gb = tl.zeros([BT, E], tl.float32)
    for a in range(E):
        ua = xx + tl.load(n_ptr + h * E + a) - 2.0 * tl.load(uv_h + a, mask=tmask, other=0.0)
        d2 = ua[:, None] + vb + tl.load(g_ptr + (h * E + a) * E + b)[None, :]
        w = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
        gb += w
        tl.store(ga_ptr + (h * T + t) * E + a, tl.sum(w, axis=1), mask=tmask)
    tl.store(gb_ptr + (h * T + t[:, None]) * E + b[None, :], gb, mask=tmask[:, None])
    tl.store(z_ptr + h * T + t, tl.sum(gb, axis=1), mask=tmask)
    tl.store(dmin_ptr + h * T + t, dmin, mask=tmask)
    tl.store(hard_ptr + h * T + t, astar * E + bstar, mask=tmask)


@triton.jit
def _pass_b(uv_ptr, xx_ptr, n_ptr, g_ptr, dmin_ptr, z_ptr, cnt_ptr, T, c, tokens_per_prog,
            stride_uv_h, stride_uv_t, E: tl.constexpr, BT: tl.constexpr):
    """Soft counts of one row A over a token range: acc[t, B] += w / Z, reduced over t at the end."""
    a = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    b = tl.arange(0, E)
    nb = tl.load(n_ptr + h * E + b)
    g_row = tl.load(g_ptr + (h * E + a) * E + b)
    na = tl.load(n_ptr + h * E + a)
    acc = tl.zeros([BT, E], tl.float32)
    start = r * tokens_per_prog
    for t0 in range(start, start + tokens_per_prog, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < T
        uv_h = uv_ptr + h * stride_uv_h + t * stride_uv_t
        v = tl.load(uv_h[:, None] + E + b[None, :], mask=tmask[:, None], other=0.0)
        xx = tl.load(xx_ptr + h * T + t, mask=tmask, other=0.0)
        ua = xx + na - 2.0 * tl.load(uv_h + a, mask=tmask, other=0.0)
        dmin = tl.load(dmin_ptr + h * T + t, mask=tmask, other=0.0)
        inv_z = tl.where(tmask, 1.0 / tl.load(z_ptr + h * T + t, mask=tmask, other=1.0), 0.0)
        d2 = ua[:, None] + (nb[None, :] - 2.0 * v) + g_row[None, :]
        w = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
        acc += w * inv_z[:, None]
    tl.store(cnt_ptr + ((h * tl.num_programs(1) + r) * E + a) * E + b, tl.sum(acc, axis=0))


BT_A, WARPS_A = 32, 4
BT_B, WARPS_B = 32, 4
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
    _pass_a[(triton.cdiv(t, BT_A), h)](uv, xx, n, g, dmin, z, ga, gb, hard, t, c, uv.stride(0), uv.stride(1),
                                       E=e, BT=BT_A, num_warps=WARPS_A)
    n_prog = triton.cdiv(t, TOKENS_PER_PROG_B)
    cnt = torch.empty(h, n_prog, e, e, device=xc.device, dtype=torch.float32)
    _pass_b[(e, n_prog, h)](uv, xx, n, g, dmin, z, cnt, t, c, TOKENS_PER_PROG_B, uv.stride(0), uv.stride(1),
                            E=e, BT=BT_B, num_warps=WARPS_B)
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
