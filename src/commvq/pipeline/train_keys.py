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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from commvq import io
from commvq.config import option, to_dict
from commvq.data.kvstore import KVStore
from commvq.distributed import barrier, device_for_rank, rank_world
from commvq.evals.keys import pair_weights
from commvq.fsutil import write_json
from commvq.pipeline import key_methods
from commvq.pipeline.collect import store_dirs
from commvq.quant import e2e, em
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
    max_iters: int = option(100, "EM: iterations per stage at most")
    epochs: int = option(100, "E2E: epochs")
    lr: float = option(1e-3, "E2E: Adam learning rate (cosine schedule)")
    batch_size: int = option(256, "E2E: key vectors per step")
    commit_weight: float = option(0.25, "E2E: weight of the commitment loss")
    init: str = option("kmeans", "E2E: initial codebooks: kmeans (k-means++ per stage), em (the paper's EM) "
                       "or random", choices=("kmeans", "em", "random"))
    objective: str = option("mse", "E2E: mse, or attention (weights key errors by the collected queries)",
                            choices=("mse", "attention"))
    holdout: float = option(0.05, "E2E: fraction of the vectors held out to pick the best epoch")
    chunk: int = option(8192, "vectors per E-step chunk")
    kernels: str = option("auto", "EM E-step and E2E codeword search: auto (Triton on GPU), torch or triton",
                          choices=("auto", "torch", "triton"))
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
        for name in ("num_samples", "max_iters", "chunk", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.residuals is not None and self.residuals < 1:
            raise ValueError(f"--residuals {self.residuals}: must be at least 1")
        if self.quant_bits is not None and self.quant_bits <= 0:
            raise ValueError(f"--quant_bits {self.quant_bits}: must be positive")
        if not 0 < self.holdout < 0.5:
            raise ValueError(f"--holdout {self.holdout}: use a fraction between 0 and 0.5")
        if self.lr <= 0 or self.commit_weight < 0:
            raise ValueError(f"--lr {self.lr} must be positive and --commit_weight {self.commit_weight} >= 0")


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


def prepare_output(out: Path, layout: io.CodebookLayout, method: str, overwrite: bool, empty: bool = True) -> None:
    """Refuse to mix methods or layouts in one directory, unless ``overwrite`` empties it (the
    emptying only where ``empty``: one process of several)."""
    if not out.exists():
        out.mkdir(parents=True, exist_ok=True)  # several processes may get here at once
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
    if not empty:
        return
    log.warning("train-keys: emptying %s (%s codebooks) as --overwrite asks", out, have_method)
    for f in files + sorted((out / "metrics").glob("*.json")):
        f.unlink()


def use_triton(name: str, device: torch.device) -> bool:
    """Whether to run the fused Triton kernels (``--kernels``)."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda":
        raise ValueError("--kernels triton needs a CUDA device; use --kernels torch on CPU")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        if name == "triton":
            raise ModuleNotFoundError(f"--kernels triton needs triton ({e})") from e
        return False
    return True


def resolve_estep(name: str, device: torch.device) -> tuple[em.EStep, em.CentersEStep, em.Nearest | None]:
    """The EM E-steps (against codebooks, and the initialization's against free centers) and the
    nearest-codeword search that encodes the residual between stages (None: pure torch)."""
    if not use_triton(name, device):
        return em.e_step, em.e_step_centers, None
    from commvq.kernels.em_estep import e_step_triton
    from commvq.kernels.em_init import e_step_centers_triton
    from commvq.kernels.nearest import nearest_triton

    return e_step_triton, e_step_centers_triton, nearest_triton


def resolve_encoder(name: str, device: torch.device):
    if not use_triton(name, device):
        return None
    from commvq.kernels.encode import encode_triton

    return encode_triton


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


def pair_weights_for(cfg: TrainKeysConfig, spec: ModelSpec, layer: int, heads: list[int],
                     device: torch.device) -> torch.Tensor | None:
    """Query energy per pair for ``--objective attention`` (needs collected queries)."""
    if cfg.objective != "attention":
        return None
    qdir = store_dirs(cfg.key_dir)["query"]
    if not (qdir / "manifest.json").is_file():
        raise FileNotFoundError(f"--objective attention needs queries in {qdir}: collect with --with_queries")
    q = KVStore(qdir).layer(layer).read().to(device)
    return pair_weights(q, spec.num_kv_heads, spec.head_dim)[heads]


def layer_done(out: Path, layer: int, num_heads: int) -> bool:
    """A layer is finished once its metrics are written (after all its head files)."""
    return (out / "metrics" / f"{layer:03d}.json").is_file() and all(
        io.head_file(out, layer, h).is_file() for h in range(num_heads))


def train_layer(cfg: TrainKeysConfig, spec: ModelSpec, layout: io.CodebookLayout, out: Path, store: KVStore,
                layer: int, samples: int, device: torch.device) -> dict:
    """Train (and save) every KV head of one layer; return its metrics."""
    t0 = time.perf_counter()
    heads = list(range(spec.num_kv_heads))
    keys = store.layer(layer).read(0, samples).float().to(device)
    x, s = normalize(keys, spec.num_kv_heads)
    estep, init_estep, nearest_fn = resolve_estep(cfg.kernels, device)
    job = key_methods.LayerJob(layer=layer, heads=heads, x=x, s=s, layout=layout, out=out,
                               with_centers=cfg.with_centers, seed=cfg.seed * 1000 + layer,
                               estep=estep, init_estep=init_estep, nearest=nearest_fn,
                               pair_weights=pair_weights_for(cfg, spec, layer, heads, device))
    if cfg.method == "em":
        res = key_methods.run_em(job, cfg.max_iters, cfg.chunk)
    else:
        settings = e2e.E2ESettings(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                   commit_weight=cfg.commit_weight, encode_fn=resolve_encoder(cfg.kernels, device))
        res = key_methods.run_e2e(job, settings, cfg.init, cfg.holdout, cfg.max_iters, cfg.chunk,
                                  echo=lambda line: tqdm.write(line))
    k2 = float((keys.double() ** 2).sum() / keys.shape[0])
    return {"seconds": round(time.perf_counter() - t0, 3), "samples": samples, "heads": heads,
            "relative_mse": float(res.stage_mse[-1].double().sum() * layout.head_dim / k2),
            "final_error": res.stage_mse[-1].tolist(), "stage_mse": res.stage_mse.T.tolist(), **res.extra}


def run(cfg: TrainKeysConfig) -> Path:
    store = KVStore(cfg.key_dir)
    if "spec" not in store.settings:
        raise ValueError(f"{cfg.key_dir}: the manifest records no model shape; re-collect with this commvq")
    spec = ModelSpec.from_dict(store.settings["spec"])
    layout, out = resolve_layout(cfg, spec)
    rank, world = rank_world()
    prepare_output(out, layout, cfg.method, cfg.overwrite, empty=rank == 0)
    (out / "metrics").mkdir(exist_ok=True)
    barrier()  # no process writes codebooks before every one has checked (and rank 0 emptied) the folder
    layers = parse_layers(cfg.layers, spec.num_layers)
    device = device_for_rank(cfg.device)
    samples = min(cfg.num_samples, store.num_tokens)
    mine = [layer for layer in layers[rank::world]
            if cfg.overwrite or not layer_done(out, layer, spec.num_kv_heads)]
    log.info("train-keys: %s, %s -> %s (%d layers to train on rank %d/%d, %d vectors each, %s)", cfg.method,
             layout.dir_name, out, len(mine), rank, world, samples, device)
    for layer in tqdm(mine, desc="train-keys", unit="layer", disable=len(mine) < 2):
        metrics = train_layer(cfg, spec, layout, out, store, layer, samples, device)
        write_json(out / "metrics" / f"{layer:03d}.json", metrics)
        update_config(out, layout, cfg, spec, store, samples)
        log.info("layer %d: relative key MSE %.5f in %.1f s", layer, metrics["relative_mse"], metrics["seconds"])
    barrier()
    if rank == 0:
        update_config(out, layout, cfg, spec, store, samples)
    return out
