"""KIVI-style scalar quantization (baseline): asymmetric min/max per group, b bits per value.

Keys are quantized per channel (groups of ``group`` consecutive tokens of one channel), values
per token (groups of ``group`` consecutive channels of one token), as KIVI does; each group
stores a scale and a minimum in 16 bits each.
"""

from __future__ import annotations

import torch


def quantize(
    x: torch.Tensor, bits: int, group: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, shaped like ``x``), minima and steps of ``x`` in groups of ``group`` along
    ``dim`` (its size must divide); minima and steps are shaped like ``x`` with ``dim`` shrunk to
    the number of groups."""
    if x.shape[dim] % group:
        raise ValueError(f"size {x.shape[dim]} along dim {dim} is not a multiple of group={group}")
    g = x.float().movedim(dim, -1).unflatten(-1, (-1, group))
    lo = g.amin(-1, keepdim=True)
    hi = g.amax(-1, keepdim=True)
    levels = 2**bits - 1
    step = ((hi - lo) / levels).clamp_min(1e-8)
    codes = ((g - lo) / step).round().clamp(0, levels).to(torch.uint8)
    return (
        codes.flatten(-2).movedim(-1, dim),
        lo[..., 0].movedim(-1, dim),
        step[..., 0].movedim(-1, dim),
    )


def dequantize(
    codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, group: int, dim: int
) -> torch.Tensor:
    """Inverse of :func:`quantize` (float32)."""
    g = codes.float().movedim(dim, -1).unflatten(-1, (-1, group))
    lo, step = lo.float().movedim(dim, -1)[..., None], step.float().movedim(dim, -1)[..., None]
    return (g * step + lo).flatten(-2).movedim(-1, dim)


def fake_quant(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` in groups of ``group`` along ``dim``."""
    return dequantize(*quantize(x, bits, group, dim), group, dim).to(x.dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """Values ``[..., T, F]`` per token, groups of ``group`` channels."""
    return fake_quant(v, bits, min(group, v.shape[-1]), dim=-1)


def quantize_keys(k: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """Keys ``[..., T, F]`` per channel, groups of ``group`` tokens (T must be a multiple)."""
    return fake_quant(k, bits, group, dim=-2)
