"""Beam search over the residual stages: codes of the same format as the greedy encoder's, with a
smaller error.

Greedy coding takes, stage by stage, the codeword nearest to what the previous stages left. The
beam keeps ``B`` partial code sequences per vector instead: at each stage every kept sequence gets
``2E`` candidate extensions (for each second index ``b`` of the code ``a*E + b``, the two best first
indices ``a``; this holds the nearest codewords of nearly every exact top-``B``, at the cost of one
pass over the ``E x E`` distance table), and the ``B`` extensions that leave the least error go on.
Slot 0 always holds the greedy path (the nearest extension of slot 0), so the beam's best sequence
is never worse than greedy coding on the same vector, and ``beam=1`` *is* greedy coding.
"""

from __future__ import annotations

import torch

from commvq.quant.commutative import decode, decode_table, search_tables
from commvq.quant.residual import encode as greedy_encode


def _stage_candidates(res: torch.Tensor, tables: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kept residual ``res [H, n, B, D]`` and second index ``b``, the two best first indices
    ``a``: the squared errors left by the codes ``a*E + b`` and the codes, both ``[H, n, B, 2E]``
    (candidate ``2b + k``: the ``k``-th best ``a`` for ``b``). The nearest codeword (the greedy
    choice) is the smallest of these."""
    w, nrm, g = tables  # [H, D, 2E], [H, E], [H, E, E]
    e = nrm.shape[-1]
    uv = torch.einsum("hnbd,hdc->hnbc", res, w)
    left = (res * res).sum(-1, keepdim=True)[..., None]  # [H, n, B, 1, 1]
    ua = (nrm[:, None, None] - 2 * uv[..., :e])[..., None, :]
    vb = (nrm[:, None, None] - 2 * uv[..., e:])[..., :, None]
    d2 = (
        vb + ua + g.transpose(-1, -2)[:, None, None]
    )  # [H, n, B, b, a]: a last, reduced contiguously
    best, a = d2.min(-1)
    if e > 1:  # the runner-up: two passes of min are faster than topk here
        d2.scatter_(-1, a[..., None], torch.inf)
        second, a2 = d2.min(-1)
        best, a = torch.stack((best, second), -1), torch.stack((a, a2), -1)  # [H, n, B, E, 2]
    else:
        best, a = best[..., None], a[..., None]
    code = a * e + torch.arange(e, device=res.device)[:, None]
    return (best + left).flatten(-2), code.flatten(-2)


def encode_chunk(
    x: torch.Tensor, thetas: torch.Tensor, beam: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[H, n, R]`` and what they leave ``[H, n, D]`` for ``x [H, n, D]`` (one chunk)."""
    h, n, _ = x.shape
    e = thetas.shape[2] // 2
    rows_h = torch.arange(h, device=x.device)[:, None, None]
    rows_n = torch.arange(n, device=x.device)[None, :, None]
    res = x[:, :, None, :]  # [H, n, 1, D]: one sequence before the first stage
    codes = torch.zeros(h, n, 1, 0, dtype=torch.long, device=x.device)
    for r in range(thetas.shape[1]):
        th = thetas[:, r]
        err, cand = _stage_candidates(res, search_tables(th))  # [H, n, kept, 2E]
        flat = err.flatten(2)
        pick = err[:, :, 0].argmin(
            -1, keepdim=True
        )  # slot 0: the nearest extension of slot 0 (greedy)
        width = min(beam, flat.shape[-1])
        if width > 1:  # the other slots: the best of all other extensions
            others = flat.scatter(2, pick, torch.inf)
            pick = torch.cat(
                (pick, torch.topk(others, width - 1, dim=-1, largest=False).indices), -1
            )
        parent, code = pick // cand.shape[-1], cand.flatten(2).gather(2, pick)  # [H, n, width]
        table = decode_table(th)  # [H, 2E, D]
        res = res[rows_h, rows_n, parent] - table[rows_h, code // e] - table[rows_h, e + code % e]
        codes = torch.cat((codes[rows_h, rows_n, parent], code[..., None]), -1)
    best = (res * res).sum(-1).argmin(-1)  # [H, n]
    idx_h, idx_n = rows_h[..., 0], rows_n[..., 0]
    return codes[idx_h, idx_n, best], res[idx_h, idx_n, best]


def beam_encode(
    x: torch.Tensor, thetas: torch.Tensor, beam: int = 1, chunk: int = 1024
) -> torch.Tensor:
    """Codes ``[H, N, R]`` of ``x [H, N, D]`` by a beam of width ``beam`` (1: greedy); what they
    leave after each stage: :func:`stage_residuals`."""
    if beam < 1:
        raise ValueError(f"beam={beam}: must be at least 1")
    out = []
    for i in range(0, x.shape[1], chunk):
        out.append(encode_chunk(x[:, i : i + chunk], thetas, beam)[0])
    return (
        torch.cat(out, 1)
        if out
        else torch.empty(*x.shape[:2], thetas.shape[1], dtype=torch.long, device=x.device)
    )


def encode(x: torch.Tensor, thetas: torch.Tensor, beam: int = 1) -> torch.Tensor:
    """Codes ``[H, N, R]``: greedy (:func:`commvq.quant.residual.encode`) for ``beam=1``, else the
    beam."""
    if beam == 1:
        return greedy_encode(x, thetas)
    return beam_encode(x, thetas, beam)


def stage_residuals(x: torch.Tensor, codes: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """What ``codes [H, N, R]`` leave of ``x`` after each stage, ``[R, H, N, D]``."""
    left, res = [], x.clone()
    for r in range(thetas.shape[1]):
        res = res - decode(thetas[:, r], codes[..., r])
        left.append(res)
    return torch.stack(left)
