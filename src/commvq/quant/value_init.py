"""A data-driven start for the value codec: transform coding on the principal axes.

The values of a layer (scaled per channel, divided by their per-token norm: unit vectors ``u``)
are projected on the eigenvectors of their second-moment matrix, ``z = u @ axes``. Each axis gets
0, 1 or 2 bits (greedy reverse water-filling on Lloyd-Max distortions, at most 2 so that one
group of 2 bits holds all of an axis's bits) and is quantized with the Lloyd-Max levels of a
Gaussian of its power. This fits the codec exactly: a group's 2 bits are either the two bits of
one axis (levels ``+-a +-b``, 4 levels) or one bit each of two axes, the decoder rows are the
axes scaled by the level weights, and the nearest pattern of a group maximizes
``2 <c_p, z> - |c_p|^2``, linear in ``u`` -- what the encoder's MLP computes exactly from this
start (``gelu(x) - gelu(-x) = x``). Pure functions, torch only.
"""

from __future__ import annotations

import torch

# Lloyd-Max quantizers of a unit Gaussian: positive levels, and the distortion at 0, 1, 2 bits
LEVELS = {1: (0.7979,), 2: (0.4528, 1.5104)}
DISTORTION = (1.0, 0.3634, 0.1175)
MAX_BITS = 2


def principal_axes(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(power [F], axes [F, F])`` of the second-moment matrix of ``u [N, F]``, largest first
    (uncentered: the codec's decoder has no offset)."""
    u = u.double()
    power, axes = torch.linalg.eigh(u.T @ u / max(len(u), 1))
    return power.flip(0).clamp_min(0), axes.flip(1)


def allocate_bits(power: torch.Tensor, total: int) -> torch.Tensor:
    """Bits per axis (0..2, sum ``total``): each next bit where it removes the most distortion."""
    if not 0 <= total <= MAX_BITS * len(power) or total % 2:
        raise ValueError(f"total={total} bits for {len(power)} axes: an even number, at most {MAX_BITS} each")
    bits = torch.zeros(len(power), dtype=torch.long)
    dist = torch.tensor(DISTORTION, dtype=torch.float64)
    p = power.double().cpu()
    for _ in range(total):
        gain = torch.where(bits < MAX_BITS, p * (dist[bits] - dist[(bits + 1).clamp_max(MAX_BITS)]), -1.0)
        bits[int(gain.argmax())] += 1
    return bits  # an even total leaves an even number of 1-bit axes: they pair into groups


def group_layout(bits: torch.Tensor) -> list[tuple[tuple[int, float], tuple[int, float]]]:
    """Per group of 2 bits, ``((axis, weight), (axis, weight))`` in units of the axis's RMS:
    a 2-bit axis fills one group (levels ``+-a +-b`` = Lloyd-Max), 1-bit axes share groups."""
    lo, hi = LEVELS[2]
    a, b = (hi + lo) / 2, (hi - lo) / 2
    groups = [((int(i), a), (int(i), b)) for i in torch.nonzero(bits == 2).flatten()]
    ones = [int(i) for i in torch.nonzero(bits == 1).flatten()]
    groups += [((i, LEVELS[1][0]), (j, LEVELS[1][0])) for i, j in zip(ones[0::2], ones[1::2], strict=True)]
    return groups


def decoder_rows(power: torch.Tensor, axes: torch.Tensor,
                 groups: list[tuple[tuple[int, float], tuple[int, float]]]) -> torch.Tensor:
    """The codebook ``E [2 * len(groups), F]``: bit ``k`` adds ``+-weight * rms * axis``."""
    rms = power.sqrt()
    rows = [w * rms[i] * axes[:, i] for group in groups for i, w in group]
    return torch.stack(rows).float()


def pattern_weights(power: torch.Tensor, groups: list, patterns: torch.Tensor,
                    sharpness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a [n, 4, F], b [n, 4])``: the logits ``z @ a^T + b`` of each group's patterns for
    ``z = u @ axes`` are ``2 <c_p, z> - |c_p|^2`` (argmax = the nearest pattern), times
    ``sharpness`` over the mean power (one scale for all groups: weak axes get small weights)."""
    rms = power.sqrt()
    a = torch.zeros(len(groups), 4, len(power), dtype=power.dtype, device=power.device)
    b = torch.zeros(len(groups), 4, dtype=power.dtype, device=power.device)
    pat = patterns.to(power)
    for g, ((i, wi), (j, wj)) in enumerate(groups):
        ci, cj = pat[:, 0] * wi * rms[i], pat[:, 1] * wj * rms[j]  # [4] the patterns' levels on axes i, j
        a[g, :, i] += 2 * ci
        a[g, :, j] += 2 * cj
        b[g] = -(ci + cj) ** 2 if i == j else -(ci * ci + cj * cj)
    k = sharpness / power.mean().clamp_min(1e-30)
    return a * k, b * k
