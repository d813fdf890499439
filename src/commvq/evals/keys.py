"""Key-codebook errors on held-out keys: relative MSE and a query-weighted logit error.

The logit error of a key error ``e`` seen by a query ``q`` at a random relative position is
``(q . R e)^2``; averaged over the rotation angle of each RoPE pair it is
``sum_f |q_f|^2 |e_f|^2 / 2`` (cross-pair terms average out). So the query-weighted error needs
only ``w_f = E|q_f|^2`` per KV head and pair (averaged over the heads of its GQA group).
"""

from __future__ import annotations

import torch

from commvq.codecs.key_codebook import KeyCodebook
from commvq.rope import split_pairs


def pair_weights(queries: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """``w [H_kv, P]``: mean ``|q_f|^2`` of the query heads sharing each KV head."""
    q = queries.float().reshape(queries.shape[0], -1, head_dim)  # [N, H_q, D]
    re, im = split_pairs(q)
    energy = (re * re + im * im).mean(0)  # [H_q, P]
    return energy.reshape(num_kv_heads, -1, head_dim // 2).mean(1)


def pair_energy(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``|x_f|^2`` per token, KV head and pair: ``[N, H_kv, P]``."""
    re, im = split_pairs(x.float().reshape(x.shape[0], num_kv_heads, -1))
    return re * re + im * im


def key_errors(
    keys: torch.Tensor,
    codebook: KeyCodebook,
    weights: torch.Tensor | None = None,
    chunk: int = 16384,
) -> dict[str, float]:
    """``relative_mse`` (and ``relative_logit_error`` with pair weights) of ``keys [N, H*D]``."""
    h = codebook.num_heads
    err = ref = werr = wref = 0.0
    for i in range(0, keys.shape[0], chunk):
        k = keys[i : i + chunk].float()
        codes, s = codebook.encode(k)
        e = k - codebook.decode(codes, s)
        err += float((e.double() ** 2).sum())
        ref += float((k.double() ** 2).sum())
        if weights is not None:
            werr += float((pair_energy(e, h) * weights).double().sum())
            wref += float((pair_energy(k, h) * weights).double().sum())
    out = {"relative_mse": err / ref}
    if weights is not None:
        out["relative_logit_error"] = werr / wref
    return out


def water_filling(eigenvalues: torch.Tensor, bits: float) -> float:
    """Distortion ``D(R)`` of a Gaussian vector with covariance eigenvalues ``eigenvalues [D]``
    coded at ``bits`` per vector (reverse water-filling: ``sum_i min(lambda_i, t)`` with the level
    ``t`` at which ``sum_i max(0, log2(lambda_i / t) / 2)`` equals ``bits``)."""
    ev = eigenvalues.double().clamp_min(0)
    if bits <= 0 or float(ev.max()) <= 0:
        return float(ev.sum())
    positive = ev[ev > 0]
    lo, hi = float(positive.min()) * 2.0 ** (-2 * bits), float(positive.max())
    for _ in range(200):  # the rate falls monotonically in the level: bisect on log t
        t = (lo * hi) ** 0.5
        rate = float((0.5 * torch.log2(positive / t)).clamp_min(0).sum())
        lo, hi = (t, hi) if rate > bits else (lo, t)
    return float(torch.minimum(ev, torch.tensor(hi, dtype=ev.dtype)).sum())


def gaussian_bound(keys: torch.Tensor, num_kv_heads: int, bits_per_head: float) -> float:
    """Relative MSE a Gaussian source with the mean and covariance of each KV head's keys
    ``keys [N, H*D]`` reaches at ``bits_per_head`` per vector (the rate-distortion function: no
    code of that rate does better on such a source; a source of this covariance that is not
    Gaussian can be coded better)."""
    x = keys.double().reshape(keys.shape[0], num_kv_heads, -1)
    dist = 0.0
    for h in range(num_kv_heads):
        centered = x[:, h] - x[:, h].mean(0)
        cov = centered.T @ centered / x.shape[0]
        dist += water_filling(torch.linalg.eigvalsh(cov), bits_per_head)
    return dist / float((x**2).sum(-1).mean(0).sum())
