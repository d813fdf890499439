"""Stage `eval-values`: per-layer value and attention-output MSE of value codecs vs KIVI-style
scalar quantization at the same bits, on held-out text. Writes JSON and a Markdown table."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from commvq.codecs.value_codec import ValueCodec
from commvq.config import option, to_dict
from commvq.data.corpus import CorpusSource, batches, iter_documents, pack, resolve_dataset
from commvq.evals.values import value_errors
from commvq.fsutil import atomic_path, write_json
from commvq.integrations.hf.loader import load_model
from commvq.pipeline.scale import load_scales
from commvq.pipeline.train_values import TrainValuesConfig, start_codec

ROUNDABLE = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def rounded(codec: ValueCodec, dtype: torch.dtype) -> ValueCodec:
    """A copy of ``codec`` whose float weights hold only what ``dtype`` holds (computed in
    float32)."""
    out = copy.deepcopy(codec)
    with torch.no_grad():
        for t in itertools.chain(out.parameters(), out.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return out


@dataclass(frozen=True)
class EvalValuesConfig:
    codec_dirs: list[Path] = option([], "value codec folders", positional=True)
    model: str = option("embedded", "model the codecs were trained for")
    dataset: str = option("embedded", "corpus (the embedded corpus uses its held-out split)")
    max_seq_length: int = option(1024, "tokens per sequence")
    num_sequences: int = option(4, "held-out sequences")
    scale_file: Path | None = option(
        None,
        "also evaluate, with these scales, each codec's training start "
        "(rebuilt from its recorded settings) and a random-rotation codec",
    )
    rounded: str = option(
        "",
        "also each codec with its weights rounded to these dtypes (e.g. bfloat16,float16): "
        "what holding the codec in that dtype would cost",
    )
    output: Path = option(Path("runs/eval_values"), "folder for values.json and values.md")
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec_dirs", [Path(d) for d in self.codec_dirs])
        if not self.codec_dirs:
            raise ValueError("give at least one value codec folder")
        bad = [d for d in _names(self.rounded) if d not in ROUNDABLE]
        if bad:
            raise ValueError(f"--rounded {','.join(bad)}: use {', '.join(ROUNDABLE)}")


def run(cfg: EvalValuesConfig) -> Path:
    loaded = load_model(cfg.model, device=cfg.device)
    spec = loaded.spec
    codecs: dict[str, ValueCodec] = {}
    bits = set()
    for d in cfg.codec_dirs:
        c = ValueCodec.load(d, spec.num_layers, spec.kv_dim).to(loaded.model.device)
        codecs[f"{d.name}"] = c
        for name in _names(cfg.rounded):
            codecs[f"{d.name}@{name}"] = rounded(c, ROUNDABLE[name])
        bits.add(c.quant_bits)
    if cfg.scale_file is not None:
        values = load_scales(cfg.scale_file)["value"]
        for d in cfg.codec_dirs:
            start = _training_start(d, loaded, values)
            if start is not None:
                codecs[f"start_{d.name}"] = start
        for b in sorted(bits):
            torch.manual_seed(0)
            codecs[f"untrained_{b}bit"] = ValueCodec.from_scales(values, b).to(loaded.model.device)
    tok = loaded.tokenizer
    src = CorpusSource(
        resolve_dataset(cfg.dataset), split="heldout" if cfg.dataset == "embedded" else "train"
    )
    docs = (tok(d, add_special_tokens=False)["input_ids"] for d in iter_documents(src))
    seqs = itertools.islice(
        (
            s
            for s in pack(docs, cfg.max_seq_length, tok.eos_token_id or 0)
            if len(s) == cfg.max_seq_length
        ),
        cfg.num_sequences,
    )
    data = [b.to(loaded.model.device) for b in batches(seqs, 1)]
    rows = value_errors(loaded.model, codecs, data, sorted(bits))
    return report(
        cfg, rows, {"model": loaded.name, "tokens": cfg.num_sequences * cfg.max_seq_length}
    )


def _training_start(folder: Path, loaded, values: dict[int, torch.Tensor]) -> ValueCodec | None:
    """The codec that training of ``folder`` started from, rebuilt from its recorded settings when
    it was data-driven (``--init pca``: the same first batches give the same start); else None."""
    config = json.loads((folder / "config.json").read_text())
    recorded = config.get("train_config") or {}
    if recorded.get("init") != "pca":
        return None
    known = {f.name for f in dataclasses.fields(TrainValuesConfig)}
    settings = TrainValuesConfig(**{k: v for k, v in recorded.items() if k in known})
    return start_codec(settings, loaded, values, 0, int(config.get("world", 1))).eval()


def report(cfg: EvalValuesConfig, rows: list[dict], meta: dict) -> Path:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    names = list(rows[0])
    lines = [
        f"Held-out tokens: {meta['tokens']} ({meta['model']}). "
        "Per layer: value MSE / attention-output MSE.",
        "",
        "| layer | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for i, row in enumerate(rows):
        lines.append(
            f"| {i} | "
            + " | ".join(f"{row[n]['value_mse']:.4g} / {row[n]['attn_mse']:.4g}" for n in names)
            + " |"
        )
    means = {
        n: {k: sum(r[n][k] for r in rows) / len(rows) for k in ("value_mse", "attn_mse")}
        for n in names
    }
    lines.append(
        "| mean | "
        + " | ".join(f"**{means[n]['value_mse']:.4g} / {means[n]['attn_mse']:.4g}**" for n in names)
        + " |"
    )
    text = "\n".join(lines)
    print(text)
    with atomic_path(out / "values.md") as tmp:
        tmp.write_text(text + "\n")
    write_json(out / "values.json", {"rows": rows, "means": means, **meta, "config": to_dict(cfg)})
    return out
