"""Fused, pruned EM E-step for commutative codebooks (Triton): the N x E^2 soft assignment never
reaches memory, and table columns whose weights all underflow are skipped.

Per chunk of tokens, ``uv = x @ W`` (cuBLAS, fp32) gives the separable distance terms. One
persistent kernel walks tiles of ``BT`` tokens, sorted by a hint (the previous iteration's hard
codes) so that a tile holds tokens of the same or nearby cells. Per tile it walks each token's
``E x E`` distance table: once row by row, elementwise, for the column minima (hence the hard
code and ``d_min``), then column by column over the columns any token of the tile still needs for
the weights ``exp((d_min - d) / tau)``, their sum ``Z`` and the two marginals, then over the same
columns for the soft counts ``N_AB``. A column ``B`` is skipped when, for every token of the
tile, its nearest codeword in that column is farther than ``d_min + PRUNE_CUT * tau``: all its
weights are below ``exp(-PRUNE_CUT)``, which is zero in float32, so pruning changes no result.
Soft counts accumulate in per-program partials summed in a fixed order (deterministic). The
reference is :func:`commvq.quant.em.e_step`.
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
def _estep_kernel(uv_ptr, xx_ptr, n_ptr, g_ptr, gt_ptr, order_ptr, scratch_ptr, dmin_ptr, z_ptr, marg_ptr, hard_ptr,
                  cnt_ptr, work_ptr, T, n_tiles, c, cut, tiles_per_prog, stride_uv_h, stride_uv_t,
                  E: tl.constexpr, BT: tl.constexpr):
    p = tl.program_id(0)
    h = tl.program_id(1)
    nprog = tl.num_programs(0)
    e = tl.arange(0, E)
    r = tl.arange(0, BT)
    ne = tl.load(n_ptr + h * E + e)
    scratch = scratch_ptr + (h * nprog + p) * E * BT  # column minima of the current tile, [E, BT]
    cnt = cnt_ptr + (h * nprog + p) * E * E  # this program's soft counts
    cols_done = 0
    for tile in range(p * tiles_per_prog, tl.minimum((p + 1) * tiles_per_prog, n_tiles)):
        i = tile * BT + r
        imask = i < T
        t = tl.load(order_ptr + h * T + i, mask=imask, other=0)
        uv_t = uv_ptr + h * stride_uv_h + t * stride_uv_t
        xx = tl.load(xx_ptr + h * T + t, mask=imask, other=0.0)
        vb = ne[None, :] - 2.0 * tl.load(uv_t[:, None] + E + e[None, :], mask=imask[:, None], other=0.0)
        # walk 1, row by row (A), elementwise over B: column minima and their rows (no reductions)
        m = tl.full([BT, E], float("inf"), tl.float32)
        am = tl.zeros([BT, E], tl.int32)
        for a in range(E):
            ua = xx + tl.load(n_ptr + h * E + a) - 2.0 * tl.load(uv_t + a, mask=imask, other=0.0)
            d2 = ua[:, None] + vb + tl.load(g_ptr + (h * E + a) * E + e)[None, :]
            better = d2 < m
            m = tl.where(better, d2, m)
            am = tl.where(better, a, am)
        best = tl.min(m, axis=1)
        bstar = tl.argmin(m, axis=1)
        astar = tl.sum(tl.where(e[None, :] == bstar[:, None], am, 0), axis=1)
        dmin = tl.sqrt(tl.maximum(best, 0.0))
        lim = dmin + cut
        lim2 = lim * lim
        tl.store(scratch + e[None, :] * BT + r[:, None], m)
        tl.debug_barrier()
        # walks 2 and 3, column by column (B), elementwise over A, over the columns the tile needs
        ua = xx[:, None] + ne[None, :] - 2.0 * tl.load(uv_t[:, None] + e[None, :], mask=imask[:, None], other=0.0)
        ga = tl.zeros([BT, E], tl.float32)
        for b in range(E):
            keep = (tl.load(scratch + b * BT + r) <= lim2) & imask
            wb = tl.zeros([BT], tl.float32)
            if tl.max(keep.to(tl.int32), axis=0) > 0:
                vcol = tl.load(n_ptr + h * E + b) - 2.0 * tl.load(uv_t + E + b, mask=imask, other=0.0)
                d2 = ua + vcol[:, None] + tl.load(gt_ptr + (h * E + b) * E + e)[None, :]
                w = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
                ga += w
                wb = tl.sum(w, axis=1)
                cols_done += 1
            tl.store(marg_ptr + (h * T + t) * (2 * E) + E + b, wb, mask=imask)
        z = tl.sum(ga, axis=1)
        inv_z = tl.where(imask, 1.0 / tl.where(imask, z, 1.0), 0.0)
        tl.store(marg_ptr + (h * T + t[:, None]) * (2 * E) + e[None, :], ga, mask=imask[:, None])
        tl.store(z_ptr + h * T + t, z, mask=imask)
        tl.store(dmin_ptr + h * T + t, dmin, mask=imask)
        tl.store(hard_ptr + h * T + t, astar * E + bstar, mask=imask)
        for b in range(E):
            keep = (tl.load(scratch + b * BT + r) <= lim2) & imask
            if tl.max(keep.to(tl.int32), axis=0) > 0:
                vcol = tl.load(n_ptr + h * E + b) - 2.0 * tl.load(uv_t + E + b, mask=imask, other=0.0)
                d2 = ua + vcol[:, None] + tl.load(gt_ptr + (h * E + b) * E + e)[None, :]
                w = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
                tl.atomic_add(cnt + e * E + b, tl.sum(w * inv_z[:, None], axis=0))  # own partial: ordered
        tl.debug_barrier()
    tl.store(work_ptr + h * nprog + p, cols_done)


BT, WARPS = 64, 2
PROGRAMS_PER_SM = 4
SPLIT_K = 4096  # tokens per partial product in the marginal sums (parallel, fixed-order reduction)


def _programs(n_tiles: int, heads: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(n_tiles, PROGRAMS_PER_SM * sms // heads))


def _sum_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` per head (``[H, T, M]``, ``[H, T, D]`` -> ``[H, M, D]``, float64), split over T."""
    h, t, m = a.shape
    full = t // SPLIT_K * SPLIT_K
    out = torch.zeros(h, m, b.shape[-1], dtype=torch.float64, device=a.device)
    if full:
        pa = a[:, :full].reshape(h * (full // SPLIT_K), SPLIT_K, m)
        pb = b[:, :full].reshape(h * (full // SPLIT_K), SPLIT_K, -1)
        out += torch.bmm(pa.transpose(1, 2), pb).view(h, -1, m, b.shape[-1]).double().sum(1)
    if full < t:
        out += torch.bmm(a[:, full:].transpose(1, 2), b[:, full:]).double()
    return out


def _chunk_stats(xc: torch.Tensor, sc: torch.Tensor, w: torch.Tensor, n: torch.Tensor, g: torch.Tensor,
                 hint: torch.Tensor | None, tau: float, prune: bool, stats: EStats) -> tuple[torch.Tensor, int, int]:
    h, t, d = xc.shape
    e = n.shape[-1]
    uv = torch.bmm(xc, w).contiguous()  # [H, T, 2E]
    xx = (xc * xc).sum(-1).contiguous()
    if hint is None:
        order = torch.arange(t, device=xc.device, dtype=torch.int32).expand(h, t).contiguous()
    else:
        order = torch.argsort(hint, dim=-1, stable=True).to(torch.int32).contiguous()
    n_tiles = triton.cdiv(t, BT)
    nprog = _programs(n_tiles, h, xc.device)
    per_prog = triton.cdiv(n_tiles, nprog)
    nprog = triton.cdiv(n_tiles, per_prog)
    f32 = dict(device=xc.device, dtype=torch.float32)
    scratch = torch.empty(h, nprog, e, BT, **f32)
    dmin, z = torch.empty(h, t, **f32), torch.empty(h, t, **f32)
    marg = torch.empty(h, t, 2 * e, **f32)
    hard = torch.empty(h, t, device=xc.device, dtype=torch.int32)
    cnt = torch.zeros(h, nprog, e, e, **f32)
    work = torch.zeros(h, nprog, device=xc.device, dtype=torch.int32)
    cut = PRUNE_CUT * tau if prune else float("inf")
    gt = g.transpose(-1, -2).contiguous()
    _estep_kernel[(nprog, h)](uv, xx, n, g, gt, order, scratch, dmin, z, marg, hard, cnt, work, t, n_tiles,
                              math.log2(math.e) / tau, cut, per_prog, uv.stride(0), uv.stride(1),
                              E=e, BT=BT, num_warps=WARPS)
    stats.count += cnt.double().sum(1)
    sums = _sum_products(marg, xc / z[..., None])
    stats.sum_a += sums[:, :e]
    stats.sum_b += sums[:, e:]
    stats.sum_xx += xx.double().sum(-1)
    stats.hard_sqerr += ((dmin.double() * sc.double()) ** 2).sum(-1)
    return hard, int(work.sum()), n_tiles * e * h


def e_step_triton(x: torch.Tensor, s: torch.Tensor, theta: torch.Tensor, tau: float, chunk: int = 8192,
                  hint: torch.Tensor | None = None, prune: bool = True) -> EStats:
    """Same statistics as :func:`commvq.quant.em.e_step`, fused on the GPU (float32 inputs).

    ``hint [H, N]``: codes to sort tokens by (the previous iteration's hard codes), which lets
    tiles skip more columns; the results do not depend on it. ``prune=False`` walks them all.
    """
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("e_step_triton needs CUDA tensors; use commvq.quant.em.e_step on CPU")
    x = x.float()
    theta = theta.float()
    w, n, g = (t.contiguous() for t in search_tables(theta))
    h, big_n, d = x.shape
    stats = _empty_stats(h, n.shape[-1], d, x.device)
    step = max(chunk, 131072)  # the kernel needs no chunking for memory; large chunks fill the GPU
    hards, done, total = [], 0, 0
    for i in range(0, big_n, step):
        part_hint = None if hint is None else hint[:, i:i + step]
        hard, cols, all_cols = _chunk_stats(x[:, i:i + step].contiguous(), s[i:i + step].float(), w, n, g,
                                            part_hint, tau, prune, stats)
        hards.append(hard)
        done, total = done + cols, total + all_cols
    stats.hard = torch.cat(hards, 1)
    stats.work = done / max(total, 1)
    return stats
