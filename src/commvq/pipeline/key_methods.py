"""The two ways to train one layer's key codebooks (EM, E2E), behind one signature."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commvq import io
from commvq.codecs.key_codebook import Encoder
from commvq.fsutil import atomic_path
from commvq.pipeline import progress
from commvq.quant import e2e, em, refine
from commvq.quant.beam import encode as torch_encode
from commvq.quant.beam import stage_residuals
from commvq.quant.commutative import as_float, num_entries
from commvq.spec import ModelSpec

log = logging.getLogger("commvq")


@dataclass
class LayerJob:
    """What a method needs to train one layer."""

    layer: int
    heads: list[int]
    x: torch.Tensor  # [H, N, D] normalized training keys of the heads to train
    s: torch.Tensor  # [N] their prescales
    val_x: torch.Tensor  # [H, M, D] validation keys (E2E picks its best round or epoch there)
    val_s: torch.Tensor  # [M]
    layout: io.CodebookLayout
    out: Path
    with_centers: bool
    seed: int
    estep: em.EStep
    init_estep: em.CentersEStep = em.e_step_centers
    nearest: em.Nearest | None = None  # encodes the residual between EM stages (None: pure torch)
    pair_weights: torch.Tensor | None = None  # [H, P] for objective=attention
    encoder: Encoder = torch_encode  # (x, thetas, beam) -> codes: what the cache will encode with
    beam: int = 1  # the encoder's beam width the codebooks are trained for and saved with


@dataclass
class LayerResult:
    thetas: torch.Tensor  # [H, R, 2E, P]
    stage_mse: torch.Tensor  # [R, H], original scale
    extra: dict


def validation_stage_mse(job: LayerJob, thetas: torch.Tensor) -> torch.Tensor:
    """``[R, H]`` MSE (original scale) left after each stage of the validation keys, coded by
    the job's encoder."""
    codes = job.encoder(job.val_x, thetas, job.beam)
    left = stage_residuals(job.val_x, codes, thetas) * job.val_s[None, None, :, None]
    return (left.double() ** 2).mean((2, 3)).float().cpu()


def save_heads(job: LayerJob, thetas: torch.Tensor, stage_mse: torch.Tensor) -> None:
    for i, h in enumerate(job.heads):
        io.save_head(
            io.head_file(job.out, job.layer, h),
            thetas[i],
            stage_mse[:, i],
            float(stage_mse[-1, i]),
            job.with_centers,
        )


def run_em(job: LayerJob, max_iters: int, chunk: int) -> LayerResult:
    bar = progress.bar(
        total=job.layout.residuals, desc=f"layer {job.layer:3d}", unit="stage", leave=False
    )

    def on_stage(r: int, res: em.StageResult, err: torch.Tensor) -> None:
        bar.update(1)
        bar.set_postfix(mse=f"{float(err.mean()):.4g}")
        log.debug(  # one line per stage and layer: detail (-v), not the log of a whole run
            "layer %d stage %d/%d: hard MSE (original scale) %s, iterations %s",
            job.layer,
            r + 1,
            job.layout.residuals,
            " ".join(f"{v:.5g}" for v in res.mse.tolist()),
            res.iters.tolist(),
        )

    fitted = em.fit(
        job.x,
        job.s,
        job.layout.residuals,
        num_entries(job.layout.code_bits),
        em.EMSettings(max_iters=max_iters, chunk=chunk),
        seed=job.seed,
        estep=job.estep,
        on_stage=on_stage,
        init_estep=job.init_estep,
        nearest_fn=job.nearest,
    )
    bar.close()
    stage_mse = fitted.residual_mse if job.beam == 1 else validation_stage_mse(job, fitted.thetas)
    save_heads(job, fitted.thetas, stage_mse)
    return LayerResult(fitted.thetas, stage_mse, {"iterations": fitted.iters.T.tolist()})


def initial_thetas(
    job: LayerJob,
    init: str,
    max_iters: int,
    chunk: int,
    init_dir: Path | None = None,
    spec: ModelSpec | None = None,
) -> torch.Tensor:
    """E2E's start: codebooks from ``init_dir`` (same layout), else trained on the job's keys."""
    if init_dir is not None:
        if spec is None:
            raise ValueError("init_dir needs the model's spec")
        return as_float(io.load_layer(init_dir, job.layer, spec)[job.heads]).to(job.x.device)
    generator = torch.Generator().manual_seed(job.seed)
    e = num_entries(job.layout.code_bits)
    if init == "em":
        settings = em.EMSettings(max_iters=max_iters, chunk=chunk)
        return em.fit(
            job.x,
            job.s,
            job.layout.residuals,
            e,
            settings,
            seed=job.seed,
            estep=job.estep,
            init_estep=job.init_estep,
            nearest_fn=job.nearest,
        ).thetas
    if init == "random":
        return e2e.init_random(job.x, job.layout.residuals, e, generator)
    return e2e.init_kmeans(job.x, job.layout.residuals, e, generator)


def _progress(
    job: LayerJob, echo: Callable[[str], None], total: int, unit: str, line: Callable[[Any], str]
) -> tuple[Callable[[Any, torch.Tensor | None], None], Any]:
    """A solver's step callback (a progress bar, the step's log line, the best codebooks saved as
    soon as they are reached) and its bar."""
    bar = progress.bar(total=total, desc=f"layer {job.layer:3d}", unit=unit, leave=False)

    def on_step(entry: Any, best: torch.Tensor | None) -> None:
        bar.update(1)
        echo(line(entry))
        if best is not None:
            save_heads(job, best, validation_stage_mse(job, best))
            loss = entry.heldout
            echo(
                f"✓ Saved best model with loss {loss:.4f}"
                if loss >= 1e-3
                else f"✓ Saved best model with loss {loss:.4g}"
            )

    return on_step, bar


def run_e2e_adam(
    job: LayerJob,
    settings: e2e.E2ESettings,
    thetas0: torch.Tensor,
    echo: Callable[[str], None] = print,
) -> LayerResult:
    """Adam on the training keys (greedy codes); the validation keys pick the best epoch."""
    on_epoch, bar = _progress(
        job,
        echo,
        settings.epochs,
        "epoch",
        lambda entry: (
            f"Epoch {entry.epoch}/{settings.epochs} - Loss: {entry.loss:.4f}, "
            f"Recon: {entry.recon:.4f}, Commit: {entry.commit:.4f}"
        ),
    )
    result = e2e.train(
        job.x, job.val_x, thetas0, settings, job.pair_weights, seed=job.seed, on_epoch=on_epoch
    )
    bar.close()
    return _finish(job, "adam", "epoch", result.best_epoch, result)


def run_e2e_lstsq(
    job: LayerJob,
    settings: refine.RefineSettings,
    thetas0: torch.Tensor,
    echo: Callable[[str], None] = print,
    weighted: bool = False,
) -> LayerResult:
    """Alternate encoding (the job's beam) and the joint least-squares solve of all stages; the
    validation keys pick the best round (round 0: the start). ``weighted``: each key weighs its
    squared prescale in the solve and in the validation error (the error in the keys' own
    scale)."""
    on_round, bar = _progress(
        job,
        echo,
        settings.rounds,
        "round",
        lambda entry: (
            f"Round {entry.round}/{settings.rounds} - Recon: {entry.train:.4g}, "
            f"held-out: {entry.heldout:.4g} (step {entry.step_size:g}, {entry.seconds:.1f} s)"
        ),
    )
    w, val_w = (job.s**2, job.val_s**2) if weighted else (None, None)
    result = refine.refine(
        job.x, job.val_x, thetas0, settings, on_round=on_round, weights=w, heldout_weights=val_w
    )
    bar.close()
    return _finish(job, "lstsq", "round", result.best_round, result)


def _finish(job: LayerJob, solver: str, unit: str, best: int, result: Any) -> LayerResult:
    """Save the start when no step beat it, plot the curves, and the layer's metrics."""
    stage_mse = validation_stage_mse(job, result.thetas)
    if best == 0:
        save_heads(job, result.thetas, stage_mse)
    history = [vars(h) for h in result.history]
    path = job.out / "curves" / f"{job.layer:03d}.png"
    plot_curves(path, history, job.layer, job.layout.bits_per_channel)
    return LayerResult(
        result.thetas,
        stage_mse,
        {
            "solver": solver,
            f"best_{unit}": best,
            "heldout_relative_error": result.best_heldout,
            "init_heldout_relative_error": result.init_heldout,
            "history": history,
        },
    )


def plot_curves(path: Path, history: list[dict], layer: int, bits: float | None = None) -> None:
    """Training and held-out errors per epoch (Adam: Loss, Recon, Commit) or per round (lstsq: the
    round's training Recon), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    step = "epoch" if history and "epoch" in history[0] else "round"
    keys = ("loss", "recon", "commit", "heldout") if step == "epoch" else ("train", "heldout")
    for key in keys:
        ax.plot(
            [h[step] for h in history],
            [h[key] for h in history],
            label={"heldout": "held-out recon", "train": "recon (the round's codes)"}.get(key, key),
            marker=".",
        )
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(step)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("relative key MSE")
    ax.set_yscale("log")
    width = f", {bits:.2g} bits per channel" if bits else ""
    ax.set_title(f"E2E key codebooks, layer {layer}{width}")
    ax.grid(alpha=0.3)
    # below the axes: inside, it covered the lines' ends (where the rounds' errors are read)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
