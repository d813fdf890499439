#!/usr/bin/env python
"""Keys encoded by their own error or by the query-weighted (logit) error, same codebooks.

The query-weighted error ``sum_f w_f |e_f|^2`` (``w_f = E|q_f|^2`` per KV head and RoPE pair,
:func:`commvq.evals.keys.pair_weights`) is the attention-logit error averaged over the rotation of
every pair. Encoding by it needs no new kernel: scaling each pair of the keys and of the
codebook's tables by ``sqrt(w_f)`` turns it into the plain squared error, and the codes decode
with the unscaled codebook as before. This probe encodes each layer's keys both ways with one
codebook folder and reports, for each: the relative key MSE and logit error on held-out keys
(as ``compare-codebooks`` measures them), and with ``--ppl_docs`` > 0 perplexity and KL to the
exact model of the cache with these keys (values exact; ``commvq eval ppl --methods commvq``,
the loader patched in this process so that the cache encodes by the weighted error).

    python benchmarks/weighted_encoding.py --key_dir runs/cpukeys/data/key \\
        --query_dir runs/embedded/data/query --codebooks DIR [--rows 262144:266240] \\
        [--ppl_tokens 1024 --ppl_docs 4] [--device cpu]

A table and a last JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id

from commvq import io
from commvq.codecs.key_codebook import KeyCodebook
from commvq.data.kvstore import KVStore
from commvq.evals.keys import key_errors, pair_weights
from commvq.quant.commutative import as_float
from commvq.spec import ModelSpec


class WeightedCodebook(KeyCodebook):
    """A :class:`KeyCodebook` that picks codes by the error weighted by ``w [H, P]`` per pair."""

    def __init__(self, base: KeyCodebook, w: torch.Tensor) -> None:
        super().__init__(base.thetas, base.code_bits, base.beam, base.encoder)
        self.w = w

    def to(self, device, kernels: str = "auto") -> WeightedCodebook:
        return WeightedCodebook(super().to(device, kernels), self.w.to(device))

    def with_beam(self, beam: int) -> WeightedCodebook:
        return WeightedCodebook(super().with_beam(beam), self.w)

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.w / self.w.mean(-1, keepdim=True)).sqrt().to(x.device)  # [H, P]
        thetas = as_float(self.thetas)
        scaled = thetas * scale[:, None, None, :].to(thetas.dtype)
        return self.encoder(x * torch.cat((scale, scale), -1)[:, None, :], scaled, self.beam)


@contextlib.contextmanager
def weighted_loader(queries: KVStore):
    """``io.load_key_codebook`` returns :class:`WeightedCodebook` while in this block."""
    plain = io.load_key_codebook

    def load(folder, layer, spec, beam=None):
        w = pair_weights(queries.layer(layer).read(), spec.num_kv_heads, spec.head_dim)
        return WeightedCodebook(plain(folder, layer, spec, beam), w)

    io.load_key_codebook = load
    try:
        yield
    finally:
        io.load_key_codebook = plain


def offline_errors(args, spec: ModelSpec, queries: KVStore, weighted: bool) -> dict[str, float]:
    """Key MSE and logit error over every layer (sums of errors over sums of energies)."""
    keys = KVStore(args.key_dir)
    start, stop = (int(v) for v in args.rows.split(":"))
    err = {"relative_mse": 0.0, "relative_logit_error": 0.0}
    for layer in range(spec.num_layers):
        k = keys.layer(layer).read(start, stop).float()
        w = pair_weights(queries.layer(layer).read(), spec.num_kv_heads, spec.head_dim)
        cb = io.load_key_codebook(args.codebooks, layer, spec, args.beam or None)
        cb = WeightedCodebook(cb, w) if weighted else cb
        for name, value in key_errors(k, cb.to(torch.device(args.device)), w).items():
            err[name] += value / spec.num_layers  # the mean over layers, as compare's table
    return err


def model_errors(args, queries: KVStore, weighted: bool, out: Path) -> dict:
    from commvq.cli import main as cli

    argv = ["-q", "eval", "ppl", "--methods", "commvq", "--key_dir", str(args.codebooks)]
    argv += ["--ppl_tokens", str(args.ppl_tokens), "--ppl_docs", str(args.ppl_docs)]
    argv += ["--device", args.device, "--output", str(out)]
    with weighted_loader(queries) if weighted else contextlib.nullcontext():
        if cli(argv) != 0:
            raise SystemExit(f"eval ppl failed (weighted={weighted})")
    result = json.loads((out / "ppl.json").read_text())["results"]["commvq"]
    return {k: result[k] for k in ("ppl", "kl", "kl_docs")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--key_dir", required=True, help="a collected key store (held-out rows)")
    ap.add_argument("--query_dir", required=True, help="a collected query store of the model")
    ap.add_argument("--codebooks", required=True)
    ap.add_argument("--rows", default="262144:266240", help="key rows for the offline errors")
    ap.add_argument("--beam", type=int, default=0, help="0: the width config.json records")
    ap.add_argument("--ppl_tokens", type=int, default=1024)
    ap.add_argument("--ppl_docs", type=int, default=4, help="0: no model run")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    spec = ModelSpec.from_dict(KVStore(args.key_dir).settings["spec"])
    queries = KVStore(args.query_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for weighted in (False, True):
            t0 = time.perf_counter()
            row = {"encode_by": "query-weighted error" if weighted else "key error"}
            row.update(offline_errors(args, spec, queries, weighted))
            if args.ppl_docs:
                row.update(model_errors(args, queries, weighted, Path(tmp) / str(weighted)))
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    print(f"codebooks {args.codebooks}  key rows {args.rows}  commit {commit_id()}")
    print(f"{'encode by':22s} {'key MSE':>9s} {'logit err':>9s} {'ppl':>8s} {'KL':>8s}  KL per doc")
    for r in rows:
        docs = ", ".join(f"{v:.5f}" for v in r.get("kl_docs", []))
        print(
            f"{r['encode_by']:22s} {r['relative_mse']:9.5f} {r['relative_logit_error']:9.5f} "
            f"{r.get('ppl', float('nan')):8.3f} {r.get('kl', float('nan')):8.5f}  {docs}"
        )
    print(
        json.dumps(
            {
                "bench": "weighted_encoding",
                "codebooks": str(args.codebooks),
                "rows": rows,
                "commit": commit_id(),
            }
        )
    )


if __name__ == "__main__":
    main()
