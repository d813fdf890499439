"""Learned binary value codes: the math of the value codec.

Per layer, over all KV heads jointly (``F = H_kv * D`` channels) at ``q`` bits per channel:
``u = (v / scale) / p`` with the per-token norm ``p``; the encoder emits ``n = F*q/2`` groups of
4 logits, each group picks one of 4 two-bit patterns (sign bits, +-1), ``bits [F*q]``; the decoder
is ``y = bits @ E`` (``E [F*q, F]``) and ``v_hat = y / |y| * p * scale``. Storing the per-token
factor ``f = p / |bits @ E|`` makes decoding linear in the bits: ``v_hat = (bits @ E) * f * scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the 4 two-bit patterns, as signs
PATTERNS = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])


def num_groups(width: int, quant_bits: int) -> int:
    if quant_bits not in (1, 2):
        raise ValueError(
            f"quant_bits={quant_bits}: the value codec supports 1 or 2 bits per channel"
        )
    if (width * quant_bits) % 2:
        raise ValueError(f"width={width} x quant_bits={quant_bits} must be even")
    return width * quant_bits // 2


def hidden_size(width: int, quant_bits: int) -> int:
    """Encoder hidden width ``h = min(4096, 4n)``."""
    return min(4096, 4 * num_groups(width, quant_bits))


def normalize(v: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, p)``: per-channel scaled, per-token unit vectors and the per-token norms."""
    z = v.float() / scale
    p = z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return z / p, p.squeeze(-1)


def choose(logits: torch.Tensor, train: bool, tau: float = 1.0) -> torch.Tensor:
    """One-hot ``[..., n, 4]``: hard Gumbel-softmax (straight-through) in training, argmax
    otherwise."""
    if train:
        return F.gumbel_softmax(logits.float(), tau=tau, hard=True)
    return F.one_hot(logits.argmax(-1), 4).to(logits.dtype)


def bits_from_onehot(onehot: torch.Tensor) -> torch.Tensor:
    """``[..., n, 4]`` one-hot -> sign bits ``[..., 2n]`` (differentiable through the one-hot)."""
    return (onehot @ PATTERNS.to(onehot.device, onehot.dtype)).flatten(-2)


def bits_from_index(idx: torch.Tensor) -> torch.Tensor:
    """Pattern indices ``[..., n]`` -> sign bits ``[..., 2n]``."""
    return PATTERNS.to(idx.device)[idx.long()].flatten(-2)


def decode_factor(bits: torch.Tensor, codebook: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The per-token factor ``f = p / |bits @ E|`` stored beside the codes."""
    return p / (bits.float() @ codebook.float()).norm(dim=-1).clamp_min(1e-12)


def decode(
    bits: torch.Tensor, codebook: torch.Tensor, factor: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``v_hat = (bits @ E) * f * scale`` -- linear in the bits."""
    return (
        (bits.to(codebook.dtype) @ codebook)
        * factor[..., None].to(codebook.dtype)
        * scale.to(codebook.dtype)
    )
