"""The main job: the whole pipeline on the embedded defaults, in one working folder.

collect -> scale -> key codebooks (EM and E2E, 2 and 1 bit) -> value codecs (2 and 1 bit) ->
held-out key errors (EM vs E2E) -> evaluation of every cache method side by side.
The defaults (8-bit codes, 4096 key vectors per layer, 3 EM iterations, E2E by 2 least-squares
rounds from the EM codebooks, both value codecs trained together for 45 steps, retrieval at 512 and
768 tokens) are sized to end within 15 minutes on 2 CPU cores (docs/benchmarks.md); the paper's
settings are one flag away (``--code_bits 12 --key_samples 1100000 --em_iters 100``). Re-running
resumes: finished stages and layers are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from commvq import io
from commvq.config import option
from commvq.integrations.hf.loader import load_model
from commvq.pipeline import (
    collect,
    compare,
    evaluate,
    methods,
    progress,
    scale,
    train_keys,
    train_values,
)
from commvq.quant.residual import residuals_for_bits

log = logging.getLogger("commvq")


@dataclass(frozen=True)
class PipelineConfig:
    workdir: Path = option(Path("runs/embedded"), "working folder for every stage's output")
    model: str = option("embedded", "model (see `commvq collect --help`)")
    dataset: str = option("embedded", "corpus (see `commvq collect --help`)")
    num_samples: int = option(16384, "tokens per layer to collect")
    max_seq_length: int = option(1024, "tokens per packed sequence")
    code_bits: int = option(8, "bits per key code and stage (the paper: 12)")
    key_samples: int = option(4096, "key vectors per layer for key training")
    em_iters: int = option(3, "EM iterations per stage")
    e2e_rounds: int = option(
        2,
        "E2E least-squares rounds, from the EM codebooks (2 keeps the 2-bit error of 4 at 4,096 "
        "keys per layer; 1-bit E2E/EM 0.819 vs 0.805, docs/benchmarks.md)",
    )
    beam: int = option(train_keys.DEFAULT_BEAM, "beam width of the E2E codebooks' key encoder")
    value_steps: int = option(45, "value codec training steps")
    value_seq_length: int = option(512, "tokens per sequence for value training")
    bits: str = option("2,1", "bit widths to build (comma list of 1 and 2)")
    eval_methods: str = option(methods.ALL, "methods to compare")
    ppl_tokens: int = option(768, "tokens per held-out document for perplexity")
    lengths: str = option("512,768", "passkey / needle context lengths")
    depths: str = option(
        "0,0.25,0.5",
        "passkey / needle depths (fractions of the context before the probe; at these lengths "
        "all lie before the exact window, where compression can lose them)",
    )
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")
    seed: int = option(0, "seed")

    def __post_init__(self) -> None:
        object.__setattr__(self, "workdir", Path(self.workdir))
        if any(b.strip() not in ("1", "2") for b in self.bits.split(",")):
            raise ValueError(f"--bits {self.bits!r}: a comma list of 1 and 2")


COMPARE_SAMPLES = 2048  # held-out key rows per layer for key errors (training's and compare's)

# Each stage's share of the main job's time with the defaults on 2 CPU cores; the estimate scales
# these by the time the stages that ran took.
STAGE_SHARE = {  # measured: commit 233e1b8, 2 quiet cores, 15:00 in all (docs/benchmarks.md)
    "collect": 0.035,
    "scale": 0.001,
    "keys em": 0.031,
    "keys e2e": 0.107,
    "values": 0.113,  # per width (they train together)
    "compare keys": 0.036,
    "evaluate": 0.41,
}


def stage_weights(bits: list[int]) -> dict[str, float]:
    """The main job's stages in order, each with its expected share of the time."""
    out = {"collect": STAGE_SHARE["collect"], "scale": STAGE_SHARE["scale"]}
    for b in bits:
        for part in ("keys em", "keys e2e"):
            out[f"{part} {b}-bit"] = STAGE_SHARE[part]
    out["values"] = STAGE_SHARE["values"] * len(bits)  # the widths train together
    out["compare keys"] = STAGE_SHARE["compare keys"]
    out["evaluate"] = STAGE_SHARE["evaluate"]
    return out


def run(cfg: PipelineConfig) -> Path:
    w = cfg.workdir
    data = w / "data"
    bits = [int(b) for b in cfg.bits.split(",")]
    clock = progress.StageClock(stage_weights(bits))
    loaded = load_model(cfg.model, device=cfg.device)
    spec = loaded.spec
    with clock.stage("collect"):
        key_dir = _collect(cfg, loaded, data)
    with clock.stage("scale"):
        scale_file = scale.run(scale.ScaleConfig(key_dir=key_dir))
    key_dirs = []
    for b in bits:
        r = residuals_for_bits(b, spec.head_dim, cfg.code_bits)
        em_dir = None
        for method in ("em", "e2e"):  # E2E refines the EM codebooks just trained
            with clock.stage(f"keys {method} {b}-bit"):
                key_dirs.append(_train_keys(cfg, spec, key_dir, method, r, em_dir))
            em_dir = key_dirs[-1]
    with clock.stage("values"):  # every width on the same batches: one forward pass each step
        train_values.run_together([_values_config(cfg, scale_file, b) for b in bits], loaded)
    with clock.stage("compare keys"):
        compare.run(
            compare.CompareConfig(
                dirs=key_dirs,
                key_dir=key_dir,
                eval_samples=COMPARE_SAMPLES,
                output=w / "compare_keys",
                device=cfg.device,
            )
        )
    wanted = [
        m for m in cfg.eval_methods.split(",") if not m.startswith("commvq-") or int(m[-1]) in bits
    ]
    with clock.stage("evaluate"):
        evaluate.run(
            evaluate.EvalConfig(
                suite="compare",
                methods=",".join(wanted),
                workdir=w,
                model=cfg.model,
                ppl_tokens=cfg.ppl_tokens,
                ppl_docs=1,
                lengths=cfg.lengths,
                depths=cfg.depths,
                samples=1,
                device=cfg.device,
                seed=cfg.seed,
            )
        )
    layers = f"{spec.num_layers} layers, {spec.num_kv_heads} KV heads x {spec.head_dim}"
    print(f"\nmodel      {loaded.name} ({layers})")
    print(f"data       {data}  (keys, values, queries, learnable_scale.pt)")
    print(f"keys       {', '.join(str(d) for d in key_dirs)}")
    print(f"values     {', '.join(str(w / f'value_codec_{b}bit') for b in bits)}")
    print(f"results    {w / 'compare_keys'}/compare.md, {w / 'eval'}/compare.md (+ .json, .png)")
    return w


def _collect(cfg: PipelineConfig, loaded, data: Path) -> Path:
    return collect.run(
        collect.CollectConfig(
            model=cfg.model,
            dataset=cfg.dataset,
            output_dir=data / "key",
            num_samples=cfg.num_samples,
            max_seq_length=cfg.max_seq_length,
            device=cfg.device,
            seed=cfg.seed,
            with_queries=True,
            num_queries=min(8192, cfg.num_samples),
        ),
        loaded=loaded,
    )


def _train_keys(cfg: PipelineConfig, spec, key_dir: Path, method: str, r: int, em_dir) -> Path:
    out = (
        cfg.workdir
        / io.CodebookLayout(cfg.code_bits, spec.head_dim, r, e2e=method == "e2e").dir_name
    )
    return train_keys.run(
        train_keys.TrainKeysConfig(
            key_dir=key_dir,
            output_dir=out,
            method=method,
            code_bits=cfg.code_bits,
            residuals=r,
            num_samples=cfg.key_samples,
            max_iters=cfg.em_iters,
            rounds=cfg.e2e_rounds,
            init_dir=em_dir,
            beam=cfg.beam if method == "e2e" else None,
            layer_lines=False,  # the job's log: a line per stage and per 30 s, not per layer
            eval_samples=COMPARE_SAMPLES,
            device=cfg.device,
            seed=cfg.seed,
        )
    )


def _values_config(cfg: PipelineConfig, scale_file: Path, b: int) -> train_values.TrainValuesConfig:
    return train_values.TrainValuesConfig(
        model=cfg.model,
        dataset=cfg.dataset,
        scale_file=scale_file,
        output_dir=cfg.workdir / f"value_codec_{b}bit",
        init_values=scale_file.parent / "value",  # the collected values: no forward passes
        quant_bits=b,
        max_seq_length=cfg.value_seq_length,
        steps=cfg.value_steps,
        warmup_steps=max(1, cfg.value_steps // 10),
        save_every=cfg.value_steps,
        resume=True,
        device=cfg.device,
        seed=cfg.seed,
    )
