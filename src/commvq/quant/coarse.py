"""Coarse-to-fine decode over residual key codes: the pure math.

Every cached token is scored with its first ``S`` residual stages only (the *coarse* score ``c``);
the ``budget`` tokens that rank highest are scored exactly and mix their values; the others are
dropped. The encoder stores, per token and KV head, the norm ``d`` of what the later stages add
(``|sum_{r >= S} codeword_r|`` of the normalized key, in one byte, rounded up), so the exact score
lies within ``c +- b`` with ``b = |q| * prescale * rope_scale * d`` (Cauchy-Schwarz: the
rotation keeps norms). From those bounds:

- a token whose upper bound ``c + b`` lies more than ``margin`` below the best lower bound ``L`` of
  its query row carries at most ``exp(-margin)`` of the best token's weight: it is dropped even if
  the budget would keep it;
- the exact softmax's mass on the dropped tokens is at most ``sum_dropped exp(c + b - L)`` (the
  token that attains ``L`` alone has weight ``exp(L)`` or more), computed in the same pass.

``fill="coarse"`` gives the dropped tokens their coarse weights instead of none: one more entry
in the softmax, ``logsumexp`` of their coarse scores, whose weight is spread over their values by
the softmax of those scores (:func:`fill_terms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from commvq.quant import residual
from commvq.quant.commutative import as_float

# one byte per token and KV head: d_hat = 2 ** ((code - TAIL_OFFSET) / TAIL_STEPS), rounded up
TAIL_STEPS = 16
TAIL_OFFSET = 224  # code 0 = 2**-14 (anything smaller rounds up to it), code 255 = 2**(31/16)
TAIL_SLACK = 2.0**-8  # stored >= d * (1 + slack): covers the kernels' float16 codebook rounding
FILLS = ("none", "coarse")
SELECTS = ("topk", "radix")


@dataclass(frozen=True)
class CoarseSettings:
    """``stages``: the residual stages the coarse pass sums (S); ``keep``: the share of compressed
    tokens scored exactly, at least ``min_tokens`` of them (the budget); ``margin`` (logits): also
    drop a kept token whose upper bound lies more than this below its row's best lower bound
    (``inf``: the budget alone decides); ``fill``: what the dropped tokens get, ``none`` (no weight)
    or ``coarse`` (one share of the softmax, from their coarse scores, spread over their values by
    those scores: coarse scores written per query head and a values pass over every compressed
    token, so not the rank-only kernel); ``select``: how the budget is picked from the ranks,
    ``radix`` (:mod:`commvq.kernels.select` where the decode kernels serve, 3.5x faster than the
    top-k on an H100; ties within 2**-15 go to the earlier tokens; elsewhere torch's top-k) or
    ``topk`` (torch's top-k, then a sort); ``exact_layers``: layers decoded exactly all the same (a
    layer whose attention spreads over most tokens, as the first layer's does, loses much of its
    mass to any budget); ``pairs``: the share of RoPE pairs the coarse pass sums (1, 1/2, 1/4, ...;
    below 1 the pairs whose first ``stages`` codewords carry the most energy, a cheaper and rougher
    rank that the stored bound no longer covers, so it needs ``margin = inf``); ``rerank``: with
    ``pairs < 1``, the best ``rerank x budget`` tokens of that pass are ranked again over every pair
    (same stages) and the budget is picked from them (0: one pass; a second pass over a few
    candidates that ranks about as well as one over every pair); ``fused``: the window's scores
    and the final softmax with the window's values on two Triton kernels
    (:mod:`commvq.kernels.window`; where triton is installed and the keys' ``kernels`` are not
    ``torch``, without a sink, a mask, a margin, a log or the fill; their torch references off a
    GPU); ``False``: the same in torch's kernels."""

    stages: int = 2
    keep: float = 1 / 8
    min_tokens: int = 256
    margin: float = math.inf
    exact_layers: tuple[int, ...] = (0,)
    pairs: float = 1.0
    fill: str = "none"
    select: str = "radix"
    rerank: float = 0.0
    fused: bool = True

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"coarse stages={self.stages}: must be at least 1")
        if not 0 < self.keep <= 1:
            raise ValueError(f"coarse keep={self.keep}: a share in (0, 1], e.g. 0.03")
        if self.min_tokens < 1:
            raise ValueError(f"coarse min_tokens={self.min_tokens}: must be at least 1")
        if not self.margin >= 0:
            raise ValueError(f"coarse margin={self.margin}: logits >= 0 (inf: budget only)")
        object.__setattr__(self, "exact_layers", tuple(int(i) for i in self.exact_layers))
        if any(i < 0 for i in self.exact_layers):
            raise ValueError(f"coarse exact_layers={self.exact_layers}: layer indices >= 0")
        if not 0 < self.pairs <= 1 or not math.log2(1 / self.pairs).is_integer():
            raise ValueError(f"coarse pairs={self.pairs}: 1, 0.5, 0.25, ... (a power of two)")
        if self.fill not in FILLS:
            raise ValueError(f"coarse fill={self.fill!r}: one of {FILLS}")
        if self.select not in SELECTS:
            raise ValueError(f"coarse select={self.select!r}: one of {SELECTS}")
        if self.rerank != 0 and not (self.rerank >= 1 and self.pairs < 1):
            raise ValueError(
                f"coarse rerank={self.rerank} with pairs={self.pairs}: candidates per budget "
                "token, at least 1, and only with pairs < 1 (0: no second pass)"
            )
        if self.pairs < 1 and self.margin != math.inf:
            raise ValueError(
                f"coarse pairs={self.pairs} with margin={self.margin}: the stored bound covers "
                "the later stages, not the pairs left out; use margin=inf or pairs=1"
            )

    def budget(self, n: int) -> int:
        """Tokens scored exactly out of ``n`` compressed ones."""
        return min(n, max(self.min_tokens, math.ceil(self.keep * n)))

    def candidates(self, n: int) -> int:
        """Tokens the second pass ranks again out of ``n`` (``rerank``; without one the budget:
        no second pass)."""
        return min(n, math.ceil(self.rerank * self.budget(n))) if self.rerank else self.budget(n)


def tail_code(d: torch.Tensor) -> torch.Tensor:
    """The byte whose :func:`tail_value` is the smallest grid value >= ``d * (1 + TAIL_SLACK)``
    (uint8). Norms above ``tail_value(255)`` (about 3.8; a normalized key's own norm is at most
    1) are clamped, the one case where the stored bound could be short."""
    x = d.float().clamp_min(2.0**-30) * (1 + TAIL_SLACK)
    code = torch.ceil(torch.log2(x) * TAIL_STEPS - 1e-4) + TAIL_OFFSET
    code = code.clamp(0, 255)
    code = code + (tail_value(code) < x).float()  # log2's rounding: never below d
    return code.clamp(0, 255).to(torch.uint8)


def tail_value(code: torch.Tensor) -> torch.Tensor:
    """The norm a stored byte stands for (float32)."""
    return torch.exp2((code.float() - TAIL_OFFSET) / TAIL_STEPS)


def tail_norms(codes: torch.Tensor, thetas: torch.Tensor, stages: int) -> torch.Tensor:
    """``|sum_{r >= stages} codeword_r|`` per head and vector: codes ``[H, N, R]`` -> ``[H, N]``
    (0 when ``stages >= R``)."""
    if stages >= thetas.shape[1]:
        return torch.zeros(codes.shape[:2], device=codes.device)
    tail = residual.decode(codes[..., stages:].long(), as_float(thetas[:, stages:]))
    return tail.norm(dim=-1)


def coarse_pairs(thetas: torch.Tensor, stages: int, share: float) -> torch.Tensor:
    """The RoPE pairs ``[P * share]`` (increasing) a coarse pass over ``share`` of them sums: those
    whose table entries of the first ``stages`` stages carry the most energy over all KV heads
    (``thetas [H, R, 2E, P]``)."""
    p = thetas.shape[-1]
    count = max(1, round(p * share))
    return pair_energy(thetas, stages).sum(0).topk(count).indices.sort().values


def pair_energy(thetas: torch.Tensor, stages: int) -> torch.Tensor:
    """Per KV head and RoPE pair, the energy of the first ``stages`` stages' table entries
    (``thetas [H, R, 2E, P]`` -> ``[H, P]``, float64)."""
    return (thetas[:, :stages].abs().double() ** 2).sum(dim=(1, 2))  # |entry|^2: complex too


def rank(coarse: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Each token's best chance over a sequence's query rows: ``max_rows (c - best_row)``.
    ``coarse [B, H, T, N]``, ``best [B, H, T, 1]`` (each row's best score, coarse or exact)
    -> ``[B, N]``."""
    return (coarse - best).amax(dim=(1, 2))


def pick(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest of ``scores [B, N]``, as indices in increasing order ``[B, k]``."""
    if k >= scores.shape[1]:
        return torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def fill_terms(coarse: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the ``dropped [B|1, Hq|1, T|1, N]`` tokens get under ``fill="coarse"``: one logit
    for their share of the softmax, the log-sum-exp of their coarse scores ``[B, Hq, T, 1]``
    (``-inf`` where none is dropped), and each one's part of that share, the softmax of its
    coarse score over the dropped ones ``[B, Hq, T, N]`` (0 on the others)."""
    c = coarse.masked_fill(~dropped, float("-inf"))
    return torch.logsumexp(c, -1, keepdim=True), torch.softmax(c, -1).nan_to_num(0.0)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [B, k]`` of a block tensor ``x [B, n, ...]`` -> ``[B, k, ...]``."""
    index = idx.reshape(*idx.shape, *[1] * (x.dim() - 2)).expand(*idx.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def take_cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Last-dim entries ``idx [B, k]`` of ``x [B|1, H|1, T, n]`` -> ``[B, H|1, T, k]``."""
    x = x.expand(idx.shape[0], *x.shape[1:])
    return torch.gather(x, -1, idx[:, None, None, :].expand(*x.shape[:-1], idx.shape[1]))


def bounds(
    coarse: torch.Tensor, width: torch.Tensor, others_best: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(upper [B, H, T, N], best_lower [B, H, T, 1])``: the coarse scores' upper bounds ``c + b``
    and each row's best lower bound over the compressed tokens (``c - b``) and the exactly
    scored ones (``others_best``, ``-inf`` where there are none)."""
    upper = coarse + width
    best_lower = torch.maximum((coarse - width).amax(-1, keepdim=True), others_best)
    return upper, best_lower


def dropped_mass_bound(
    upper: torch.Tensor, best_lower: torch.Tensor, dropped: torch.Tensor
) -> torch.Tensor:
    """Most attention mass the exact softmax could give the ``dropped [B|1, H|1, T|1, N]`` tokens:
    ``sum exp(upper - best_lower)`` over them, per row ``[B, H, T]`` (may exceed 1: no guarantee
    then)."""
    return torch.where(dropped, torch.exp(upper - best_lower), 0.0).sum(-1)
