"""Pure-torch attention over a CommVQ-compressed cache: the oracle for the GPU kernels and the
CPU path. No key or value is ever decoded.

Keys: the per-step table ``u = q . M(a_e)`` per query head, stage and entry, gathered by the
codes, summed over stages, rotated once per pair by the key's position and scaled by its
prescale. Values: ``((p * f) @ bits) @ E`` so the codebook product happens once per query.
Shapes: queries ``[B, Hq, Tq, D]`` (after RoPE); ``Hq = g * Hkv`` (GQA).
"""

from __future__ import annotations

import torch

from commvq.quant.binary import bits_from_index
from commvq.quant.commutative import as_float, score_entries, score_table


def kv_head_of(num_q_heads: int, num_kv_heads: int, device=None) -> torch.Tensor:
    return torch.arange(num_q_heads, device=device) // (num_q_heads // num_kv_heads)


def score_tables(q: torch.Tensor, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u0, u1)`` of shape ``[B, Hq, Tq, R, TE, P]``: the two components of ``q_f^T M(a_e[f])``
    (:func:`commvq.quant.commutative.score_table` per query head, stage and entry; ``TE``: E, or
    2E for untied tables)."""
    heads = kv_head_of(q.shape[1], thetas.shape[0], q.device)
    u = score_table(
        q.float()[:, :, :, None], as_float(thetas[heads])[None, :, None]
    )  # [B, Hq, Tq, R, TE, P, 2]
    return u[..., 0], u[..., 1]


def commvq_scores(
    q: torch.Tensor,
    codes: torch.Tensor,
    prescale: torch.Tensor,
    positions: torch.Tensor,
    thetas: torch.Tensor,
    inv_freq: torch.Tensor,
    rope_scale: float = 1.0,
    chunk: int = 1024,
) -> torch.Tensor:
    """``q . RoPE(decode(codes))`` for every cached token: ``[B, Hq, Tq, N]`` (float32).

    ``codes [B, N, Hkv, R]`` (12-bit ``A*E + B``), ``prescale [B, N]``, ``positions [B, N]``,
    ``thetas [Hkv, R, 2E, P]``, ``inv_freq [P]`` (the model's RoPE frequencies).
    """
    b, hq, tq, _ = q.shape
    n = codes.shape[1]
    e = thetas.shape[2] // 2
    off = score_entries(thetas) - e  # where the B index's rows start
    u0, u1 = score_tables(q, thetas)  # [B, Hq, Tq, R, TE, P]
    heads = kv_head_of(hq, thetas.shape[0], q.device)
    out = torch.empty(b, hq, tq, n, device=q.device, dtype=torch.float32)
    for s in range(0, n, chunk):
        c = codes[:, s : s + chunk].long()[:, :, heads, :].permute(0, 2, 1, 3)  # [B, Hq, n, R]
        a_idx, b_idx = c // e, off + c % e
        ua0, ua1, ub0, ub1 = (
            _gather(u, idx, tq) for u, idx in ((u0, a_idx), (u1, a_idx), (u0, b_idx), (u1, b_idx))
        )
        ang = positions[:, s : s + chunk].float()[..., None] * inv_freq.float()  # [B, n, P]
        cos, sin = ang.cos()[:, None, None], ang.sin()[:, None, None]
        per_pair = ua0 * cos + ua1 * sin - ub0 * sin + ub1 * cos  # [B, Hq, Tq, n, P]
        out[..., s : s + chunk] = (
            per_pair.sum(-1) * prescale[:, s : s + chunk].float()[:, None, None] * rope_scale
        )
    return out


def _gather(u: torch.Tensor, idx: torch.Tensor, tq: int) -> torch.Tensor:
    """``sum_r u[b, h, t, r, idx[b, h, n, r], :]`` -> ``[B, Hq, Tq, n, P]``."""
    b, hq, _, r, e, p = u.shape
    n = idx.shape[2]
    flat = u.reshape(b, hq, tq, r * e, p)
    lin = (
        (idx + torch.arange(r, device=idx.device) * e)
        .reshape(b, hq, 1, n * r, 1)
        .expand(-1, -1, tq, -1, p)
    )
    return torch.gather(flat, 3, lin).reshape(b, hq, tq, n, r, p).sum(4)


def commvq_values(
    probs: torch.Tensor,
    value_idx: torch.Tensor,
    factor: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    num_kv_heads: int,
) -> torch.Tensor:
    """``sum_n p_n v_hat_n`` per query head without decoding values: ``[B, Hq, Tq, D]``.

    ``probs [B, Hq, Tq, N]``, ``value_idx [B, N, n]`` (2-bit pattern indices), ``factor [B, N]``,
    ``codebook [F*q, F]``, ``scale [F]``.
    """
    b, hq, tq, n = probs.shape
    f = codebook.shape[1]
    d = f // num_kv_heads
    bits = bits_from_index(value_idx).float()  # [B, N, F*q]
    weighted = (probs.float() * factor.float()[:, None, None, :]).reshape(b, hq * tq, n)
    mixed = torch.bmm(weighted, bits).reshape(b, hq, tq, -1)  # [B, Hq, Tq, F*q]
    heads = kv_head_of(hq, num_kv_heads, probs.device)
    e_heads = codebook.float().reshape(-1, num_kv_heads, d).permute(1, 0, 2)[heads]  # [Hq, F*q, D]
    out = torch.einsum("bhtk,hkd->bhtd", mixed, e_heads)
    return out * scale.float().reshape(num_kv_heads, d)[heads][None, :, None, :]
