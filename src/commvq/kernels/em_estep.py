"""Fused, pruned EM E-step for commutative codebooks (Triton): the N x E^2 soft assignment never
reaches memory, and table rows whose weights all underflow are skipped.

Per chunk of tokens, ``uv = x @ W`` (cuBLAS, fp32, per head: no copy of the vectors) gives the
separable distance terms. Tokens are taken in tiles of ``BT``, sorted by a hint (the previous
iteration's hard codes) so that a tile holds tokens of the same or nearby cells. One kernel walks
a tile's ``E x E`` distance tables three times: column by column, elementwise, for the row minima
(hence the hard code, ``d_min`` and which rows ``A`` the tile needs); over the needed rows for the
weights ``exp((d_min - d) / tau)``, their sum ``Z`` and the two marginals (left divided by ``Z``:
the marginal sums ``S_A``, ``S_B`` are then split-K matmuls with the vectors); over them again for
the tile's soft counts ``w / Z``, one row per needed row, summed over tiles afterwards in float64
(fixed order: deterministic). A row is skipped when, for every token of the tile, its nearest
codeword in that row is farther than ``d_min + PRUNE_CUT * tau``: all its weights are below
``exp(-PRUNE_CUT)``, zero in float32 (or, at the last stages' tiny temperatures, a value that
float32 rounding of the distance can lift to about ``exp(-80)``, still nothing beside ``Z >= 1``).
The reference is :func:`commvq.quant.em.e_step`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from commvq.quant.commutative import search_tables
from commvq.quant.em import EStats, _empty_stats

PRUNE_CUT = 110.0  # in units of tau; exp(-110) = 1.7e-48 is below float32's smallest subnormal


@triton.jit
def _tile_kernel(x_ptr, uv_ptr, xx_ptr, n_ptr, g_ptr, gt_ptr, order_ptr, dmin_ptr, marg_ptr, cnt_ptr, hard_ptr,
                 flag_ptr, T, c, cut, sx_h, sx_t, stride_uv_h, stride_uv_t, D: tl.constexpr, E: tl.constexpr,
                 BT: tl.constexpr, UNROLL: tl.constexpr):
    """One tile of ``BT`` (sorted) tokens: ``|x|^2``, hard code, ``d_min``, both marginals divided by
    ``Z``, the tile's soft counts, and which rows ``A`` the tile needs (``flag``); rows no token
    needs are skipped."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    e = tl.arange(0, E)
    i = tile * BT + tl.arange(0, BT)
    imask = i < T
    t = tl.load(order_ptr + h * T + i, mask=imask, other=0)
    uv_t = uv_ptr + h * stride_uv_h + t * stride_uv_t
    d = tl.arange(0, D)
    xt = tl.load(x_ptr + h * sx_h + t[:, None] * sx_t + d[None, :], mask=imask[:, None], other=0.0)
    xx = tl.sum(xt * xt, axis=1)
    tl.store(xx_ptr + h * T + t, xx, mask=imask)
    ne = tl.load(n_ptr + h * E + e)
    # walk 1, column by column (B), elementwise over A: the row minima d2(A) = u_A + min_B (v_B + G_AB),
    # an add and a min per table entry (u_A is added after the walk: rounding is monotonic, same minima)
    ua = xx[:, None] + ne[None, :] - 2.0 * tl.load(uv_t[:, None] + e[None, :], mask=imask[:, None], other=0.0)
    m = tl.full([BT, E], float("inf"), tl.float32)
    for b in tl.range(0, E, loop_unroll_factor=UNROLL):  # unrolled: loads of several columns in flight
        vcol = tl.load(n_ptr + h * E + b) - 2.0 * tl.load(uv_t + E + b, mask=imask, other=0.0)
        m = tl.minimum(m, vcol[:, None] + tl.load(gt_ptr + (h * E + b) * E + e)[None, :])
    m = ua + m
    best = tl.min(m, axis=1)
    astar = tl.argmin(m, axis=1)  # first row reaching the minimum, then its first column: torch's flat argmin
    ua_star = xx + tl.load(n_ptr + h * E + astar) - 2.0 * tl.load(uv_t + astar, mask=imask, other=0.0)
    vb = ne[None, :] - 2.0 * tl.load(uv_t[:, None] + E + e[None, :], mask=imask[:, None], other=0.0)
    row = ua_star[:, None] + (vb + tl.load(g_ptr + (h * E + astar[:, None]) * E + e[None, :]))  # same sums
    bstar = tl.argmin(row, axis=1)
    dmin = tl.sqrt(tl.maximum(best, 0.0))
    lim = dmin + cut
    need = tl.max(((m <= (lim * lim)[:, None]) & imask[:, None]).to(tl.int32), axis=0)  # [E] rows
    tl.store(flag_ptr + (h * tl.num_programs(0) + tile) * E + e, need.to(tl.int8))
    tl.debug_barrier()
    # walk 2, row by row (A), elementwise over B, over the rows the tile needs
    gb = tl.zeros([BT, E], tl.float32)
    for a in range(E):
        wa = tl.zeros([BT], tl.float32)
        if tl.load(flag_ptr + (h * tl.num_programs(0) + tile) * E + a) != 0:
            ua_a = xx + tl.load(n_ptr + h * E + a) - 2.0 * tl.load(uv_t + a, mask=imask, other=0.0)
            d2 = ua_a[:, None] + (vb + tl.load(g_ptr + (h * E + a) * E + e)[None, :])
            w = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
            gb += w
            wa = tl.sum(w, axis=1)
        tl.store(marg_ptr + (h * T + t) * (2 * E) + a, wa, mask=imask)
    z = tl.sum(gb, axis=1)
    inv_z = 1.0 / z
    tl.store(marg_ptr + (h * T + t[:, None]) * (2 * E) + E + e[None, :], gb * inv_z[:, None], mask=imask[:, None])
    tl.debug_barrier()  # the row marginals written above are read back, divided by Z
    ma = marg_ptr + (h * T + t[:, None]) * (2 * E) + e[None, :]
    tl.store(ma, tl.load(ma, mask=imask[:, None], other=0.0) * inv_z[:, None], mask=imask[:, None])
    # walk 3, the same rows again: the tile's soft counts w / Z, a row of E per needed row (zeros elsewhere)
    inv_zm = tl.where(imask, inv_z, 0.0)
    cnt_t = cnt_ptr + (h * tl.num_programs(0) + tile) * E * E
    for a in range(E):
        cr = tl.zeros([E], tl.float32)
        if tl.load(flag_ptr + (h * tl.num_programs(0) + tile) * E + a) != 0:
            ua_a = xx + tl.load(n_ptr + h * E + a) - 2.0 * tl.load(uv_t + a, mask=imask, other=0.0)
            d2 = ua_a[:, None] + (vb + tl.load(g_ptr + (h * E + a) * E + e)[None, :])
            w = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
            cr = tl.sum(w * inv_zm[:, None], axis=0)
        tl.store(cnt_t + a * E + e, cr)
    tl.store(dmin_ptr + h * T + t, dmin, mask=imask)
    tl.store(hard_ptr + h * T + t, astar * E + bstar, mask=imask)


BT, WARPS = 32, 4
UNROLL = 4  # columns per step of walk 1
SPLIT_K = 4096  # tokens per partial product in the marginal sums (parallel, fixed-order reduction)


def _sum_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` per head (``[H, T, M]``, ``[H, T, D]`` -> ``[H, M, D]``, float64), split over T.

    Per head, so that a head's rows of a token slice of the vectors are one contiguous block (no copy).
    """
    h, t, m = a.shape
    full = t // SPLIT_K * SPLIT_K
    out = torch.zeros(h, m, b.shape[-1], dtype=torch.float64, device=a.device)
    for i in range(h):
        if full:
            pa = a[i, :full].reshape(full // SPLIT_K, SPLIT_K, m)
            pb = b[i, :full].reshape(full // SPLIT_K, SPLIT_K, -1)
            out[i] += torch.bmm(pa.transpose(1, 2), pb).double().sum(0)
        if full < t:
            out[i] += (a[i, full:].T @ b[i, full:]).double()
    return out


def _chunk_stats(xc: torch.Tensor, sc: torch.Tensor, w: torch.Tensor, n: torch.Tensor, g: torch.Tensor,
                 hint: torch.Tensor | None, tau: float, prune: bool, stats: EStats) -> tuple[torch.Tensor, int, int]:
    h, t, d = xc.shape
    e = n.shape[-1]
    f32 = dict(device=xc.device, dtype=torch.float32)
    uv = torch.empty(h, t, 2 * e, **f32)
    for i in range(h):  # per head: a head's rows of the chunk are contiguous, batched matmul would copy them
        torch.mm(xc[i], w[i], out=uv[i])
    if hint is None:
        order = torch.arange(t, device=xc.device, dtype=torch.int32).expand(h, t).contiguous()
    else:
        order = torch.argsort(hint, dim=-1, stable=True).to(torch.int32).contiguous()
    n_tiles = triton.cdiv(t, BT)
    xx, dmin = torch.empty(h, t, **f32), torch.empty(h, t, **f32)
    marg = torch.empty(h, t, 2 * e, **f32)
    cnt = torch.empty(h, n_tiles, e, e, **f32)
    hard = torch.empty(h, t, device=xc.device, dtype=torch.int32)
    flags = torch.empty(h, n_tiles, e, device=xc.device, dtype=torch.int8)
    cut = PRUNE_CUT * tau if prune else float("inf")
    c = math.log2(math.e) / tau
    gt = g.transpose(-1, -2).contiguous()
    _tile_kernel[(n_tiles, h)](xc, uv, xx, n, g, gt, order, dmin, marg, cnt, hard, flags, t, c, cut, xc.stride(0),
                               xc.stride(1), uv.stride(0), uv.stride(1), D=d, E=e, BT=BT, UNROLL=UNROLL,
                               num_warps=WARPS)
    stats.count += torch.sum(cnt, 1, dtype=torch.float64)
    sums = _sum_products(marg, xc)  # marginals are already divided by Z
    stats.sum_a += sums[:, :e]
    stats.sum_b += sums[:, e:]
    stats.sum_xx += xx.double().sum(-1)
    stats.hard_sqerr += ((dmin.double() * sc.double()) ** 2).sum(-1)
    return hard, int(flags.sum(dtype=torch.int64)), flags.numel()


def e_step_triton(x: torch.Tensor, s: torch.Tensor, theta: torch.Tensor, tau: float, chunk: int = 8192,
                  hint: torch.Tensor | None = None, prune: bool = True) -> EStats:
    """Same statistics as :func:`commvq.quant.em.e_step`, fused on the GPU (float32 inputs).

    ``hint [H, N]``: codes to sort tokens by (the previous iteration's hard codes), which lets
    tiles skip more rows; it changes the statistics only by float rounding (the order of sums).
    ``prune=False`` walks every row (same results bit for bit).
    """
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("e_step_triton needs CUDA tensors; use commvq.quant.em.e_step on CPU")
    x = x.float()
    if x.stride(-1) != 1 or x.stride(1) != x.shape[-1]:
        x = x.contiguous()
    theta = theta.float()
    w, n, g = (t.contiguous() for t in search_tables(theta))
    h, big_n, d = x.shape
    stats = _empty_stats(h, n.shape[-1], d, x.device)
    step = max(chunk, 131072)  # the kernels need no chunking for memory; large chunks fill the GPU
    hards, done, total = [], 0, 0
    for i in range(0, big_n, step):
        part_hint = None if hint is None else hint[:, i:i + step]
        hard, rows, all_rows = _chunk_stats(x[:, i:i + step], s[i:i + step].float(), w, n, g,
                                            part_hint, tau, prune, stats)
        hards.append(hard)
        done, total = done + rows, total + all_rows
    stats.hard = torch.cat(hards, 1)
    stats.work = done / max(total, 1)
    return stats
