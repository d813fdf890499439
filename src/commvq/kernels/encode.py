"""Greedy residual encoding of all stages in one Triton launch; the reference is
:func:`commvq.quant.residual.encode`.

Per block of tokens of one head the residual stays on chip: for each stage, ``proj = res @ W``
(fp32; the projections of the residual on the columns of ``W``, the separable distance terms
``U_A`` then ``V_B``), the exact argmin over the ``E x E`` separable distance table, then the
chosen codeword (two rows of the decode table) is subtracted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from commvq.quant.commutative import as_float, decode_table, search_tables


@triton.jit
def _encode_kernel(
    x_ptr,
    w_ptr,
    n_ptr,
    g_ptr,
    m_ptr,
    proj_ptr,
    codes_ptr,
    res_ptr,
    T,
    R,
    D: tl.constexpr,
    E: tl.constexpr,
    BT: tl.constexpr,
    UNROLL: tl.constexpr,
    STORE_RES: tl.constexpr,
):
    h = tl.program_id(1)
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tmask = t < T
    dcol = tl.arange(0, D)
    b = tl.arange(0, E)
    c2 = tl.arange(0, 2 * E)
    res = tl.load(x_ptr + (h * T + t[:, None]) * D + dcol[None, :], mask=tmask[:, None], other=0.0)
    scratch = proj_ptr + ((h * tl.num_programs(0) + pid) * BT + tl.arange(0, BT)) * (2 * E)
    for r in range(R):
        hr = h * R + r
        w = tl.load(w_ptr + (hr * D + dcol[:, None]) * (2 * E) + c2[None, :])  # [D, 2E]
        proj = tl.dot(res, w, input_precision="ieee")  # [BT, 2E]
        tl.store(scratch[:, None] + c2[None, :], proj)
        tl.debug_barrier()
        vb = tl.load(n_ptr + hr * E + b)[None, :] - 2.0 * tl.load(scratch[:, None] + E + b[None, :])
        m = tl.full([BT, E], float("inf"), tl.float32)
        am = tl.zeros([BT, E], tl.int32)
        for a in tl.range(
            0, E, loop_unroll_factor=UNROLL
        ):  # unrolled: loads of several rows in flight
            ua = tl.load(n_ptr + hr * E + a) - 2.0 * tl.load(scratch + a)
            d2 = ua[:, None] + vb + tl.load(g_ptr + (hr * E + a) * E + b)[None, :]
            better = d2 < m
            m = tl.where(better, d2, m)
            am = tl.where(better, a, am)
        bstar = tl.argmin(m, axis=1)
        astar = tl.sum(tl.where(b[None, :] == bstar[:, None], am, 0), axis=1)
        rows_a = tl.load(m_ptr + (hr * 2 * E + astar[:, None]) * D + dcol[None, :])
        rows_b = tl.load(m_ptr + (hr * 2 * E + E + bstar[:, None]) * D + dcol[None, :])
        res = res - rows_a - rows_b
        tl.store(codes_ptr + (h * T + t) * R + r, astar * E + bstar, mask=tmask)
        if STORE_RES:
            tl.store(
                res_ptr + ((h * R + r) * T + t[:, None]) * D + dcol[None, :],
                res,
                mask=tmask[:, None],
            )
        tl.debug_barrier()


@dataclass(frozen=True)
class EncodeTuning:
    """Block sizes of the greedy encoder kernel (a tuning benchmark passes its own)."""

    bt: int = 16  # tokens per program
    warps: int = 4
    # rows per step of the search loop (H100, batch 256 x 8 heads x 21 stages: 242 us; 1 or 4: 302)
    unroll: int = 8


TUNING = EncodeTuning()


def encode_triton(
    x: torch.Tensor, thetas: torch.Tensor, tuning: EncodeTuning = TUNING
) -> torch.Tensor:
    """Greedy codes ``[H, N, R]`` (int64) of ``x [H, N, D]`` with ``thetas [H, R, 2E, P]``."""
    return _launch(x, thetas, False, tuning)[0]


def encode_triton_with_residuals(
    x: torch.Tensor, thetas: torch.Tensor, tuning: EncodeTuning = TUNING
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy codes and what each stage leaves, ``[R, H, N, D]``, as
    :func:`commvq.quant.residual.encode_with_residuals` (stored head-major, so ``.transpose(0, 1)``
    is a contiguous ``[H, R, N, D]``)."""
    return _launch(x, thetas, True, tuning)


def _launch(
    x: torch.Tensor, thetas: torch.Tensor, residuals: bool, tuning: EncodeTuning
) -> tuple[torch.Tensor, torch.Tensor]:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("encode_triton needs CUDA tensors")
    h, t, d = x.shape
    r, e = thetas.shape[1], thetas.shape[2] // 2
    th = as_float(thetas.detach())
    w, n, g = (
        v.contiguous() for v in search_tables(th.flatten(0, 1))
    )  # [H*R, D, 2E], [H*R, E], [H*R, E, E]
    table = decode_table(th.flatten(0, 1)).contiguous()  # [H*R, 2E, D]
    xs = x.detach().float().contiguous()
    bt = tuning.bt
    blocks = triton.cdiv(t, bt)
    proj = torch.empty(h * blocks * bt, 2 * e, device=x.device, dtype=torch.float32)
    codes = torch.empty(h, t, r, device=x.device, dtype=torch.int32)
    res = torch.empty(h, r if residuals else 1, t, d, device=x.device, dtype=torch.float32)
    _encode_kernel[(blocks, h)](
        xs,
        w,
        n,
        g,
        table,
        proj,
        codes,
        res,
        t,
        r,
        D=d,
        E=e,
        BT=bt,
        UNROLL=tuning.unroll,
        STORE_RES=residuals,
        num_warps=tuning.warps,
    )
    return codes.long(), res.transpose(0, 1)
