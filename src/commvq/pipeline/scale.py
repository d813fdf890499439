"""Stage `scale`: per-channel mean |x| of the collected keys and values.

Writes ``learnable_scale.pt`` = ``{"key": {layer: Tensor[F]}, "value": {layer: Tensor[F]}}``
(float32) and, beside it, ``learnable_scale.json`` with the token counts and skipped shards.
Streams over shards; a shard holding NaN/Inf is skipped with a warning naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from commvq import __version__
from commvq.config import option, to_dict
from commvq.data.kvstore import KVStore, LayerData
from commvq.fsutil import atomic_path, write_json
from commvq.pipeline import progress

log = logging.getLogger("commvq")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ScaleConfig:
    key_dir: Path = option(Path("data/key"), "collected keys")
    value_dir: Path | None = option(None, "collected values (default: sibling 'value' of key_dir)")
    output: Path | None = option(None, "scale file (default: learnable_scale.pt beside key_dir)")
    num_samples: int | None = option(None, "use only the first N tokens per layer (default: all)")
    chunk_tokens: int = option(65536, "rows read at a time")

    def __post_init__(self) -> None:
        key_dir = Path(self.key_dir)
        object.__setattr__(self, "key_dir", key_dir)
        object.__setattr__(self, "value_dir", Path(self.value_dir or key_dir.parent / "value"))
        object.__setattr__(
            self, "output", Path(self.output or key_dir.parent / "learnable_scale.pt")
        )
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"--num_samples {self.num_samples}: must be at least 1")
        if self.chunk_tokens < 1:
            raise ValueError(f"--chunk_tokens {self.chunk_tokens}: must be at least 1")


def mean_abs(
    layer: LayerData, chunk: int, limit: int | None, skipped: list[str]
) -> tuple[torch.Tensor, int]:
    """Per-channel mean |x| over finite shards (float64 sums); appends skipped shard paths."""
    total = torch.zeros(layer.store.width, dtype=torch.float64)
    count = 0
    part, part_n, part_path, bad = torch.zeros_like(total), 0, None, False

    def commit() -> None:
        nonlocal total, count
        if part_path is None:
            return
        if bad:
            skipped.append(str(part_path))
            log.warning("scale: skipping shard %s: it holds NaN or Inf", part_path)
        else:
            total += part
            count += part_n

    for path, x in layer.shard_chunks(chunk, limit):
        if path != part_path:
            commit()
            part, part_n, part_path, bad = torch.zeros_like(total), 0, path, False
        x = x.double()
        if not torch.isfinite(x).all():
            bad = True
            continue
        part += x.abs().sum(0)
        part_n += x.shape[0]
    commit()
    if count == 0:
        raise ValueError(
            f"{layer.store.root}: layer {layer.layer} has no finite values to compute a scale "
            "from; re-run `commvq collect --overwrite`"
        )
    return (total / count).float(), count


def run(cfg: ScaleConfig) -> Path:
    stores = {"key": KVStore(cfg.key_dir), "value": KVStore(cfg.value_dir)}
    if stores["key"].num_layers != stores["value"].num_layers:
        raise ValueError(f"{cfg.key_dir} and {cfg.value_dir} hold different layer counts")
    scales: dict[str, dict[int, torch.Tensor]] = {}
    meta: dict[str, dict] = {}
    skipped: list[str] = []
    total = sum(s.num_layers for s in stores.values())
    with progress.bar(total=total, desc="scale", unit="layer") as bar:
        for kind, store in stores.items():
            scales[kind], meta[kind] = {}, {}
            for layer in range(store.num_layers):
                s, n = mean_abs(store.layer(layer), cfg.chunk_tokens, cfg.num_samples, skipped)
                scales[kind][layer], meta[kind][str(layer)] = s, n
                bar.update(1)
    with atomic_path(cfg.output) as tmp:
        torch.save(scales, tmp)
    write_json(
        cfg.output.with_suffix(".json"),
        {
            "format": "commvq-scale",
            "version": FORMAT_VERSION,
            "commvq": __version__,
            "tokens": meta,
            "skipped_shards": skipped,
            "config": to_dict(cfg),
        },
    )
    log.info("scale: wrote %s", cfg.output)
    return cfg.output


def load_scales(path: str | Path) -> dict[str, dict[int, torch.Tensor]]:
    """Read a scale file safely (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scale file; run `commvq scale` first")
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except (
        Exception
    ) as e:  # a pickle of other objects is refused by weights_only, a torn file fails to read
        raise ValueError(
            f"{path}: not a readable scale file ({type(e).__name__}); run `commvq scale` again"
        ) from None
    if (
        not isinstance(data, dict)
        or set(data) != {"key", "value"}
        or not all(
            isinstance(d, dict)
            and all(torch.is_tensor(t) and bool(torch.isfinite(t).all()) for t in d.values())
            for d in data.values()
        )
    ):
        raise ValueError(
            f"{path}: not a scale file (per kind, a layer -> finite tensor mapping); run "
            "`commvq scale` again"
        )
    return data
