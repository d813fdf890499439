"""Beam-search encoding of all stages in one Triton launch; the reference is
:func:`commvq.quant.beam.beam_encode` (same candidates, same selection).

A program holds ``BT`` tokens x ``B`` kept sequences of one head as ``BT*B`` rows of residuals on
chip. Per stage: ``proj = res @ W`` (fp32; the projections of the residuals on the columns of
``W``, the separable distance terms ``U_A`` then ``V_B``), per row and second index ``b`` the two
best first indices ``a`` (the greedy kernel's column minima, and the runners-up), then per token
the ``B`` best extensions among the ``B*2E`` candidates, slot 0 being slot 0's nearest (the greedy
path). Parents' residuals and column arg-minima are re-read through a per-program scratch area. The
kernel writes each stage's codes and parent slots; the chosen sequence is traced back on the host
side in torch.
Programs loop over blocks of tokens, so scratch memory does not grow with the number of tokens.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from commvq.quant.commutative import as_float, decode_table, search_tables


@triton.jit
def _beam_kernel(
    x_ptr,
    w_ptr,
    n_ptr,
    g_ptr,
    m_ptr,
    scr_ptr,
    iscr_ptr,
    codes_ptr,
    parent_ptr,
    err_ptr,
    T,
    R,
    NPROG,
    ITERS,
    D: tl.constexpr,
    E: tl.constexpr,
    BT: tl.constexpr,
    B: tl.constexpr,
    UNROLL: tl.constexpr,
):
    h = tl.program_id(1)
    pid = tl.program_id(0)
    ROWS: tl.constexpr = BT * B
    C: tl.constexpr = 2 * E  # candidates per kept sequence: the two best a for every b
    row = tl.arange(0, ROWS)
    tloc = row // B
    slot = row % B
    dcol = tl.arange(0, D)
    b = tl.arange(0, E)
    c2 = tl.arange(0, 2 * E)
    col = tl.arange(0, B * C)
    tok = tl.arange(0, BT)
    # this program's scratch: projections, residuals
    proj_s = scr_ptr + (h * NPROG + pid) * (ROWS * (2 * E + D))
    res_s = proj_s + ROWS * 2 * E
    am_s = iscr_ptr + (h * NPROG + pid) * (
        ROWS * C + ROWS
    )  # candidates' first indices, picks (int32)
    pick_s = am_s + ROWS * C
    for it in range(ITERS):  # blocks pid, pid + NPROG, ...; a block past the end is all masked
        t = (pid + it * NPROG) * BT + tloc
        tmask = t < T
        res = tl.load(
            x_ptr + (h * T + t[:, None]) * D + dcol[None, :], mask=tmask[:, None], other=0.0
        )
        alive = slot == 0  # before the first stage every slot holds the same (empty) sequence
        for r in range(R):
            hr = h * R + r
            w = tl.load(w_ptr + (hr * D + dcol[:, None]) * (2 * E) + c2[None, :])  # [D, 2E]
            proj = tl.dot(res, w, input_precision="ieee")  # [ROWS, 2E]
            tl.store(proj_s + row[:, None] * (2 * E) + c2[None, :], proj)
            tl.store(res_s + row[:, None] * D + dcol[None, :], res)
            tl.debug_barrier()
            vb = tl.load(n_ptr + hr * E + b)[None, :] - 2.0 * tl.load(
                proj_s + row[:, None] * (2 * E) + E + b[None, :]
            )
            m1 = tl.full([ROWS, E], float("inf"), tl.float32)
            m2 = tl.full([ROWS, E], float("inf"), tl.float32)
            a1 = tl.zeros([ROWS, E], tl.int32)
            a2 = tl.zeros([ROWS, E], tl.int32)
            for a in tl.range(0, E, loop_unroll_factor=UNROLL):
                ua = tl.load(n_ptr + hr * E + a) - 2.0 * tl.load(proj_s + row * (2 * E) + a)
                d2 = ua[:, None] + vb + tl.load(g_ptr + (hr * E + a) * E + b)[None, :]
                first = d2 < m1
                second = d2 < m2
                m2 = tl.where(first, m1, tl.where(second, d2, m2))
                a2 = tl.where(first, a1, tl.where(second, a, a2))
                m1 = tl.where(first, d2, m1)
                a1 = tl.where(first, a, a1)
            tl.store(am_s + row[:, None] * C + c2[None, :], tl.reshape(tl.join(a1, a2), [ROWS, C]))
            left = tl.sum(res * res, axis=1)
            cand = tl.reshape(tl.join(m1, m2), [ROWS, C]) + left[:, None]  # candidate 2b + k
            cand = tl.where(alive[:, None], cand, float("inf"))
            cand = tl.reshape(
                cand, [BT, B * C]
            )  # token-major: candidate j*C + c is slot j's candidate c
            greedy = tl.argmin(tl.where(col[None, :] < C, cand, float("inf")), axis=1)
            tl.store(pick_s + tok * B, greedy)
            cand = tl.where(col[None, :] == greedy[:, None], float("inf"), cand)
            for j in tl.static_range(1, B):
                nxt = tl.argmin(cand, axis=1)
                tl.store(pick_s + tok * B + j, nxt)
                cand = tl.where(col[None, :] == nxt[:, None], float("inf"), cand)
            tl.debug_barrier()
            pick = tl.load(pick_s + row)  # [ROWS]: row t*B + j reads token t's pick j
            par = pick // C
            prow = tloc * B + par
            astar = tl.load(am_s + prow * C + pick % C)
            bstar = (pick % C) // 2
            rows_a = tl.load(m_ptr + (hr * 2 * E + astar[:, None]) * D + dcol[None, :])
            rows_b = tl.load(m_ptr + (hr * 2 * E + E + bstar[:, None]) * D + dcol[None, :])
            res = tl.load(res_s + prow[:, None] * D + dcol[None, :]) - rows_a - rows_b
            out = ((h * T + t) * R + r) * B + slot
            tl.store(codes_ptr + out, astar * E + bstar, mask=tmask)
            tl.store(parent_ptr + out, par.to(tl.int8), mask=tmask)
            alive = slot >= 0
            tl.debug_barrier()
        tl.store(err_ptr + (h * T + t) * B + slot, tl.sum(res * res, axis=1), mask=tmask)


ROWS = 64  # tokens x slots per program
WARPS = 4
UNROLL = 8


def trace_back(codes: torch.Tensor, parent: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """The best final slot's code sequence ``[H, T, R]`` from per-stage codes and parent slots
    ``[H, T, R, B]`` and final errors ``[H, T, B]``."""
    slot = err.argmin(-1, keepdim=True)  # [H, T, 1]
    out = torch.empty(codes.shape[:3], dtype=torch.long, device=codes.device)
    for r in range(codes.shape[2] - 1, -1, -1):
        out[:, :, r] = codes[:, :, r].gather(-1, slot)[..., 0]
        slot = parent[:, :, r].gather(-1, slot).long()
    return out


def beam_encode_triton(
    x: torch.Tensor, thetas: torch.Tensor, beam: int, chunk: int = 131072
) -> torch.Tensor:
    """Codes ``[H, N, R]`` (int64) of ``x [H, N, D]`` by a beam of width ``beam`` (a power of two,
    at most 16), like :func:`commvq.quant.beam.beam_encode`."""
    h, n, d = x.shape
    r, e = thetas.shape[1], thetas.shape[2] // 2
    if beam not in (1, 2, 4, 8, 16):
        raise ValueError(f"beam={beam}: the kernel takes 1, 2, 4, 8 or 16")
    if beam > e:
        raise ValueError(f"beam={beam} exceeds the {e} table entries of these codebooks")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("beam_encode_triton needs CUDA tensors")
    th = as_float(thetas.detach())
    w, nrm, g = (v.contiguous() for v in search_tables(th.flatten(0, 1)))
    table = decode_table(th.flatten(0, 1)).contiguous()
    bt = ROWS // beam
    out = []
    for i in range(0, n, chunk):
        xs = x[:, i : i + chunk].detach().float().contiguous()
        t = xs.shape[1]
        nblk = triton.cdiv(t, bt)
        nprog = min(nblk, 2048 // h + 1)
        scratch = torch.empty(h * nprog * ROWS * (2 * e + d), device=x.device, dtype=torch.float32)
        iscratch = torch.empty(h * nprog * ROWS * (2 * e + 1), device=x.device, dtype=torch.int32)
        codes = torch.empty(h, t, r, beam, device=x.device, dtype=torch.int32)
        parent = torch.empty(h, t, r, beam, device=x.device, dtype=torch.int8)
        err = torch.empty(h, t, beam, device=x.device, dtype=torch.float32)
        _beam_kernel[(nprog, h)](
            xs,
            w,
            nrm,
            g,
            table,
            scratch,
            iscratch,
            codes,
            parent,
            err,
            t,
            r,
            nprog,
            triton.cdiv(nblk, nprog),
            D=d,
            E=e,
            BT=bt,
            B=beam,
            UNROLL=UNROLL,
            num_warps=WARPS,
        )
        out.append(trace_back(codes, parent, err))
    return torch.cat(out, 1) if out else torch.empty(h, 0, r, dtype=torch.long, device=x.device)
