#!/usr/bin/env python
"""Collection throughput against a bare forward pass over the same tokens.

    python benchmarks/collect_throughput.py [--model embedded] [--seq 1024] [--batch 1] \
        [--tokens 8192]
    python benchmarks/collect_throughput.py --random_shape llama-3.1-8b --seq 8192 \
        --out_dir /dev/shm

(a) bare forward: the base model (no LM head) over the packed batches, no hooks, no storage;
(b) `commvq collect` over the same batches (hooks, device->host copies, shard writes).
Prints a table and, last, one JSON line. Target: ratio (b)/(a) <= 1.2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

from commvq.data.corpus import CorpusSource, batches, iter_documents, pack
from commvq.integrations.hf.loader import load_model
from commvq.pipeline import collect

try:
    from _shapes import SHAPES, random_model
except ImportError:  # run from another folder
    from benchmarks._shapes import SHAPES, random_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(lm, batch_list) -> float:
    base, dev = lm.model.base_model, lm.model.device
    sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batch_list:
            base(input_ids=b.to(dev), use_cache=False)
    sync(dev)
    return time.perf_counter() - t0


def collect_run(lm, args, out: Path, tokens: int) -> float:
    cfg = collect.CollectConfig(
        model=lm.name,
        dataset=args.dataset,
        output_dir=out / "key",
        num_samples=tokens,
        max_seq_length=args.seq,
        batch_size=args.batch,
        device=args.device,
        shard_tokens=args.shard_tokens,
    )
    t0 = time.perf_counter()
    collect.run(cfg, loaded=lm)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per measured run")
    ap.add_argument("--shard_tokens", type=int, default=65536)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--random_shape",
        choices=sorted(SHAPES),
        help="random weights of this shape instead of --model",
    )
    ap.add_argument("--out_dir", default=None, help="where shards go (default: a temporary folder)")
    args = ap.parse_args()

    if args.random_shape:
        lm = random_model(args.random_shape, device="cuda" if torch.cuda.is_available() else "cpu")
    else:
        lm = load_model(args.model, device=args.device)
    tok = lm.tokenizer
    docs = (
        tok(d, add_special_tokens=False)["input_ids"]
        for d in iter_documents(CorpusSource(args.dataset))
    )
    n_seq = args.tokens // args.seq
    batch_list = list(
        batches(itertools.islice(pack(docs, args.seq, tok.eos_token_id), n_seq), args.batch)
    )
    tokens = sum(b.numel() for b in batch_list)

    bare_forward(lm, batch_list[:1])  # warm-up
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        collect_run(lm, args, Path(tmp) / "warm", min(tokens, args.seq * args.batch))
        for r in range(args.repeats):
            t_bare = bare_forward(lm, batch_list)
            t_coll = collect_run(lm, args, Path(tmp) / f"run{r}", tokens)
            rows.append((t_bare, t_coll))
    t_bare = min(r[0] for r in rows)
    t_coll = min(r[1] for r in rows)
    ratio = t_coll / t_bare
    dev = lm.model.device
    if dev.type == "cuda":
        card = torch.cuda.get_device_name(dev)
    else:
        card = f"CPU {platform.machine()} x{torch.get_num_threads()} threads"
    commit = commit_id()
    print(
        f"model {lm.name}  device {card}  seq {args.seq}  batch {args.batch}  tokens {tokens}  "
        f"shards in {args.out_dir or tempfile.gettempdir()}"
    )
    print(f"{'run':<14}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'bare forward':<14}{t_bare:>10.3f}{tokens / t_bare:>12.0f}")
    print(f"{'collect':<14}{t_coll:>10.3f}{tokens / t_coll:>12.0f}")
    print(f"ratio collect/bare: {ratio:.3f} (target <= 1.2)")
    print(
        json.dumps(
            {
                "bench": "collect_throughput",
                "model": lm.name,
                "device": card,
                "seq": args.seq,
                "batch": args.batch,
                "tokens": tokens,
                "bare_s": round(t_bare, 4),
                "collect_s": round(t_coll, 4),
                "ratio": round(ratio, 4),
                "out_dir": args.out_dir,
                "commit": commit,
            }
        )
    )


if __name__ == "__main__":
    main()
