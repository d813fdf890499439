"""Float32-accurate products on float16 tensor cores: each operand as a sum of two float16 halves.

A row (or column) is scaled by a power of two so that its largest entry lies in ``[2^10, 2^11)``,
then split into ``hi = fp16(v)`` and ``lo = fp16(v - hi)``: ``hi + lo`` keeps 22 of float32's 24
bits. ``a @ b ~ a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi`` (the ``lo @ lo`` term is below that
precision) is one float16 product with float32 accumulation and output, of ``[a_lo | a_hi | a_hi]``
(``K`` tripled) by ``[b_hi; b_lo; b_hi]``, followed by the exact power-of-two unscaling
``out[i, j] * row_scale[i] * col_scale[j]``, which callers fuse into the kernel that reads the
product. The small terms come first: the tensor cores' accumulator rounds toward zero, so every step
added to the large ``hi @ hi`` sum biases it (H100, a probe, docs/benchmarks.md: a mean error of
4.6e-8 of ``|a| |b|`` toward zero with ``hi @ hi`` first, more than the whole RMS error of float32
on the CUDA cores, 1.7e-8; small terms first: 9e-9, as with the three products apart).

EM's vectors are fixed for a whole stage (100 E-steps), so their split is made once and the
per-iteration product ``x @ W`` reads 1.5x the bytes of ``x`` on tensor cores instead of running
float32 on the CUDA cores (``benchmarks/em_layer.py``).

Names: ``v_split`` is the float16 split of ``v`` (:func:`split_rows`: ``[v_lo | v_hi | v_hi]``;
:func:`split_cols`: ``[v_hi; v_lo; v_hi]``) and ``v_unscale`` its unscaling (per row or per column,
powers of two: ``v ~ (v_hi + v_lo) * v_unscale``).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

# the largest entry of a scaled row lies in [2^10, 2^11): float16's 11 bits, far from overflow
SCALE_EXP = 11


def _unit_scale(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Powers of two ``2^(11 - e)`` with ``max |v| = m 2^e``, ``m`` in ``[0.5, 1)``, along ``dim``
    (kept)."""
    top = torch.linalg.vector_norm(v, ord=math.inf, dim=dim, keepdim=True)
    _, e = torch.frexp(top)
    return torch.ldexp(torch.ones_like(top), SCALE_EXP - e)


def _halves(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = v.half()
    return hi, (v - hi.float()).half()


def split_rows(a: torch.Tensor, rows_per_pass: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``a [..., M, K]`` (float32) -> ``[a_lo | a_hi | a_hi]`` ``[..., M, 3K]`` (float16) and the
    unscaling ``[..., M]`` (``a ~ (a_hi + a_lo) * unscale``), ``rows_per_pass`` rows at a time (the
    temporaries of a whole EM layer would be three times its size)."""
    k = a.shape[-1]
    flat = a.reshape(-1, k)
    out = torch.empty(flat.shape[0], 3 * k, dtype=torch.float16, device=a.device)
    unscale = torch.empty(flat.shape[0], dtype=torch.float32, device=a.device)
    for i in range(0, flat.shape[0], rows_per_pass):
        v = flat[i : i + rows_per_pass].float()
        scale = _unit_scale(v, -1)
        v = v * scale
        rows = out[i : i + rows_per_pass]
        rows[:, k : 2 * k] = v  # hi, rounded to nearest
        rows[:, 2 * k :] = rows[:, k : 2 * k]
        rows[:, :k] = v.sub_(rows[:, k : 2 * k])  # lo = v - hi, exact in float32
        unscale[i : i + rows_per_pass] = 1.0 / scale.squeeze(-1)
    return out.view(*a.shape[:-1], 3 * k), unscale.view(a.shape[:-1])


def split_cols(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``b [..., K, N]`` (float32) -> ``[b_hi; b_lo; b_hi]`` ``[..., 3K, N]`` (float16) and the
    unscaling ``[..., N]``."""
    scale = _unit_scale(b, -2)
    hi, lo = _halves(b.float() * scale)
    return torch.cat((hi, lo, hi), dim=-2), (1.0 / scale).squeeze(-2)


@functools.cache
def supported(device: torch.device) -> bool:
    """Whether this torch gives float16 products a float32 output on ``device`` (``bmm(...,
    out_dtype=)``, torch 2.8 on); callers fall back to float32 products where it does not."""
    if device.type != "cuda":
        return True
    a = torch.zeros(1, 16, 16, dtype=torch.float16, device=device)
    try:
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def product(a_split: torch.Tensor, b_split: torch.Tensor) -> torch.Tensor:
    """``a_split @ b_split`` of split halves (:func:`split_rows`, :func:`split_cols`), float32
    accumulation and output, still scaled (batched ``[B, M, 3K]`` by ``[B, 3K, N]``)."""
    if a_split.is_cuda:
        with fp16_full_reduction():
            return torch.bmm(a_split, b_split, out_dtype=torch.float32)
    # CPU (tests): the same products of float16 values
    return torch.bmm(a_split.float(), b_split.float())


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched, float32) through the split; unscaled here (tests and small products)."""
    a_split, a_unscale = split_rows(a)
    b_split, b_unscale = split_cols(b)
    return product(a_split, b_split) * a_unscale[..., :, None] * b_unscale[..., None, :]


@contextlib.contextmanager
def fp16_full_reduction():
    """No reduced-precision (float16) reductions inside cuBLAS's float16 products."""
    m = torch.backends.cuda.matmul
    keep = m.allow_fp16_reduced_precision_reduction
    m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_fp16_reduced_precision_reduction = keep


@contextlib.contextmanager
def tf32_products():
    """float32 products on TF32 tensor cores (10-bit mantissas) inside the block: for sums whose
    terms need no more, like EM's marginal sums ``S_A``, ``S_B``."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        keep = m.fp32_precision
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = keep
    else:  # older torch
        keep = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = keep
