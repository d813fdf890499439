"""Codes and bits <-> bytes."""

from __future__ import annotations

import torch


def pack_2bit(idx: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` integers in 0..3 -> ``[..., ceil(n/4)]`` uint8 (four per byte, first in the low
    bits)."""
    n = idx.shape[-1]
    pad = (-n) % 4
    x = torch.nn.functional.pad(idx.to(torch.uint8), (0, pad)).reshape(*idx.shape[:-1], -1, 4)
    return x[..., 0] | (x[..., 1] << 2) | (x[..., 2] << 4) | (x[..., 3] << 6)


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: ``[..., n]`` int64."""
    shifts = torch.tensor([0, 2, 4, 6], device=packed.device, dtype=torch.uint8)
    x = (packed[..., None] >> shifts) & 3
    return x.reshape(*packed.shape[:-1], -1)[..., :n].long()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., n]`` integers below ``2**bits`` -> little-endian bit stream ``[..., ceil(n*bits/8)]``
    uint8."""
    n = codes.shape[-1]
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.long()[..., None] >> shifts) & 1).reshape(*codes.shape[:-1], n * bits)
    pad = (-stream.shape[-1]) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(*codes.shape[:-1], -1, 8)
    return (stream << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., n]`` int64 (fast paths for 1, 2, 4, 8, 6 and 12
    bits)."""
    lead = packed.shape[:-1]
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        x = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return x.reshape(*lead, -1)[..., :n].long()
    if 24 % bits == 0:
        b = (
            torch.nn.functional.pad(packed, (0, (-packed.shape[-1]) % 3))
            .long()
            .reshape(*lead, -1, 3)
        )
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # 24 little-endian bits
        shifts = torch.arange(0, 24, bits, device=packed.device)
        x = (word[..., None] >> shifts) & ((1 << bits) - 1)
        return x.reshape(*lead, -1)[..., :n]
    stream = (packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : n * bits].reshape(
        *packed.shape[:-1], n, bits
    )
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)
