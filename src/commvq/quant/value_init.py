"""A data-driven start for the value codec: transform coding on the principal axes.

The values of a layer (scaled per channel, divided by their per-token norm: unit vectors ``u``)
are projected on the eigenvectors of their second-moment matrix, ``z = u @ axes``. Each axis gets
0 to 4 bits (greedy reverse water-filling on the quantizers' distortions) and is quantized on its
own: 1 and 2 bits with the Lloyd-Max levels of a Gaussian of its power, 3 and 4 bits with the
uniform quantizer of optimal step ``d``. This fits the codec exactly:

- the decoder is additive in sign bits: the levels of an axis are ``sum_k +-w_k`` (2 bits: Lloyd-Max
  ``+-a +-b``; 3 bits: ``+-2d +-d +-d/2``; 4 bits: ``+-4d +-2d +-d +-d/2``), each bit a decoder row
  ``w_k * rms * axis``;
- a group of 2 bits holds the two bits of one axis (4 levels), or one bit each of two axes;
- a group's nearest pattern maximizes ``2 <c_p, x> - |c_p|^2``, linear in its input ``x``. For the
  coarse bits of a 3-/4-bit axis ``x = z`` (the coarse levels' cells are unions of fine cells); its
  fine bits ("fine" halves) quantize the remainder ``z - c(z)``, where the coarse value ``c`` is a
  staircase of 3 steps. The encoder's MLP computes the linear part exactly (``gelu(x) - gelu(-x) =
  x``) and each step as a steep ramp ``(gelu(k (z - t) + A) - gelu(k (z - t) - A)) / 2A`` from two
  spare hidden units; axes get more than 2 bits only while spare units last.

Pure functions, torch only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Lloyd-Max quantizers of a unit Gaussian (positive levels) at 1 and 2 bits; the optimal uniform
# quantizers' steps at 3 and 4 bits; the distortion at 0..4 bits
LEVELS = {1: (0.7979,), 2: (0.4528, 1.5104)}
STEP = {3: 0.586, 4: 0.335}
DISTORTION = (1.0, 0.3634, 0.1175, 0.03744, 0.01154)
MAX_BITS = 4
STEPS_PER_DEEP_AXIS = 3  # a 3- or 4-bit axis's coarse staircase
RAMP_A = 3.0  # gelu(+-A) is within 0.004 of relu(+-A): the ramp's corners
RAMP_WIDTH = 0.02  # a step's ramp, as a share of the axis's finest step


class Half(NamedTuple):
    """One bit of a group: ``+-weight * rms`` along ``axis``; ``fine``: it quantizes the remainder
    ``z - c(z)`` of a 3-/4-bit axis instead of ``z``."""

    axis: int
    weight: float
    fine: bool = False


def principal_axes(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(power [F], axes [F, F])`` of the second-moment matrix of ``u [N, F]``, largest first
    (uncentered: the codec's decoder has no offset)."""
    u = u.double()
    power, axes = torch.linalg.eigh(u.T @ u / max(len(u), 1))
    return power.flip(0).clamp_min(0), axes.flip(1)


def allocate_bits(power: torch.Tensor, total: int, max_deep: int = 0) -> torch.Tensor:
    """Bits per axis (sum ``total``): each next bit where it removes the most distortion; at most
    2 bits per axis, except that up to ``max_deep`` axes of non-negligible power may take 3 or 4."""
    cap = MAX_BITS if max_deep > 0 else 2
    if not 0 <= total <= cap * len(power) or total % 2:
        raise ValueError(
            f"total={total} bits for {len(power)} axes: an even number, at most {cap} each"
        )
    bits = torch.zeros(len(power), dtype=torch.long)
    dist = torch.tensor(DISTORTION, dtype=torch.float64)
    p = power.double().cpu()
    strong = p > 1e-9 * p.max().clamp_min(
        1e-300
    )  # a staircase on a (numerically) empty axis has no scale
    for _ in range(total):
        can_deepen = int((bits > 2).sum()) < max_deep
        limit = torch.where((bits > 2) | (strong & can_deepen), MAX_BITS, 2)
        gain = torch.where(
            bits < limit, p * (dist[bits] - dist[(bits + 1).clamp_max(MAX_BITS)]), -1.0
        )
        bits[int(gain.argmax())] += 1
    return bits


def staircase(bits: int) -> tuple[float, float, tuple[float, float, float]]:
    """``(base, height, thresholds)`` of the coarse value ``c(z) = base + height * #(thresholds
    below z)`` of a 3- or 4-bit axis, in units of its RMS."""
    h = 2 ** (bits - 2) * STEP[bits]
    return -1.5 * h, h, (-h, 0.0, h)


def axis_halves(i: int, b: int) -> tuple[list[tuple[Half, Half]], list[Half]]:
    """``(whole groups, lone halves)`` of axis ``i`` at ``b`` bits."""
    if b == 1:
        return [], [Half(i, LEVELS[1][0])]
    if b == 2:
        lo, hi = LEVELS[2]
        return [(Half(i, (hi + lo) / 2), Half(i, (hi - lo) / 2))], []
    d = STEP[b]
    coarse = (Half(i, 2 ** (b - 2) * d), Half(i, 2 ** (b - 3) * d))
    if b == 3:
        return [coarse], [Half(i, d / 2, True)]
    return [coarse, (Half(i, d, True), Half(i, d / 2, True))], []


def group_layout(bits: torch.Tensor) -> list[tuple[Half, Half]]:
    """Groups of 2 bits: whole axes' groups first, then the lone halves (1-bit axes and the last
    bit of 3-bit axes) paired in axis order. An even total leaves an even number of lone halves."""
    groups, lone = [], []
    for i, b in enumerate(bits.tolist()):
        whole, halves = axis_halves(i, int(b)) if b else ([], [])
        groups += whole
        lone += halves
    return groups + list(zip(lone[0::2], lone[1::2], strict=True))


def steps(bits: torch.Tensor) -> list[tuple[int, float]]:
    """``(axis, threshold in RMS units)`` of every staircase step, axis by axis."""
    return [(i, t) for i, b in enumerate(bits.tolist()) if b > 2 for t in staircase(int(b))[2]]


def decoder_rows(
    power: torch.Tensor, axes: torch.Tensor, groups: list[tuple[Half, Half]]
) -> torch.Tensor:
    """The codebook ``E [2 * len(groups), F]``: bit ``k`` adds ``+-weight * rms * axis``."""
    rms = power.sqrt()
    rows = [h.weight * rms[h.axis] * axes[:, h.axis] for group in groups for h in group]
    return torch.stack(rows).float()


def pattern_weights(
    power: torch.Tensor,
    bits: torch.Tensor,
    groups: list[tuple[Half, Half]],
    patterns: torch.Tensor,
    sharpness: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a [n, 4, F], c [n, 4, S], b [n, 4])``: the logits ``z @ a^T + H @ c^T + b`` of each
    group's patterns, with ``z = u @ axes`` and ``H [S]`` the step indicators of :func:`steps`
    (``H_s = 1`` when ``z_axis > threshold * rms``), are ``2 <c_p, x> - |c_p|^2`` (argmax = the
    nearest pattern to the group's input ``x``), times ``sharpness`` over the mean power (one scale
    for all groups: weak axes get small weights)."""
    rms = power.sqrt()
    listed = steps(bits)
    index = {}
    for s, (i, _) in enumerate(listed):
        index.setdefault(i, []).append(s)
    n, f = len(groups), len(power)
    a = torch.zeros(n, 4, f, dtype=power.dtype, device=power.device)
    c = torch.zeros(n, 4, len(listed), dtype=power.dtype, device=power.device)
    b = torch.zeros(n, 4, dtype=power.dtype, device=power.device)
    pat = patterns.to(power)
    for g, halves in enumerate(groups):
        levels = [pat[:, k] * h.weight * rms[h.axis] for k, h in enumerate(halves)]  # [4] each
        one_axis = halves[0].axis == halves[1].axis
        b[g] = -((levels[0] + levels[1]) ** 2) if one_axis else -(levels[0] ** 2 + levels[1] ** 2)
        for h, lv in zip(halves, levels, strict=True):
            a[g, :, h.axis] += 2 * lv
            if h.fine:  # 2 l (z - c(z)), c(z) = (base + height * sum_s H_s) * rms
                base, height, _ = staircase(int(bits[h.axis]))
                b[g] -= 2 * lv * base * rms[h.axis]
                c[g, :, index[h.axis]] -= (2 * lv * height * rms[h.axis])[:, None]
    k = sharpness / power.mean().clamp_min(1e-30)
    return a * k, c * k, b * k


def step_units(
    power: torch.Tensor, axes: torch.Tensor, bits: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [2S, F], bias [2S])`` of the hidden units of the steps of :func:`steps`, two per
    step over inputs ``u / scale`` (``z = u @ axes``): with ``t = k (z_axis - threshold * rms)``,
    units ``2s`` and ``2s + 1`` are ``gelu(t + A)`` and ``gelu(t - A)``, so that
    ``H = (gelu(t + A) - gelu(t - A)) / 2A`` (:func:`step_readout`) is 0 below the threshold and 1
    above, a ramp of ``RAMP_WIDTH`` times the axis's finest step in between."""
    rms = power.sqrt()
    listed = steps(bits)
    axis = torch.tensor([i for i, _ in listed], dtype=torch.long, device=axes.device)
    k = torch.tensor(
        [2 * RAMP_A / (RAMP_WIDTH * STEP[int(bits[i])] * float(rms[i])) for i, _ in listed],
        dtype=axes.dtype,
        device=axes.device,
    )
    thresholds = torch.tensor([t for _, t in listed], dtype=axes.dtype, device=axes.device)
    weight = (k[:, None] * axes[:, axis].T * scale).repeat_interleave(2, 0)
    ramp = torch.tensor([RAMP_A, -RAMP_A], dtype=axes.dtype, device=axes.device)
    bias = (-k * thresholds * rms[axis].to(axes.dtype))[:, None] + ramp
    return weight, bias.flatten()


def step_readout(c: torch.Tensor) -> torch.Tensor:
    """The output weights ``[n * 4, 2S]`` on the step units that add ``H @ c^T`` to the logits, for
    the step coefficients ``c [n, 4, S]`` of :func:`pattern_weights`."""
    out = c.flatten(0, 1) / (2 * RAMP_A)
    return torch.stack([out, -out], -1).flatten(1)
