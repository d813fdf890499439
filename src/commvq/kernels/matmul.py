"""Batched float32 matmuls on tensor cores at float32-level accuracy (Triton, ``tf32x3``).

cuBLAS runs float32 GEMMs on the CUDA cores (plain TF32 loses too much for distances and EM
statistics). ``tf32x3`` splits each operand into a TF32 head and tail and keeps three of the four
products, which is about as accurate as float32 and several times faster on tensor cores. Used by
the EM E-step: the distance terms ``x @ W`` and the marginal sums ``M^T x``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, k_split, sa_b, sa_m, sa_k, sb_b, sb_k, sb_n, sc_b, sc_s, sc_m, sc_n,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """``c[b, s] = a[b, :, ks] @ b[b, ks, :]`` over the ``s``-th ``k_split`` range ``ks`` of K."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    bat = tl.program_id(2).to(tl.int64)
    tiles_n = tl.cdiv(N, BN)
    rm = (pid // tiles_n) * BM + tl.arange(0, BM)
    rn = (pid % tiles_n) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_lo = s * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    a_base = a_ptr + bat * sa_b + rm[:, None].to(tl.int64) * sa_m
    b_base = b_ptr + bat * sb_b + rn[None, :] * sb_n
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = (k0 + rk).to(tl.int64)
        a = tl.load(a_base + kk[None, :] * sa_k, mask=(rm[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
        b = tl.load(b_base + kk[:, None] * sb_k, mask=(kk[:, None] < k_hi) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    c = c_ptr + bat * sc_b + s * sc_s + rm[:, None] * sc_m + rn[None, :] * sc_n
    tl.store(c, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


BM, BN, BK, WARPS, STAGES = 128, 128, 32, 8, 3
PRECISION = "tf32x3"


def _launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, k_split: int) -> torch.Tensor:
    bat, m, k = a.shape
    n = b.shape[-1]
    splits = triton.cdiv(k, k_split)
    grid = (triton.cdiv(m, BM) * triton.cdiv(n, BN), splits, bat)
    _bmm_kernel[grid](a, b, out, m, n, k, k_split, *a.stride(), *b.stride(), out.stride(0), out.stride(1),
                      out.stride(2), out.stride(3), BM=BM, BN=BN, BK=BK, PRECISION=PRECISION, num_warps=WARPS,
                      num_stages=STAGES)
    return out


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [B, M, K] @ b [B, K, N]`` (float32, any strides) -> ``[B, M, N]``."""
    out = torch.empty(a.shape[0], 1, a.shape[1], b.shape[-1], device=a.device, dtype=torch.float32)
    return _launch(a, b, out, max(a.shape[-1], 1))[:, 0]


def split_sum_tn(a: torch.Tensor, b: torch.Tensor, split: int) -> torch.Tensor:
    """``a^T b`` per batch (``a [B, T, M]``, ``b [B, T, N]`` -> ``[B, M, N]`` float64): float32
    partial products over ``split`` rows of T each (parallel), summed in float64 in a fixed order."""
    bat, t, m = a.shape
    parts = torch.empty(bat, triton.cdiv(max(t, 1), split), m, b.shape[-1], device=a.device, dtype=torch.float32)
    if t == 0:
        return torch.zeros(bat, m, b.shape[-1], device=a.device, dtype=torch.float64)
    return _launch(a.transpose(1, 2), b, parts, split).sum(1, dtype=torch.float64)
