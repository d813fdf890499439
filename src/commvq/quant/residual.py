"""Greedy residual coding with commutative codebooks, and the per-token key prescale.

Keys of one layer ``k [N, H*D]`` are divided by their L2 norm over all KV heads (the prescale,
one scalar per token), split into heads ``x [H, N, D]``, and coded stage by stage: each stage
quantizes what the previous ones left (``thetas [H, R, 2E, P]``, codes ``[H, N, R]``).
"""

from __future__ import annotations

import torch

from commvq.quant.commutative import decode as decode_stage
from commvq.quant.commutative import decode_table, nearest


def residuals_for_bits(quant_bits: float, head_dim: int, code_bits: int = 12) -> int:
    """Stages R giving about ``quant_bits`` per channel:
    ``round(quant_bits * head_dim / code_bits)``."""
    r = round(quant_bits * head_dim / code_bits)
    if r < 1:
        raise ValueError(
            f"quant_bits={quant_bits} with head_dim={head_dim}, code_bits={code_bits} "
            "gives 0 stages"
        )
    return r


def prescale(k: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm over all KV heads of the layer, ``[N]`` (zeros become 1)."""
    s = k.float().norm(dim=-1)
    return torch.where(s > 0, s, torch.ones_like(s))


def to_heads(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[N, H*D]`` -> ``[H, N, D]``."""
    return k.reshape(k.shape[0], num_heads, -1).transpose(0, 1)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """``[H, N, D]`` -> ``[N, H*D]``."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def normalize(k: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [H, N, D], s [N])``: unit-norm (over the layer) keys split into heads, and the norms."""
    s = prescale(k)
    return to_heads(k.float() / s[:, None], num_heads), s


def encode(
    x: torch.Tensor, thetas: torch.Tensor, chunk: int = 8192, nearest_fn=nearest
) -> torch.Tensor:
    """Greedy residual codes ``[H, N, R]`` of ``x [H, N, D]`` (``nearest_fn``: a fused kernel)."""
    return _greedy(x, thetas, chunk, nearest_fn, keep=False)[0]


def encode_with_residuals(
    x: torch.Tensor, thetas: torch.Tensor, chunk: int = 8192, nearest_fn=nearest
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy codes ``[H, N, R]`` and what each stage leaves, ``[R, H, N, D]``:
    ``x - sum_{j <= r} c_j``."""
    codes, left = _greedy(x, thetas, chunk, nearest_fn, keep=True)
    return codes, torch.stack(left)


def _greedy(
    x: torch.Tensor, thetas: torch.Tensor, chunk: int, nearest_fn, keep: bool
) -> tuple[torch.Tensor, list]:
    residual = x.clone()
    codes, left = [], []
    for r in range(thetas.shape[1]):
        c = nearest_fn(residual, thetas[:, r], chunk)
        residual -= decode_stage(thetas[:, r], c)
        codes.append(c)
        if keep:
            left.append(residual.clone())
    return torch.stack(codes, dim=-1), left


def decode(codes: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Sum of the stages' codewords, ``[H, N, D]`` (differentiable in thetas)."""
    out = decode_stage(thetas[:, 0], codes[..., 0])
    for r in range(1, thetas.shape[1]):
        out = out + decode_stage(thetas[:, r], codes[..., r])
    return out


def code_onehot(
    codes: torch.Tensor, num_entries: int, dtype: torch.dtype, by_head: bool = False
) -> torch.Tensor:
    """``[R, H, N, 2E]``: ones at ``A`` and ``E + B`` of each code ``A*E + B`` of
    ``codes [H, N, R]``; ``by_head=True``: the same ones laid out ``[H, R, 2E, N]`` (for sums over
    tokens per table row)."""
    if by_head:
        c, dim = codes.long().transpose(1, 2)[:, :, None, :], 2  # [H, R, 1, N]
        shape = (codes.shape[0], codes.shape[2], 2 * num_entries, codes.shape[1])
    else:
        c, dim = codes.long().permute(2, 0, 1)[..., None], 3  # [R, H, N, 1]
        shape = (*c.shape[:3], 2 * num_entries)
    onehot = torch.zeros(shape, device=codes.device, dtype=dtype)
    onehot.scatter_(dim, c // num_entries, 1.0)
    onehot.scatter_(dim, num_entries + c % num_entries, 1.0)
    return onehot


def stage_decodes(codes: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Each stage's codewords ``[R, H, N, D]``, as one batched one-hot matmul (differentiable)."""
    onehot = code_onehot(codes, thetas.shape[-2] // 2, thetas.dtype)
    return onehot @ decode_table(thetas).transpose(0, 1)  # [R, H, N, 2E] @ [R, H, 2E, D]


def stage_errors(
    x: torch.Tensor, s: torch.Tensor, thetas: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """``[R, H]`` MSE in original scale (times the prescale) left after each greedy stage."""
    out = torch.zeros(thetas.shape[1], x.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, x.shape[1], chunk):
            xc, sc = x[:, i : i + chunk], s[i : i + chunk]
            left = encode_with_residuals(xc, thetas, chunk)[1]  # [R, H, n, D]
            out += ((left * sc[:, None]) ** 2).sum((2, 3)).double().cpu()
    return (out / (x.shape[1] * x.shape[2])).float()
