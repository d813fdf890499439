"""End-to-end (E2E) training of all residual stages of commutative codebooks by gradient descent.

The assignment is exactly what inference computes (greedy residual nearest codeword, no
gradient); the decoded key is differentiable in theta through the gather, so the codebooks stay
RoPE-commutative by construction and no straight-through estimator is needed. Losses are
normalized by the batch's key energy (scale-free, same optimum as the plain MSE)::

    Recon  = sum |x - sum_r c_r|^2_w / sum |x|^2_w
    Commit = mean_r sum |t_r - c_r|^2_w / sum |x|^2_w,   t_r = x - sum_{j<r} c_j (detached)
    Loss   = Recon + commit_weight * Commit

``|.|_w`` weighs RoPE pair ``f`` of head ``h`` by ``w[h, f]`` (all ones for ``objective=mse``;
the mean query energy ``E|q_f|^2`` for ``objective=attention``, which makes Recon the
rotation-averaged attention-logit error). The gradient is taken in closed form from the stage
residuals the encoder leaves (:func:`loss_and_grad`; :func:`losses` is the autograd reference):
with ``e_r = x - sum_{j<=r} c_j``, ``dLoss/dc_r = -2 w (e_R + commit_weight/R * e_r) / energy``,
gathered into the table rows by a one-hot matmul. Adam with a cosine schedule and gradient
clipping; a held-out split picks the best epoch (epoch 0 = the initialization). On CUDA one
training step is captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from commvq.quant.commutative import join_theta, nearest
from commvq.quant.em import EStats, m_step
from commvq.quant.residual import code_onehot, stage_decodes
from commvq.quant.residual import encode_with_residuals as residual_encode


@dataclass(frozen=True)
class E2ESettings:
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 256
    commit_weight: float = 0.25
    clip: float = 1.0
    max_bad_fraction: float = 0.5  # an epoch with more non-finite batches than this stops training
    cuda_graphs: bool = True
    eval_chunk: int = 8192
    encode_fn: Callable | None = (
        None  # a fused greedy encoder of codes and residuals (default: pure torch)
    )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(
                f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr} must be positive"
            )
        if self.commit_weight < 0:
            raise ValueError(f"commit_weight={self.commit_weight} must be >= 0")


def pair_weight_vector(weights: torch.Tensor | None, h: int, d: int, device, dtype) -> torch.Tensor:
    """Per-channel weights ``[H, 1, D]`` from pair weights ``[H, P]`` (ones when None)."""
    if weights is None:
        return torch.ones(h, 1, d, device=device, dtype=dtype)
    w = weights.to(device=device, dtype=dtype)
    return torch.cat((w, w), dim=-1)[:, None, :]


def losses(
    x: torch.Tensor, thetas: torch.Tensor, codes: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(recon, commit)`` of ``x [H, B, D]`` coded as ``codes [H, B, R]``; ``w [H, 1, D]``."""
    stages = stage_decodes(codes, thetas)  # [R, H, B, D], differentiable in thetas
    before = torch.cumsum(stages, 0) - stages  # sum_{j<r} c_j
    energy = (x * x * w).sum()
    recon = ((x - stages.sum(0)) ** 2 * w).sum() / energy
    targets = (x - before).detach()
    commit = ((targets - stages) ** 2 * w).sum() / (energy * stages.shape[0])
    return recon, commit


def loss_and_grad(
    x: torch.Tensor,
    thetas: torch.Tensor,
    codes: torch.Tensor,
    residuals: torch.Tensor,
    w: torch.Tensor,
    commit_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(recon, commit, d(recon + commit_weight * commit)/d thetas)`` without autograd.

    ``residuals [R, H, B, D]`` are what the greedy encoder left after each stage of ``codes``;
    the gradient equals autograd's through :func:`losses` (same codes).
    """
    h, r, e, p = thetas.shape[0], thetas.shape[1], thetas.shape[2] // 2, thetas.shape[3]
    b, d = x.shape[1], x.shape[2]
    energy = (x * x * w).sum()
    last = residuals[-1]
    recon = (last * last * w).sum() / energy
    commit = (torch.linalg.vector_norm(residuals, dim=2).square() * w[:, 0]).sum() / (energy * r)
    # dLoss/dc_r = -2 w (e_R + commit_weight/R * e_r) / energy, summed into the decode-table rows
    # by one-hot products: [R*2E, B] @ e_R per head, plus [2E, B] @ e_r per (head, stage)
    onehot = code_onehot(codes, e, x.dtype, by_head=True)  # [H, R, 2E, B]
    dm = torch.bmm(onehot.view(h, r * 2 * e, b), last).view(h * r, 2 * e, d)
    dm.baddbmm_(
        onehot.view(h * r, 2 * e, b),
        residuals.transpose(0, 1).reshape(h * r, b, d),
        alpha=commit_weight / r,
    )
    dm = dm.view(h, r, 2 * e, d) * (w[:, None] * (-2.0 / energy))  # d/d decode_table, [H, R, 2E, D]
    # decode_table rows A: [R_A | I_A], rows E + B: [-I_B | R_B]
    d_re = dm[..., :e, :p] + dm[..., e:, p:]
    d_im = dm[..., :e, p:] - dm[..., e:, :p]
    return recon, commit, join_theta(d_re, d_im)


def encode_with_residuals(
    x: torch.Tensor, thetas: torch.Tensor, encode_fn: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy codes and what each stage leaves (``encode_fn``: a fused encoder of both, e.g.
    ``kernels.encode.encode_triton_with_residuals``; else pure torch)."""
    if encode_fn:
        return encode_fn(x, thetas)
    return residual_encode(x, thetas, x.shape[1])


def relative_error(
    x: torch.Tensor, thetas: torch.Tensor, w: torch.Tensor, chunk: int = 8192, encode_fn=None
) -> float:
    """Weighted relative error of the greedy code of ``x`` (what inference gets)."""
    err = ref = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[1], chunk):
            xc = x[:, i : i + chunk]
            left = encode_with_residuals(xc, thetas, encode_fn)[1][-1]
            err += float((left * left * w).sum())
            ref += float((xc * xc * w).sum())
    return err / ref


def make_optimizer(
    params: torch.nn.Parameter, settings: E2ESettings
) -> tuple[torch.optim.Optimizer, torch.Tensor | float]:
    """Adam (fused on CUDA: one kernel per step) and its learning rate: a device tensor when the
    step is captured in a CUDA graph (the schedule then writes it in place), else a float."""
    capturable = bool(settings.cuda_graphs and params.is_cuda)
    lr = torch.tensor(settings.lr, device=params.device) if capturable else settings.lr
    return torch.optim.Adam([params], lr=lr, capturable=capturable, fused=params.is_cuda), lr


def kmeanspp_centers(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ (D^2) seeding of ``k`` centers per head from ``x [H, N, D]``: ``[H, k, D]``.

    With fewer than ``k`` points, the points are repeated at random instead.
    """
    h, n, d = x.shape
    if n <= k:
        pick = torch.randint(0, n, (h, k), generator=generator).to(x.device)
        return torch.gather(x, 1, pick[..., None].expand(-1, -1, d))
    idx = torch.empty(
        h, k, dtype=torch.long, device=x.device
    )  # on the device: no host sync per pick
    idx[:, 0] = torch.randint(0, n, (h,), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device)
    xx = (x * x).sum(-1)
    xt = x.transpose(
        1, 2
    ).contiguous()  # [H, D, N]: the row-vector product below is 9x faster on a CPU

    def dist2(
        c: torch.Tensor,
    ) -> torch.Tensor:  # |x - c|^2 per point, c [H, D]: one vector-matrix product
        return (
            xx - 2 * torch.bmm(c[:, None], xt).squeeze(1) + (c * c).sum(-1, keepdim=True)
        ).clamp_min_(0)

    d2 = dist2(x[rows, idx[:, 0]])
    uniform = torch.rand(h, k, generator=generator, dtype=torch.float64).to(x.device)
    for j in range(1, k):
        cdf = torch.cumsum(d2, 1, dtype=torch.float64)
        pick = (
            torch.searchsorted(cdf, (uniform[:, j] * cdf[:, -1])[:, None])
            .squeeze(1)
            .clamp_max_(n - 1)
        )
        idx[:, j] = pick
        d2 = torch.minimum(d2, dist2(x[rows, pick]))
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, d))


def fit_to_centers(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The structured theta closest (weighted least squares) to free centers, weighted by the
    hard assignment of ``x`` to them."""
    h, _, d = x.shape
    e = math.isqrt(centers.shape[1])
    hard = torch.cdist(x, centers).argmin(-1)  # [H, N]
    onehot_counts = torch.zeros(h, e * e, dtype=torch.float64, device=x.device)
    onehot_counts.scatter_add_(1, hard, torch.ones_like(hard, dtype=torch.float64))
    sums = torch.zeros(h, e * e, d, dtype=torch.float64, device=x.device)
    sums.scatter_add_(1, hard[..., None].expand(-1, -1, d), x.double())
    counts = onehot_counts.view(h, e, e)
    s4 = sums.view(h, e, e, d)
    stats = EStats(
        counts,
        s4.sum(2),
        s4.sum(1),
        (x.double() ** 2).sum((1, 2)),
        torch.zeros(h, dtype=torch.float64),
    )
    return m_step(stats, dtype=x.dtype)


def init_kmeans(
    x: torch.Tensor,
    num_stages: int,
    num_entries: int,
    generator: torch.Generator,
    subsample: int = 8192,
) -> torch.Tensor:
    """Greedy residual init: per stage, k-means++ seeds on a subsample, fitted structurally."""
    n = x.shape[1]
    pick = torch.randperm(n, generator=generator)[: min(n, subsample)].to(x.device)
    residual = x[:, pick].clone()
    thetas = []
    for _ in range(num_stages):
        theta = fit_to_centers(residual, kmeanspp_centers(residual, num_entries**2, generator))
        residual -= stage_decodes(nearest(residual, theta)[..., None], theta[:, None]).sum(0)
        thetas.append(theta)
    return torch.stack(thetas, 1)


def init_random(
    x: torch.Tensor, num_stages: int, num_entries: int, generator: torch.Generator
) -> torch.Tensor:
    """Small random tables, shrinking with the stage like the residuals do."""
    h, _, d = x.shape
    scale = float(x.std()) / 2
    th = torch.randn(h, num_stages, 2 * num_entries, d // 2, generator=generator).to(
        x.device, x.dtype
    )
    return (
        th
        * scale
        * (0.5 ** torch.arange(num_stages, device=x.device, dtype=x.dtype))[None, :, None, None]
    )


@dataclass
class EpochLog:
    epoch: int
    loss: float
    recon: float
    commit: float
    heldout: float
    bad_batches: int


@dataclass
class E2EResult:
    thetas: torch.Tensor  # [H, R, 2E, P] of the best held-out epoch
    best_epoch: int
    best_heldout: float
    init_heldout: float
    history: list[EpochLog] = field(default_factory=list)


class _Step:
    """One optimizer step on a batch; captured as a CUDA graph when possible."""

    def __init__(
        self,
        params: torch.nn.Parameter,
        opt: torch.optim.Optimizer,
        w: torch.Tensor,
        settings: E2ESettings,
        shape: tuple[int, int, int],
    ) -> None:
        self.params, self.opt, self.w, self.settings = params, opt, w, settings
        self.xb = torch.zeros(shape, device=params.device, dtype=params.dtype)
        self.sums = torch.zeros(
            4, device=params.device, dtype=torch.float64
        )  # loss, recon, commit, bad
        params.grad = torch.zeros_like(params)
        self.graph = None
        if settings.cuda_graphs and params.is_cuda:
            self._capture()

    def _body(self) -> None:
        settings = self.settings
        with torch.no_grad():
            thetas = self.params.detach()
            codes, res = encode_with_residuals(self.xb, thetas, settings.encode_fn)
            recon, commit, grad = loss_and_grad(
                self.xb, thetas, codes, res, self.w, settings.commit_weight
            )
            loss = recon + settings.commit_weight * commit
            finite = torch.isfinite(loss)
            # a non-finite batch moves nothing but the moments
            self.params.grad.copy_(torch.nan_to_num(grad * finite, 0.0, 0.0, 0.0))
            values = torch.stack((loss, recon, commit)).double().nan_to_num(0.0, 0.0, 0.0) * finite
            self.sums += torch.cat((values, (~finite).double()[None]))
        torch.nn.utils.clip_grad_norm_([self.params], settings.clip)
        self.opt.step()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        start = self.params.detach().clone()
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up outside the graph (allocations, optimizer state)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()
        with torch.no_grad():  # undo the warm-up steps: start values, fresh optimizer state
            self.params.copy_(start)
            self.sums.zero_()
            for state in self.opt.state.values():
                for t in state.values():
                    if torch.is_tensor(t):
                        t.zero_()

    def __call__(self, batch: torch.Tensor) -> None:
        """One step on ``batch``; its loss, recon, commit and non-finite flag add to ``sums``."""
        self.xb.copy_(batch)
        if self.graph is None:
            self._body()
        else:
            self.graph.replay()

    def take_sums(self) -> list[float]:
        out = self.sums.tolist()
        self.sums.zero_()
        return out


def train(
    x: torch.Tensor,
    heldout: torch.Tensor,
    thetas0: torch.Tensor,
    settings: E2ESettings,
    weights: torch.Tensor | None = None,
    seed: int = 0,
    on_epoch: Callable[[EpochLog, torch.Tensor | None], None] | None = None,
) -> E2EResult:
    """Train ``thetas0 [H, R, 2E, P]`` on ``x [H, N, D]``; pick the best epoch on ``heldout``.

    ``on_epoch(log, best)`` is called after every epoch; ``best`` is the new best thetas when the
    held-out error improved, else None.
    """
    h, n, d = x.shape
    w = pair_weight_vector(weights, h, d, x.device, x.dtype)
    params = torch.nn.Parameter(thetas0.detach().clone())
    opt, lr = make_optimizer(params, settings)
    bs = min(settings.batch_size, n)
    steps_per_epoch = n // bs
    total = settings.epochs * steps_per_epoch
    step_fn = _Step(params, opt, w, settings, (h, bs, d))
    generator = torch.Generator().manual_seed(seed)
    search = settings.encode_fn
    start_err = relative_error(heldout, params, w, encode_fn=search)
    best = E2EResult(
        thetas=params.detach().clone(), best_epoch=0, best_heldout=start_err, init_heldout=start_err
    )
    step = 0
    for epoch in range(1, settings.epochs + 1):
        perm = torch.randperm(n, generator=generator).to(x.device)
        for i in range(steps_per_epoch):
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
            if torch.is_tensor(lr):
                lr.fill_(settings.lr * factor)
            else:
                opt.param_groups[0]["lr"] = settings.lr * factor
            step_fn(x[:, perm[i * bs : (i + 1) * bs]])
            step += 1
        loss, recon, commit, bad = (v / steps_per_epoch for v in step_fn.take_sums())
        bad_batches = int(round(bad * steps_per_epoch))
        diverged = not math.isfinite(float(params.detach().abs().max()))
        if diverged or bad_batches > settings.max_bad_fraction * steps_per_epoch:
            raise FloatingPointError(
                f"E2E training diverged in epoch {epoch} ({bad_batches} of {steps_per_epoch} "
                "batches non-finite); lower --lr. The layer is not marked done; its files hold the "
                "best epoch saved before, if any"
            )
        good = steps_per_epoch - bad_batches
        scale = steps_per_epoch / max(good, 1)
        heldout_err = relative_error(heldout, params, w, encode_fn=search)
        log = EpochLog(epoch, loss * scale, recon * scale, commit * scale, heldout_err, bad_batches)
        best.history.append(log)
        improved = heldout_err < best.best_heldout
        if improved:
            best.thetas, best.best_epoch, best.best_heldout = (
                params.detach().clone(),
                epoch,
                heldout_err,
            )
        if on_epoch is not None:
            on_epoch(log, best.thetas if improved else None)
    return best
