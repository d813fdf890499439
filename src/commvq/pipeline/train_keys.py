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

from commvq import io
from commvq.codecs.key_codebook import encoder_for
from commvq.config import option, to_dict
from commvq.data.kvstore import KVStore
from commvq.distributed import barrier, device_for_rank, rank_world
from commvq.evals.keys import pair_weights
from commvq.fsutil import write_json
from commvq.pipeline import key_methods, progress
from commvq.pipeline.collect import store_dirs
from commvq.pipeline.key_rows import EVAL_SAMPLES, finite_rows, heldout_errors, split_rows
from commvq.quant import e2e, em, refine
from commvq.quant.commutative import is_untied, untie
from commvq.quant.residual import normalize, residuals_for_bits
from commvq.spec import ModelSpec

log = logging.getLogger("commvq")
DEFAULT_QUANT_BITS = 2.0
DEFAULT_CODE_BITS = 12
SOLVERS = ("lstsq", "adam")
DEFAULT_ROUNDS = 8  # untied tables still gain at round 8 (docs/results.md); tied ones stop by 2-4
DEFAULT_BEAM = 8
TABLES = ("tied", "untied")
DEFAULT_TABLES = "untied"
ADAM_DEFAULTS = {"epochs": 100, "lr": 1e-3, "batch_size": 256}


@dataclass(frozen=True)
class TrainKeysConfig:
    key_dir: Path = option(Path("data/key"), "collected keys (from `commvq collect`)")
    output_dir: Path | None = option(
        None,
        "codebook directory (default: codebook[_e2e]_<b>bits_<D>group_<R>"
        "residuals in the current folder)",
    )
    method: str = option(
        "em", "training method", choices=io.METHODS, aliases=("--training_method",)
    )
    layers: str = option("all", "layers: all, L, A-B or a comma list", aliases=("--layer",))
    quant_bits: float | None = option(
        None, f"bits per channel, sets R (default: {DEFAULT_QUANT_BITS:g})"
    )
    code_bits: int | None = option(
        None, f"bits per code and stage, even, 6..12 (default: {DEFAULT_CODE_BITS})"
    )
    residuals: int | None = option(
        None, "residual stages R (default: round(quant_bits*head_dim/code_bits))"
    )
    num_samples: int = option(
        1_048_576, "key vectors per layer to train on (the first N collected)"
    )
    max_iters: int = option(100, "EM: iterations per stage at most")
    solver: str = option(
        "lstsq",
        "E2E: lstsq (alternate encoding with the beam and one joint least-squares "
        "solve of all stages) or adam (gradient steps on greedy codes)",
        choices=SOLVERS,
    )
    rounds: int = option(DEFAULT_ROUNDS, "E2E lstsq: rounds of encode + solve")
    step: str = option(
        "search",
        "E2E lstsq: each round's move: search (the fraction 1, 1/2, 1/4 or 1/8 of the solve's "
        "step that the beam encodes best on a sample of the training keys, tried largest first "
        "while the error falls; whole steps can run away over the rounds) or full (each solve "
        "as it is)",
        choices=refine.STEPS,
    )
    weights: str = option(
        "none",
        "E2E lstsq: each key's weight in the solve and in choosing the round: none (the unit-norm "
        "keys alike) or prescale (its squared norm: the error in the keys' own scale, as "
        "config.json reports it)",
        choices=("none", "prescale"),
    )
    tables: str | None = option(
        None,
        "E2E lstsq: tied (the paper's codewords a_A + i a_B, one table per stage) or untied "
        f"(a_A + i b_B: a second table for the B index; same codes, bits and decode cost; "
        f"default {DEFAULT_TABLES} for e2e lstsq, tied otherwise); recorded in config.json",
        choices=TABLES,
    )
    beam: int | None = option(
        None,
        "beam width of the key encoder the codebooks are trained for and used with "
        f"(1: greedy; default {DEFAULT_BEAM} for e2e, 1 for em); recorded in config.json",
    )
    epochs: int | None = option(None, f"E2E adam: epochs (default {ADAM_DEFAULTS['epochs']})")
    lr: float | None = option(
        None, f"E2E adam: learning rate, cosine schedule (default {ADAM_DEFAULTS['lr']:g})"
    )
    batch_size: int | None = option(
        None, f"E2E adam: key vectors per step (default {ADAM_DEFAULTS['batch_size']})"
    )
    commit_weight: float = option(0.25, "E2E: weight of the commitment loss")
    init: str = option(
        "em",
        "E2E: initial codebooks: em (the paper's EM on the same keys), kmeans "
        "(k-means++ per stage) or random",
        choices=("em", "kmeans", "random"),
    )
    init_dir: Path | None = option(
        None,
        "E2E: start from the codebooks in this folder (e.g. an EM run on the "
        "same keys) instead of training a start",
    )
    objective: str = option(
        "mse",
        "E2E: mse, or attention (weights key errors by the collected queries)",
        choices=("mse", "attention"),
    )
    holdout: float = option(0.05, "E2E: fraction of the vectors held out to pick the best epoch")
    layer_lines: bool = option(
        True, "print each layer's lines (its epochs or rounds, its held-out error)"
    )
    eval_samples: int = option(
        EVAL_SAMPLES,
        "rows after the training vectors on which config.json's key errors are measured",
    )
    chunk: int = option(8192, "vectors per E-step chunk")
    kernels: str = option(
        "auto",
        "EM E-step and E2E codeword search: auto (Triton on GPU), torch or triton",
        choices=("auto", "torch", "triton"),
    )
    with_centers: bool = option(False, "also store the materialized centers (about 2 MB per stage)")
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")
    seed: int = option(0, "random seed")
    overwrite: bool = option(
        False, "retrain finished layers; empty a directory of another method/layout"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_dir", Path(self.key_dir))
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.method not in io.METHODS:
            raise ValueError(f"--method {self.method!r}: use one of {io.METHODS}")
        if self.code_bits is not None and (self.code_bits % 2 or not 6 <= self.code_bits <= 12):
            raise ValueError(f"--code_bits {self.code_bits}: use an even number from 6 to 12")
        for name in ("num_samples", "max_iters", "chunk", "epochs", "batch_size", "beam"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.rounds < 0:
            raise ValueError(f"--rounds {self.rounds}: must be 0 or more")
        if self.init_dir is not None:
            object.__setattr__(self, "init_dir", Path(self.init_dir))
        if self.method == "e2e" and self.solver == "adam" and self.beam not in (None, 1):
            raise ValueError(
                f"--beam {self.beam} needs --solver lstsq: adam trains on greedy codes (--beam 1)"
            )
        if self.residuals is not None and self.residuals < 1:
            raise ValueError(f"--residuals {self.residuals}: must be at least 1")
        if self.quant_bits is not None and self.quant_bits <= 0:
            raise ValueError(f"--quant_bits {self.quant_bits}: must be positive")
        if not 0 < self.holdout < 0.5:
            raise ValueError(f"--holdout {self.holdout}: use a fraction between 0 and 0.5")
        if self.eval_samples < 1:
            raise ValueError(f"--eval_samples {self.eval_samples}: use 1 or more")
        if self.tables not in (None, *TABLES):
            raise ValueError(f"--tables {self.tables!r}: use tied or untied")
        if self.tables == "untied" and (self.method, self.solver) != ("e2e", "lstsq"):
            raise ValueError(
                "--tables untied needs --method e2e --solver lstsq (EM and adam train the "
                "paper's tied tables); drop --tables or change the method"
            )
        if self.weights not in ("none", "prescale"):
            raise ValueError(f"--weights {self.weights}: none or prescale")
        if (self.lr is not None and self.lr <= 0) or self.commit_weight < 0:
            raise ValueError(
                f"--lr {self.lr} must be positive and --commit_weight {self.commit_weight} >= 0"
            )

    @property
    def encode_beam(self) -> int:
        """The beam width the codebooks are trained for (the default depends on the method)."""
        if self.beam is not None:
            return self.beam
        return DEFAULT_BEAM if self.method == "e2e" and self.solver == "lstsq" else 1

    @property
    def table_kind(self) -> str:
        """tied or untied: what the codebooks are trained as (the default depends on the method)."""
        if self.tables is not None:
            return self.tables
        return DEFAULT_TABLES if self.method == "e2e" and self.solver == "lstsq" else "tied"

    def ignored_flags(self) -> list[str]:
        """The Adam flags given to a run that does not use Adam."""
        if self.method == "e2e" and self.solver == "adam":
            return []
        return [f"--{n}" for n in ADAM_DEFAULTS if getattr(self, n) is not None]

    def adam(self, name: str):
        value = getattr(self, name)
        return ADAM_DEFAULTS[name] if value is None else value


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
            raise ValueError(
                f"--output_dir {cfg.output_dir.name} says head_dim {named.head_dim}; "
                f"the model's is {spec.head_dim}"
            )
        if named.e2e and cfg.method != "e2e":
            raise ValueError(
                f"--output_dir {cfg.output_dir.name} is an E2E directory; "
                "use --method e2e or another name"
            )
        if cfg.method == "e2e" and not named.e2e:
            raise ValueError(
                f"--output_dir {cfg.output_dir.name} is named for EM codebooks; use "
                f"codebook_e2e_{named.code_bits}bits_{named.head_dim}group_"
                f"{named.residuals}residuals or another name"
            )
        for flag, given, said in (
            ("code_bits", cfg.code_bits, named.code_bits),
            ("residuals", cfg.residuals, named.residuals),
        ):
            if given is not None and given != said:
                raise ValueError(f"--{flag} {given} contradicts --output_dir {cfg.output_dir.name}")
    code_bits = cfg.code_bits or (named.code_bits if named else DEFAULT_CODE_BITS)
    quant_bits = cfg.quant_bits if cfg.quant_bits is not None else DEFAULT_QUANT_BITS
    if cfg.residuals is not None:
        r = cfg.residuals
    elif named is not None:
        r = named.residuals
        if (
            cfg.quant_bits is not None
            and residuals_for_bits(cfg.quant_bits, spec.head_dim, code_bits) != r
        ):
            raise ValueError(
                f"--quant_bits {cfg.quant_bits:g} gives "
                f"{residuals_for_bits(cfg.quant_bits, spec.head_dim, code_bits)} stages, "
                f"--output_dir {cfg.output_dir.name} says {r}"
            )
    else:
        r = residuals_for_bits(quant_bits, spec.head_dim, code_bits)
    layout = io.CodebookLayout(code_bits, spec.head_dim, r, e2e=cfg.method == "e2e")
    return layout, cfg.output_dir or Path(layout.dir_name)


def prepare_output(
    out: Path,
    layout: io.CodebookLayout,
    method: str,
    overwrite: bool,
    empty: bool = True,
    beam: int = 1,
    tables: str = "tied",
) -> None:
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
    same = (
        cfg is not None
        and cfg["method"] == method
        and (cfg["code_bits"], cfg["residuals"], cfg.get("beam", 1), cfg.get("tables", "tied"))
        == (layout.code_bits, layout.residuals, beam, tables)
    )
    if same:
        return
    if not overwrite:
        raise ValueError(
            f"{out} holds {have_method} codebooks of other settings; EM and E2E results never "
            "overwrite each other: choose another --output_dir or pass --overwrite"
        )
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


def resolve_estep(
    name: str, device: torch.device
) -> tuple[em.EStep, em.CentersEStep, em.Nearest | None]:
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
    from commvq.kernels.encode import encode_triton_with_residuals

    return encode_triton_with_residuals


def update_config(
    out: Path,
    layout: io.CodebookLayout,
    cfg: TrainKeysConfig,
    spec: ModelSpec,
    store: KVStore,
    samples: int,
) -> None:
    """Rebuild config.json from the per-layer metrics files (safe with several processes)."""
    layers = {}
    for f in sorted((out / "metrics").glob("*.json")):
        layers[str(int(f.stem))] = json.loads(f.read_text())
    io.write_config(
        out,
        layout,
        cfg.method,
        spec,
        {
            "model": store.settings.get("model"),
            "key_dir": str(cfg.key_dir),
            "samples": samples,
            "seed": cfg.seed,
            "beam": cfg.encode_beam,
            "tables": cfg.table_kind,
            "train_config": to_dict(cfg),
            "layers": layers,
        },
    )


def pair_weights_for(
    cfg: TrainKeysConfig, spec: ModelSpec, layer: int, heads: list[int], device: torch.device
) -> torch.Tensor | None:
    """Query energy per pair for ``--objective attention`` (needs collected queries)."""
    if cfg.objective != "attention":
        return None
    qdir = store_dirs(cfg.key_dir)["query"]
    if not (qdir / "manifest.json").is_file():
        raise FileNotFoundError(
            f"--objective attention needs queries in {qdir}: collect with --with_queries"
        )
    q = KVStore(qdir).layer(layer).read().to(device)
    return pair_weights(q, spec.num_kv_heads, spec.head_dim)[heads]


def layer_done(out: Path, layer: int, num_heads: int) -> bool:
    """A layer is finished once its metrics are written (after all its head files)."""
    return (out / "metrics" / f"{layer:03d}.json").is_file() and all(
        io.head_file(out, layer, h).is_file() for h in range(num_heads)
    )


def train_layer(
    cfg: TrainKeysConfig,
    spec: ModelSpec,
    layout: io.CodebookLayout,
    out: Path,
    store: KVStore,
    layer: int,
    samples: int,
    device: torch.device,
) -> dict:
    """Train (and save) every KV head of one layer; return its metrics."""
    t0 = time.perf_counter()
    heads = list(range(spec.num_kv_heads))
    rows = split_rows(samples, store.num_tokens, cfg.holdout, cfg.eval_samples)
    keys = store.layer(layer).read(0, samples).float().to(device)
    finite = finite_rows(keys, layer, "training and validation")
    x, s = normalize(keys, spec.num_kv_heads)
    n_train = rows["train"][1]
    if not bool(finite[:n_train].any()) or not bool(finite[n_train:].any()):
        raise ValueError(
            f"{cfg.key_dir}: layer {layer} has no finite key in its training or validation rows; "
            "re-collect the keys (`commvq collect --overwrite`)"
        )
    estep, init_estep, nearest_fn = resolve_estep(cfg.kernels, device)
    encoder = encoder_for(cfg.kernels, device)
    if not bool(finite.all()):  # (a copy only when rows are dropped)
        x, s, n_train = x[:, finite], s[finite], int(finite[:n_train].sum())
    job = key_methods.LayerJob(
        layer=layer,
        heads=heads,
        x=x[:, :n_train],
        s=s[:n_train],
        val_x=x[:, n_train:],
        val_s=s[n_train:],
        layout=layout,
        out=out,
        with_centers=cfg.with_centers,
        seed=cfg.seed * 1000 + layer,
        estep=estep,
        init_estep=init_estep,
        nearest=nearest_fn,
        pair_weights=pair_weights_for(cfg, spec, layer, heads, device),
        encoder=encoder,
        beam=cfg.encode_beam,
    )
    echo = progress.write if cfg.layer_lines else (lambda text: None)
    if cfg.method == "em":
        res = key_methods.run_em(job, cfg.max_iters, cfg.chunk)
    else:
        thetas0 = key_methods.initial_thetas(
            job, cfg.init, cfg.max_iters, cfg.chunk, cfg.init_dir, spec
        )
        if is_untied(thetas0) and cfg.table_kind == "tied":
            raise ValueError(
                f"--init_dir {cfg.init_dir} holds untied tables and this run trains tied ones: "
                "start from tied codebooks (e.g. an EM folder) or pass --tables untied"
            )
        if cfg.solver == "adam":
            settings = e2e.E2ESettings(
                epochs=cfg.adam("epochs"),
                lr=cfg.adam("lr"),
                batch_size=cfg.adam("batch_size"),
                commit_weight=cfg.commit_weight,
                encode_fn=resolve_encoder(cfg.kernels, device),
            )
            res = key_methods.run_e2e_adam(job, settings, thetas0, echo)
        else:
            settings = refine.RefineSettings(
                rounds=cfg.rounds,
                beam=job.beam,
                commit_weight=cfg.commit_weight,
                step=cfg.step,
                encode_fn=encoder,
            )
            weighted = cfg.weights == "prescale"
            if cfg.table_kind == "untied":
                thetas0 = untie(thetas0)
            res = key_methods.run_e2e_lstsq(job, settings, thetas0, echo, weighted)
    seconds = time.perf_counter() - t0
    del keys, x, s, job
    err = heldout_errors(store, layer, rows["eval"], out, layout, spec, cfg.encode_beam, device)
    return {
        "seconds": round(seconds, 3),
        "samples": samples,
        "rows": rows,
        "heads": heads,
        "beam": cfg.encode_beam,
        "dropped_nonfinite": int((~finite).sum()),
        **err,
        "final_error": res.stage_mse[-1].tolist(),
        "stage_mse": res.stage_mse.T.tolist(),
        **res.extra,
    }


def run(cfg: TrainKeysConfig) -> Path:
    store = KVStore(cfg.key_dir)
    if store.kind != "key":
        raise ValueError(
            f"--key_dir {cfg.key_dir} holds {store.kind} vectors, not keys: give the keys folder "
            f"(`commvq collect` writes it beside this one, as {Path(cfg.key_dir).parent / 'key'})"
        )
    if "spec" not in store.settings:
        raise ValueError(
            f"{cfg.key_dir}: the manifest records no model shape; re-collect with this commvq"
        )
    spec = ModelSpec.from_dict(store.settings["spec"])
    layout, out = resolve_layout(cfg, spec)
    if cfg.ignored_flags():
        log.warning(
            "train-keys: %s set the adam solver; this run (--method %s%s) does not use them: pass "
            "--method e2e --solver adam to train by gradient steps",
            ", ".join(cfg.ignored_flags()),
            cfg.method,
            " --solver lstsq" if cfg.method == "e2e" else "",
        )
    rank, world = rank_world()
    prepare_output(
        out,
        layout,
        cfg.method,
        cfg.overwrite,
        empty=rank == 0,
        beam=cfg.encode_beam,
        tables=cfg.table_kind,
    )
    (out / "metrics").mkdir(exist_ok=True)
    # no process writes codebooks before every one has checked (and rank 0 emptied) the folder
    barrier()
    layers = parse_layers(cfg.layers, spec.num_layers)
    device = device_for_rank(cfg.device)
    samples = min(cfg.num_samples, store.num_tokens)
    mine = [
        layer
        for layer in layers[rank::world]
        if cfg.overwrite or not layer_done(out, layer, spec.num_kv_heads)
    ]
    log.info(
        "train-keys: %s, %s -> %s (%d layers to train on rank %d/%d, %d vectors each, %s)",
        cfg.method,
        layout.dir_name,
        out,
        len(mine),
        rank,
        world,
        samples,
        device,
    )
    for layer in progress.bar(mine, desc="train-keys", unit="layer", disable=len(mine) < 2):
        metrics = train_layer(cfg, spec, layout, out, store, layer, samples, device)
        write_json(out / "metrics" / f"{layer:03d}.json", metrics)
        update_config(out, layout, cfg, spec, store, samples)
        log.log(
            logging.INFO if cfg.layer_lines else logging.DEBUG,
            "layer %d: held-out relative key MSE %.5f (rows %d..%d, beam %d) in %.1f s",
            layer,
            metrics["relative_mse"],
            *metrics["rows"]["eval"],
            metrics["beam"],
            metrics["seconds"],
        )
    barrier()
    if rank == 0:
        update_config(out, layout, cfg, spec, store, samples)
    return out
