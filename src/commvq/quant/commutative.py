"""RoPE-commutative codebooks: theta <-> codewords, exact nearest-codeword search, score tables.

One codebook (one KV head, one residual stage) is ``theta`` of shape ``[2E, P]``: rows ``2e`` and
``2e+1`` are the real and imaginary parts ``R_e``, ``I_e`` of the table entry ``a_e`` (``P`` pairs).
The 12-bit (generally ``code_bits``) code ``k = A*E + B`` stands for the codeword
``c_AB[f] = a_A[f] + i a_B[f]``; in the ``rotate_half`` vector layout ``[re (P) | im (P)]``::

    re = R_A - I_B        im = I_A + R_B

Untied tables (``untie``): the B index reads a table of its own, ``c_AB[f] = a_A[f] + i b_B[f]``,
held as a complex ``theta [..., 2E, P]`` (rows ``a_0..a_{E-1}``, then ``b_0..b_{E-1}``; the paper's
tied tables are ``b = a``). The codes, their count and the decode cost are the same; multiplying by
any complex number commutes with RoPE, so the score tables work alike (2E entries instead of E).

Functions take a leading batch of heads: ``theta [H, 2E, P]``, vectors ``x [H, N, D]``.
"""

from __future__ import annotations

import torch


def num_entries(code_bits: int) -> int:
    """Table entries E per codebook: ``2**(code_bits/2)`` (64 for the paper's 12-bit codes)."""
    if code_bits % 2 or not 2 <= code_bits <= 16:
        raise ValueError(f"code_bits={code_bits} must be even and in [2, 16]")
    return 2 ** (code_bits // 2)


def split_theta(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, I)`` of shape ``[..., E, P]``: real and imaginary parts of the table entries."""
    return theta[..., 0::2, :], theta[..., 1::2, :]


def join_theta(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_theta`."""
    return torch.stack((re, im), dim=-2).flatten(-3, -2)


def is_untied(theta: torch.Tensor) -> bool:
    """Whether ``theta`` holds untied tables (complex ``[..., 2E, P]``, see :func:`untie`)."""
    return theta.is_complex()


def untie(theta: torch.Tensor) -> torch.Tensor:
    """The same codebook with untied tables: complex ``[..., 2E, P]``, ``a`` then ``b = a``
    (untied input is returned as it is)."""
    if is_untied(theta):
        return theta
    re, im = split_theta(theta)
    z = torch.complex(re, im)
    return torch.cat((z, z), dim=-2)


def as_float(theta: torch.Tensor) -> torch.Tensor:
    """``theta`` in float32 (complex64 for untied tables): what the encoders and kernels read."""
    return theta.to(torch.complex64 if is_untied(theta) else torch.float32)


def table_parts(
    theta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(R_a, I_a, R_b, I_b)``, each ``[..., E, P]``: the tables the A and the B index read
    (the same table twice for tied theta)."""
    if is_untied(theta):
        e = theta.shape[-2] // 2
        a, b = theta[..., :e, :], theta[..., e:, :]
        return a.real, a.imag, b.real, b.imag
    re, im = split_theta(theta)
    return re, im, re, im


def decode(theta: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Codewords ``[H, N, D]`` of ``codes [H, N]`` (``k = A*E + B``), differentiable in theta."""
    ra, ia, rb, ib = table_parts(theta)
    e = ra.shape[-2]
    a, b = (codes // e).long(), (codes % e).long()
    h = torch.arange(theta.shape[0], device=theta.device)[:, None]
    return torch.cat((ra[h, a] - ib[h, b], ia[h, a] + rb[h, b]), dim=-1)


def decode_table(theta: torch.Tensor) -> torch.Tensor:
    """``M [..., 2E, D]`` with ``decode = onehot(A) @ M[:E] + onehot(B) @ M[E:]``.

    Rows ``A``: ``[R_A | I_A]``; rows ``E + B``: ``[-I_B | R_B]`` (of the B table). A matmul with
    one-hot codes has a cheap, deterministic backward (no scatter of gathered rows).
    """
    ra, ia, rb, ib = table_parts(theta)
    return torch.cat((torch.cat((ra, ia), dim=-1), torch.cat((-ib, rb), dim=-1)), dim=-2)


def codewords(theta: torch.Tensor) -> torch.Tensor:
    """All ``E*E`` codewords ``[H, E*E, D]`` in code order (only for tests and center files)."""
    e = theta.shape[-2] // 2
    codes = torch.arange(e * e, device=theta.device).expand(theta.shape[0], -1)
    return decode(theta, codes)


def interleave_pairs(x: torch.Tensor) -> torch.Tensor:
    """``[re (P) | im (P)]`` -> ``re_0, im_0, re_1, im_1, ...`` (the reference centers layout)."""
    p = x.shape[-1] // 2
    return torch.stack((x[..., :p], x[..., p:]), dim=-1).flatten(-2)


def search_tables(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables of the separable squared distance.

    ``d2(x, c_AB) = |x|^2 - 2 (x.W[:, A] + x.W[:, E+B]) + n[A] + n[B] + G[A, B]`` with
    ``W [H, D, 2E]`` (columns ``[R_e; I_e]`` then ``[-I_e; R_e]``), ``n [H, E] = |a_e|^2`` and
    ``G [H, E, E] = -2 sum_f Im(conj(a_A) b_B)`` (``b = a`` for tied tables). Untied tables fold
    the B table's own norms into ``G``: ``G[A, B] += |b_B|^2 - |a_B|^2``, so that the encoders
    read one norm vector either way.
    """
    ra, ia, rb, ib = table_parts(theta)
    w = decode_table(theta).transpose(-1, -2)  # x . [R_A; I_A] = U_A, x . [-I_B; R_B] = V_B
    n = (ra * ra + ia * ia).sum(-1)
    g = -2.0 * (ra @ ib.transpose(-1, -2) - ia @ rb.transpose(-1, -2))
    if is_untied(theta):
        g = g + ((rb * rb + ib * ib).sum(-1) - n)[..., None, :]
    return w, n, g


def squared_distances(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``[H, N, E*E]`` squared distances to every codeword, by the separable formula."""
    w, n, g = search_tables(theta)
    e = n.shape[-1]
    proj = x @ w
    u, v = proj[..., :e], proj[..., e:]
    xx = (x * x).sum(-1, keepdim=True)
    n = n[:, None]
    d2 = (n - 2 * u)[..., :, None] + (n - 2 * v)[..., None, :] + g[:, None] + xx[..., None]
    return d2.flatten(-2)


def nearest(x: torch.Tensor, theta: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Exact nearest-codeword codes ``[H, N]`` (int64), ``chunk`` vectors at a time."""
    w, n, g = search_tables(theta)
    e = n.shape[-1]
    n = n[:, None]
    out = []
    for i in range(0, x.shape[1], chunk):
        proj = x[:, i : i + chunk] @ w
        s = (
            (n - 2 * proj[..., :e])[..., :, None]
            + (n - 2 * proj[..., e:])[..., None, :]
            + g[:, None]
        )
        out.append(s.flatten(-2).argmin(-1))
    return (
        torch.cat(out, dim=1)
        if out
        else torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
    )


def score_entries(theta: torch.Tensor) -> int:
    """Rows of :func:`score_table` per codebook: E (tied), 2E (untied; the B index reads row
    ``E + B``)."""
    e = theta.shape[-2] // 2
    return 2 * e if is_untied(theta) else e


def score_table(q: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``u [..., E, P, 2]``: ``u_e[f] = q_f^T M(a_e[f])`` with
    ``M(z) = [[Re z, -Im z], [Im z, Re z]]``; untied tables: ``[..., 2E, P, 2]``, the entries of
    ``a`` then those of ``b``.

    ``q [..., D]`` (rotate_half layout), ``theta [2E, P]`` (one codebook, broadcast over q's batch).
    """
    if is_untied(theta):
        re, im = theta.real, theta.imag
    else:
        re, im = split_theta(theta)
    q_re, q_im = q[..., None, : re.shape[-1]], q[..., None, re.shape[-1] :]
    first = q_re * re + q_im * im
    second = -q_re * im + q_im * re
    return torch.stack((first, second), dim=-1)


def scores_from_codes(
    q: torch.Tensor,
    thetas: torch.Tensor,
    codes: torch.Tensor,
    prescale: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """``q . RoPE(decode(codes)) * prescale`` for every cached token, without decoding keys.

    ``q [D]`` (one query head, already rotated), ``thetas [R, 2E, P]`` (its KV head's stages),
    ``codes [T, R]``, ``prescale [T]``, ``cos``/``sin [T, P]`` (the keys' rotation angles).
    """
    e = thetas.shape[-2] // 2
    off = score_entries(thetas) - e  # where the B index's rows start
    u = torch.stack([score_table(q, th) for th in thetas])  # [R, E or 2E, P, 2]
    stage = torch.arange(thetas.shape[0], device=q.device)
    ua = u[stage, (codes // e).long()].sum(1)  # [T, P, 2]
    ub = u[stage, off + (codes % e).long()].sum(1)
    per_pair = ua[..., 0] * cos + ua[..., 1] * sin - ub[..., 0] * sin + ub[..., 1] * cos
    return per_pair.sum(-1) * prescale
