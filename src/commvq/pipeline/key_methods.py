"""The two ways to train one layer's key codebooks (EM, E2E), behind one signature."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from commvq import io
from commvq.fsutil import atomic_path
from commvq.quant import e2e, em
from commvq.quant.commutative import num_entries
from commvq.quant.residual import stage_errors

log = logging.getLogger("commvq")


@dataclass
class LayerJob:
    """What a method needs to train one layer."""

    layer: int
    heads: list[int]
    x: torch.Tensor  # [H, N, D] normalized keys of the heads to train
    s: torch.Tensor  # [N] prescales
    layout: io.CodebookLayout
    out: Path
    with_centers: bool
    seed: int
    estep: em.EStep
    init_estep: em.CentersEStep = em.e_step_centers
    nearest: em.Nearest | None = None  # encodes the residual between EM stages (None: pure torch)
    pair_weights: torch.Tensor | None = None  # [H, P] for objective=attention


@dataclass
class LayerResult:
    thetas: torch.Tensor  # [H, R, 2E, P]
    stage_mse: torch.Tensor  # [R, H], original scale
    extra: dict


def save_heads(job: LayerJob, thetas: torch.Tensor, stage_mse: torch.Tensor) -> None:
    for i, h in enumerate(job.heads):
        io.save_head(io.head_file(job.out, job.layer, h), thetas[i], stage_mse[:, i], float(stage_mse[-1, i]),
                     job.with_centers)


def run_em(job: LayerJob, max_iters: int, chunk: int) -> LayerResult:
    bar = tqdm(total=job.layout.residuals, desc=f"layer {job.layer:3d}", unit="stage", leave=False)

    def on_stage(r: int, res: em.StageResult, err: torch.Tensor) -> None:
        bar.update(1)
        bar.set_postfix(mse=f"{float(err.mean()):.4g}")
        log.info("layer %d stage %d/%d: hard MSE (original scale) %s, iterations %s", job.layer, r + 1,
                 job.layout.residuals, " ".join(f"{v:.5g}" for v in res.mse.tolist()), res.iters.tolist())

    fitted = em.fit(job.x, job.s, job.layout.residuals, num_entries(job.layout.code_bits),
                    em.EMSettings(max_iters=max_iters, chunk=chunk), seed=job.seed, estep=job.estep,
                    on_stage=on_stage, init_estep=job.init_estep, nearest_fn=job.nearest)
    bar.close()
    save_heads(job, fitted.thetas, fitted.residual_mse)
    return LayerResult(fitted.thetas, fitted.residual_mse, {"iterations": fitted.iters.T.tolist()})


def initial_thetas(job: LayerJob, init: str, train_x: torch.Tensor, max_iters: int, chunk: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(job.seed)
    e = num_entries(job.layout.code_bits)
    if init == "em":
        settings = em.EMSettings(max_iters=max_iters, chunk=chunk)
        return em.fit(train_x, job.s[: train_x.shape[1]], job.layout.residuals, e, settings, seed=job.seed,
                      estep=job.estep, init_estep=job.init_estep, nearest_fn=job.nearest).thetas
    if init == "random":
        return e2e.init_random(train_x, job.layout.residuals, e, generator)
    return e2e.init_kmeans(train_x, job.layout.residuals, e, generator)


def run_e2e(job: LayerJob, settings: e2e.E2ESettings, init: str, holdout: float, max_iters: int,
            chunk: int, echo: Callable[[str], None] = print) -> LayerResult:
    """E2E on all but the last ``holdout`` of the vectors; those pick the best epoch, whose
    codebooks are saved as soon as it is reached."""
    n = job.x.shape[1]
    n_hold = max(1, int(n * holdout))
    train_x, held_x, held_s = job.x[:, : n - n_hold], job.x[:, n - n_hold:], job.s[n - n_hold:]
    thetas0 = initial_thetas(job, init, train_x, max_iters, chunk)
    bar = tqdm(total=settings.epochs, desc=f"layer {job.layer:3d}", unit="epoch", leave=False)

    def on_epoch(entry: e2e.EpochLog, best: torch.Tensor | None) -> None:
        bar.update(1)
        echo(f"Epoch {entry.epoch}/{settings.epochs} - Loss: {entry.loss:.4f}, Recon: {entry.recon:.4f}, "
             f"Commit: {entry.commit:.4f}")
        if best is not None:
            save_heads(job, best, stage_errors(held_x, held_s, best))
            echo(f"✓ Saved best model with loss {entry.heldout:.4f}")

    result = e2e.train(train_x, held_x, thetas0, settings, job.pair_weights, seed=job.seed, on_epoch=on_epoch)
    bar.close()
    stage_mse = stage_errors(held_x, held_s, result.thetas)
    if result.best_epoch == 0:  # no epoch beat the initialization: keep it
        save_heads(job, result.thetas, stage_mse)
    history = [vars(h) for h in result.history]
    plot_curves(job.out / "curves" / f"{job.layer:03d}.png", history, job.layer)
    return LayerResult(result.thetas, stage_mse, {
        "best_epoch": result.best_epoch, "heldout_relative_error": result.best_heldout,
        "init_heldout_relative_error": result.init_heldout, "history": history})


def plot_curves(path: Path, history: list[dict], layer: int) -> None:
    """Loss, Recon, Commit and held-out error per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("loss", "recon", "commit", "heldout"):
        ax.plot(epochs, [h[key] for h in history], label=key if key != "heldout" else "held-out recon")
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
    ax.set_title(f"E2E key codebooks, layer {layer}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
