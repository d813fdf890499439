"""KeyCodebook: the key codec of one layer (all KV heads, all residual stages), and the choice of
encoder (greedy or beam search; pure torch or Triton)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from commvq.quant import residual
from commvq.quant.beam import encode as torch_encode
from commvq.quant.commutative import as_float, is_untied, num_entries

Encoder = Callable[
    [torch.Tensor, torch.Tensor, int], torch.Tensor
]  # (x [H, N, D], thetas, beam) -> codes [H, N, R]


def encoder_for(kernels: str, device: torch.device | str) -> Encoder:
    """The encoder for ``device``: the fused Triton kernels on a GPU where ``kernels`` (auto, torch
    or triton) allows and triton is installed (greedy for beam 1), else pure torch."""
    if kernels == "torch" or torch.device(device).type != "cuda":
        return torch_encode
    try:
        from commvq.kernels.beam import beam_encode_triton
        from commvq.kernels.encode import encode_triton
    except ImportError:
        if kernels == "triton":
            raise
        return torch_encode

    def fused(x: torch.Tensor, thetas: torch.Tensor, beam: int = 1) -> torch.Tensor:
        return encode_triton(x, thetas) if beam == 1 else beam_encode_triton(x, thetas, beam)

    return fused


class KeyCodebook:
    """Encode pre-RoPE keys ``[N, H*D]`` to codes ``[N, H, R]`` plus one prescale per token.

    ``beam``: the encoder's beam width (1: greedy, the paper's encoder); codebooks trained for a
    beam record it in their config.json and are loaded with it.
    """

    def __init__(
        self,
        thetas: torch.Tensor,
        code_bits: int = 12,
        beam: int = 1,
        encoder: Encoder | None = None,
    ) -> None:
        if thetas.dim() != 4:
            raise ValueError(
                f"thetas must be [H, R, 2E, P] (complex for untied tables), got "
                f"{tuple(thetas.shape)}"
            )
        if thetas.shape[2] != 2 * num_entries(code_bits):
            raise ValueError(
                f"thetas have {thetas.shape[2] // 2} entries, code_bits={code_bits} needs "
                f"{num_entries(code_bits)}"
            )
        if beam < 1:
            raise ValueError(f"beam={beam}: must be at least 1 (1 is greedy coding)")
        self.thetas = thetas
        self.code_bits = code_bits
        self.beam = beam
        self.encoder = encoder or torch_encode

    @property
    def num_heads(self) -> int:
        return self.thetas.shape[0]

    @property
    def num_stages(self) -> int:
        return self.thetas.shape[1]

    @property
    def head_dim(self) -> int:
        return self.thetas.shape[3] * 2

    def to(self, device, kernels: str = "auto") -> KeyCodebook:
        """On ``device``, encoding with the kernels ``kernels`` names there (auto, torch or
        triton)."""
        return KeyCodebook(
            self.thetas.to(device), self.code_bits, self.beam, encoder_for(kernels, device)
        )

    def with_beam(self, beam: int) -> KeyCodebook:
        return KeyCodebook(self.thetas, self.code_bits, beam, self.encoder)

    def code_size(self) -> int:
        """Bits per token: H * R codes of ``code_bits``, plus a 16-bit prescale."""
        return self.num_heads * self.num_stages * self.code_bits + 16

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[H, N, R]`` of normalized keys ``x [H, N, D]``."""
        thetas = self.thetas.to(x.dtype) if not is_untied(self.thetas) else as_float(self.thetas)
        return self.encoder(x, thetas, self.beam)

    def encode(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [N, H, R] int16/int32, prescale [N])`` of keys ``k [N, H*D]``."""
        x, s = residual.normalize(k, self.num_heads)
        codes = self.encode_normalized(x).permute(1, 0, 2)
        dtype = torch.int16 if self.code_bits <= 15 else torch.int32
        return codes.to(dtype), s

    def decode(self, codes: torch.Tensor, prescale: torch.Tensor) -> torch.Tensor:
        """Keys ``[N, H*D]`` (float32) from codes and prescales."""
        x = residual.decode(codes.permute(1, 0, 2).long(), as_float(self.thetas))
        return residual.from_heads(x) * prescale.float()[:, None]
