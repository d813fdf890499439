"""The dense part of a coarse decoding step in two Triton kernels: the exact window's scores with
each row's best (what the coarse ranks are offset by), and, once the budget's exact scores are in,
the softmax over budget and window with the window's share of the output. In torch the same work
is a dtype cast, a product, a concatenation and a maximum before the coarse pass, and a
concatenation, a softmax, a cast and a product after it (about 25 us of small kernels in an H100
step of 0.18 ms). One program per query row; grouped-query heads read their KV head's rows.
The torch reference: :func:`window_scores_torch` and :func:`merge_torch`."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _grouped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x [B, Hq, 1, K] @ y [B, Hkv, K, M]``, each KV head serving its query heads (the codecs'
    ``grouped``, which this layer may not import): ``[B, Hq, 1, M]``."""
    b, hq, _, k = x.shape
    hkv, m = y.shape[1], y.shape[-1]
    return torch.bmm(x.reshape(b * hkv, hq // hkv, k), y.reshape(b * hkv, k, m)).reshape(
        b, hq, 1, m
    )


def window_scores_torch(
    qs: torch.Tensor, win_k: torch.Tensor, length: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s [B, Hq, 1, W], best [B, Hq, 1, 1])``: the scaled query ``qs [B, Hq, 1, D]`` against the
    window ``win_k [B, Hkv, W, D]`` (slots from ``length`` on: ``-inf``), and each row's
    largest."""
    w = win_k.shape[2]
    s = _grouped(qs, win_k.float().transpose(-1, -2))
    if length is not None:
        s = s.masked_fill(torch.arange(w, device=s.device) >= length, float("-inf"))
    return s, s.amax(-1, keepdim=True)


def merge_torch(
    exact: torch.Tensor, s_win: torch.Tensor, win_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p [B, Hq, 1, K], out [B, Hq, 1, D])``: one softmax over the budget's scores ``exact``
    and the window's ``s_win``; the budget's weights, and the window's values mixed by theirs."""
    k = exact.shape[-1]
    p = torch.softmax(torch.cat((exact, s_win), -1), -1)
    return p[..., :k], _grouped(p[..., k:], win_v.float())


@triton.jit
def _scores_kernel(
    q_ptr,
    k_ptr,
    len_ptr,
    s_ptr,
    best_ptr,
    HQ,
    HKV,
    W,
    stride_kb,
    stride_kh,
    stride_kt,
    D: tl.constexpr,
    WP: tl.constexpr,
    DK: tl.constexpr,
    HAS_LEN: tl.constexpr,
):
    row = tl.program_id(0)  # b * HQ + query head
    b = row // HQ
    h = (row % HQ) // (HQ // HKV)
    t = tl.arange(0, WP)
    live = t < W
    if HAS_LEN:
        live = live & (t < tl.load(len_ptr))
    keys = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + t[:, None] * stride_kt
    acc = tl.zeros((WP,), dtype=tl.float32)
    for d0 in tl.static_range(0, D, DK):
        dd = d0 + tl.arange(0, DK)
        dm = dd < D
        q = tl.load(q_ptr + row.to(tl.int64) * D + dd, mask=dm, other=0.0)
        kk = tl.load(keys + dd[None, :], mask=(t < W)[:, None] & dm[None, :], other=0.0)
        acc += tl.sum(kk.to(tl.float32) * q[None, :], 1)
    s = tl.where(live, acc, float("-inf"))
    tl.store(s_ptr + row.to(tl.int64) * W + t, s, mask=t < W)
    tl.store(best_ptr + row, tl.max(s, 0))


@triton.jit
def _merge_kernel(
    e_ptr,
    s_ptr,
    v_ptr,
    p_ptr,
    out_ptr,
    HQ,
    HKV,
    K,
    W,
    stride_vb,
    stride_vh,
    stride_vt,
    D: tl.constexpr,
    WP: tl.constexpr,
    KB: tl.constexpr,
    DK: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // HQ
    h = (row % HQ) // (HQ // HKV)
    erow = e_ptr + row.to(tl.int64) * K
    t = tl.arange(0, WP)
    sw = tl.load(s_ptr + row.to(tl.int64) * W + t, mask=t < W, other=float("-inf"))
    m = tl.max(sw, 0)
    kb = tl.arange(0, KB)
    for k0 in range(0, K, KB):
        m = tl.maximum(m, tl.max(tl.load(erow + k0 + kb, mask=k0 + kb < K, other=float("-inf")), 0))
    pw = tl.exp(sw - m)
    total = tl.sum(pw, 0)
    for k0 in range(0, K, KB):
        x = tl.load(erow + k0 + kb, mask=k0 + kb < K, other=float("-inf"))
        total += tl.sum(tl.exp(x - m), 0)
    inv = 1.0 / total
    prow = p_ptr + row.to(tl.int64) * K
    for k0 in range(0, K, KB):
        x = tl.load(erow + k0 + kb, mask=k0 + kb < K, other=float("-inf"))
        tl.store(prow + k0 + kb, tl.exp(x - m) * inv, mask=k0 + kb < K)
    pw = pw * inv
    vals = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + t[:, None] * stride_vt
    for d0 in tl.static_range(0, D, DK):
        dd = d0 + tl.arange(0, DK)
        dm = dd < D
        v = tl.load(vals + dd[None, :], mask=(t < W)[:, None] & dm[None, :], other=0.0)
        o = tl.sum(v.to(tl.float32) * pw[:, None], 0)
        tl.store(out_ptr + row.to(tl.int64) * D + dd, o, mask=dm)


def _runs_here(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def window_scores(
    qs: torch.Tensor, win_k: torch.Tensor, length: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_scores_torch` in one kernel (where it can run; else torch)."""
    if not _runs_here(qs):
        return window_scores_torch(qs, win_k, length)
    b, hq, _, d = qs.shape
    hkv, w = win_k.shape[1], win_k.shape[2]
    if win_k.stride(3) != 1:
        win_k = win_k.contiguous()
    q = qs.float().contiguous()
    s = torch.empty(b, hq, 1, w, device=qs.device, dtype=torch.float32)
    best = torch.empty(b, hq, 1, 1, device=qs.device, dtype=torch.float32)
    lengths = s if length is None else length.reshape(1)
    _scores_kernel[(b * hq,)](
        q,
        win_k,
        lengths,
        s,
        best,
        hq,
        hkv,
        w,
        *win_k.stride()[:3],
        D=d,
        WP=triton.next_power_of_2(w),
        DK=min(32, triton.next_power_of_2(d)),
        HAS_LEN=length is not None,
        num_warps=4,
    )
    return s, best


def merge(
    exact: torch.Tensor, s_win: torch.Tensor, win_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_torch` in one kernel (where it can run; else torch)."""
    if not _runs_here(exact):
        return merge_torch(exact, s_win, win_v)
    b, hq, _, k = exact.shape
    hkv, w, d = win_v.shape[1:]
    if win_v.stride(3) != 1:
        win_v = win_v.contiguous()
    p = torch.empty(b, hq, 1, k, device=exact.device, dtype=torch.float32)
    out = torch.empty(b, hq, 1, d, device=exact.device, dtype=torch.float32)
    _merge_kernel[(b * hq,)](
        exact.float().contiguous(),
        s_win.float().contiguous(),
        win_v,
        p,
        out,
        hq,
        hkv,
        k,
        w,
        *win_v.stride()[:3],
        D=d,
        WP=triton.next_power_of_2(w),
        KB=1024,
        DK=min(32, triton.next_power_of_2(d)),
        num_warps=4,
    )
    return p, out
