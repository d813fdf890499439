"""KeyCodebook: the key codec of one layer (all KV heads, all residual stages)."""

from __future__ import annotations

from pathlib import Path

import torch

from commvq import io
from commvq.quant import residual
from commvq.quant.commutative import num_entries
from commvq.spec import ModelSpec


class KeyCodebook:
    """Encode pre-RoPE keys ``[N, H*D]`` to codes ``[N, H, R]`` plus one prescale per token."""

    def __init__(self, thetas: torch.Tensor, code_bits: int = 12) -> None:
        if thetas.dim() != 4:
            raise ValueError(f"thetas must be [H, R, 2E, P], got {tuple(thetas.shape)}")
        if thetas.shape[2] != 2 * num_entries(code_bits):
            raise ValueError(f"thetas have {thetas.shape[2] // 2} entries, code_bits={code_bits} needs "
                             f"{num_entries(code_bits)}")
        self.thetas = thetas
        self.code_bits = code_bits

    @classmethod
    def from_dir(cls, folder: str | Path, layer: int, spec: ModelSpec) -> KeyCodebook:
        layout = io.check_fits(Path(folder), spec)
        return cls(io.load_layer(Path(folder), layer, spec), layout.code_bits)

    @property
    def num_heads(self) -> int:
        return self.thetas.shape[0]

    @property
    def num_stages(self) -> int:
        return self.thetas.shape[1]

    @property
    def head_dim(self) -> int:
        return self.thetas.shape[3] * 2

    def to(self, device) -> KeyCodebook:
        return KeyCodebook(self.thetas.to(device), self.code_bits)

    def code_size(self) -> int:
        """Bits per token: H * R codes of ``code_bits``, plus a 16-bit prescale."""
        return self.num_heads * self.num_stages * self.code_bits + 16

    def encode(self, k: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [N, H, R] int16/int32, prescale [N])`` of keys ``k [N, H*D]``."""
        x, s = residual.normalize(k, self.num_heads)
        codes = residual.encode(x, self.thetas.to(x.dtype), chunk).permute(1, 0, 2)
        dtype = torch.int16 if self.code_bits <= 15 else torch.int32
        return codes.to(dtype), s

    def decode(self, codes: torch.Tensor, prescale: torch.Tensor) -> torch.Tensor:
        """Keys ``[N, H*D]`` (float32) from codes and prescales."""
        x = residual.decode(codes.permute(1, 0, 2).long(), self.thetas.float())
        return residual.from_heads(x) * prescale.float()[:, None]
