"""The ``k`` highest of each row of scores, as positions in increasing order (Triton): a radix
select over each score's float bits in three histogram passes of 8 bits each, then one pass that
writes the chosen positions in order, so that no sort follows; a row of at most ``ONE_PROGRAM``
scores is selected by one program that holds it whole (one launch instead of six: the cascade's
second pick). Scores equal in their 24 highest
bits (sign, exponent and 15 mantissa bits: within 2**-15 of each other, relatively) count as
ties, and ties at the boundary go to the earlier positions. The torch reference:
:func:`commvq.quant.coarse.pick` (``topk`` then a sort)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BITS = 8  # per histogram pass: 256 bins (wider histograms cost more than the passes they save)
PASSES = tl.constexpr(3)  # 24 bits: sign, exponent and 15 mantissa bits
BINS = 1 << BITS
ONE_PROGRAM = 4096  # rows up to this long: one program per row (H100: 12 us at 4,096, 35 at 8,192)


@triton.jit
def _ordered(x):
    """float32 -> int32 whose signed order is the floats' order."""
    i = x.to(tl.int32, bitcast=True)
    return tl.where(i < 0, i ^ 0x7FFFFFFF, i)


@triton.jit
def _boundary(hist_ptr, k, NB: tl.constexpr):
    """The highest bin whose count, with every bin above it, reaches ``k``, and the count of
    the bins above it."""
    bins = tl.arange(0, NB)
    h = tl.load(hist_ptr + bins)
    reach = tl.cumsum(h, 0, reverse=True)
    top = tl.max(tl.where(reach >= k, bins, -1), 0)
    return top, tl.sum(tl.where(bins > top, h, 0), 0)


@triton.jit
def _prefix(hist_ptr, k, UPTO: tl.constexpr, B: tl.constexpr):
    """The boundary's first ``UPTO * B`` bits (``key >> (32 - UPTO * B)``) from the row's
    histograms of the first ``UPTO`` passes, and how many keys with that prefix are still to
    take."""
    NB: tl.constexpr = 1 << B
    hist = hist_ptr + tl.program_id(1) * PASSES * NB
    prefix = 0
    for p in tl.static_range(UPTO):
        top, above = _boundary(hist + p * NB, k, NB)
        if p == 0:  # noqa: SIM108 (a Triton loop: the first pass is offset)
            prefix = top - NB // 2
        else:
            prefix = prefix * NB + top
        k = k - above
    return prefix, k


@triton.jit
def _keys(x_ptr, N, CHUNK: tl.constexpr):
    """This program's chunk of its row: positions, in-row mask, ordered keys."""
    t = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    m = t < N
    row = x_ptr + tl.program_id(1).to(tl.int64) * N
    return t, m, _ordered(tl.load(row + t, mask=m, other=0.0))


@triton.jit
def _hist_kernel(x_ptr, hist_ptr, N, k, PASS: tl.constexpr, B: tl.constexpr, CHUNK: tl.constexpr):
    """Pass ``p``: the histogram of the keys' bits ``[32 - (p+1)B, 32 - pB)`` among the keys
    whose higher bits are the boundary's so far, added into the row's ``hist [PASSES, 2**B]``."""
    NB: tl.constexpr = 1 << B
    _, m, key = _keys(x_ptr, N, CHUNK)
    if PASS == 0:
        h = tl.histogram((key >> (32 - B)) + NB // 2, NB, mask=m)
    else:
        prefix, _ = _prefix(hist_ptr, k, PASS, B)
        inside = m & ((key >> (32 - PASS * B)) == prefix)
        h = tl.histogram((key >> (32 - (PASS + 1) * B)) & (NB - 1), NB, mask=inside)
    hist = hist_ptr + (tl.program_id(1) * PASSES + PASS) * NB
    tl.atomic_add(hist + tl.arange(0, NB), h, mask=h > 0)


@triton.jit
def _count_kernel(x_ptr, hist_ptr, cnt_ptr, N, k, C, B: tl.constexpr, CHUNK: tl.constexpr):
    """Per chunk: how many keys lie above the row's boundary and how many at it."""
    _, m, key = _keys(x_ptr, N, CHUNK)
    thr, _ = _prefix(hist_ptr, k, PASSES, B)
    top = key >> (32 - PASSES * B)
    cnt = cnt_ptr + (tl.program_id(1) * C + tl.program_id(0)) * 2
    tl.store(cnt, tl.sum((m & (top > thr)).to(tl.int32), 0))
    tl.store(cnt + 1, tl.sum((m & (top == thr)).to(tl.int32), 0))


@triton.jit
def _write_kernel(
    x_ptr,
    hist_ptr,
    cnt_ptr,
    out_ptr,
    N,
    k,
    C,
    B: tl.constexpr,
    CHUNK: tl.constexpr,
    CP: tl.constexpr,
):
    """Each chosen position, written at its rank in position order: after the chosen ones of the
    earlier chunks and of the earlier positions of this one."""
    t, m, key = _keys(x_ptr, N, CHUNK)
    thr, ties = _prefix(hist_ptr, k, PASSES, B)
    b = tl.program_id(1)
    earlier = tl.arange(0, CP)
    before = cnt_ptr + (b * C + earlier) * 2
    above_before = tl.sum(tl.load(before, mask=earlier < tl.program_id(0), other=0), 0)
    ties_before = tl.sum(tl.load(before + 1, mask=earlier < tl.program_id(0), other=0), 0)
    top = key >> (32 - PASSES * B)
    tie = m & (top == thr)
    take = (m & (top > thr)) | (tie & (ties_before + tl.cumsum(tie.to(tl.int32), 0) <= ties))
    rank = above_before + tl.minimum(ties_before, ties) + tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(out_ptr + b.to(tl.int64) * k + rank, t.to(tl.int64), mask=take)


@triton.jit
def _row_kernel(
    x_ptr, src_ptr, out_ptr, N, K, HAS_SRC: tl.constexpr, B: tl.constexpr, NP: tl.constexpr
):
    """One row whole in one program: the three histogram passes in registers, then the chosen
    positions (or ``src``'s entries at them) written in order."""
    NB: tl.constexpr = 1 << B
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, NP)
    m = t < N
    key = _ordered(tl.load(x_ptr + b * N + t, mask=m, other=0.0))
    bins = tl.arange(0, NB)
    prefix, k = 0, K
    for p in tl.static_range(PASSES):
        if p == 0:  # noqa: SIM108 (a Triton loop: the first pass is offset)
            h = tl.histogram((key >> (32 - B)) + NB // 2, NB, mask=m)
        else:
            inside = m & ((key >> (32 - p * B)) == prefix)
            h = tl.histogram((key >> (32 - (p + 1) * B)) & (NB - 1), NB, mask=inside)
        reach = tl.cumsum(h, 0, reverse=True)
        top = tl.max(tl.where(reach >= k, bins, -1), 0)
        k = k - tl.sum(tl.where(bins > top, h, 0), 0)
        if p == 0:  # noqa: SIM108
            prefix = top - NB // 2
        else:
            prefix = prefix * NB + top
    top24 = key >> (32 - PASSES * B)
    tie = m & (top24 == prefix)
    take = (m & (top24 > prefix)) | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= k))
    rank = tl.cumsum(take.to(tl.int32), 0) - 1
    if HAS_SRC:  # noqa: SIM108 (a Triton branch on a constexpr)
        val = tl.load(src_ptr + b * N + t, mask=take, other=0)
    else:
        val = t.to(tl.int64)
    tl.store(out_ptr + b * K + rank, val, mask=take)


def top_k_positions_triton(
    scores: torch.Tensor, k: int, chunk: int = 4096, source: torch.Tensor | None = None
) -> torch.Tensor:
    """The positions ``[B, k]`` (int64, increasing) of the ``k`` highest of ``scores [B, N]``
    (float32; NaN not allowed), as :func:`commvq.quant.coarse.pick` returns them, ties (see the
    module) to the earlier positions; with ``source [B, N]`` (int64), its entries at those
    positions (``gather(source, 1, positions)`` in one pass). Fixed shapes throughout (CUDA
    graphs can hold it)."""
    b, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: between 1 and the row's {n} scores")
    if source is not None and (source.shape != scores.shape or source.dtype != torch.int64):
        raise ValueError(f"source {tuple(source.shape)} {source.dtype}: int64 of {(b, n)}")
    if not scores.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("top_k_positions_triton needs CUDA tensors")
    x = scores.float().contiguous()
    if n <= ONE_PROGRAM:
        out = torch.empty(b, k, device=x.device, dtype=torch.int64)
        src = x if source is None else source.contiguous()
        np_ = triton.next_power_of_2(n)
        _row_kernel[(b,)](
            x, src, out, n, k, HAS_SRC=source is not None, B=BITS, NP=np_, num_warps=8
        )
        return out
    c = triton.cdiv(n, chunk)
    hist = torch.zeros(b, PASSES, BINS, device=x.device, dtype=torch.int32)
    cnt = torch.empty(b, c, 2, device=x.device, dtype=torch.int32)
    out = torch.empty(b, k, device=x.device, dtype=torch.int64)
    grid = (c, b)
    for p in range(PASSES):
        _hist_kernel[grid](x, hist, n, k, PASS=p, B=BITS, CHUNK=chunk, num_warps=8)
    _count_kernel[grid](x, hist, cnt, n, k, c, B=BITS, CHUNK=chunk, num_warps=8)
    cp = triton.next_power_of_2(c)
    _write_kernel[grid](x, hist, cnt, out, n, k, c, B=BITS, CHUNK=chunk, CP=cp, num_warps=8)
    return out if source is None else torch.gather(source, 1, out)
