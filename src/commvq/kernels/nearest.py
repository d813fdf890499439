"""Exact nearest commutative codeword (Triton): argmin over the E x E separable distance table,
computed on the fly; the reference is :func:`commvq.quant.commutative.nearest`."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from commvq.quant.commutative import as_float, search_tables


@triton.jit
def _nearest_kernel(
    proj_ptr,
    n_ptr,
    g_ptr,
    out_ptr,
    T,
    stride_proj_h,
    stride_proj_t,
    E: tl.constexpr,
    BT: tl.constexpr,
):
    """Nearest codes of ``BT`` tokens of head ``h`` from ``proj = x @ W`` (the projections on the
    columns of ``W``: the separable distance terms ``U_A`` then ``V_B``)."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < T
    b = tl.arange(0, E)
    proj_h = proj_ptr + h * stride_proj_h + t * stride_proj_t
    v = tl.load(proj_h[:, None] + E + b[None, :], mask=tmask[:, None], other=0.0)
    vb = tl.load(n_ptr + h * E + b)[None, :] - 2.0 * v
    m = tl.full([BT, E], float("inf"), tl.float32)
    am = tl.zeros([BT, E], tl.int32)
    for a in range(E):
        ua = tl.load(n_ptr + h * E + a) - 2.0 * tl.load(proj_h + a, mask=tmask, other=0.0)
        d2 = ua[:, None] + vb + tl.load(g_ptr + (h * E + a) * E + b)[None, :]
        better = d2 < m
        m = tl.where(better, d2, m)
        am = tl.where(better, a, am)
    bstar = tl.argmin(m, axis=1)
    astar = tl.sum(tl.where(b[None, :] == bstar[:, None], am, 0), axis=1)
    tl.store(out_ptr + h * T + t, astar * E + bstar, mask=tmask)


def _block(tokens: int, heads: int) -> tuple[int, int]:
    """Tokens per program and warps: small blocks when few tokens, so every SM gets work."""
    if tokens * heads <= 32768:
        return 4, 1
    return 32, 4


def nearest_triton(x: torch.Tensor, theta: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Codes ``[H, N]`` (int64) of the nearest codewords, like ``commutative.nearest``."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("nearest_triton needs CUDA tensors")
    w, n, g = (t.float().contiguous() for t in search_tables(as_float(theta)))
    proj = torch.bmm(x.float(), w)
    h, t = x.shape[0], x.shape[1]
    out = torch.empty(h, t, dtype=torch.int32, device=x.device)
    e = n.shape[-1]
    bt, warps = _block(t, h)
    _nearest_kernel[(triton.cdiv(t, bt), h)](
        proj, n, g, out, t, proj.stride(0), proj.stride(1), E=e, BT=bt, num_warps=warps
    )
    return out.long()
