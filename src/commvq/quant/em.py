"""The paper's EM training of one residual stage of commutative codebooks, batched over heads.

E-step: soft assignment ``softmax(-d / tau)`` over all ``E*E`` codes with the Euclidean (not
squared) distance ``d``, and the hard assignment ``argmin d``. Its sufficient statistics are the
``E x E`` soft counts and the two per-entry marginal sums ``S_A``, ``S_B`` (``E x D`` each): the
``N x E*E`` assignment matrix is never kept. M-step: the closed-form weighted least-squares fit
of the structured codewords (one ``2E x 2E`` normal matrix shared by all pairs).
Schedule: init from random data points (one E-step at temperature 1 against them, one M-step),
then up to ``max_iters`` iterations at exponentially decaying temperature ``temp_start*c ->
temp_end*c``; the iterate of best hard MSE (original scale) is kept; a head stops when its MSE
fails to improve and is worse than the best by less than ``tol`` (the reference rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from commvq.quant.commutative import codewords, decode, join_theta, search_tables


@dataclass(frozen=True)
class EMSettings:
    max_iters: int = 100
    temp_start: float = 1e-3
    temp_end: float = 1e-5
    decay_every: int = 4  # the stage factor c is divided by 10 after stages 0, 4, 8, ...
    tol: float = 1e-5
    chunk: int = 8192
    eps: float = 1e-8  # added to every soft count in the M-step, as the reference does

    def __post_init__(self) -> None:
        if self.max_iters < 1 or self.chunk < 1:
            raise ValueError(f"max_iters={self.max_iters} and chunk={self.chunk} must be positive")
        if not 0 < self.temp_end <= self.temp_start:
            raise ValueError(f"need 0 < temp_end={self.temp_end} <= temp_start={self.temp_start}")


@dataclass
class EStats:
    """Sufficient statistics of one E-step, per head."""

    count: torch.Tensor  # [H, E, E] soft counts N_AB
    sum_a: torch.Tensor  # [H, E, D] sum_t (sum_B gamma_tAB) x_t
    sum_b: torch.Tensor  # [H, E, D] sum_t (sum_A gamma_tAB) x_t
    sum_xx: torch.Tensor  # [H] sum_t |x_t|^2
    hard_sqerr: torch.Tensor  # [H] sum_t s_t^2 |x_t - c_hard(t)|^2 (original scale)
    hard: torch.Tensor | None = None  # [H, N] hard codes, a sorting hint for the next E-step
    work: torch.Tensor | float | None = (
        None  # share of the distance table a pruned E-step evaluated
    )


def stage_factor(stage: int, every: int = 4) -> float:
    """``c`` of a stage: 1 for stage 0, then divided by 10 after stages 0, every, 2*every, ..."""
    return 10.0 ** -math.ceil(stage / every)


def temperature(step: int, n_steps: int, start: float, end: float) -> float:
    """Exponential decay from ``start`` (step 0) to ``end`` (step ``n_steps - 1``)."""
    if n_steps <= 1:
        return start
    return start * (end / start) ** (step / (n_steps - 1))


def soft_objective(stats: EStats, theta: torch.Tensor) -> torch.Tensor:
    """``sum_t sum_k gamma_tk |x_t - c_k(theta)|^2`` from the statistics, ``[H]`` (float64).

    This is what the M-step minimizes exactly for the E-step's gammas.
    """
    th = theta.double()
    c = codewords(th)  # [H, E*E, D]
    e = stats.count.shape[-1]
    p = th.shape[-1]
    re, im = c[..., :p].reshape(-1, e, e, p), c[..., p:].reshape(-1, e, e, p)
    n = stats.count.double()
    quad = (n[..., None] * (re * re + im * im)).sum((-3, -2, -1))
    sa, sb = stats.sum_a.double(), stats.sum_b.double()
    # sum_AB c_AB . S_AB with c = (R_A - I_B, I_A + R_B), through the marginals only
    r_e, i_e = th[..., 0::2, :], th[..., 1::2, :]
    lin = (r_e * sa[..., :p] + i_e * sa[..., p:]).sum((-2, -1)) + (
        -i_e * sb[..., :p] + r_e * sb[..., p:]
    ).sum((-2, -1))
    return stats.sum_xx.double() - 2 * lin + quad


def m_step(stats: EStats, eps: float = 1e-8, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Closed-form weighted least squares: theta ``[H, 2E, P]`` from the E-step statistics."""
    n = stats.count.double() + eps
    h, e, _ = n.shape
    p = stats.sum_a.shape[-1] // 2
    diag = n.sum(-1) + n.sum(-2)  # N_A(e) + N_B(e)
    normal = torch.zeros(h, 2 * e, 2 * e, dtype=torch.float64, device=n.device)
    idx = torch.arange(e, device=n.device)
    normal[:, 2 * idx, 2 * idx] = diag
    normal[:, 2 * idx + 1, 2 * idx + 1] = diag
    anti = n.transpose(-1, -2) - n
    normal[:, 0::2, 1::2] += anti
    normal[:, 1::2, 0::2] -= anti
    sa, sb = stats.sum_a.double(), stats.sum_b.double()
    rhs = join_theta(sa[..., :p] + sb[..., p:], sa[..., p:] - sb[..., :p])  # [H, 2E, P]
    # positive definite (a weighted Gram matrix plus eps): no singularity check, so no wait for the
    # GPU
    return torch.linalg.solve_ex(normal, rhs)[0].to(dtype)


def empty_stats(h: int, e: int, d: int, device) -> EStats:
    z = dict(dtype=torch.float64, device=device)
    return EStats(
        torch.zeros(h, e, e, **z),
        torch.zeros(h, e, d, **z),
        torch.zeros(h, e, d, **z),
        torch.zeros(h, **z),
        torch.zeros(h, **z),
    )


def _accumulate(
    stats: EStats,
    d2: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    tau: float,
    hard_err: torch.Tensor,
) -> None:
    """Add one chunk: ``d2 [H, T, E*E]`` squared distances of ``x [H, T, D]``."""
    h, t, _ = d2.shape
    e = stats.count.shape[-1]
    gamma = torch.softmax(d2.clamp_min(0).sqrt_().mul_(-1.0 / tau), dim=-1).view(
        h, t, e, e
    )  # few full passes
    stats.count += gamma.sum(1).double()
    xd = x.double()
    stats.sum_a += torch.einsum("hte,htd->hed", gamma.sum(-1).double(), xd)
    stats.sum_b += torch.einsum("hte,htd->hed", gamma.sum(-2).double(), xd)
    stats.sum_xx += (xd * xd).sum((1, 2))
    stats.hard_sqerr += (hard_err.double() * s.double() ** 2).sum(-1)


def e_step(
    x: torch.Tensor,
    s: torch.Tensor,
    theta: torch.Tensor,
    tau: float,
    chunk: int = 8192,
    hint: torch.Tensor | None = None,
    cache: dict | None = None,
) -> EStats:
    """E-step against the structured codebooks ``theta [H, 2E, P]`` (pure torch, chunked).

    ``hint`` (a token order) and ``cache`` (what a fused kernel derives once from vectors that stay
    fixed within a stage) save a fused kernel work; they are not needed here.
    """
    w, n, g = search_tables(theta)
    h, big_n, d = x.shape
    e = n.shape[-1]
    n = n[:, None]
    stats = empty_stats(h, e, d, x.device)
    hards = []
    for i in range(0, big_n, chunk):
        xc, sc = x[:, i : i + chunk], s[i : i + chunk]
        proj = xc @ w
        xx = (xc * xc).sum(-1)
        d2 = (
            (n - 2 * proj[..., :e])[..., :, None]
            + (n - 2 * proj[..., e:])[..., None, :]
            + g[:, None]
        ).flatten(-2)
        d2 = d2 + xx[..., None]
        hard = d2.argmin(-1)
        hards.append(hard)
        err = ((xc - decode(theta, hard)) ** 2).sum(-1)
        _accumulate(stats, d2, xc, sc, tau, err)
    stats.hard = torch.cat(hards, 1) if hards else None
    return stats


def e_step_centers(
    x: torch.Tensor,
    s: torch.Tensor,
    centers: torch.Tensor,
    tau: float,
    chunk: int = 8192,
    cache: dict | None = None,
) -> EStats:
    """E-step against free centers ``[H, E*E, D]`` (the initialization from data points); ``cache``
    as for :func:`e_step`, not needed here."""
    h, big_n, d = x.shape
    e = math.isqrt(centers.shape[1])
    stats = empty_stats(h, e, d, x.device)
    cc = (centers * centers).sum(-1)
    hards = []
    for i in range(0, big_n, chunk):
        xc, sc = x[:, i : i + chunk], s[i : i + chunk]
        d2 = torch.baddbmm(cc[:, None], xc, centers.transpose(-1, -2), alpha=-2).add_(
            (xc * xc).sum(-1, keepdim=True)
        )
        hard = d2.argmin(-1)
        hards.append(hard)
        err = ((xc - torch.gather(centers, 1, hard[..., None].expand(-1, -1, d))) ** 2).sum(-1)
        _accumulate(stats, d2, xc, sc, tau, err)
    stats.hard = torch.cat(hards, 1) if hards else None
    return stats


EStep = Callable[..., EStats]  # (x, s, theta, tau, chunk, hint, cache=) -> EStats, as e_step
CentersEStep = Callable[
    ..., EStats
]  # (x, s, centers, tau, chunk, cache=) -> EStats, as e_step_centers
Nearest = Callable[..., torch.Tensor]  # (x, theta, chunk) -> codes [H, N], as commutative.nearest


@dataclass
class StageResult:
    theta: torch.Tensor  # [H, 2E, P] of the best iterate
    mse: torch.Tensor  # [H] its hard MSE in original scale (mean over tokens and channels)
    iters: torch.Tensor  # [H] iterations run


def fit_stage(
    x: torch.Tensor,
    s: torch.Tensor,
    num_entries: int,
    stage: int,
    settings: EMSettings,
    generator: torch.Generator,
    estep: EStep = e_step,
    init_estep: CentersEStep = e_step_centers,
) -> StageResult:
    """Train one stage for every head of ``x [H, N, D]`` (prescales ``s [N]``).

    The host reads an iteration's error only after the next iteration is queued, so the GPU never
    waits for it; a head whose stopping rule fires has run one iteration more, whose results are
    dropped (same results as stopping at once)."""
    h, big_n, d = x.shape
    idx = torch.randint(0, big_n, (h, num_entries**2), generator=generator).to(x.device)
    centers = torch.gather(x, 1, idx[..., None].expand(-1, -1, d))
    cache: dict = {}  # what the E-steps derive once from x, fixed within the stage
    init = init_estep(x, s, centers, 1.0, settings.chunk, cache=cache)
    theta = m_step(init, settings.eps, x.dtype)
    hint = init.hard.to(torch.int32)  # tokens of one free center tend to share a cell
    c = stage_factor(stage, settings.decay_every)
    track = _Best(h, theta, settings.tol)
    active = torch.arange(h)
    pending = (
        None  # (heads, theta evaluated, their hard MSE on the device) of the last iteration queued
    )
    for step in range(settings.max_iters):
        active = active[~track.stopped[active]]
        if len(active) == 0:
            break
        tau = temperature(step, settings.max_iters, settings.temp_start * c, settings.temp_end * c)
        if len(active) == h:  # no copies (x[active] would copy all the vectors), no index waits
            stats = estep(x, s, theta, tau, settings.chunk, hint, cache=cache)
            hint = stats.hard.to(torch.int32) if stats.hard is not None else hint
        else:
            stats = estep(
                x[active],
                s,
                theta[active],
                tau,
                settings.chunk,
                hint[active],
                cache={k: v[active] for k, v in cache.items()},
            )
            if stats.hard is not None:
                hint[active] = stats.hard.to(torch.int32)
        new_theta = m_step(stats, settings.eps, x.dtype)
        if pending is not None:
            track.add(*pending)  # waits for the previous iteration only: this one is queued
        pending = (
            active,
            theta if len(active) == h else theta[active],
            _HostCopy(stats.hard_sqerr / (big_n * d)),
        )
        if len(active) == h:
            theta = new_theta
        else:
            theta = theta.clone()
            theta[active] = new_theta
    if pending is not None:
        track.add(*pending)
    return StageResult(theta=track.theta, mse=track.mse.float(), iters=track.iters)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the GPU (pinned, non-blocking copy)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _HostCopy:
    """A device tensor copied to the host without waiting; :meth:`get` waits for that copy only
    (not for work queued after it)."""

    def __init__(self, t: torch.Tensor):
        if t.device.type != "cuda":
            self.value, self.event = t, None
            return
        self.value = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.value.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.value


class _Best:
    """Per head: the iterate of lowest hard MSE, iterations counted, and the reference stopping rule
    (stop when the MSE fails to improve and is worse than the best by less than ``tol``). Nothing
    here waits for the GPU beyond the MSE it is given."""

    def __init__(self, h: int, theta: torch.Tensor, tol: float):
        self.mse = torch.full((h,), math.inf, dtype=torch.float64)
        self.theta = theta.clone()
        self.iters = torch.zeros(h, dtype=torch.long)
        self.stopped = torch.zeros(h, dtype=torch.bool)
        self.tol = tol

    def add(self, heads: torch.Tensor, theta: torch.Tensor, mse: _HostCopy) -> None:
        """One iteration's results for ``heads`` (``theta``, ``mse`` row by row); heads stopped
        meanwhile are ignored."""
        err = mse.get().double()
        keep = ~self.stopped[heads]
        heads, err = heads[keep], err[keep]
        self.iters[heads] += 1
        better = err < self.mse[heads]
        self.mse[heads[better]] = err[better]
        if bool(better.any()):
            dev = theta.device
            if len(heads) == len(self.mse) and bool(keep.all()):
                candidate = theta
            else:
                candidate = self.theta.clone()
                candidate[_to_device(heads, dev)] = theta.index_select(
                    0, _to_device(keep.nonzero()[:, 0], dev)
                )
            upd = torch.zeros(len(self.mse), dtype=torch.bool)
            upd[heads[better]] = True
            self.theta = torch.where(_to_device(upd, dev)[:, None, None], candidate, self.theta)
        self.stopped[heads[~better & (err - self.mse[heads] < self.tol)]] = True


@dataclass
class FitResult:
    thetas: torch.Tensor  # [H, R, 2E, P]
    stage_mse: torch.Tensor  # [R, H] hard MSE of each stage's best iterate (original scale)
    residual_mse: torch.Tensor  # [R, H] MSE left after each stage (original scale)
    iters: torch.Tensor  # [R, H]


def fit(
    x: torch.Tensor,
    s: torch.Tensor,
    num_stages: int,
    num_entries: int,
    settings: EMSettings,
    seed: int = 0,
    estep: EStep = e_step,
    on_stage: Callable[[int, StageResult, torch.Tensor], None] | None = None,
    init_estep: CentersEStep = e_step_centers,
    nearest_fn: Nearest | None = None,
) -> FitResult:
    """Greedy residual EM: train stage r on what stages < r left. ``x [H, N, D]`` is not modified.
    ``nearest_fn`` (as :func:`commvq.quant.commutative.nearest`, the default) encodes the residual
    with a trained stage."""
    from commvq.quant.commutative import nearest

    nearest_fn = nearest if nearest_fn is None else nearest_fn
    generator = torch.Generator().manual_seed(seed)
    residual = x.clone(memory_format=torch.contiguous_format)  # a head's chunks are then contiguous
    big_n, d = x.shape[1], x.shape[2]
    thetas, stage_mse, res_mse, iters = [], [], [], []
    for r in range(num_stages):
        res = fit_stage(residual, s, num_entries, r, settings, generator, estep, init_estep)
        for i in range(0, big_n, settings.chunk):
            part = residual[:, i : i + settings.chunk]
            part -= decode(res.theta, nearest_fn(part, res.theta, settings.chunk))
        err = (torch.linalg.vector_norm(residual, dim=-1).square() * (s * s)).sum(-1).cpu() / (
            big_n * d
        )
        thetas.append(res.theta)
        stage_mse.append(res.mse)
        res_mse.append(err.float())
        iters.append(res.iters)
        if on_stage is not None:
            on_stage(r, res, err)
    return FitResult(
        torch.stack(thetas, 1), torch.stack(stage_mse), torch.stack(res_mse), torch.stack(iters)
    )
