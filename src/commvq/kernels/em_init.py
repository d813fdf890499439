"""The EM initialization's E-step against free centers (Triton): the reference is
:func:`commvq.quant.em.e_step_centers`.

Each stage starts from 4,096 random data points as free centers and one E-step at temperature 1,
dense by nature. Per chunk of tokens one tensor-core product of split halves writes ``x.c``
(:mod:`commvq.kernels.split16`, float32-like) and one kernel reads it twice (the minimum walk:
hard code, ``d_min`` and ``Z``; then the weights walk: the weights, both marginals and the soft
counts), instead of a dozen full passes of elementwise torch ops over ``N x E^2``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from commvq.kernels import split16
from commvq.kernels.em_estep import stage_cache
from commvq.quant.em import EStats, empty_stats


@triton.jit
def _block_d2(row_ptr, imask, xx, neg2_x_unscale, cc_ptr, c_unscale_ptr, col):
    """Squared distances of a tile's tokens to the ``E`` centers of block ``A``:
    ``|x|^2 + |c|^2 - 2 x.c`` (``neg2_x_unscale``: ``-2`` times the token's unscaling)."""
    xc = (
        tl.load(row_ptr, mask=imask[:, None], other=0.0)
        * neg2_x_unscale
        * tl.load(c_unscale_ptr + col)[None, :]
    )
    return (xx + tl.load(cc_ptr + col)[None, :]) + xc


@triton.jit
def _centers_kernel(
    xc_ptr,
    x_unscale_ptr,
    c_unscale_ptr,
    cc_ptr,
    xx_ptr,
    dmin_ptr,
    hard_ptr,
    marg_ptr,
    cnt_ptr,
    T,
    c,
    E: tl.constexpr,
    BT: tl.constexpr,
):
    """One tile of ``BT`` tokens against ``E*E`` free centers in code order, from the scaled
    products ``x.c`` (``[H, T, E*E]``, unscaled by ``x_unscale`` per token and ``c_unscale`` per
    center) and ``|c|^2`` (``cc``): the minimum walk gives the hard code, ``d_min`` and ``Z``
    (online); the weights walk gives the weights ``w / Z``, both marginals and the tile's soft
    counts (a row of ``E`` per block ``A``)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    e = tl.arange(0, E)
    i = tile * BT + tl.arange(0, BT)
    imask = i < T
    xx = tl.load(xx_ptr + h * T + i, mask=imask, other=0.0)[:, None]
    neg2_x_unscale = -2.0 * tl.load(x_unscale_ptr + h * T + i, mask=imask, other=0.0)[:, None]
    rows = xc_ptr + (h * T + i[:, None]).to(tl.int64) * (E * E) + e[None, :]
    best2 = tl.full([BT], float("inf"), tl.float32)
    arg = tl.zeros([BT], tl.int32)
    dm = tl.full([BT], float("inf"), tl.float32)
    z = tl.zeros([BT], tl.float32)
    # the minimum walk: hard code, d_min and Z (online)
    for a in range(E):
        d2 = _block_d2(
            rows + a * E, imask, xx, neg2_x_unscale, cc_ptr, c_unscale_ptr, h * E * E + a * E + e
        )
        b2 = tl.min(d2, axis=1)
        better = b2 < best2  # strict: an earlier block wins a tie, as the flat argmin does
        arg = tl.where(better, a * E + tl.argmin(d2, axis=1), arg)
        best2 = tl.where(better, b2, best2)
        d = tl.sqrt(tl.maximum(d2, 0.0))
        new = tl.minimum(dm, tl.min(d, axis=1))
        z = z * tl.exp2((new - dm) * c) + tl.sum(tl.exp2((new[:, None] - d) * c), axis=1)
        dm = new
    inv_z = tl.where(imask, 1.0 / z, 0.0)
    gb = tl.zeros([BT, E], tl.float32)
    cnt = cnt_ptr + (h * tl.num_programs(0) + tile) * (E * E) + e
    # the weights walk: weights w / Z, both marginals, the tile's soft counts
    for a in range(E):
        d2 = _block_d2(
            rows + a * E, imask, xx, neg2_x_unscale, cc_ptr, c_unscale_ptr, h * E * E + a * E + e
        )
        w = tl.exp2((dm[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c) * inv_z[:, None]
        gb += w
        tl.store(marg_ptr + (h * T + i) * (2 * E) + a, tl.sum(w, axis=1), mask=imask)
        tl.store(cnt + a * E, tl.sum(w, axis=0))
    tl.store(marg_ptr + (h * T + i[:, None]) * (2 * E) + E + e[None, :], gb, mask=imask[:, None])
    tl.store(dmin_ptr + h * T + i, dm, mask=imask)
    tl.store(hard_ptr + h * T + i, arg, mask=imask)


BT_CENTERS = 32


def e_step_centers_triton(
    x: torch.Tensor,
    s: torch.Tensor,
    centers: torch.Tensor,
    tau: float,
    chunk: int = 8192,
    cache: dict | None = None,
) -> EStats:
    """Same statistics as :func:`commvq.quant.em.e_step_centers` (the initialization against free
    centers ``[H, E*E, D]``): per chunk, one product writes ``x.c`` and one kernel reads it twice,
    instead of a dozen full passes of elementwise torch ops over ``N x E^2``. ``cache``: as for
    :func:`commvq.kernels.em_estep.e_step_triton`; the split halves of ``x`` made here then serve
    the stage's E-steps (without them, each chunk is split on its own; where torch cannot give
    float16 products a float32 output, the products are float32)."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "e_step_centers_triton needs CUDA tensors; use commvq.quant.em.e_step_centers on CPU"
        )
    x, centers = x.float(), centers.float()
    h, big_n, d = x.shape
    e = math.isqrt(centers.shape[1])
    stats = empty_stats(h, e, d, x.device)
    cc = (centers * centers).sum(-1).contiguous()  # [H, E*E]
    split = split16.supported(x.device)
    if split:
        c_split, c_unscale = split16.split_cols(centers.transpose(-1, -2))
    else:  # float32 products, unit scales
        ct, c_unscale = centers.transpose(-1, -2), torch.ones(h, e * e, device=x.device)
    hard = torch.empty(h, big_n, device=x.device, dtype=torch.int32)
    c = math.log2(math.e) / tau
    f32 = dict(device=x.device, dtype=torch.float32)
    if cache is not None:
        stage_cache(x.contiguous(), cache)
    for i in range(0, big_n, chunk):
        xc = x[:, i : i + chunk]
        t = xc.shape[1]
        if not split:
            prod, x_unscale = torch.bmm(xc, ct), torch.ones(h, t, **f32)
        else:
            if cache is not None and "x_split" in cache:
                x_split = cache["x_split"][:, i : i + chunk]
                x_unscale = cache["x_unscale"][:, i : i + chunk].contiguous()
            else:
                x_split, x_unscale = split16.split_rows(xc)
            prod = split16.product(x_split, c_split)  # [H, t, E*E], scaled
        xx = (xc * xc).sum(-1).contiguous()
        n_tiles = triton.cdiv(t, BT_CENTERS)
        dmin, marg = torch.empty(h, t, **f32), torch.empty(h, t, 2 * e, **f32)
        cnt = torch.empty(h, n_tiles, e * e, **f32)
        hard_c = torch.empty(h, t, device=x.device, dtype=torch.int32)
        _centers_kernel[(n_tiles, h)](
            prod,
            x_unscale,
            c_unscale.contiguous(),
            cc,
            xx,
            dmin,
            hard_c,
            marg,
            cnt,
            t,
            c,
            E=e,
            BT=BT_CENTERS,
            num_warps=4,
        )
        hard[:, i : i + chunk] = hard_c
        stats.count += cnt.sum(1, dtype=torch.float64).view(h, e, e)
        sums = torch.bmm(marg.transpose(1, 2), xc).double()
        stats.sum_a += sums[:, :e]
        stats.sum_b += sums[:, e:]
        stats.sum_xx += xx.sum(-1, dtype=torch.float64)
        stats.hard_sqerr += ((dmin.double() * s[i : i + chunk].double()) ** 2).sum(-1)
    stats.hard = hard
    return stats
