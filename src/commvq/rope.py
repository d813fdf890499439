"""RoPE in the ``rotate_half`` layout, as pure functions.

Channel ``j`` of a head pairs with channel ``j + D/2``; pair ``f`` is the complex number
``x_f + i x_{f+D/2}``, rotated by ``exp(i m w_f)`` at position ``m``. ``cos``/``sin`` tables
have the Hugging Face shape ``[..., T, D]`` (the ``P`` frequencies repeated twice).
"""

from __future__ import annotations

import torch


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Default (unscaled) RoPE frequencies ``w_f = theta^(-2f/D)``, float32 ``[D/2]``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return (1.0 / theta**exponents).float()


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` tables ``[..., T, D]`` for frequencies ``[P]`` at ``positions [..., T]``."""
    angles = positions.to(freqs.dtype)[..., None] * freqs
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, D]`` forward by the angles in ``cos``/``sin``."""
    return x * cos + rotate_half(x) * sin


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by the negative angles)."""
    return x * cos - rotate_half(x) * sin


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts ``([..., P], [..., P])`` of the pairs of ``x [..., D]``."""
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def merge_pairs(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_pairs`."""
    return torch.cat((re, im), dim=-1)
