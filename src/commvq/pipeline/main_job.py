"""The main job: every stage on the embedded defaults, in one working folder.

For now: collect -> scale. Re-running resumes and skips finished stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from commvq.config import option
from commvq.integrations.hf.loader import load_model
from commvq.pipeline import collect, scale

log = logging.getLogger("commvq")


@dataclass(frozen=True)
class PipelineConfig:
    workdir: Path = option(Path("runs/embedded"), "working folder for every stage's output")
    model: str = option("embedded", "model (see `commvq collect --help`)")
    dataset: str = option("embedded", "corpus (see `commvq collect --help`)")
    num_samples: int = option(32768, "tokens per layer to collect")
    max_seq_length: int = option(1024, "tokens per packed sequence")
    batch_size: int = option(1, "sequences per forward pass")
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")
    seed: int = option(0, "seed")

    def __post_init__(self) -> None:
        object.__setattr__(self, "workdir", Path(self.workdir))


def run(cfg: PipelineConfig) -> Path:
    data = cfg.workdir / "data"
    loaded = load_model(cfg.model, device=cfg.device)
    key_dir = collect.run(collect.CollectConfig(
        model=cfg.model, dataset=cfg.dataset, output_dir=data / "key", num_samples=cfg.num_samples,
        max_seq_length=cfg.max_seq_length, batch_size=cfg.batch_size, device=cfg.device,
        seed=cfg.seed, with_queries=True, num_queries=min(8192, cfg.num_samples),
    ), loaded=loaded)
    scale_file = scale.run(scale.ScaleConfig(key_dir=key_dir))
    print(f"model      {loaded.name} ({loaded.spec.num_layers} layers, "
          f"{loaded.spec.num_kv_heads} KV heads x {loaded.spec.head_dim})")
    print(f"keys       {key_dir}")
    print(f"values     {collect.store_dirs(key_dir)['value']}")
    print(f"scales     {scale_file}")
    return cfg.workdir
