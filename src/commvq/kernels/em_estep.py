"""Fused, pruned EM E-step for commutative codebooks (one Triton kernel): neither the N x E^2 soft
assignment nor any per-token intermediate reaches memory, and table rows whose weights all
underflow are skipped.

Tokens are taken in tiles of ``BT``, sorted by a hint (the previous iteration's hard codes) so that
a tile holds tokens of the same or nearby cells; each program walks ``TILES_PER_PROG`` consecutive
tiles of one head. Per tile: ``uv = x @ W`` (the separable distance terms, ``tl.dot`` at
``PRECISION``) goes to a program-private scratch row; walk 1 covers the whole ``E x E`` distance
table in blocks of ``BC`` columns for the row minima (hence the hard code, ``d_min`` and which rows
``A`` the tile needs); walk 2 goes over the needed rows for the weights ``exp((d_min - d) / tau)``,
their sum ``Z`` and both marginals; walk 3 goes over them again for the soft counts ``w / Z``
(added to the program's private ``E x E`` partial); the marginal sums ``S_A``, ``S_B`` are one
``[2E, BT] x [BT, D]`` product per tile, accumulated in registers. Partials are summed per program
in a fixed order, then over programs in float64: deterministic. A row is skipped when, for every
token of the tile, its nearest codeword in that row is farther than ``d_min + PRUNE_CUT * tau``:
all its weights are below ``exp(-PRUNE_CUT)``, zero in float32 (or, at the last stages' tiny
temperatures, a value that float32 rounding of the distance can lift to about ``exp(-80)``, still
nothing beside ``Z >= 1``). The reference is :func:`commvq.quant.em.e_step`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from commvq.quant.commutative import search_tables
from commvq.quant.em import EStats, _empty_stats, e_step

PRUNE_CUT = 110.0  # in units of tau; exp(-110) = 1.7e-48 is below float32's smallest subnormal


@triton.jit
def _estep_kernel(x_ptr, w_ptr, n_ptr, g_ptr, order_ptr, scratch_ptr, flag_ptr, cnt_ptr, sums_ptr, xx_ptr,
                  rows_ptr, dmin_ptr, hard_ptr, T, n_tiles, tiles_per_prog, c, cut, sx_h, sx_t,
                  D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    slot = h * tl.num_programs(0) + pid  # this program's private partials and scratch
    e = tl.arange(0, E)
    c2 = tl.arange(0, 2 * E)
    dd = tl.arange(0, D)
    bt = tl.arange(0, BT)
    bc = tl.arange(0, BC)
    ne = tl.load(n_ptr + h * E + e)
    uv_s = scratch_ptr + slot * (BT * 2 * E)
    flags = flag_ptr + slot * E
    cnt = cnt_ptr + slot * E * E
    acc = tl.zeros([2 * E, D], tl.float32)  # [S_A; S_B] of this program's tokens
    xx_sum = tl.zeros([BT], tl.float32)
    rows = tl.zeros([E], tl.int32)  # needed rows, per row over the tiles
    for tile in range(pid * tiles_per_prog, tl.minimum((pid + 1) * tiles_per_prog, n_tiles)):
        i = tile * BT + bt
        imask = i < T
        t = tl.load(order_ptr + h * T + i, mask=imask, other=0)
        xt = tl.load(x_ptr + h * sx_h + t[:, None] * sx_t + dd[None, :], mask=imask[:, None], other=0.0)
        w = tl.load(w_ptr + (h * D + dd[:, None]) * (2 * E) + c2[None, :])
        tl.debug_barrier()  # the previous tile is done with the scratch, flags and count rows
        tl.store(uv_s + bt[:, None] * (2 * E) + c2[None, :], tl.dot(xt, w, input_precision=PRECISION))
        xx = tl.sum(xt * xt, axis=1)
        xx_sum += xx
        tl.debug_barrier()
        # walk 1, BC columns (B) at a time over all rows (A): the row minima
        ua = xx[:, None] + ne[None, :] - 2.0 * tl.load(uv_s + bt[:, None] * (2 * E) + e[None, :])
        m = tl.full([BT, E], float("inf"), tl.float32)
        for b0 in range(0, E, BC):
            v = tl.load(uv_s + bt[:, None] * (2 * E) + E + b0 + bc[None, :])
            vblk = tl.load(n_ptr + h * E + b0 + bc)[None, :] - 2.0 * v
            gblk = tl.load(g_ptr + (h * E + e[:, None]) * E + b0 + bc[None, :])  # [E (A), BC (B)]
            m = tl.minimum(m, tl.min((ua[:, :, None] + vblk[:, None, :]) + gblk[None, :, :], axis=2))
        best = tl.min(m, axis=1)
        astar = tl.argmin(m, axis=1)  # first row reaching the minimum, then its first column: torch's flat argmin
        ua_star = xx + tl.load(n_ptr + h * E + astar) - 2.0 * tl.load(uv_s + bt * (2 * E) + astar)
        vb = ne[None, :] - 2.0 * tl.load(uv_s + bt[:, None] * (2 * E) + E + e[None, :])
        row = (ua_star[:, None] + vb) + tl.load(g_ptr + (h * E + astar[:, None]) * E + e[None, :])  # same sums
        bstar = tl.argmin(row, axis=1)
        dmin = tl.sqrt(tl.maximum(best, 0.0))
        lim = dmin + cut
        need = tl.max(((m <= (lim * lim)[:, None]) & imask[:, None]).to(tl.int32), axis=0)  # [E] rows
        tl.store(flags + e, need)
        rows += need
        tl.store(dmin_ptr + h * T + t, dmin, mask=imask)
        tl.store(hard_ptr + h * T + t, astar * E + bstar, mask=imask)
        tl.debug_barrier()
        # walk 2, row by row (A) over the needed rows: weights, Z and both marginals
        gb = tl.zeros([BT, E], tl.float32)
        wa = tl.zeros([BT, E], tl.float32)
        for a in range(E):
            if tl.load(flags + a) != 0:
                ua_a = xx + tl.load(n_ptr + h * E + a) - 2.0 * tl.load(uv_s + bt * (2 * E) + a)
                d2 = (ua_a[:, None] + vb) + tl.load(g_ptr + (h * E + a) * E + e)[None, :]
                wr = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
                gb += wr
                wa = tl.where(e[None, :] == a, tl.sum(wr, axis=1)[:, None], wa)
        inv_z = tl.where(imask, 1.0 / tl.sum(gb, axis=1), 0.0)
        # walk 3, the same rows again: soft counts w / Z into this program's partial
        for a in range(E):
            if tl.load(flags + a) != 0:
                ua_a = xx + tl.load(n_ptr + h * E + a) - 2.0 * tl.load(uv_s + bt * (2 * E) + a)
                d2 = (ua_a[:, None] + vb) + tl.load(g_ptr + (h * E + a) * E + e)[None, :]
                wr = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
                tl.store(cnt + a * E + e, tl.load(cnt + a * E + e) + tl.sum(wr * inv_z[:, None], axis=0))
        # marginal sums: [wa | gb]^T / Z @ x, one product for both
        marg = tl.reshape(tl.permute(tl.join(wa, gb), (0, 2, 1)), (BT, 2 * E)) * inv_z[:, None]
        acc += tl.dot(tl.trans(marg), xt, input_precision=PRECISION)
    tl.store(sums_ptr + (slot * 2 * E + c2[:, None]) * D + dd[None, :], acc)
    tl.store(xx_ptr + slot, tl.sum(xx_sum, axis=0))
    tl.store(rows_ptr + slot, tl.sum(rows, axis=0))


BT, BC, WARPS = 32, 4, 8
TILES_PER_PROG = 64  # tiles per program: how many tokens share one set of partial sums
PRECISION = "tf32x3"  # of the two products (x @ W, marginals): float32-level error on tensor cores


def e_step_triton(x: torch.Tensor, s: torch.Tensor, theta: torch.Tensor, tau: float, chunk: int = 8192,
                  hint: torch.Tensor | None = None, prune: bool = True) -> EStats:
    """Same statistics as :func:`commvq.quant.em.e_step`, fused on the GPU (float32 inputs).

    ``hint [H, N]``: codes to sort tokens by (the previous iteration's hard codes), which lets
    tiles skip more rows; it changes the statistics only by float rounding (the order of sums).
    ``prune=False`` walks every row (same results bit for bit). ``chunk`` is not needed (nothing
    per token is kept but the hard code and its distance); it is accepted for the common signature.
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not x.is_cuda and not interpret:
        raise ValueError("e_step_triton needs CUDA tensors; use commvq.quant.em.e_step on CPU")
    h, big_n, d = x.shape
    e = theta.shape[-2] // 2
    if not interpret and (d < 16 or 2 * e < 16):  # tl.dot needs dimensions of 16 and more
        return e_step(x, s, theta, tau, chunk, hint)
    x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    w, n, g = (t.contiguous() for t in search_tables(theta.float()))
    stats = _empty_stats(h, e, d, x.device)
    if hint is None:
        order = torch.arange(big_n, device=x.device, dtype=torch.int32).expand(h, big_n).contiguous()
    else:
        order = torch.argsort(hint, dim=-1, stable=True).to(torch.int32).contiguous()
    n_tiles = triton.cdiv(big_n, BT)
    n_prog = triton.cdiv(n_tiles, TILES_PER_PROG)
    f32 = dict(device=x.device, dtype=torch.float32)
    scratch = torch.empty(h, n_prog, BT, 2 * e, **f32)
    flags = torch.empty(h, n_prog, e, device=x.device, dtype=torch.int32)
    cnt = torch.zeros(h, n_prog, e, e, **f32)
    sums = torch.empty(h, n_prog, 2 * e, d, **f32)
    xx = torch.empty(h, n_prog, **f32)
    rows = torch.empty(h, n_prog, device=x.device, dtype=torch.int32)
    dmin = torch.empty(h, big_n, **f32)
    hard = torch.empty(h, big_n, device=x.device, dtype=torch.int32)
    cut = PRUNE_CUT * tau if prune else float("inf")
    _estep_kernel[(n_prog, h)](x, w, n, g, order, scratch, flags, cnt, sums, xx, rows, dmin, hard, big_n, n_tiles,
                               TILES_PER_PROG, math.log2(math.e) / tau, cut, x.stride(0), x.stride(1),
                               D=d, E=e, BT=BT, BC=min(BC, e), PRECISION=PRECISION, num_warps=WARPS)
    stats.count += cnt.double().sum(1)
    total = sums.double().sum(1)
    stats.sum_a += total[:, :e]
    stats.sum_b += total[:, e:]
    stats.sum_xx += xx.double().sum(-1)
    stats.hard_sqerr += ((dmin.double() * s.double()) ** 2).sum(-1)
    stats.hard = hard
    stats.work = float(rows.sum(dtype=torch.int64)) / (n_tiles * e * h)
    return stats
