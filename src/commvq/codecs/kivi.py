"""KIVI-style scalar quantization (baseline): asymmetric min/max per group, b bits per value.

Keys are quantized per channel (groups of ``group`` consecutive tokens of one channel), values
per token (groups of ``group`` consecutive channels of one token), as KIVI does; each group
stores a scale and a minimum in 16 bits each.
"""

from __future__ import annotations

import torch


def fake_quant(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` in groups of ``group`` along ``dim`` (its size must divide)."""
    if x.shape[dim] % group:
        raise ValueError(f"size {x.shape[dim]} along dim {dim} is not a multiple of group={group}")
    xt = x.float().movedim(dim, -1)
    g = xt.reshape(*xt.shape[:-1], -1, group)
    lo = g.amin(-1, keepdim=True)
    hi = g.amax(-1, keepdim=True)
    levels = 2**bits - 1
    step = ((hi - lo) / levels).clamp_min(1e-8)
    q = ((g - lo) / step).round().clamp(0, levels)
    return (q * step + lo).reshape(xt.shape).movedim(-1, dim).to(x.dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """Values ``[..., T, F]`` per token, groups of ``group`` channels."""
    return fake_quant(v, bits, min(group, v.shape[-1]), dim=-1)


def quantize_keys(k: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """Keys ``[..., T, F]`` per channel, groups of ``group`` tokens (T must be a multiple)."""
    return fake_quant(k, bits, group, dim=-2)


def bits_per_value(bits: int, group: int) -> float:
    """Effective bits per value including the 16-bit scale and minimum of each group."""
    return bits + 32 / group
