"""Stage `train-keys`: RoPE-commutative residual key codebooks, per layer and KV head.

``--method em`` is the paper's EM; ``--method e2e`` trains all stages jointly by gradient
descent. Settings come from flags or from an ``--output_dir`` named in the pattern
``codebook[_e2e]_{code_bits}bits_{head_dim}group_{R}residuals``. Finished (layer, head) files
are skipped; writes are atomic; EM and E2E results never overwrite each other.
With ``torchrun`` (or RANK/WORLD_SIZE set) layers are spread over the processes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from commvq import io
from commvq.config import option, to_dict
from commvq.data.kvstore import KVStore
from commvq.fsutil import write_json
from commvq.quant import em
from commvq.quant.commutative import num_entries
from commvq.quant.residual import normalize, residuals_for_bits
from commvq.spec import ModelSpec

log = logging.getLogger("commvq")
DEFAULT_QUANT_BITS = 2.0
DEFAULT_CODE_BITS = 12


@dataclass(frozen=True)
class TrainKeysConfig:
    key_dir: Path = option(Path("data/key"), "collected keys (from `commvq collect`)")
    output_dir: Path | None = option(None, "codebook directory (default: codebook[_e2e]_<b>bits_<D>group_<R>"
                                     "residuals in the current folder)")
    method: str = option("em", "training method", choices=io.METHODS, aliases=("--training_method",))
    layers: str = option("all", "layers: all, L, A-B or a comma list", aliases=("--layer",))
    quant_bits: float | None = option(None, f"bits per channel, sets R (default: {DEFAULT_QUANT_BITS:g})")
    code_bits: int | None = option(None, f"bits per code and stage, even, 6..12 (default: {DEFAULT_CODE_BITS})")
    residuals: int | None = option(None, "residual stages R (default: round(quant_bits*head_dim/code_bits))")
    num_samples: int = option(1_048_576, "key vectors per layer to train on (the first N collected)")
    max_iters: int = option(100, "EM iterations per stage at most")
    chunk: int = option(8192, "vectors per E-step chunk")
    estep: str = option("auto", "EM E-step: auto (Triton on GPU), torch or triton", choices=("auto", "torch", "triton"))
    with_centers: bool = option(False, "also store the materialized centers (about 2 MB per stage)")
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")
    seed: int = option(0, "random seed")
    overwrite: bool = option(False, "retrain finished layers; empty a directory of another method/layout")

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_dir", Path(self.key_dir))
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.method not in io.METHODS:
            raise ValueError(f"--method {self.method!r}: use one of {io.METHODS}")
        if self.code_bits is not None and (self.code_bits % 2 or not 6 <= self.code_bits <= 12):
            raise ValueError(f"--code_bits {self.code_bits}: use an even number from 6 to 12")
        for name in ("num_samples", "max_iters", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.residuals is not None and self.residuals < 1:
            raise ValueError(f"--residuals {self.residuals}: must be at least 1")
        if self.quant_bits is not None and self.quant_bits <= 0:
            raise ValueError(f"--quant_bits {self.quant_bits}: must be positive")


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``all``, ``7``, ``2-5`` or ``0,3,9`` -> sorted layer indices, checked against the model."""
    text = str(text).strip()
    if text == "all":
        return list(range(num_layers))
    out: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = (int(v) for v in part.split("-"))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise ValueError(f"--layers {text!r}: use all, L, A-B or a comma list") from None
    bad = sorted(v for v in out if not 0 <= v < num_layers)
    if bad or not out:
        raise ValueError(f"--layers {text!r}: layers must lie in 0..{num_layers - 1}")
    return sorted(out)


def resolve_layout(cfg: TrainKeysConfig, spec: ModelSpec) -> tuple[io.CodebookLayout, Path]:
    """Settings from flags and the output directory's name; contradictions are errors."""
    named = io.parse_dir_name(cfg.output_dir.name) if cfg.output_dir is not None else None
    if named is not None:
        if named.head_dim != spec.head_dim:
            raise ValueError(f"--output_dir {cfg.output_dir.name} says head_dim {named.head_dim}; "
                             f"the model's is {spec.head_dim}")
        if named.e2e and cfg.method != "e2e":
            raise ValueError(f"--output_dir {cfg.output_dir.name} is an E2E directory; "
                             "use --method e2e or another name")
        for flag, given, said in (("code_bits", cfg.code_bits, named.code_bits),
                                  ("residuals", cfg.residuals, named.residuals)):
            if given is not None and given != said:
                raise ValueError(f"--{flag} {given} contradicts --output_dir {cfg.output_dir.name}")
    code_bits = cfg.code_bits or (named.code_bits if named else DEFAULT_CODE_BITS)
    quant_bits = cfg.quant_bits if cfg.quant_bits is not None else DEFAULT_QUANT_BITS
    if cfg.residuals is not None:
        r = cfg.residuals
    elif named is not None:
        r = named.residuals
        if cfg.quant_bits is not None and residuals_for_bits(cfg.quant_bits, spec.head_dim, code_bits) != r:
            raise ValueError(f"--quant_bits {cfg.quant_bits:g} gives "
                             f"{residuals_for_bits(cfg.quant_bits, spec.head_dim, code_bits)} stages, "
                             f"--output_dir {cfg.output_dir.name} says {r}")
    else:
        r = residuals_for_bits(quant_bits, spec.head_dim, code_bits)
    layout = io.CodebookLayout(code_bits, spec.head_dim, r, e2e=cfg.method == "e2e")
    return layout, cfg.output_dir or Path(layout.dir_name)


def prepare_output(out: Path, layout: io.CodebookLayout, method: str, overwrite: bool) -> None:
    """Refuse to mix methods or layouts in one directory, unless ``overwrite`` empties it."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    cfg = io.read_config(out)
    files = sorted(out.glob("[0-9][0-9][0-9]_*.pt"))
    if cfg is None and not files:
        return
    have_method = cfg["method"] if cfg else "unknown"
    same = cfg is not None and cfg["method"] == method and (cfg["code_bits"], cfg["residuals"]) == (
        layout.code_bits, layout.residuals)
    if same:
        return
    if not overwrite:
        raise ValueError(f"{out} holds {have_method} codebooks of other settings; EM and E2E results never "
                         "overwrite each other: choose another --output_dir or pass --overwrite")
    log.warning("train-keys: emptying %s (%s codebooks) as --overwrite asks", out, have_method)
    for f in files + sorted((out / "metrics").glob("*.json")):
        f.unlink()


def distributed() -> tuple[int, int]:
    """``(rank, world)`` from torchrun's environment (``(0, 1)`` otherwise)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def resolve_estep(name: str, device: torch.device) -> em.EStep:
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return em.e_step
    try:
        from commvq.kernels.em_estep import e_step_triton
    except ImportError as e:
        if name == "triton":
            raise ModuleNotFoundError(f"--estep triton needs triton and a CUDA GPU ({e})") from e
        return em.e_step
    if device.type != "cuda":
        raise ValueError("--estep triton needs a CUDA device; use --estep torch on CPU")
    return e_step_triton


def update_config(out: Path, layout: io.CodebookLayout, cfg: TrainKeysConfig, spec: ModelSpec, store: KVStore,
                  samples: int) -> None:
    """Rebuild config.json from the per-layer metrics files (safe with several processes)."""
    layers = {}
    for f in sorted((out / "metrics").glob("*.json")):
        layers[str(int(f.stem))] = json.loads(f.read_text())
    io.write_config(out, layout, cfg.method, spec, {
        "model": store.settings.get("model"), "key_dir": str(cfg.key_dir), "samples": samples,
        "seed": cfg.seed, "train_config": to_dict(cfg), "layers": layers,
    })


def train_layer(cfg: TrainKeysConfig, layout: io.CodebookLayout, keys: torch.Tensor, heads: list[int],
                layer: int, device: torch.device) -> dict:
    """Train the given heads of one layer; return per-head thetas and metrics."""
    x, s = normalize(keys.to(device), keys.shape[1] // layout.head_dim)
    x = x[heads]
    e = num_entries(layout.code_bits)
    bar = tqdm(total=layout.residuals, desc=f"layer {layer:3d}", unit="stage", leave=False)

    def on_stage(r: int, res: em.StageResult, err: torch.Tensor) -> None:
        bar.update(1)
        bar.set_postfix(mse=f"{float(err.mean()):.4g}")
        log.info("layer %d stage %d/%d: hard MSE (original scale) %s, iterations %s", layer, r + 1,
                 layout.residuals, " ".join(f"{v:.5g}" for v in res.mse.tolist()), res.iters.tolist())

    if cfg.method == "em":
        settings = em.EMSettings(max_iters=cfg.max_iters, chunk=cfg.chunk)
        fitted = em.fit(x, s, layout.residuals, e, settings, seed=cfg.seed * 1000 + layer,
                        estep=resolve_estep(cfg.estep, device), on_stage=on_stage)
        thetas, stage_mse, residual_mse = fitted.thetas, fitted.stage_mse, fitted.residual_mse
        extra = {"iterations": fitted.iters.T.tolist()}
    else:
        raise NotImplementedError("--method e2e is not implemented yet")
    bar.close()
    k2 = (keys.double() ** 2).sum() / keys.shape[0]
    return {"thetas": thetas.cpu(), "stage_mse": stage_mse, "final_error": residual_mse[-1],
            "relative_mse": float(residual_mse[-1].double().sum() * layout.head_dim / k2), **extra}


def run(cfg: TrainKeysConfig) -> Path:
    store = KVStore(cfg.key_dir)
    if "spec" not in store.settings:
        raise ValueError(f"{cfg.key_dir}: the manifest records no model shape; re-collect with this commvq")
    spec = ModelSpec.from_dict(store.settings["spec"])
    layout, out = resolve_layout(cfg, spec)
    prepare_output(out, layout, cfg.method, cfg.overwrite)
    (out / "metrics").mkdir(exist_ok=True)
    layers = parse_layers(cfg.layers, spec.num_layers)
    rank, world = distributed()
    device = resolve_device(cfg.device)
    samples = min(cfg.num_samples, store.num_tokens)
    log.info("train-keys: %s, %s -> %s (%d layers on rank %d/%d, %d vectors each, %s)", cfg.method,
             layout.dir_name, out, len(layers[rank::world]), rank, world, samples, device)
    for layer in tqdm(layers[rank::world], desc="train-keys", unit="layer", disable=len(layers) < 2):
        heads = [h for h in range(spec.num_kv_heads)
                 if cfg.overwrite or not io.head_file(out, layer, h).is_file()]
        if not heads:
            continue
        t0 = time.perf_counter()
        keys = store.layer(layer).read(0, samples).float()
        res = train_layer(cfg, layout, keys, heads, layer, device)
        for i, h in enumerate(heads):
            io.save_head(io.head_file(out, layer, h), res["thetas"][i], res["stage_mse"][:, i],
                         float(res["final_error"][i]), cfg.with_centers)
        metrics = {"seconds": round(time.perf_counter() - t0, 3), "samples": samples, "heads": heads,
                   "relative_mse": res["relative_mse"], "final_error": res["final_error"].tolist(),
                   "stage_mse": res["stage_mse"].T.tolist(),
                   **{k: v for k, v in res.items() if k == "iterations"}}
        write_json(out / "metrics" / f"{layer:03d}.json", metrics)
        update_config(out, layout, cfg, spec, store, samples)
        log.info("layer %d: relative key MSE %.5f in %.1f s", layer, res["relative_mse"], metrics["seconds"])
    update_config(out, layout, cfg, spec, store, samples)
    return out
