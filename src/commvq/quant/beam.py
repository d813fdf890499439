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


def _distance_terms(res: torch.Tensor, tables: tuple) -> tuple[torch.Tensor, ...]:
    """The separable parts of the squared error each code ``a*E + b`` leaves of the kept residuals
    ``res [H, n, B, D]``: ``|res|^2 [H, n, B]``, ``ua, vb [H, n, B, E]`` and ``gt [H, b, a]``;
    the error is ``|res|^2 + (vb[b] + ua[a] + gt[b, a])``."""
    w, nrm, g = tables  # [H, D, 2E], [H, E], [H, E, E]
    e = nrm.shape[-1]
    proj = torch.einsum("hnbd,hdc->hnbc", res, w)
    ua = nrm[:, None, None] - 2 * proj[..., :e]
    vb = nrm[:, None, None] - 2 * proj[..., e:]
    return (res * res).sum(-1), ua, vb, g.transpose(-1, -2)


def _two_best(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two smallest entries of ``d2 [..., E]`` (last dim) and their indices, ``[..., 2]``
    each (the first occurrence on ties)."""
    best, a = d2.min(-1)
    if d2.shape[-1] == 1:
        return best[..., None], a[..., None]
    d2 = d2.scatter(-1, a[..., None], torch.inf)
    second, a2 = d2.min(-1)
    return torch.stack((best, second), -1), torch.stack((a, a2), -1)


def _stage_picks(
    res: torch.Tensor, tables: tuple, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stage of the beam for ``res [H, n, B, D]``: the ``width`` extensions kept, as their
    errors, parent slots and codes, ``[H, n, width]`` each; slot 0 first.

    The candidates are, per kept slot and second index ``b``, the two best first indices ``a``
    (``2E`` per slot); slot 0 takes the nearest extension of slot 0 (greedy), the others the
    best of the other candidates. Only the ``width`` (slot, ``b``) pairs whose best candidate is
    smallest, and slot 0's nearest pair, can hold those: their runner-ups are looked up alone,
    not those of all ``B * E`` pairs."""
    left, ua, vb, gt = _distance_terms(res, tables)
    h, n, kept, e = ua.shape
    # (slot, b) -> its best candidate, [H, n, B*E]: one pass over the E x E table per slot
    pair_best = ((ua[..., None, :] + gt[:, None, None]).amin(-1) + vb + left[..., None]).flatten(2)
    greedy = pair_best[..., :e].argmin(-1, keepdim=True)  # slot 0's nearest pair
    k = min(width, kept * e)
    top = torch.topk(pair_best, k, dim=-1, largest=False).indices if width > 1 else greedy[..., :0]
    pairs = torch.cat((greedy, top), -1)  # [H, n, 1 + k]
    slot, b = pairs // e, pairs % e
    heads = torch.arange(h, device=res.device)[:, None, None]
    # the chosen pairs' errors over every first index a, as the table gives them
    d2 = (
        vb.flatten(2).gather(2, pairs)[..., None]
        + ua.gather(2, slot[..., None].expand(-1, -1, -1, e))
        + gt[heads, b]
    )
    err, a = _two_best(d2)  # [H, n, 1 + k, 2]
    err = err + left.gather(2, slot)[..., None]
    code = a * e + b[..., None]
    pick_err, pick_slot, pick_code = err[:, :, 0, :1], slot[:, :, :1], code[:, :, 0, :1]
    if width > 1:  # the others: the best candidates but the greedy one (counted once)
        dup = (pairs[..., 1:] == greedy)[..., None].expand(-1, -1, -1, err.shape[-1])
        rest = torch.cat(
            (err[:, :, :1, 1:].flatten(2), err[:, :, 1:].masked_fill(dup, torch.inf).flatten(2)), -1
        )
        rest_slot = torch.cat(
            (slot[..., :1], slot[..., 1:, None].expand(-1, -1, -1, err.shape[-1]).flatten(2)), -1
        )
        rest_code = torch.cat((code[:, :, :1, 1:].flatten(2), code[:, :, 1:].flatten(2)), -1)
        w = min(width - 1, rest.shape[-1])
        best = torch.topk(rest, w, dim=-1, largest=False).indices
        pick_err = torch.cat((pick_err, rest.gather(2, best)), -1)
        pick_slot = torch.cat((pick_slot, rest_slot.gather(2, best)), -1)
        pick_code = torch.cat((pick_code, rest_code.gather(2, best)), -1)
    return pick_err, pick_slot, pick_code


def stage_tables(thetas: torch.Tensor) -> list[tuple[tuple, torch.Tensor]]:
    """Per stage of ``thetas [H, R, 2E, P]``: the separable distance tables ``(W, n, G)`` of
    :func:`commvq.quant.commutative.search_tables` and the decode rows ``[H, 2E, D]``."""
    return [
        (search_tables(thetas[:, r]), decode_table(thetas[:, r])) for r in range(thetas.shape[1])
    ]


def encode_chunk(
    x: torch.Tensor, thetas: torch.Tensor, beam: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[H, n, R]`` and what they leave ``[H, n, D]`` for ``x [H, n, D]`` (one chunk)."""
    return encode_chunk_tables(x, stage_tables(thetas), beam)


def encode_chunk_tables(
    x: torch.Tensor, stages: list[tuple[tuple, torch.Tensor]], beam: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_chunk` from per-stage tables as :func:`stage_tables` gives them (or tables of
    rows mapped to another space, with ``x`` mapped alike)."""
    h, n, _ = x.shape
    e = stages[0][1].shape[1] // 2
    rows_h = torch.arange(h, device=x.device)[:, None, None]
    rows_n = torch.arange(n, device=x.device)[None, :, None]
    res = x[:, :, None, :]  # [H, n, 1, D]: one sequence before the first stage
    codes = torch.zeros(h, n, 1, 0, dtype=torch.long, device=x.device)
    for tables, table in stages:
        width = min(beam, min(2, e) * e * res.shape[2])  # candidates: 2 per (slot, b)
        _, parent, code = _stage_picks(res, tables, width)  # [H, n, width]
        res = res[rows_h, rows_n, parent] - table[rows_h, code // e] - table[rows_h, e + code % e]
        codes = torch.cat((codes[rows_h, rows_n, parent], code[..., None]), -1)
    best = (res * res).sum(-1).argmin(-1)  # [H, n]
    idx_h, idx_n = rows_h[..., 0], rows_n[..., 0]
    return codes[idx_h, idx_n, best], res[idx_h, idx_n, best]


def default_chunk(e: int) -> int:
    """Vectors per pass of the beam for ``E`` table entries: 1,024 for 8-bit codes (E = 16), 64
    for 12-bit codes (E = 64), where larger passes ran 2-4x slower on a 2-core CPU."""
    return max(32, min(1024, 2**18 // (e * e)))


def beam_encode(
    x: torch.Tensor, thetas: torch.Tensor, beam: int = 1, chunk: int | None = None
) -> torch.Tensor:
    """Codes ``[H, N, R]`` of ``x [H, N, D]`` by a beam of width ``beam`` (1: greedy); what they
    leave after each stage: :func:`stage_residuals`."""
    if beam < 1:
        raise ValueError(f"beam={beam}: must be at least 1")
    if chunk is None:  # vectors per pass: a pass's E x E tables stay within a CPU's caches
        chunk = default_chunk(thetas.shape[2] // 2)
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
