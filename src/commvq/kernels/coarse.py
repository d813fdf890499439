"""The coarse pass of coarse-to-fine decoding (Triton): each compressed token's rank, the best over
the query heads of its score from the first ``S`` residual stages less the head's offset, with every
KV head of a block of tokens in one program (one rotation per token, no score written). The math and
its torch reference: :mod:`commvq.quant.coarse`, ``CommVQKeys.coarse_rank``; the scores it sums as
:func:`commvq.kernels.decode.commvq_scores_triton` does."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from commvq.kernels.decode import _key_sum, _query_dot, _rotated, _rotation, prepare_tables
from commvq.quant.commutative import score_entries


@triton.jit
def _rank_kernel(
    a_ptr,
    codes_ptr,
    prescale_ptr,
    pos_ptr,
    freq_ptr,
    q_ptr,
    off_ptr,
    idx_ptr,
    out_ptr,
    N,
    M,
    row_bytes,
    scale,
    R: tl.constexpr,
    S: tl.constexpr,
    E: tl.constexpr,
    TE: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    HKV: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BN: tl.constexpr,
    FAST: tl.constexpr,
    HAS_IDX: tl.constexpr,
):
    """Each token's coarse rank ``max over query heads (score - off)`` ``out [B, M]``: the scores
    of :func:`_scores_regdecode_kernel` from the first ``S`` stages, every KV head in one program,
    so that the token's rotation is computed once and no score reaches memory. ``HAS_IDX``: rank
    the stored tokens ``idx [B, M]`` (of ``N``) only, else every one (``M = N``)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    i = pid_n * BN + tl.arange(0, BN)
    tmask = i < M
    t = tl.load(idx_ptr + b * M + i, mask=tmask, other=0) if HAS_IDX else i
    f = tl.arange(0, P)
    row = codes_ptr + (b * N + t) * row_bytes
    pre = tl.load(prescale_ptr + b * N + t, mask=tmask, other=0.0).to(tl.float32) * scale
    pos = tl.load(pos_ptr + b * N + t, mask=tmask, other=0).to(tl.float32)
    c, s = _rotation(pos, tl.load(freq_ptr + f), FAST)
    best = tl.full([BN], float("-inf"), tl.float32)
    for h in range(HKV):
        kre, kim = _key_sum(a_ptr, row, row_bytes, h, tmask, R, S, E, TE, D, P, CODE_BITS, BN)
        rre, rim = _rotated(kre, kim, c, s)
        for j in tl.static_range(G):
            score = _query_dot(rre, rim, q_ptr + ((b * HKV + h) * G + j) * D, f, P) * pre
            best = tl.maximum(best, score - tl.load(off_ptr + (b * HKV + h) * G + j))
    tl.store(out_ptr + b * M + i, best, mask=tmask)


def column_tables(thetas: torch.Tensor, columns: torch.Tensor | None = None) -> tuple:
    """The rank kernel's table (:func:`prepare_tables`, ``regdecode16``) over ``columns`` of each
    codeword (``None``: all); build once per codebook."""
    (table,) = prepare_tables(thetas, "regdecode16")
    return (table if columns is None else table[..., columns].contiguous(),)


def commvq_rank_triton(
    q: torch.Tensor,
    packed: torch.Tensor,
    prescale: torch.Tensor,
    positions: torch.Tensor,
    thetas: torch.Tensor,
    inv_freq: torch.Tensor,
    code_bits: int,
    offsets: torch.Tensor,
    stages: int,
    scale: float = 1.0,
    tables: tuple | None = None,
    block: int = 64,
    num_warps: int = 4,
    columns: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token's coarse rank ``[B, N]``: the best over the query heads ``q [B, Hq, D]`` of its
    score from the first ``stages`` stages (as :func:`commvq_scores_triton` computes it) less the
    head's ``offsets [B, Hq]``. ``columns``: sum only these channels (a power of two of RoPE
    pairs, their first halves then their second halves; None: all); ``tables``:
    :func:`column_tables` of the same columns, if built; ``index [B, M]``: rank only these stored
    tokens (``[B, M]``, read through the index)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("commvq_rank_triton needs CUDA tensors")
    tables = tables if tables else column_tables(thetas, columns)
    if columns is not None:
        q, inv_freq = q[..., columns], inv_freq[columns[: columns.numel() // 2]]
    b, hq, d = q.shape
    hkv, r, e2, _ = thetas.shape
    n = packed.shape[1]
    m = n if index is None else index.shape[1]
    if not 1 <= stages <= r:
        raise ValueError(f"stages={stages}: between 1 and the codebooks' {r} stages")
    out = torch.empty(b, m, device=q.device, dtype=torch.float32)
    if m == 0:
        return out
    _rank_kernel[(triton.cdiv(m, block), b)](
        tables[0],
        packed.contiguous(),
        prescale.contiguous(),
        positions.contiguous(),
        inv_freq.float().contiguous(),
        q.float().contiguous(),
        offsets.float().contiguous(),
        out if index is None else index.contiguous(),
        out,
        n,
        m,
        packed.shape[2],
        scale,
        R=r,
        S=stages,
        E=e2 // 2,
        TE=score_entries(thetas),
        G=hq // hkv,
        D=d,
        P=d // 2,
        HKV=hkv,
        CODE_BITS=code_bits,
        BN=block,
        FAST=q.is_cuda,
        HAS_IDX=index is not None,
        num_warps=num_warps,
    )
    return out
