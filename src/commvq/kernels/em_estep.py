"""Fused, pruned EM E-step for commutative codebooks (Triton): the N x E^2 soft assignment never
reaches memory, and table rows whose weights all underflow are skipped.

Work goes in contiguous blocks of vectors (whole heads, or a token range of one head), alternating
between CUDA streams (``EStepTuning.streams``). Per block, ``proj = x @ W``, the projections of
the vectors on the columns of ``W`` (the separable distance terms ``U_A`` then ``V_B``), is one
float16 tensor-core product of split halves (:mod:`commvq.kernels.split16`, float32-accurate; the
halves of ``x`` made once per EM stage), unscaled by the kernel that reads it. Tokens are taken in
tiles of ``EStepTuning.bt``, sorted by a hint (the previous iteration's hard codes) so that a tile
holds tokens of the same or nearby cells. The marginals pass (:func:`_marginals_pass`) keeps the
tile's terms transposed in a scratch and walks its ``E x E`` distance tables twice: the row-minima
walk, column by column, elementwise, for the row minima (hence the hard code, ``d_min`` and which
rows ``A`` the tile needs), then the weights walk, over the needed rows, for the weights
``exp((d_min - d) / tau)``, their sum ``Z`` and the two marginals (left divided by ``Z``: the
marginal sums ``S_A``, ``S_B`` are split-K matmuls with the block, on TF32 tensor cores). The counts
pass (:func:`_counts_pass`) visits, per row ``A``, only the tiles that need it (it lists them from
their flags) and accumulates the soft counts ``N_AB`` into per-program partials over fixed tile
ranges, summed afterwards in a fixed order (deterministic). A row is skipped when,
for every token of the tile, its nearest codeword in that row is farther than
``d_min + PRUNE_CUT * tau``: all its weights are below ``exp(-PRUNE_CUT)``, zero in float32 (or, at
the last stages' tiny temperatures, a value that float32 rounding of the distance can lift to about
``exp(-80)``, still nothing beside ``Z >= 1``). The reference is :func:`commvq.quant.em.e_step`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from commvq.kernels import split16
from commvq.kernels.split16 import tf32_products
from commvq.quant.commutative import search_tables
from commvq.quant.em import EStats, empty_stats

PRUNE_CUT = 110.0  # in units of tau; exp(-110) = 1.7e-48 is below float32's smallest subnormal


@triton.jit
def _marginals_pass(
    proj_ptr,
    x_unscale_ptr,
    w_unscale_ptr,
    xx_ptr,
    s_ptr,
    n_ptr,
    g_ptr,
    gt_ptr,
    order_ptr,
    scr_ptr,
    tok_ptr,
    marg_ptr,
    hard_ptr,
    flag_ptr,
    err_ptr,
    T,
    c,
    cut,
    E: tl.constexpr,
    BT: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """One tile of ``BT`` (sorted) tokens: hard code, ``d_min``, ``Z``, both marginals divided by
    ``Z``, which rows ``A`` the tile needs (``flag``) and the tile's hard error ``sum (s d_min)^2``;
    rows no token needs are skipped.

    ``proj`` (``x @ W``) is the product of the split halves (:mod:`commvq.kernels.split16`),
    unscaled here by ``x_unscale`` (per token) and ``w_unscale`` (per column). The tile's terms go
    to a scratch transposed (``[2E, BT]``), so that a column of the table is one coalesced load;
    they stay there for the counts pass with the tile's ``|x|^2``, ``d_min`` and ``1/Z``
    (``tok [3, BT]``), in tile order."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    e = tl.arange(0, E)
    bt = tl.arange(0, BT)
    i = tile * BT + bt
    imask = i < T
    t = tl.load(order_ptr + h * T + i, mask=imask, other=0)
    proj_t = proj_ptr + (h * T + t) * (2 * E)
    slot = h * tl.num_programs(0) + tile
    scr = scr_ptr + slot * (2 * E * BT)  # [2E, BT]: u then v, column-major for the tile
    tok = tok_ptr + slot * (3 * BT)
    xx = tl.load(xx_ptr + h * T + t, mask=imask, other=0.0)
    ne = tl.load(n_ptr + h * E + e)
    x_unscale = tl.load(x_unscale_ptr + h * T + t, mask=imask, other=0.0)[:, None]
    w_unscale_h = w_unscale_ptr + h * 2 * E + e
    u = (
        tl.load(proj_t[:, None] + e[None, :], mask=imask[:, None], other=0.0)
        * x_unscale
        * tl.load(w_unscale_h)[None, :]
    )
    v = (
        tl.load(proj_t[:, None] + E + e[None, :], mask=imask[:, None], other=0.0)
        * x_unscale
        * tl.load(w_unscale_h + E)[None, :]
    )
    tl.store(scr + e[None, :] * BT + bt[:, None], u)
    tl.store(scr + (E + e[None, :]) * BT + bt[:, None], v)
    tl.debug_barrier()
    # the row-minima walk, column by column (B), elementwise over A: the row minima (one min per
    # table entry; the form (u_A + v_B) + G_AB measured faster on the H100 than
    # u_A + min_B (v_B + G_AB), one add less)
    ua = xx[:, None] + ne[None, :] - 2.0 * u
    m = tl.full([BT, E], float("inf"), tl.float32)
    for b in tl.range(
        0, E, loop_unroll_factor=UNROLL
    ):  # unrolled: loads of several columns in flight
        vcol = tl.load(n_ptr + h * E + b) - 2.0 * tl.load(scr + (E + b) * BT + bt)
        m = tl.minimum(m, (ua + vcol[:, None]) + tl.load(gt_ptr + (h * E + b) * E + e)[None, :])
    best = tl.min(m, axis=1)
    astar = tl.argmin(
        m, axis=1
    )  # first row reaching the minimum, then its first column: torch's flat argmin
    ua_star = xx + tl.load(n_ptr + h * E + astar) - 2.0 * tl.load(scr + astar * BT + bt)
    vb = ne[None, :] - 2.0 * v
    row = (ua_star[:, None] + vb) + tl.load(
        g_ptr + (h * E + astar[:, None]) * E + e[None, :]
    )  # same sums
    bstar = tl.argmin(row, axis=1)
    dmin = tl.sqrt(tl.maximum(best, 0.0))
    lim = dmin + cut
    need = tl.max(((m <= (lim * lim)[:, None]) & imask[:, None]).to(tl.int32), axis=0)  # [E] rows
    tl.store(flag_ptr + slot * E + e, need.to(tl.int8))
    tl.debug_barrier()
    # the weights walk, row by row (A), elementwise over B, over the rows the tile needs
    gb = tl.zeros([BT, E], tl.float32)
    wa = tl.zeros([BT, E], tl.float32)
    for a in range(E):
        if tl.load(flag_ptr + slot * E + a) != 0:
            ua_a = xx + tl.load(n_ptr + h * E + a) - 2.0 * tl.load(scr + a * BT + bt)
            d2 = (ua_a[:, None] + vb) + tl.load(g_ptr + (h * E + a) * E + e)[None, :]
            w = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
            gb += w
            wa = tl.where(e[None, :] == a, tl.sum(w, axis=1)[:, None], wa)
    inv_z = tl.where(imask, 1.0 / tl.sum(gb, axis=1), 0.0)
    m_t = marg_ptr + (h * T + t[:, None]) * (2 * E) + e[None, :]
    tl.store(m_t, wa * inv_z[:, None], mask=imask[:, None])
    tl.store(m_t + E, gb * inv_z[:, None], mask=imask[:, None])
    tl.store(tok + bt, xx)
    tl.store(tok + BT + bt, dmin)
    tl.store(tok + 2 * BT + bt, inv_z)
    tl.store(hard_ptr + h * T + t, astar * E + bstar, mask=imask)
    err = dmin * tl.load(s_ptr + t, mask=imask, other=0.0)
    tl.store(err_ptr + slot, tl.sum(err * err, axis=0))


@triton.jit
def _counts_pass(
    n_ptr,
    g_ptr,
    scr_ptr,
    tok_ptr,
    flag_ptr,
    list_ptr,
    cnt_ptr,
    n_tiles,
    c,
    E: tl.constexpr,
    BT: tl.constexpr,
    RANGE: tl.constexpr,
):
    """Soft counts of one row ``A`` over the tiles of the ``r``-th range of ``RANGE`` tiles that
    need it (their flags, compacted in order into the program's ``list``): acc[t, B] += w / Z, from
    the tiles' scratch that the marginals pass left."""
    a = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    k = (h * E + a) * tl.num_programs(1) + r
    j = r * RANGE + tl.arange(0, RANGE)
    f = tl.load(flag_ptr + (h * n_tiles + j) * E + a, mask=j < n_tiles, other=0).to(tl.int32)
    lst = list_ptr + k * RANGE
    tl.store(lst + tl.cumsum(f, axis=0) - 1, j, mask=f != 0)
    count = tl.sum(f, axis=0)
    tl.debug_barrier()  # the list is read back by every thread
    e = tl.arange(0, E)
    bt = tl.arange(0, BT)
    nb = tl.load(n_ptr + h * E + e)
    g_row = tl.load(g_ptr + (h * E + a) * E + e)
    na = tl.load(n_ptr + h * E + a)
    acc = tl.zeros([BT, E], tl.float32)
    for p in range(count):
        slot = h * n_tiles + tl.load(lst + p)
        scr = scr_ptr + slot * (2 * E * BT)
        tok = tok_ptr + slot * (3 * BT)
        v = tl.load(scr + (E + e[None, :]) * BT + bt[:, None])
        ua = tl.load(tok + bt) + na - 2.0 * tl.load(scr + a * BT + bt)
        dmin = tl.load(tok + BT + bt)
        inv_z = tl.load(tok + 2 * BT + bt)
        d2 = (ua[:, None] + (nb[None, :] - 2.0 * v)) + g_row[None, :]
        w = tl.exp2((dmin[:, None] - tl.sqrt(tl.maximum(d2, 0.0))) * c)
        acc += w * inv_z[:, None]
    tl.store(cnt_ptr + ((h * tl.num_programs(1) + r) * E + a) * E + e, tl.sum(acc, axis=0))


@dataclass(frozen=True)
class EStepTuning:
    """Block sizes and options of the fused E-step (measured on an H100, EM layer at 8 x 1M; the
    figures are in docs/benchmarks.md). Callers that tune pass their own; nothing changes
    globally."""

    bt: int = 32  # tokens per tile
    warps_marginals: int = 4  # the marginals pass (60.1 s per layer with 4, 61.8 with 8)
    warps_counts: int = 8  # the counts pass
    unroll: int = 4  # columns per step of the marginals pass's row-minima walk
    # the counts pass: the range of tiles of a program (one row A each)
    tiles_per_prog_counts: int = 128
    streams: int = 2  # CUDA streams blocks alternate between (3-6% faster per E-step than one)
    split_k: int = (
        4096  # tokens per partial product in the marginal sums (parallel, fixed-order reduction)
    )
    # x @ W through float16 halves on tensor cores (split16); False: float32 on the CUDA cores
    split: bool = True
    block: int = (
        1 << 20
    )  # vectors per block of work (8 heads x 1M: one head at a time, 0.5 GiB of terms)


TUNING = EStepTuning()


def _sum_products(a: torch.Tensor, b: torch.Tensor, split_k: int) -> torch.Tensor:
    """``a^T b`` per head (``[H, T, M]``, ``[H, T, D]`` contiguous -> ``[H, M, D]``, float64), split
    over T, on TF32 tensor cores: EM's marginal sums need no more (10-bit weights and vectors,
    errors of either sign over a million terms; the distances, which do, use :mod:`split16`)."""
    h, t, m = a.shape
    full = t // split_k * split_k
    out = torch.zeros(h, m, b.shape[-1], dtype=torch.float64, device=a.device)
    with tf32_products():
        if full:
            pa = a[:, :full].reshape(h * (full // split_k), split_k, m)
            pb = b[:, :full].reshape(h * (full // split_k), split_k, -1)
            out += (
                torch.bmm(pa.transpose(1, 2), pb)
                .view(h, -1, m, b.shape[-1])
                .sum(1, dtype=torch.float64)
            )
        if full < t:
            out += torch.bmm(a[:, full:].transpose(1, 2), b[:, full:]).double()
    return out


def _distance_terms(
    xc: torch.Tensor, w: torch.Tensor, split: tuple | None
) -> tuple[torch.Tensor, ...]:
    """``x @ W`` for the block, still scaled, with its unscaling per token and per column: through
    the split halves ``split = (x_split, x_unscale, w_split, w_unscale)`` when given, else in
    float32 (unit scales)."""
    if split is None:
        return (
            torch.bmm(xc, w),
            torch.ones(xc.shape[:2], device=xc.device),
            torch.ones(w.shape[0], w.shape[-1], device=w.device),
        )
    x_split, x_unscale, w_split, w_unscale = split
    return split16.product(x_split, w_split), x_unscale.contiguous(), w_unscale.contiguous()


def _block_stats(
    xc: torch.Tensor,
    split: tuple | None,
    xx: torch.Tensor,
    sc: torch.Tensor,
    w: torch.Tensor,
    n: torch.Tensor,
    g: torch.Tensor,
    hint: torch.Tensor | None,
    tau: float,
    prune: bool,
    stats: EStats,
    tuning: EStepTuning,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of the contiguous block ``xc [h, t, D]`` (some heads, some tokens), added to
    ``stats`` (views of those heads); ``split``: the block's split halves, see
    :func:`_distance_terms`."""
    h, t, d = xc.shape
    e = n.shape[-1]
    f32 = dict(device=xc.device, dtype=torch.float32)
    proj, x_unscale, w_unscale = _distance_terms(xc, w, split)  # [h, t, 2E], [h, t], [h, 2E]
    if hint is None:
        order = torch.arange(t, device=xc.device, dtype=torch.int32).expand(h, t).contiguous()
    else:  # codes below 2^15 sort as int16: a two-pass radix sort
        key = hint.to(torch.int16) if e * e <= 1 << 15 else hint
        order = torch.argsort(key, dim=-1, stable=True).to(torch.int32)
    bt = tuning.bt
    n_tiles = triton.cdiv(t, bt)
    xx = xx.contiguous()
    scratch = torch.empty(h, n_tiles, 2 * e, bt, **f32)
    tok = torch.empty(h, n_tiles, 3, bt, **f32)  # |x|^2, d_min, 1/Z in tile order
    marg = torch.empty(h, t, 2 * e, **f32)
    hard = torch.empty(h, t, device=xc.device, dtype=torch.int32)
    flags = torch.empty(h, n_tiles, e, device=xc.device, dtype=torch.int8)
    tile_err = torch.empty(h, n_tiles, **f32)
    cut = PRUNE_CUT * tau if prune else float("inf")
    c = math.log2(math.e) / tau
    gt = g.transpose(-1, -2).contiguous()
    _marginals_pass[(n_tiles, h)](
        proj,
        x_unscale,
        w_unscale,
        xx,
        sc.float().contiguous(),
        n,
        g,
        gt,
        order,
        scratch,
        tok,
        marg,
        hard,
        flags,
        tile_err,
        t,
        c,
        cut,
        E=e,
        BT=bt,
        UNROLL=tuning.unroll,
        num_warps=tuning.warps_marginals,
    )
    # the counts pass visits only the needed (row, tile) pairs: a program takes one row within a
    # fixed range of tiles, lists the tiles that need it from their flags, in order (the same sums
    # as walking all)
    per_prog = tuning.tiles_per_prog_counts
    n_prog = triton.cdiv(n_tiles, per_prog)
    lists = torch.empty(h, e, n_prog, per_prog, device=xc.device, dtype=torch.int32)
    cnt = torch.empty(h, n_prog, e, e, **f32)
    _counts_pass[(e, n_prog, h)](
        n,
        g,
        scratch,
        tok,
        flags,
        lists,
        cnt,
        n_tiles,
        c,
        E=e,
        BT=bt,
        RANGE=per_prog,
        num_warps=tuning.warps_counts,
    )
    stats.count += cnt.sum(1, dtype=torch.float64)
    sums = _sum_products(marg, xc, tuning.split_k)  # the marginals are already divided by Z
    stats.sum_a += sums[:, :e]
    stats.sum_b += sums[:, e:]
    stats.sum_xx += xx.sum(-1, dtype=torch.float64)
    stats.hard_sqerr += tile_err.sum(-1, dtype=torch.float64)
    return hard, flags.sum(dtype=torch.int64)


def _blocks(h: int, n: int, budget: int) -> list[tuple[slice, slice]]:
    """(heads, tokens) blocks of about ``budget`` vectors that are contiguous in ``[H, N, D]``:
    several whole heads, or token ranges of one head."""
    if n <= budget:
        per = max(1, budget // max(n, 1))
        return [(slice(i, min(i + per, h)), slice(0, n)) for i in range(0, h, per)]
    return [
        (slice(i, i + 1), slice(j, min(j + budget, n)))
        for i in range(h)
        for j in range(0, n, budget)
    ]


_side_streams: dict = {}  # device -> the extra streams of the E-step (created once)


def _streams(device: torch.device, count: int) -> list:
    made = _side_streams.setdefault(device, [])
    made += [torch.cuda.Stream(device) for _ in range(count - 1 - len(made))]
    return [torch.cuda.current_stream(device)] + _side_streams[device][: count - 1]


def stage_cache(x: torch.Tensor, cache: dict | None, split: bool = True) -> dict:
    """What the E-steps of one stage share for vectors ``x [H, N, D]`` that stay fixed: ``|x|^2``
    (``"xx"``) and, with ``split`` (where torch supports it), the split halves of ``x`` and their
    unscaling (``"x_split" [H, N, 3D]`` float16: 1.5x the bytes of ``x``; ``"x_unscale" [H, N]``,
    see :func:`commvq.kernels.split16.split_rows`). Filled into ``cache`` on first use when one is
    given."""
    cache = {} if cache is None else cache
    if "xx" not in cache:
        cache["xx"] = torch.linalg.vector_norm(x, dim=-1).square_()
    if split and "x_split" not in cache and split16.supported(x.device):
        cache["x_split"], cache["x_unscale"] = split16.split_rows(x)
    return cache


def e_step_triton(
    x: torch.Tensor,
    s: torch.Tensor,
    theta: torch.Tensor,
    tau: float,
    chunk: int = 8192,
    hint: torch.Tensor | None = None,
    prune: bool = True,
    cache: dict | None = None,
    tuning: EStepTuning = TUNING,
) -> EStats:
    """Same statistics as :func:`commvq.quant.em.e_step`, fused on the GPU (float32 inputs).

    ``hint [H, N]``: codes to sort tokens by (the previous iteration's hard codes), which lets
    tiles skip more rows; it changes the statistics only by float rounding (the order of sums).
    ``prune=False`` walks every row (same results bit for bit). ``cache``: a dict kept by a caller
    whose ``x`` stays fixed over many calls (EM, within a stage), holding what :func:`stage_cache`
    derives from ``x`` once (``|x|^2`` as ``"xx"``, which a caller may also put there). Work goes in
    blocks of about ``tuning.block`` vectors, each contiguous (whole heads, or part of one head): no
    copies. ``chunk`` is accepted for the common signature (the kernels need no smaller blocks).
    """
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("e_step_triton needs CUDA tensors; use commvq.quant.em.e_step on CPU")
    x = x.float().contiguous()
    theta = theta.float()
    w, n, g = (t.contiguous() for t in search_tables(theta))
    h, big_n, d = x.shape
    stats = empty_stats(h, n.shape[-1], d, x.device)
    hard = torch.empty(h, big_n, device=x.device, dtype=torch.int32)
    cache = stage_cache(x, cache, tuning.split)
    xx = cache["xx"]
    x_split = cache.get("x_split") if tuning.split else None
    x_unscale = cache.get("x_unscale")
    w_split, w_unscale = split16.split_cols(w) if x_split is not None else (None, None)
    needed, total = [], 0
    # blocks alternate between streams: one block's matmuls can overlap another's kernels
    streams = _streams(x.device, tuning.streams) if x.is_cuda else [None]
    for st in streams[1:]:
        st.wait_stream(streams[0])
    for k, (hs, ts) in enumerate(_blocks(h, big_n, tuning.block)):
        st = streams[k % len(streams)]
        with torch.cuda.stream(st) if st is not None else contextlib.nullcontext():
            part = EStats(
                *(
                    getattr(stats, f)[hs]
                    for f in ("count", "sum_a", "sum_b", "sum_xx", "hard_sqerr")
                )
            )
            part_hint = None if hint is None else hint[hs, ts]
            split = (
                None
                if x_split is None
                else (x_split[hs, ts], x_unscale[hs, ts], w_split[hs], w_unscale[hs])
            )
            hard[hs, ts], rows = _block_stats(
                x[hs, ts],
                split,
                xx[hs, ts],
                s[ts],
                w[hs],
                n[hs],
                g[hs],
                part_hint,
                tau,
                prune,
                part,
                tuning,
            )
        needed.append(rows)
        total += (hs.stop - hs.start) * triton.cdiv(ts.stop - ts.start, tuning.bt) * n.shape[-1]
    for st in streams[1:]:
        streams[0].wait_stream(st)
    stats.hard = hard
    stats.work = torch.stack(needed).sum() / max(
        total, 1
    )  # a device scalar: no wait for the GPU here
    return stats
