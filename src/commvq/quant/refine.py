"""Joint least-squares refinement of all residual stages: the E2E objective solved exactly for
fixed codes, alternated with re-encoding.

With the codes fixed, a vector's decode is linear in the table entries, and RoPE pair ``f`` of the
decode depends only on the entries' pair ``f``. In complex form (``z_r[e] = R_r[e] + i I_r[e]``,
``x_f = re_f + i im_f``) stage ``r`` contributes ``z_r[A_r] + i z_r[B_r]``, so per head one
``R*E``-square Hermitian normal matrix, shared by all ``P`` pairs, gives every stage at once::

    phi_n = onehot(A) + i onehot(B)           (over all stages, length R*E)
    G     = sum_n conj(phi_n) phi_n^T         rhs = sum_n conj(phi_n) x_n        [R*E, P]

The E2E loss ``Recon + commit_weight * Commit`` (targets detached) adds each stage's own block of
``G`` (times ``commit_weight / R``) and its targets, what the earlier stages leave. A small ridge
pulls unused entries toward their current values. A round encodes the training vectors, gathers
``G`` and ``rhs`` in one pass (chunked; nothing of size ``N`` is kept), solves by Cholesky, and is
scored on the held-out split; the best round (round 0: the start) is kept.
A round moves the tables by a fraction of the solve's step (``step="search"``): the one of
:data:`STEP_SIZES` whose tables the beam encodes best on a sample of the training vectors (tried
largest first, halving while the sample's error falls). The
solve fits the codes the encoder found; its full step can give tables the beam encodes far
worse than those codes (each stage no longer the best start for the next), and full steps then
run away round after round (held-out error x10 by round 8 on synthetic Llama-shape keys).
Untied tables (complex theta, :func:`commvq.quant.commutative.untie`) put the B index in columns of
its own: ``phi_n = onehot(A) + i onehot(E + B)`` over ``R*2E`` columns, the same solve.
Pair weights (``objective=attention``) scale every equation of a pair alike, so they do not change
the solution: they matter to training only through the encoder. Vector weights do: the keys are
trained unit-norm (``x = k / s``) while the error that counts is in the keys' own scale,
``sum s^2 |x - x_hat|^2``, so each vector's equations and its held-out error carry ``w = s^2``
(``weights``; EM weights its fit by the prescales too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from commvq.quant.beam import encode as torch_encode
from commvq.quant.commutative import decode_table, is_untied, join_theta, split_theta
from commvq.quant.residual import decode

STEPS = ("search", "full")
STEP_SIZES = (1.0, 0.5, 0.25, 0.125)  # fractions of the solve's step a searching round tries


@dataclass(frozen=True)
class RefineSettings:
    rounds: int = 4
    beam: int = 1  # the encoder's beam width (1: greedy, what the cache does by default)
    commit_weight: float = 0.25
    ridge: float = 1e-6  # relative to the mean diagonal of the normal matrix
    chunk: int = 16384
    encode_fn: Callable = (
        torch_encode  # (x [H, n, D], thetas, beam) -> codes [H, n, R], e.g. a fused kernel
    )
    # stochastic relaxation: each round's solve sees its targets plus Gaussian noise of variance
    # noise * (1 - round / rounds)**0.5 times each channel's residual variance (0 in the last round)
    noise: float = 0.0
    seed: int = 0
    # each round's move: "search" scales the solve's step by the one of STEP_SIZES the beam
    # encodes best on search_rows training vectors (evenly spaced; largest first, halved while
    # their error falls); "full": the solve as it is
    step: str = "search"
    search_rows: int = 16384
    # dead-entry revival: after each solve but the last, a table entry whose codes used it less
    # than ``revive`` times the stage's mean use restarts as a copy of the stage's most used entry,
    # nudged apart (the next encode splits that entry's vectors between the two); 0: off
    revive: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.beam < 1 or self.chunk < 1:
            raise ValueError(
                f"rounds={self.rounds}, beam={self.beam}, chunk={self.chunk}: rounds >= 0, "
                "beam and chunk >= 1"
            )
        if self.step not in STEPS or self.search_rows < 1:
            raise ValueError(
                f"step={self.step!r}, search_rows={self.search_rows}: step is one of {STEPS}, "
                "search_rows >= 1"
            )
        if self.commit_weight < 0 or self.ridge < 0 or self.noise < 0 or self.revive < 0:
            raise ValueError(
                f"commit_weight={self.commit_weight}, ridge={self.ridge} and noise={self.noise} "
                "must be >= 0"
            )


def _onehots(
    codes: torch.Tensor, e: int, dtype: torch.dtype, untied: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(OA, OB)``, each ``[H, n, R*E]``: ones at ``r*E + A_r`` and ``r*E + B_r``; ``untied``:
    ``[H, n, R*2E]``, ones at ``r*2E + A_r`` and ``r*2E + E + B_r``."""
    h, n, r = codes.shape
    cols = 2 * e if untied else e
    base = torch.arange(r, device=codes.device) * cols
    out = []
    for idx in (codes // e, codes % e + (e if untied else 0)):
        o = torch.zeros(h, n, r * cols, device=codes.device, dtype=dtype)
        o.scatter_(2, idx + base, 1.0)
        out.append(o)
    return out[0], out[1]


@contextmanager
def _exact_tf32():
    """TF32 matrix products for the duration (exact for one-hot factors: counts below 2**24)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _split_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [H|1, n]`` as ``hi + lo``, ``hi`` exact in TF32 (bfloat16's 8 significant bits), so
    that one-hot factors scaled by each part multiply exactly on tensor cores and the sum loses
    only ``lo``'s rounding (about 2**-19 of ``w``)."""
    hi = w.bfloat16().float()
    return hi, w - hi


def _complex_rhs(oa: torch.Tensor, ob: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_n conj(phi_n) t_n`` for ``t [H, n, D]`` in the rotate_half layout: ``[H, cols, P]``.

    Summed in float64: untied tables have a direction no equation fixes (a stage's ``a += c``,
    ``b += i c``), held only by the ridge, which multiplies the sums' rounding in it by 1/ridge;
    float32 sums let the tables drift in it round by round (tests/quant/test_untied.py)."""
    p = t.shape[-1] // 2
    t = t.double()
    at, bt = oa.double().transpose(1, 2) @ t, ob.double().transpose(1, 2) @ t  # [H, cols, D]
    return torch.complex(at[..., :p] + bt[..., p:], at[..., p:] - bt[..., :p])


@dataclass
class Normal:
    """Accumulated normal equations of one round, per head (float64 / complex128)."""

    gram: torch.Tensor  # [H, R*C, R*C] Hermitian; C: columns per stage, E (tied) or 2E (untied)
    rhs: torch.Tensor  # [H, R*C, P]
    commit_rhs: torch.Tensor  # [H, R*C, P]: each stage's block against its own targets

    @classmethod
    def zeros(cls, h: int, r: int, e: int, p: int, device, untied: bool = False) -> Normal:
        z = dict(dtype=torch.complex128, device=device)
        c = r * e * (2 if untied else 1)
        return cls(torch.zeros(h, c, c, **z), torch.zeros(h, c, p, **z), torch.zeros(h, c, p, **z))

    def add(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        thetas: torch.Tensor,
        noise: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add vectors ``x [H, n, D]`` coded as ``codes [H, n, R]`` (targets from ``thetas``);
        ``noise [H, n, D]``, if given, is added to the reconstruction targets (not the commit's);
        ``weights [n]``, if given, scale each vector's equations."""
        h, n, r = codes.shape
        e = thetas.shape[2] // 2
        untied = is_untied(thetas)
        oa, ob = _onehots(codes, e, x.dtype, untied)
        w_col = None if weights is None else weights.to(x.dtype)[None, :, None]
        parts = [None] if w_col is None else _split_weights(w_col)
        real = cross = 0.0
        with _exact_tf32():  # 0/1 inputs (times TF32-exact weights): exact tensor-core products
            for w in parts:
                wa, wb = (oa, ob) if w is None else (oa * w, ob * w)
                real = real + wa.transpose(1, 2) @ oa + wb.transpose(1, 2) @ ob
                cross = cross + wa.transpose(1, 2) @ ob
        self.gram += torch.complex(real.double(), (cross - cross.transpose(1, 2)).double())
        if w_col is not None:  # the right-hand sides: one-hots times the weights, in float32
            oa, ob = oa * w_col, ob * w_col
        self.rhs += _complex_rhs(oa, ob, x if noise is None else x + noise)
        target = x.clone()  # what the stages before s leave
        table = decode_table(thetas)  # [H, R, 2E, D]
        heads = torch.arange(h, device=x.device)[:, None]
        c = 2 * e if untied else e
        for s in range(r):
            cols = slice(s * c, (s + 1) * c)
            self.commit_rhs[:, cols] += _complex_rhs(oa[..., cols], ob[..., cols], target)
            code = codes[..., s]
            target -= table[heads, s, code // e] + table[heads, s, e + code % e]


def solve(
    normal: Normal, thetas0: torch.Tensor, commit_weight: float, ridge: float
) -> torch.Tensor:
    """Theta ``[H, R, 2E, P]`` minimizing ``Recon + commit_weight * Commit`` for the gathered codes
    (plus ``ridge`` times the mean diagonal, pulling toward ``thetas0``)."""
    h, r, e2, p = thetas0.shape
    untied = is_untied(thetas0)
    e = e2 if untied else e2 // 2  # columns per stage
    gram = normal.gram.clone()
    rhs = normal.rhs.clone()
    if commit_weight:
        c = commit_weight / r
        for s in range(r):
            cols = slice(s * e, (s + 1) * e)
            gram[:, cols, cols] += c * normal.gram[:, cols, cols]
        rhs += c * normal.commit_rhs
    if untied:
        z0 = thetas0.to(torch.complex128).reshape(h, r * e, p)
    else:
        re0, im0 = split_theta(thetas0.double())
        z0 = torch.complex(re0, im0).reshape(h, r * e, p)
    lam = ridge * gram.diagonal(dim1=1, dim2=2).real.mean(-1).clamp_min(1e-30)  # [H]
    gram.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    rhs += lam[:, None, None] * z0
    chol, info = torch.linalg.cholesky_ex(gram)
    singular = bool((info != 0).any())  # no ridge and unused entries: take the least-norm solution
    z = (
        torch.linalg.pinv(gram, hermitian=True) @ rhs
        if singular
        else torch.cholesky_solve(rhs, chol)
    )
    z = z.reshape(h, r, e, p)
    return z.to(thetas0.dtype) if untied else join_theta(z.real, z.imag).to(thetas0.dtype)


def revive_entries(
    thetas: torch.Tensor, use: torch.Tensor, below: float, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Restart the entries of ``thetas [H, R, 2E, P]`` whose ``use [H, R, E]`` is below ``below``
    times their stage's mean as copies of the stage's most used entries (most used first), each
    moved by 1% of its norm in a random direction; ``(thetas, entries restarted)``."""
    h, r, e2, p = thetas.shape
    z = thetas.reshape(h, r, e2 // 2, 2, p).clone()  # [H, R, E, (re, im), P]
    dead = use < below * use.mean(-1, keepdim=True)
    order = use.argsort(-1, descending=True)
    for hi in range(h):
        for ri in range(r):
            idx = dead[hi, ri].nonzero().flatten()
            if idx.numel() == 0:
                continue
            src = order[hi, ri, : idx.numel()]
            base = z[hi, ri, src]
            step = torch.randn(
                base.shape, generator=generator, device=base.device, dtype=base.dtype
            )
            scale = (
                0.01 * base.norm(dim=(-2, -1), keepdim=True) / step.norm(dim=(-2, -1), keepdim=True)
            )
            z[hi, ri, idx] = base + step * scale
    return z.reshape(h, r, e2, p), int(dead.sum())


def relative_error(
    x: torch.Tensor,
    thetas: torch.Tensor,
    beam: int,
    chunk: int = 16384,
    encode_fn: Callable = torch_encode,
    weights: torch.Tensor | None = None,
) -> float:
    """``sum w |x - decode(encode(x))|^2 / sum w |x|^2`` with the beam's codes (``weights
    [N]``, default 1)."""
    err = ref = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[1], chunk):
            xc = x[:, i : i + chunk]
            w = 1.0 if weights is None else weights[i : i + chunk].double()[None, :, None]
            left = xc - decode(encode_fn(xc, thetas, beam), thetas)
            err += float((left.double() ** 2 * w).sum())
            ref += float((xc.double() ** 2 * w).sum())
    return err / max(ref, 1e-30)


def sample_rows(n: int, m: int) -> torch.Tensor:
    """``min(m, n)`` row indices spread evenly over ``0..n-1`` (first and last included)."""
    m = min(m, n)
    return torch.linspace(0, n - 1, m, dtype=torch.float64).round().long()


def search_sample(n: int, settings: RefineSettings) -> torch.Tensor:
    """The training rows a searching round scores its step sizes on: ``search_rows`` of the
    ``n``, at most an eighth of them, spread evenly."""
    return sample_rows(n, min(settings.search_rows, max(n // 8, 1)))


def search_step(
    before: torch.Tensor,
    solved: torch.Tensor,
    sample: torch.Tensor,
    settings: RefineSettings,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """``(tables, size)``: ``before + size * (solved - before)`` for a size of
    :data:`STEP_SIZES` whose tables give ``sample [H, m, D]`` a low error under the beam. The
    sizes are tried largest first and the search stops at the first one that does not lower the
    previous one's error (keeping the previous one): where the error falls and then rises along
    the sizes, that is the best size, at two encodes of the sample when the full step is best."""
    best = None
    for size in STEP_SIZES:
        cand = solved if size == 1.0 else before + size * (solved - before)
        err = relative_error(
            sample, cand, settings.beam, settings.chunk, settings.encode_fn, weights
        )
        if best is not None and not err < best[0]:
            break
        best = (err, size, cand)
    return best[2], best[1]


@dataclass
class RoundLog:
    round: int
    train: float  # relative error of the codes the round solved for (before the solve)
    heldout: float  # held-out relative error of the round's result
    seconds: float
    step_size: float = 1.0  # the fraction of the solve's step the round took


@dataclass
class RefineResult:
    thetas: torch.Tensor
    best_round: int
    best_heldout: float
    init_heldout: float
    history: list[RoundLog] = field(default_factory=list)


def refine(
    x: torch.Tensor,
    heldout: torch.Tensor,
    thetas0: torch.Tensor,
    settings: RefineSettings,
    on_round: Callable[[RoundLog, torch.Tensor | None], None] | None = None,
    weights: torch.Tensor | None = None,
    heldout_weights: torch.Tensor | None = None,
) -> RefineResult:
    """Alternate encode / joint solve on ``x [H, N, D]`` from ``thetas0 [H, R, 2E, P]``; the round
    best on ``heldout`` is kept (never worse than the start there). ``weights [N]`` and
    ``heldout_weights [M]``: each vector's weight in the solve and in the errors (the squared
    prescales: the error in the keys' own scale), default 1."""
    import time

    h, n, d = x.shape
    r, e = thetas0.shape[1], thetas0.shape[2] // 2
    s = settings
    untied = is_untied(thetas0)
    if untied and s.revive:
        raise ValueError(f"revive={s.revive}: entry revival takes tied tables; use revive=0")

    def held_error(th: torch.Tensor) -> float:
        return relative_error(heldout, th, s.beam, s.chunk, s.encode_fn, heldout_weights)

    start = held_error(thetas0)
    best = RefineResult(thetas0.clone(), 0, start, start)
    thetas = thetas0
    w_all = 1.0 if weights is None else weights.double()[None, :, None]
    energy = float((x.double() ** 2 * w_all).sum())
    gen = torch.Generator(device=x.device).manual_seed(s.seed)
    if s.step == "search":
        pick = search_sample(n, s).to(x.device)
        sample = x[:, pick].contiguous()
        sample_w = None if weights is None else weights[pick]
    for rnd in range(1, s.rounds + 1):
        t0 = time.perf_counter()
        normal = Normal.zeros(h, r, e, d // 2, x.device, untied)
        err = 0.0
        temp = s.noise * max(0.0, 1 - rnd / s.rounds) ** 0.5
        with torch.no_grad():
            for i in range(0, n, s.chunk):
                xc = x[:, i : i + s.chunk]
                wc = None if weights is None else weights[i : i + s.chunk]
                codes = s.encode_fn(xc, thetas, s.beam)
                left = xc - decode(codes, thetas)
                noise = None
                if temp > 0:
                    spread = left.std(dim=1, keepdim=True) * math.sqrt(temp)
                    noise = torch.randn(xc.shape, generator=gen, device=x.device) * spread
                normal.add(xc, codes, thetas, noise, wc)
                w = 1.0 if wc is None else wc.double()[None, :, None]
                err += float((left.double() ** 2 * w).sum())
            solved = solve(normal, thetas, s.commit_weight, s.ridge)
            size = 1.0
            if s.step == "search":
                solved, size = search_step(thetas, solved, sample, s, sample_w)
            thetas = solved
        held = held_error(thetas)
        if s.revive and rnd < s.rounds:  # scored as solved; the next round starts revived
            use = normal.gram.diagonal(dim1=1, dim2=2).real.reshape(h, r, e).to(thetas.dtype)
            thetas, _ = revive_entries(thetas, use, s.revive, gen)
        if not math.isfinite(held):
            raise FloatingPointError(f"refinement round {rnd} gave non-finite codebooks")
        log = RoundLog(rnd, err / energy, held, time.perf_counter() - t0, size)
        best.history.append(log)
        improved = held < best.best_heldout
        if improved:
            best.thetas, best.best_round, best.best_heldout = solved.clone(), rnd, held
        if on_round is not None:
            on_round(log, best.thetas if improved else None)
    return best
