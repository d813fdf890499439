"""Stage `collect`: run a model over a corpus and store pre-RoPE keys and values per layer.

Keys go to ``output_dir`` (default ``data/key``), values to its sibling ``value`` and, with
``with_queries``, a strided subsample of queries (with their positions) to ``query``.
``num_samples`` counts vectors (tokens) per layer. The run resumes: shards listed in the
manifests are kept and the token stream continues right after the last stored token.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from commvq.config import option, to_dict
from commvq.data import kvstore
from commvq.data.corpus import SPLITS, CorpusSource, batches, iter_documents, pack, resolve_dataset
from commvq.distributed import barrier, rank_world
from commvq.fsutil import exclusive_lock, write_json
from commvq.integrations.hf.capture import capture_projections
from commvq.integrations.hf.loader import MODEL_DTYPES, LoadedModel, load_model
from commvq.pipeline import progress

log = logging.getLogger("commvq")
GiB = 1024**3


@dataclass(frozen=True)
class CollectConfig:
    model: str = option(
        "embedded",
        "model: HF hub id, local folder, .gguf file, 'embedded' "
        "(SmolLM2-135M-Instruct) or 'auto' (Llama-3.1-8B-Instruct where the hub is reachable, "
        "else embedded)",
        aliases=("--model_path",),
    )
    dataset: str = option(
        "auto",
        "corpus: HF dataset name, local .txt/.jsonl/.parquet file or "
        "folder, 'embedded' (State of the Union speeches) or 'auto' "
        "(HuggingFaceFW/fineweb-edu where the hub is reachable, else embedded)",
    )
    dataset_config: str | None = option(None, "HF dataset configuration name")
    text_field: str = option("text", "text field of .jsonl/.parquet/HF rows")
    split: str = option(
        "train", "corpus split: train, or heldout (1 document in 10, fixed)", choices=SPLITS
    )
    output_dir: Path = option(
        Path("data/key"), "where keys go; values go to its sibling 'value', queries to 'query'"
    )
    num_samples: int = option(1_000_000, "key/value vectors (tokens) to collect per layer")
    max_seq_length: int = option(8192, "tokens per packed sequence")
    batch_size: int = option(1, "sequences per forward pass")
    quant_bits: int = option(2, "target bits per channel (recorded as a label only)")
    with_queries: bool = option(False, "also store a strided subsample of q_proj outputs")
    num_queries: int = option(65536, "query vectors to keep per layer with --with_queries")
    dtype: str = option("bfloat16", "storage dtype of the vectors", choices=tuple(kvstore.DTYPES))
    model_dtype: str = option(
        "auto", "compute dtype (auto: bfloat16 on GPU, float32 on CPU)", choices=MODEL_DTYPES
    )
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")
    shard_tokens: int = option(65536, "tokens per shard file")
    seed: int = option(0, "seed of the document order")
    overwrite: bool = option(False, "delete data already in the output folders first")

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        for name in (
            "num_samples",
            "max_seq_length",
            "batch_size",
            "num_queries",
            "shard_tokens",
            "quant_bits",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.split not in SPLITS:
            raise ValueError(f"--split {self.split!r}: use one of {SPLITS}")
        if self.dtype not in kvstore.DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {tuple(kvstore.DTYPES)}")


LOCK_NAME = ".collect.lock"  # in the data folder: key, value and query stores are written together


def store_dirs(output_dir: Path) -> dict[str, Path]:
    """Where each kind of vector goes, given the key folder."""
    parent = Path(output_dir).parent
    return {"key": Path(output_dir), "value": parent / "value", "query": parent / "query"}


def query_stride(num_samples: int, num_queries: int) -> int:
    """Keep every ``stride``-th token's query so that about ``num_queries`` are kept."""
    return max(1, math.ceil(num_samples / num_queries))


def align_queries(root: Path, cfg: CollectConfig, key_tokens: int) -> int:
    """The query stride of the store at ``root`` from now on, made what a fresh collection with
    ``cfg`` keeps when this run extends the store: an existing store whose stride divides the new
    one is thinned to it (the same rows as a fresh run), any other stride is refused."""
    kvstore.recover(root)
    man = kvstore.read_manifest(root)
    stride = query_stride(cfg.num_samples, cfg.num_queries)
    if man is None or not man["shards"]:
        return stride
    have = man.get("settings", {}).get("query_stride")
    if have is None:  # written before the stride was recorded: the run that wrote it tells
        old = man.get("config") or {}
        if "num_samples" in old and "num_queries" in old:
            have = query_stride(old["num_samples"], old["num_queries"])
        if have is None or sum(s["tokens"] for s in man["shards"]) != math.ceil(key_tokens / have):
            raise ValueError(
                f"{root}: queries collected by an older version with an unknown stride; "
                "collect them again (--overwrite, or another --output_dir)"
            )
    if key_tokens >= cfg.num_samples or have == stride:
        stride = have  # nothing to collect, or nothing to change
    elif stride % have:
        raise ValueError(
            f"{root} keeps the query of one token in {have}; --num_samples {cfg.num_samples} "
            f"--num_queries {cfg.num_queries} keep one in {stride}, which is not a subsample of "
            f"it: pass --num_queries {math.ceil(cfg.num_samples / have)} (one in {have}), or "
            "collect into another --output_dir"
        )
    else:
        log.info(
            "collect: %s kept the query of one token in %d; thinning it to one in %d, as a fresh "
            "run with --num_samples %d keeps",
            root,
            have,
            stride,
            cfg.num_samples,
        )
        kvstore.thin(root, stride // have, {"query_stride": stride})
        return stride
    if man.get("settings", {}).get("query_stride") != stride:  # record it
        write_json(
            root / kvstore.MANIFEST,
            {**man, "settings": {**man.get("settings", {}), "query_stride": stride}},
        )
    return stride


def bytes_needed(cfg: CollectConfig, loaded: LoadedModel, tokens: int) -> int:
    spec = loaded.spec
    per_tok = 2 * kvstore.bytes_per_token(spec.num_layers, spec.kv_dim, kvstore.DTYPES[cfg.dtype])
    need = tokens * per_tok
    if cfg.with_queries:
        q_tok = kvstore.bytes_per_token(spec.num_layers, spec.q_dim, kvstore.DTYPES[cfg.dtype])
        need += math.ceil(tokens / query_stride(cfg.num_samples, cfg.num_queries)) * q_tok
    return need


def check_disk(folder: Path, need: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    log.info(
        "collect: will write %.2f GiB under %s (%.1f GiB free)", need / GiB, folder, free / GiB
    )
    if need > free:
        raise OSError(
            f"collecting needs {need / GiB:.2f} GiB in {folder} but only {free / GiB:.2f} GiB is "
            "free: lower --num_samples or choose another --output_dir"
        )


def check_limits(cfg: CollectConfig, loaded: LoadedModel) -> None:
    limit = loaded.spec.max_position
    if limit and cfg.max_seq_length > limit:
        raise ValueError(
            f"--max_seq_length {cfg.max_seq_length} exceeds the model's limit of {limit} tokens; "
            f"use --max_seq_length {limit} or less"
        )


def _to_host(tensors: dict[tuple[str, int], torch.Tensor]) -> tuple[dict, torch.cuda.Event | None]:
    """Start device-to-host copies into pinned memory on a side stream; the event marks their end.

    (Measured on an H100 at Llama-3.1-8B shapes: twice the collection throughput of plain
    synchronous ``.cpu()`` copies; docs/benchmarks.md.)
    """
    first = next(iter(tensors.values()))
    if first.device.type != "cuda":
        return tensors, None
    stream = torch.cuda.Stream(device=first.device)
    stream.wait_stream(torch.cuda.current_stream(first.device))
    out = {}
    with torch.cuda.stream(stream):
        for key, t in tensors.items():
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            t.record_stream(stream)
            out[key] = host
        event = torch.cuda.Event()
        event.record(stream)
    return out, event


class _Shard:
    """Rows gathered for the next shard, per kind and layer (host copies, maybe in flight)."""

    def __init__(self) -> None:
        self.parts: list[dict[tuple[str, int], torch.Tensor]] = []
        self.events: list[torch.cuda.Event] = []
        self.tokens = 0

    def add(self, rows: dict[tuple[str, int], torch.Tensor], tokens: int) -> None:
        host, event = _to_host(rows)
        self.parts.append(host)
        if event is not None:
            self.events.append(event)
        self.tokens += tokens

    def assemble(self, kind: str, num_layers: int) -> list[dict[str, torch.Tensor]]:
        for event in self.events:
            event.synchronize()
        out = []
        for layer in range(num_layers):
            d = {"x": torch.cat([p[(kind, layer)] for p in self.parts])}
            if (kind, -1) in self.parts[0]:
                d["pos"] = torch.cat([p[(kind, -1)] for p in self.parts])
            out.append(d)
        return out


def _batch_rows(
    captured: dict,
    start: int,
    n_tok: int,
    t_len: int,
    first_token: int,
    stride: int,
    dtype: torch.dtype,
) -> dict[tuple[str, int], torch.Tensor]:
    """Flatten captured ``[B, T, F]`` outputs to rows ``[start, start + n_tok)``, subsample queries.

    ``first_token`` is the stream index of row ``start``: queries at multiples of ``stride`` are
    kept.
    """
    rows = {}
    keep = None
    for (kind, layer), out in captured.items():
        flat = out.reshape(-1, out.shape[-1])[start : start + n_tok].to(dtype)
        if kind == "query":
            if keep is None:
                g = torch.arange(first_token, first_token + n_tok, device=flat.device)
                keep = torch.nonzero(g % stride == 0).squeeze(1)
                rows[("query", -1)] = ((keep + start) % t_len).to(torch.int32)
            flat = flat.index_select(0, keep)
        rows[(kind, layer)] = flat
    return rows


def batches_per_shard(cfg: CollectConfig) -> int:
    """Shards hold whole batches: ``ceil(shard_tokens / (batch_size * max_seq_length))`` of them."""
    return max(1, math.ceil(cfg.shard_tokens / (cfg.batch_size * cfg.max_seq_length)))


def _open_writers(
    cfg: CollectConfig, loaded: LoadedModel, kinds: tuple[str, ...], settings: dict
) -> dict[str, kvstore.KVStoreWriter]:
    """Writers for every kind, realigned on the shards all of them hold in full."""
    dirs = store_dirs(cfg.output_dir)
    if cfg.overwrite and rank_world()[0] == 0:
        for d in dirs.values():
            kvstore.remove_store(d)
    barrier()
    spec = loaded.spec
    width = {"key": spec.kv_dim, "value": spec.kv_dim, "query": spec.q_dim}
    dtype = kvstore.DTYPES[cfg.dtype]
    per_kind = {k: settings for k in kinds}
    if "query" in kinds:
        key_man = kvstore.read_manifest(dirs["key"])
        key_tokens = key_man["num_tokens"] if key_man else 0
        stride = align_queries(dirs["query"], cfg, key_tokens) if rank_world()[0] == 0 else None
        barrier()
        if (
            stride is None
        ):  # the other ranks: what the first recorded (a fresh store: the new stride)
            q_man = kvstore.read_manifest(dirs["query"]) or {}
            stride = q_man.get("settings", {}).get(
                "query_stride", query_stride(cfg.num_samples, cfg.num_queries)
            )
        per_kind["query"] = {**settings, "query_stride": stride}
    writers = {
        k: kvstore.KVStoreWriter(
            dirs[k], k, spec.num_layers, width[k], dtype, per_kind[k], to_dict(cfg)
        )
        for k in kinds
    }
    barrier()  # nobody writes before every process has opened (and cleaned) the stores
    key_w = writers["key"]
    readable = min(
        w.readable_shards() for w in writers.values()
    )  # a damaged shard is redone, and all after it
    damaged = readable < max(len(w.shards) for w in writers.values())
    if damaged:
        log.warning(
            "collect: shard %d of the stores in %s is missing or damaged; collecting again from "
            "there",
            readable,
            cfg.output_dir.parent,
        )
    if not damaged and (key_w.num_tokens >= cfg.num_samples or key_w.exhausted):
        return writers
    full = batches_per_shard(cfg) * cfg.batch_size * cfg.max_seq_length
    done = 0  # shards every store holds in full (a trailing partial shard is redone)
    while (
        done < min(readable, *(len(w.shards) for w in writers.values()))
        and key_w.shards[done].tokens == full
    ):
        done += 1
    if rank_world()[0] == 0:
        for w in writers.values():
            w.truncate(done)
    else:
        for w in writers.values():
            w.shards = w.shards[:done]
    return writers


def _sequences(
    cfg: CollectConfig, loaded: LoadedModel, dataset: str, skip: int
) -> Iterator[list[int]]:
    tok = loaded.tokenizer
    sep = tok.eos_token_id if tok.eos_token_id is not None else 0
    src = CorpusSource(
        dataset=dataset,
        split=cfg.split,
        text_field=cfg.text_field,
        dataset_config=cfg.dataset_config,
        seed=cfg.seed,
    )
    docs = (tok(d, add_special_tokens=False)["input_ids"] for d in iter_documents(src))
    return itertools.islice(pack(docs, cfg.max_seq_length, sep), skip, None)


def run(cfg: CollectConfig, loaded: LoadedModel | None = None) -> Path:
    """Collect; return the key folder. ``loaded`` reuses a model already in memory. One run at a
    time writes a data folder: the first process of a run holds its lock (the others of a torchrun
    run share it), and a second run fails at once, naming the holder."""
    lock = Path(cfg.output_dir).parent / LOCK_NAME
    held = (
        exclusive_lock(lock, f"{Path(cfg.output_dir).parent}")
        if rank_world()[0] == 0
        else nullcontext()
    )
    with held:
        return _run(cfg, loaded)


def _run(cfg: CollectConfig, loaded: LoadedModel | None) -> Path:
    loaded = loaded or load_model(cfg.model, cfg.model_dtype, cfg.device)
    check_limits(cfg, loaded)
    dataset = resolve_dataset(cfg.dataset)
    settings = {
        "model": loaded.name,
        "dataset": dataset,
        "dataset_config": cfg.dataset_config,
        "split": cfg.split,
        "max_seq_length": cfg.max_seq_length,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "shard_tokens": cfg.shard_tokens,
        "spec": loaded.spec.to_dict(),
    }
    kinds = ("key", "value") + (("query",) if cfg.with_queries else ())
    writers = _open_writers(cfg, loaded, kinds, settings)
    key_w = writers["key"]
    if key_w.num_tokens >= cfg.num_samples or key_w.exhausted:
        log.info(
            "collect: %s already holds %d tokens per layer; nothing to do",
            cfg.output_dir,
            key_w.num_tokens,
        )
        return cfg.output_dir
    check_disk(cfg.output_dir, bytes_needed(cfg, loaded, cfg.num_samples - key_w.num_tokens))
    log.info("collect: model %s, dataset %s -> %s", loaded.name, dataset, cfg.output_dir)
    exhausted = _collect_loop(cfg, loaded, dataset, writers, kinds)
    if key_w.num_tokens == 0:
        if rank_world()[0] == 0:
            for w in writers.values():
                kvstore.remove_store(w.root)
        raise ValueError(
            f"--dataset {cfg.dataset}: the corpus has no text; give a corpus with documents"
        )
    if rank_world()[0] == 0:
        for w in writers.values():
            w.finish(exhausted)
    barrier()
    if exhausted:
        log.warning(
            "collect: the corpus ran out after %d tokens per layer (asked for %d)",
            key_w.num_tokens,
            cfg.num_samples,
        )
    return cfg.output_dir


def _collect_loop(
    cfg: CollectConfig,
    loaded: LoadedModel,
    dataset: str,
    writers: dict[str, kvstore.KVStoreWriter],
    kinds: tuple[str, ...],
) -> bool:
    """The forward passes; returns True when the corpus ran out first.

    Shard ``j`` holds batches ``[jK, (j+1)K)`` and is computed by rank ``j % world``: every rank
    walks the same batch stream, so several processes write the same files as one.
    """
    rank, world = rank_world()
    k = batches_per_shard(cfg)
    store_dtype = kvstore.DTYPES[cfg.dtype]
    stride = writers["query"].settings["query_stride"] if "query" in writers else 1
    first = len(writers["key"].shards)
    g, tok = first * k, writers["key"].num_tokens
    captured: dict[tuple[str, int], torch.Tensor] = {}
    shard, pending, written = _Shard(), None, {}
    base = loaded.model.base_model  # no LM head: logits are not needed
    exhausted = True

    def sink(kind: str, layer: int, out: torch.Tensor) -> None:
        captured[(kind, layer)] = out.detach()

    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        capture_projections(base, sink, kinds),
        torch.inference_mode(),
        progress.bar(
            total=cfg.num_samples,
            initial=tok,
            unit="tok",
            desc=f"collect[{rank}]" if world > 1 else "collect",
        ) as bar,
    ):
        for batch in batches(_sequences(cfg, loaded, dataset, g * cfg.batch_size), cfg.batch_size):
            j = g // k
            n_tok = min(batch.numel(), cfg.num_samples - tok)
            if j % world == rank:
                captured.clear()
                base(input_ids=batch.to(loaded.model.device), use_cache=False)
                shard.add(
                    _batch_rows(captured, 0, n_tok, batch.shape[1], tok, stride, store_dtype), n_tok
                )
            tok, g = tok + n_tok, g + 1
            bar.update(n_tok)
            last = tok >= cfg.num_samples
            if shard.tokens and (g % k == 0 or last):
                pending = _flush(pool, pending, writers, shard, j, written)
                shard = _Shard()
            if last:
                exhausted = False
                break
        if shard.tokens:
            pending = _flush(pool, pending, writers, shard, (g - 1) // k, written)
        if pending is not None:
            pending.result()
    if world > 1:
        _merge_ranks(writers, first, written)
    return exhausted


def _write_shard(
    writers: dict[str, kvstore.KVStoreWriter], shard: _Shard, index: int, written: dict
) -> None:
    """Write shard ``index`` of every kind; one process lists it at once, several record it."""
    single = rank_world()[1] == 1
    for kind, w in writers.items():
        per_layer = shard.assemble(kind, w.num_layers)
        if single:
            w.write_shard(per_layer)
        else:
            written.setdefault(kind, {})[index] = w.write_files(index, per_layer)


def _merge_ranks(writers: dict[str, kvstore.KVStoreWriter], first: int, written: dict) -> None:
    """After every rank is done, rank 0 lists the contiguous shards in the manifests."""
    rank, world = rank_world()
    progress = writers["key"].root / f".progress.rank{rank}.json"
    write_json(progress, {kind: {str(i): n for i, n in d.items()} for kind, d in written.items()})
    barrier()
    if rank == 0:
        merged: dict[str, dict[int, int]] = {}
        for r in range(world):
            path = writers["key"].root / f".progress.rank{r}.json"
            for kind, d in json.loads(path.read_text()).items():
                merged.setdefault(kind, {}).update({int(i): n for i, n in d.items()})
        for kind, w in writers.items():
            got = merged.get(kind, {})
            tokens = []
            while first + len(tokens) in got:
                tokens.append(got[first + len(tokens)])
            w.list_shards(tokens)
        for r in range(world):
            (writers["key"].root / f".progress.rank{r}.json").unlink(missing_ok=True)
    barrier()
    for w in writers.values():  # every rank reads the merged manifests back
        w.shards = [kvstore.ShardInfo(**sh) for sh in kvstore.read_manifest(w.root)["shards"]]


def _flush(
    pool: ThreadPoolExecutor,
    pending: Future | None,
    writers,
    shard: _Shard,
    index: int,
    written: dict,
) -> Future:
    """Wait for the previous shard's write, then write this one in the background."""
    if pending is not None:
        pending.result()
    return pool.submit(_write_shard, writers, shard, index, written)
