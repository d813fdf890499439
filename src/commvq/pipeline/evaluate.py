"""Stage `eval SUITE`: perplexity + KL (``ppl``), ``passkey``, ``needle``, or all of them
(``compare``) for several cache methods in one run. Writes ``<suite>.json``, ``<suite>.md`` and,
for needles, a heat-map PNG into ``--output``."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from commvq.config import option, to_dict
from commvq.data.corpus import CorpusSource, iter_documents
from commvq.evals import synthetic
from commvq.evals.ppl import ppl_kl
from commvq.fsutil import atomic_path, write_json
from commvq.integrations.hf.attention import use_commvq
from commvq.integrations.hf.loader import MODEL_DTYPES, load_model
from commvq.pipeline import eval_cache, progress
from commvq.pipeline import methods as meth

log = logging.getLogger("commvq")
SUITES = ("ppl", "passkey", "needle", "compare")


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


@dataclass(frozen=True)
class EvalConfig:
    suite: str = option("compare", "ppl, passkey, needle or compare (all three)", positional=True)
    methods: str = option(
        meth.ALL,
        "comma list: fp16, kivi2, kivi1, commvq-{em,e2e}{2,1} (from --workdir), commvq, "
        "hf-quanto2, hf-quanto4 (transformers' QuantizedCache; needs optimum-quanto); "
        "a CommVQ method + @B encodes keys with a beam of width B (commvq-em2@8); + '+coarse' "
        "decodes it coarse to fine (commvq-e2e2+coarse, with the --coarse_* settings; its KL to "
        "the same method decoded exactly is reported)",
    )
    workdir: Path = option(Path("runs/embedded"), "folder holding codebook_*/ and value_codec_*/")
    key_dir: Path | None = option(None, "codebooks for method 'commvq'")
    value_dir: Path | None = option(None, "value codec for method 'commvq'")
    model: str = option("embedded", "model (see `commvq collect --help`)")
    model_dtype: str = option(
        "auto", "compute dtype (auto: bfloat16 on GPU, float32 on CPU)", choices=MODEL_DTYPES
    )
    window: int = option(128, "full-precision window (tokens)")
    sink: int = option(0, "first tokens kept exact by the CommVQ and KIVI caches (attention sink)")
    ppl_tokens: int = option(2048, "tokens per held-out document for perplexity")
    ppl_docs: int = option(2, "held-out documents for perplexity")
    ppl_chunk: int = option(64, "tokens fed per step (each attends to the compressed past)")
    ppl_prefill: int = option(
        0,
        "feed each document's first N tokens as one prompt and score only the tokens after it "
        "(a long context in one step; 0: score from the first window on)",
    )
    lengths: str = option("512,1024,2048", "context lengths for passkey and needle (comma list)")
    depths: str = option("0,0.5,1", "needle / pass key depths (comma list of fractions)")
    samples: int = option(
        2, "pass keys and needles per (length, depth); each needle reads other haystack text"
    )
    coarse_stages: int = option(2, "+coarse methods: residual stages of the coarse pass")
    coarse_keep: float = option(1 / 8, "+coarse methods: share of tokens rescored exactly")
    coarse_min_tokens: int = option(256, "+coarse methods: rescore at least this many tokens")
    coarse_margin: float = option(
        math.inf,
        "+coarse methods: also drop tokens the bound puts this far (logits) below the best",
    )
    coarse_exact_layers: str = option("0", "+coarse methods: layers decoded exactly (comma list)")
    coarse_pairs: float = option(
        1.0, "+coarse methods: share of RoPE pairs the coarse pass sums (1, 0.5, 0.25, ...)"
    )
    coarse_fill: str = option(
        "none",
        "+coarse methods: what the dropped tokens get: none, or coarse (their share of the "
        "softmax from their coarse scores; a values pass over every token)",
    )
    coarse_rerank: float = option(
        0.0,
        "+coarse methods with --coarse_pairs below 1: rank the best N x budget tokens again "
        "over every pair and pick the budget from them (0: one pass)",
    )
    coarse_select: str = option(
        "radix",
        "+coarse methods: how the budget is picked, radix (a GPU kernel; top-k where "
        "the kernels do not serve) or topk",
    )
    output: Path | None = option(None, "results folder (default: <workdir>/eval)")
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")
    seed: int = option(0, "seed of the pass keys and of the needles' haystack offsets")

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"eval {self.suite!r}: use one of {SUITES}")
        object.__setattr__(self, "workdir", Path(self.workdir))
        object.__setattr__(self, "output", Path(self.output or Path(self.workdir) / "eval"))
        for name in ("window", "ppl_tokens", "ppl_docs", "ppl_chunk", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.sink < 0:
            raise ValueError(f"--sink {self.sink}: must be 0 or more")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"--model_dtype {self.model_dtype}: use one of {MODEL_DTYPES}")
        if not 0 <= self.ppl_prefill < self.ppl_tokens - 1:
            raise ValueError(
                f"--ppl_prefill {self.ppl_prefill}: from 0 to --ppl_tokens - 2 "
                f"({self.ppl_tokens - 2}), so that some tokens are scored"
            )
        if self.suite in ("ppl", "compare") and self.window >= self.ppl_tokens - 1:
            # tokens inside the first window are exact for every method: none would be scored
            raise ValueError(
                f"--ppl_tokens {self.ppl_tokens}: scoring starts after the first --window "
                f"({self.window}) tokens; give --ppl_tokens above {self.window + 1}"
            )
        bad = [d for d in _floats(self.depths) if not 0 <= d <= 1]
        if bad or not _floats(self.depths):
            raise ValueError(
                f"--depths {self.depths}: "
                "give fractions of the context between 0 and 1 (e.g. 0,0.5,1)"
            )
        self.coarse_settings()  # a bad --coarse_* value fails here, before any work
        if not _ints(self.lengths) or min(_ints(self.lengths)) < 1:
            raise ValueError(
                f"--lengths {self.lengths}: give positive token counts (e.g. 512,1024)"
            )

    def coarse_settings(self):
        from commvq.quant.coarse import CoarseSettings

        return CoarseSettings(
            self.coarse_stages,
            self.coarse_keep,
            self.coarse_min_tokens,
            self.coarse_margin,
            tuple(_ints(self.coarse_exact_layers)),
            self.coarse_pairs,
            self.coarse_fill,
            select=self.coarse_select,
            rerank=self.coarse_rerank,
        )


def heldout_docs(tokenizer: Any, n: int, tokens: int) -> list[list[int]]:
    """The first ``n`` held-out speeches with at least ``tokens`` tokens, cut to that length."""
    out = []
    for doc in iter_documents(CorpusSource("embedded", split="heldout")):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no held-out speech has {tokens} tokens; lower --ppl_tokens")
    return out


def run_ppl(cfg: EvalConfig, lm, methods: list[meth.Method]) -> dict[str, dict]:
    import torch

    docs = heldout_docs(lm.tokenizer, cfg.ppl_docs, cfg.ppl_tokens)
    per_doc: dict[str, list[dict]] = {}
    for ids in progress.bar(docs, desc="ppl", unit="doc"):
        t = torch.tensor([ids], device=lm.model.device)
        makers = {
            m.name: (lambda m=m: m.make_cache(lm.model, cfg.window, cfg.sink)) for m in methods
        }
        pairs = {m.name: m.exact_mode for m in methods if m.exact_mode}
        for m in methods:  # the exact mode a coarse method is compared with, if not run itself
            if m.exact_mode and m.exact_mode not in makers:
                ref = replace(m, name=m.exact_mode, coarse=None, loaded={})
                makers[ref.name] = lambda ref=ref: ref.make_cache(lm.model, cfg.window, cfg.sink)
        stats = ppl_kl(
            lm.model, t, makers, cfg.ppl_chunk, cfg.window, pairs=pairs, prefill=cfg.ppl_prefill
        )
        for m in methods:
            per_doc.setdefault(m.name, []).append(stats[m.name])
    return {name: pooled(stats) for name, stats in per_doc.items()}


def pooled(per_doc: list[dict]) -> dict:
    """Perplexity and KL over every scored token of the documents, and each document's KL
    (``kl_docs``: the spread a comparison between methods must beat)."""
    tokens = sum(s["tokens"] for s in per_doc)
    out = {
        "ppl": math.exp(sum(s["nll"] for s in per_doc) / tokens),
        "kl": sum(s["kl"] for s in per_doc) / tokens,
        "tokens": tokens,
        "kl_docs": [s["kl"] / s["tokens"] for s in per_doc],
    }
    if all("kl_pair" in s for s in per_doc):  # a coarse method against its exact mode
        out["kl_exact_mode"] = sum(s["kl_pair"] for s in per_doc) / tokens
        out["kl_exact_mode_docs"] = [s["kl_pair"] / s["tokens"] for s in per_doc]
    return out


def run_retrieval(cfg: EvalConfig, lm, methods: list[meth.Method], kind: str) -> tuple[dict, dict]:
    encode = lambda text: lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    lengths, depths = _ints(cfg.lengths), _floats(cfg.depths)
    limit = lm.spec.max_position or max(lengths)
    lengths = [x for x in lengths if x <= limit]
    if kind == "passkey":
        probes = synthetic.passkey_probes(encode, lengths, depths, cfg.samples, cfg.seed)
    else:
        hay = " ".join(
            itertools.islice(iter_documents(CorpusSource("embedded", split="heldout")), 6)
        )
        probes = synthetic.needle_probes(encode, hay, lengths, depths, cfg.samples, cfg.seed)
    grid: dict[str, dict[tuple[int, float], list[bool]]] = {m.name: {} for m in methods}
    for probe in progress.bar(probes, desc=kind, unit="probe"):
        pre = synthetic.exact_prefill(lm.model, probe)  # one prompt pass serves every method
        for m in methods:
            cache = m.make_cache(lm.model, cfg.window, cfg.sink)
            shared = pre if synthetic.takes_prefill(cache) else None
            ok, _ = synthetic.answer(lm.model, lm.tokenizer, probe, cache, prefill=shared)
            grid[m.name].setdefault((probe.length, probe.depth), []).append(ok)
    acc = {name: {key: sum(v) / len(v) for key, v in cells.items()} for name, cells in grid.items()}
    summary = {name: sum(a.values()) / len(a) for name, a in acc.items()}
    return summary, acc


def bytes_per_token(lm, method: meth.Method, window: int, sink: int = 0) -> dict[str, float]:
    """Bytes per token per layer a cache holds for compressed tokens, measured on a real cache."""
    import torch

    cache = method.make_cache(lm.model, window, sink)
    n = window + 65  # compresses 65 tokens: enough to count the bytes of one
    ids = torch.randint(1, min(1000, lm.model.config.vocab_size), (1, n), device=lm.model.device)
    from commvq.integrations.hf.attention import cache_kwargs

    with torch.no_grad():
        lm.model(ids, use_cache=True, **cache_kwargs(lm.model, cache))
    kv_dim = lm.spec.kv_dim
    if method.name in meth.HF_QUANTIZED:
        from commvq.integrations.hf.quantized import quantized_part

        kbytes, vbytes, tokens = quantized_part(cache.layers[0])
    else:
        # every stored byte of a compressed token counts: codes and bits, and the per-token scalars
        # (key prescale and position, value factor), as KIVI's bits count its scales
        layer = cache.layers[0]
        kbytes, vbytes = (
            sum(t.numel() * t.element_size() for t in layer.store[part].values()) for part in "kv"
        )
        tokens = max(1, layer.num_compressed)
    return {
        "bytes_per_token_layer": (kbytes + vbytes) / tokens,
        "key_bits": 8 * kbytes / (tokens * kv_dim),
        "value_bits": 8 * vbytes / (tokens * kv_dim),
        "fp16_bytes_per_token_layer": 4.0 * kv_dim,
        "dtype": str(lm.model.dtype).removeprefix("torch."),  # what the uncompressed rows hold
    }


def run(cfg: EvalConfig) -> Path:
    """Every method's results, each part (bytes, perplexity, each retrieval suite) taken from the
    results folder's cache where nothing that decides it changed (:mod:`eval_cache`); the model is
    loaded only when something is left to compute."""
    methods = meth.resolve(
        [m.strip() for m in cfg.methods.split(",") if m.strip()],
        cfg.workdir,
        cfg.key_dir,
        cfg.value_dir,
        cfg.coarse_settings(),
    )
    suites = ("ppl", "passkey", "needle") if cfg.suite == "compare" else (cfg.suite,)
    settings = to_dict(cfg)
    kept = {m.name: eval_cache.load(cfg.output, m.name) for m in methods}
    common = {
        m.name: eval_cache.common_key(
            m, cfg.model, cfg.device, cfg.window, cfg.sink, cfg.model_dtype
        )
        for m in methods
    }
    fps = {
        (m.name, part): eval_cache.fingerprint(common[m.name], part, settings)
        for m in methods
        for part in ("bytes", *suites)
    }
    todo = {
        part: [m for m in methods if eval_cache.hit(kept[m.name], part, fps[m.name, part]) is None]
        for part in ("bytes", *suites)
    }
    lm = None
    if any(todo.values()):
        lm = load_model(cfg.model, cfg.model_dtype, cfg.device)
        use_commvq(lm.model)

    def keep(m: meth.Method, part: str, result: dict, grid: dict | None = None) -> None:
        payload = {"model": lm.name, "result": result}
        if grid is not None:
            payload["grid"] = _serial(grid)
        eval_cache.store(cfg.output, m.name, kept[m.name], part, fps[m.name, part], payload)

    for m in todo["bytes"]:
        keep(m, "bytes", bytes_per_token(lm, m, cfg.window, cfg.sink))
    for suite in suites:
        if not todo[suite]:
            continue
        if suite == "ppl":
            out = run_ppl(cfg, lm, todo[suite])
            for m in todo[suite]:
                keep(m, suite, out[m.name])
        else:
            summary, acc = run_retrieval(cfg, lm, todo[suite], suite)
            for m in todo[suite]:
                keep(m, suite, {suite: summary[m.name]}, acc[m.name])
    results = {
        m.name: {
            k: v for part in ("bytes", *suites) for k, v in kept[m.name][part]["result"].items()
        }
        for m in methods
    }
    grids = {
        s: {m.name: {_cell_key(k): v for k, v in kept[m.name][s]["grid"].items()} for m in methods}
        for s in suites
        if s != "ppl"
    }
    model_name = lm.name if lm is not None else kept[methods[0].name]["bytes"]["model"]
    return report(cfg, model_name, results, grids)


def _serial(grid: dict[tuple[int, float], float]) -> dict[str, float]:
    """A retrieval grid with JSON keys ``"length@depth"``; :func:`_cell_key` reads one back."""
    return {f"{length}@{depth}": v for (length, depth), v in grid.items()}


def _cell_key(text: str) -> tuple[int, float]:
    length, depth = text.split("@")
    return int(length), float(depth)


def cell(fmt: str, value: float) -> str:
    """``value`` in ``fmt``, with float noise below the last digit shown as 0 (no ``-0.0000``)."""
    text = fmt.format(value)
    return fmt.format(0.0) if text.startswith("-") and float(text.rstrip("%")) == 0 else text


def method_label(name: str, result: dict) -> str:
    """The table's name of a method: the uncompressed "fp16" row says the dtype that ran when it
    is not float16 (float32 on a CPU, bfloat16 on a GPU)."""
    dtype = result.get("dtype")
    return f"{name} (ran in {dtype})" if name == "fp16" and dtype not in (None, "float16") else name


def bytes_cell(result: dict) -> str:
    """Bytes per token and layer; where they differ from FP16's (a row that ran in another
    dtype), FP16's beside them."""
    got, fp16 = result["bytes_per_token_layer"], result.get("fp16_bytes_per_token_layer")
    text = f"{got:.1f}"
    if result.get("dtype") not in (None, "float16") and fp16 is not None and got > fp16:
        text += f" (FP16: {fp16:.1f})"
    return text


def hits_cell(rate: float, grid: dict | None, per_cell: int) -> str:
    """A retrieval rate with its count of probes: ``67% (4/6)``."""
    if not grid:
        return f"{rate:.0%}"
    total = len(grid) * per_cell
    return f"{rate:.0%} ({round(rate * total)}/{total})"


def report(cfg: EvalConfig, model_name: str, results: dict[str, dict], grids: dict) -> Path:
    out = cfg.output
    out.mkdir(parents=True, exist_ok=True)
    cols = [
        ("key bits", "key_bits", "{:.2f}"),
        ("value bits", "value_bits", "{:.2f}"),
        ("bytes/token/layer", "bytes_per_token_layer", "{:.1f}"),
        ("perplexity", "ppl", "{:.3f}"),
        ("KL vs exact", "kl", "{:.4f}"),
        ("KL vs exact mode", "kl_exact_mode", "{:.5f}"),
        ("passkey", "passkey", "{:.0%}"),
        ("needle", "needle", "{:.0%}"),
    ]
    cols = [c for c in cols if any(c[1] in r for r in results.values())]
    sink = f"; sink {cfg.sink} (CommVQ and KIVI caches)" if cfg.sink else ""
    fed = (
        f"the first {cfg.ppl_prefill} as a prompt, then {cfg.ppl_chunk} at a time (tokens after "
        "the prompt)"
        if cfg.ppl_prefill
        else f"{cfg.ppl_chunk} at a time (tokens after the first window)"
    )
    lines = [
        f"Model {model_name}; window {cfg.window}{sink}; "
        f"perplexity over {cfg.ppl_docs} held-out speeches x "
        f"{cfg.ppl_tokens} tokens fed {fed}; "
        f"retrieval at lengths {cfg.lengths}, depths {cfg.depths}.",
        "",
        "| method | " + " | ".join(c[0] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]

    def text(name: str, r: dict, key: str, fmt: str) -> str:
        if key not in r:
            return "-"
        if key == "bytes_per_token_layer":
            return bytes_cell(r)
        if key in grids:
            return hits_cell(r[key], grids[key].get(name), cfg.samples)
        return cell(fmt, r[key])

    for name, r in results.items():
        lines.append(
            f"| {method_label(name, r)} | "
            + " | ".join(text(name, r, key, fmt) for _, key, fmt in cols)
            + " |"
        )
    text = "\n".join(lines)
    print(text)
    name = cfg.suite
    with atomic_path(out / f"{name}.md") as tmp:
        tmp.write_text(text + "\n")
    serial_grids = {s: {m: _serial(g) for m, g in gm.items()} for s, gm in grids.items()}
    write_json(
        out / f"{name}.json",
        {"model": model_name, "results": results, "grids": serial_grids, "config": to_dict(cfg)},
    )
    for suite, grid in grids.items():
        synthetic.heatmap(
            out / f"{suite}.png",
            grid,
            [x for x in _ints(cfg.lengths)],
            _floats(cfg.depths),
            f"{'pass key' if suite == 'passkey' else 'needle'} accuracy ({model_name})",
            count=cfg.samples,
            what="pass key" if suite == "passkey" else "needle",
        )
    return out
