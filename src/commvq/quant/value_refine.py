"""Refining the value codec's codes after its encoder: block coordinate descent on the decode error.

The encoder (an MLP, one argmax per group of 2 bits) only approximates the codes that minimize
the error of the decoder it was trained with. With the decoder fixed, the error of a token's
unit vector ``u`` (scaled space, :func:`commvq.quant.binary.normalize`) is, for bits ``b`` and
``y = b @ E``,

    ``err(b) = |S (u - y / |y|)|^2 = |S u|^2 - 2 <S^2 u, y> / |y| + |S y|^2 / |y|^2``

(``S`` the per-channel scale: the value error ``|v - v_hat|^2`` is ``p^2 err(b)``). Every term is
a quadratic or linear form in ``b``, so the error after changing one group's two bits follows from
``b @ G``, ``b @ G_S`` (``G = E E^T``, ``G_S = E S^2 E^T``) and ``c = E S^2 u`` in O(1) per
candidate pattern. A sweep visits the groups in ``colors`` sets (group ``g`` in set ``g % colors``);
all groups of a set move at once to their best pattern given the rest, and a token takes the move
only where its error falls. So the error of every token never rises above the encoder's, the
codes keep their format, and decoding is unchanged.

Pure functions, torch only.
"""

from __future__ import annotations

import torch

from commvq.quant import binary


def decode_error(
    bits: torch.Tensor, u: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``err(b)`` per token ``[N]`` (module docstring), computed directly."""
    y = bits.float() @ codebook.float()
    y_hat = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (((u.float() - y_hat) * scale.float()) ** 2).sum(-1)


class _Forms:
    """The quadratic forms of the error, for one batch of tokens and one decoder."""

    def __init__(self, u: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor) -> None:
        e = codebook.float()
        s2 = scale.float() ** 2
        self.gram = e @ e.T  # [nb, nb]
        self.gram_s = (e * s2) @ e.T
        self.c = (u.float() * s2) @ e.T  # [N, nb]
        self.us = (u.float() ** 2 * s2).sum(-1)  # [N]
        n = e.shape[0] // 2
        # each group's own 2x2 blocks [n, 2, 2]
        self.block = self.gram.reshape(n, 2, n, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        self.block_s = self.gram_s.reshape(n, 2, n, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    def error(self, bits: torch.Tensor) -> torch.Tensor:
        yy = ((bits @ self.gram) * bits).sum(-1).clamp_min(1e-24)
        ys = ((bits @ self.gram_s) * bits).sum(-1)
        return self.us - 2 * (self.c * bits).sum(-1) / yy.sqrt() + ys / yy

    def best_patterns(self, bits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """For each token and each group of ``groups``, the pattern (0-3) of least error with
        the other groups as they are: ``[N, len(groups)]``."""
        n_tok = bits.shape[0]
        cols = torch.stack((2 * groups, 2 * groups + 1), -1).flatten()  # the groups' bits
        gb = (bits @ self.gram[:, cols]).reshape(n_tok, -1, 2)
        gsb = (bits @ self.gram_s[:, cols]).reshape(n_tok, -1, 2)
        yy = ((bits @ self.gram) * bits).sum(-1)
        ys = ((bits @ self.gram_s) * bits).sum(-1)
        cu = (self.c * bits).sum(-1)
        patterns = binary.PATTERNS.to(bits.device, bits.dtype)
        delta = patterns[None, None] - bits[:, cols].reshape(n_tok, -1, 1, 2)  # [N, m, 4, 2]
        blk, blk_s = self.block[groups], self.block_s[groups]  # [m, 2, 2]
        yy_k = (
            yy[:, None, None]
            + 2 * torch.einsum("xgi,xgki->xgk", gb, delta)
            + torch.einsum("gij,xgki,xgkj->xgk", blk, delta, delta)
        )
        ys_k = (
            ys[:, None, None]
            + 2 * torch.einsum("xgi,xgki->xgk", gsb, delta)
            + torch.einsum("gij,xgki,xgkj->xgk", blk_s, delta, delta)
        )
        cu_k = cu[:, None, None] + torch.einsum(
            "xgi,xgki->xgk", self.c[:, cols].reshape(n_tok, -1, 2), delta
        )
        yy_k = yy_k.clamp_min(1e-24)
        return (ys_k / yy_k - 2 * cu_k / yy_k.sqrt()).argmin(-1)


def refine_codes(
    idx: torch.Tensor,
    u: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    sweeps: int,
    colors: int = 4,
) -> torch.Tensor:
    """Pattern indices ``idx [N, n]`` (the encoder's) -> refined ones of no larger
    :func:`decode_error` for any token, after ``sweeps`` sweeps of ``colors`` block steps."""
    if sweeps < 0 or colors < 1:
        raise ValueError(f"sweeps={sweeps}, colors={colors}: need sweeps >= 0 and colors >= 1")
    if sweeps == 0 or idx.numel() == 0:
        return idx
    forms = _Forms(u, codebook, scale)
    n = idx.shape[-1]
    idx = idx.clone()
    bits = binary.bits_from_index(idx).float()
    err = forms.error(bits)
    sets = [torch.arange(k, n, colors, device=idx.device) for k in range(min(colors, n))]
    for _ in range(sweeps):
        for groups in sets:
            trial = idx.clone()
            trial[:, groups] = forms.best_patterns(bits, groups)
            trial_bits = binary.bits_from_index(trial).float()
            trial_err = forms.error(trial_bits)
            better = trial_err < err
            idx = torch.where(better[:, None], trial, idx)
            bits = torch.where(better[:, None], trial_bits, bits)
            err = torch.where(better, trial_err, err)
    return idx
