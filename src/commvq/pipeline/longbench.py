"""Stages `longbench-pred` and `longbench-eval` (the guide's evaluation/longbench/pred.py, eval.py).

The guide's swap flow works: key codebooks copied into
``<model dir>/<name>-CommVQ-<b>bit-codebook/`` (and a value codec in
``<model dir>/<name>-CommVQ-<b>bit-values/``) are found from ``--model`` alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from commvq.config import option, to_dict
from commvq.evals import longbench as lb
from commvq.fsutil import atomic_path, complete_lines, write_json
from commvq.integrations.hf.attention import use_commvq
from commvq.integrations.hf.loader import load_model
from commvq.pipeline import progress
from commvq.pipeline.methods import BASELINES, Method

log = logging.getLogger("commvq")
METHODS = ("auto", *BASELINES, "commvq")


@dataclass(frozen=True)
class PredConfig:
    model: str = option("embedded", "model folder, hub id, .gguf or 'embedded'")
    codebook_dir: Path | None = option(
        None, "key codebooks (default: <model>/*-CommVQ-*bit-codebook if present)"
    )
    value_dir: Path | None = option(
        None, "value codec (default: <model>/*-CommVQ-*bit-values if present)"
    )
    method: str = option(
        "auto",
        "auto (commvq when codebooks are found, else fp16), fp16, kivi2, kivi1, commvq",
        choices=METHODS,
    )
    data_dir: Path = option(Path("data"), "folder of LongBench-format <task>.jsonl files")
    tasks: str = option("all", f"comma list of {', '.join(lb.TASKS)} or all")
    max_length: int = option(7500, "prompt tokens kept (middle truncation)")
    limit: int | None = option(None, "samples per task (default: all)")
    window: int = option(128, "full-precision window of the compressed cache")
    out_dir: Path = option(
        Path("pred"), "predictions go to <out_dir>/<model>-<method>/<task>.jsonl"
    )
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")

    def __post_init__(self) -> None:
        bad = [t for t in self.task_list if t not in lb.TASKS]
        if bad:
            raise ValueError(f"--tasks: unknown {bad}; use {', '.join(lb.TASKS)} or all")
        if self.max_length < 16:
            raise ValueError(f"--max_length {self.max_length}: too short")

    @property
    def task_list(self) -> list[str]:
        return (
            list(lb.TASKS)
            if self.tasks == "all"
            else [t.strip() for t in self.tasks.split(",") if t.strip()]
        )


def _found(model: str, suffix: str) -> Path | None:
    folder = Path(model)
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.glob(f"*-CommVQ-*bit-{suffix}") if p.is_dir())
    return hits[0] if hits else None


def resolve_method(cfg: PredConfig) -> Method:
    keys = cfg.codebook_dir or _found(cfg.model, "codebook")
    values = cfg.value_dir or _found(cfg.model, "values")
    method = cfg.method
    if method == "auto":
        method = "commvq" if keys or values else "fp16"
    if method == "commvq" and not (keys or values):
        raise FileNotFoundError(
            f"--method commvq: no codebooks given and none in {cfg.model}/*-CommVQ-*bit-codebook"
        )
    return Method(
        method, keys if method == "commvq" else None, values if method == "commvq" else None
    )


def run_pred(cfg: PredConfig) -> Path:
    lm = load_model(cfg.model, device=cfg.device)
    use_commvq(lm.model)
    method = resolve_method(cfg)
    name = f"{Path(lm.name).name}-{method.name}"
    out = Path(cfg.out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    log.info(
        "longbench: %s with %s (keys %s, values %s) -> %s",
        lm.name,
        method.name,
        method.key_dir,
        method.value_dir,
        out,
    )
    for task in cfg.task_list:
        rows = lb.load_task(cfg.data_dir, task, cfg.limit)
        path = out / f"{task}.jsonl"
        done = complete_lines(
            path
        )  # a torn last line (an interrupted write) is dropped, then redone
        with path.open("a", encoding="utf-8") as fh:
            for sample in progress.bar(rows[done:], desc=task, unit="sample"):
                pred = lb.predict(
                    lm.model,
                    lm.tokenizer,
                    task,
                    sample,
                    cfg.max_length,
                    lambda: method.make_cache(lm.model, cfg.window),
                )
                fh.write(
                    json.dumps(
                        {
                            "pred": pred,
                            "answers": sample["answers"],
                            "all_classes": sample.get("all_classes"),
                            "length": sample.get("length"),
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                fh.flush()
    write_json(
        out / "pred_config.json",
        {
            **to_dict(cfg),
            "method": method.name,
            "key_dir": str(method.key_dir),
            "value_dir": str(method.value_dir),
        },
    )
    return out


@dataclass(frozen=True)
class EvalConfig:
    pred_dir: Path = option(Path("pred"), "folder of <model>-<method>/ prediction folders")
    model: str | None = option(None, "score only this prediction folder name (default: all)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "pred_dir", Path(self.pred_dir))


def run_eval(cfg: EvalConfig) -> Path:
    if not cfg.pred_dir.is_dir():
        raise FileNotFoundError(f"--pred_dir {cfg.pred_dir}: no predictions; run pred.py first")
    folders = sorted(
        p
        for p in cfg.pred_dir.iterdir()
        if p.is_dir() and (cfg.model is None or p.name == cfg.model)
    )
    if not folders:
        raise FileNotFoundError(
            f"{cfg.pred_dir}: no prediction folders{f' named {cfg.model}' if cfg.model else ''}"
        )
    table = {}
    for folder in folders:
        scores = {}
        for task in lb.TASKS:
            path = folder / f"{task}.jsonl"
            if path.is_file():
                rows = [
                    json.loads(line)
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()
                ]
                scores[task] = round(lb.task_score(task, rows), 2)
        if scores:
            scores["average"] = round(sum(scores.values()) / len(scores), 2)
        write_json(folder / "result.json", scores)
        table[folder.name] = scores
    tasks = [t for t in lb.TASKS if any(t in s for s in table.values())] + ["average"]
    lines = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, scores in table.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{scores[t]:.2f}" if t in scores else "-" for t in tasks)
            + " |"
        )
    text = "\n".join(lines)
    print(text)
    with atomic_path(cfg.pred_dir / "results.md") as tmp:
        tmp.write_text(text + "\n")
    write_json(cfg.pred_dir / "results.json", table)
    return cfg.pred_dir
