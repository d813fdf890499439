#!/usr/bin/env python
"""Keys encoded by their own error or by a query-weighted (logit) error, same codebooks.

Two weightings of the key error ``e`` (pre-RoPE), both from the model's collected queries:
- ``pairs``: ``sum_f w_f |e_f|^2`` with ``w_f = E|q_f|^2`` per KV head and RoPE pair
  (:func:`commvq.evals.keys.pair_weights`): the attention-logit error averaged over the rotation
  of every pair;
- ``metric``: ``e^T M e`` with ``M = E_delta[R_delta^T E[q q^T] R_delta]``: the logit error
  ``(q . R_delta e)^2`` averaged over the queries and over the relative distances ``delta`` of
  ``--deltas`` only (a slowly turning pair is not averaged over its rotation; pairs of near
  frequencies keep their cross terms).
Either is a plain squared error after a linear map of the keys and of the tables' rows (``x @ C``
with ``M = C C^T``; per-pair scales for ``pairs``), so the beam and greedy encoders run unchanged
on the mapped vectors and tables, and the codes decode with the unmapped codebook as before. This
probe encodes each layer's keys each way with one codebook folder and reports the relative key
MSE and logit error on held-out keys (as ``compare-codebooks`` measures them), and with
``--ppl_docs`` > 0 perplexity and KL to the exact model of the cache with these keys (values
exact; ``commvq eval ppl --methods commvq``, the loader patched in this process so that the cache
encodes by the weighted error).

    python benchmarks/weighted_encoding.py --key_dir runs/cpukeys/data/key \\
        --query_dir runs/embedded/data/query --codebooks DIR [--rows 262144:266240] \\
        [--encode_by key,pairs,metric] [--deltas 128:2048] [--ppl_tokens 1024 --ppl_docs 4]

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

from commvq import io, rope
from commvq.codecs.key_codebook import KeyCodebook
from commvq.data.kvstore import KVStore
from commvq.evals.keys import key_errors, pair_weights
from commvq.quant import beam as beam_search
from commvq.quant.commutative import as_float
from commvq.spec import ModelSpec

MODES = ("key", "pairs", "metric")


class _ReweightedCodebook(KeyCodebook):
    """A :class:`KeyCodebook` that encodes by another error, set by one tensor ``weight``, kept
    through :meth:`to` and :meth:`with_beam`."""

    def __init__(self, base: KeyCodebook, weight: torch.Tensor) -> None:
        super().__init__(base.thetas, base.code_bits, base.beam, base.encoder)
        self.weight = weight

    def to(self, device, kernels: str = "auto"):
        return type(self)(super().to(device, kernels), self.weight.to(device))

    def with_beam(self, beam: int):
        return type(self)(super().with_beam(beam), self.weight)


class WeightedCodebook(_ReweightedCodebook):
    """Codes by the error weighted by ``weight [H, P]`` per pair."""

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        scale = (w / w.mean(-1, keepdim=True)).sqrt().to(x.device)  # [H, P]
        thetas = as_float(self.thetas)
        scaled = thetas * scale[:, None, None, :].to(thetas.dtype)
        return self.encoder(x * torch.cat((scale, scale), -1)[:, None, :], scaled, self.beam)


def logit_metric(
    queries: torch.Tensor, num_kv_heads: int, spec: ModelSpec, deltas: torch.Tensor
) -> torch.Tensor:
    """``C [H_kv, D, D]`` with ``C C^T = M = mean_delta R_delta^T E[q q^T] R_delta`` (plus a ridge
    of 1e-6 of its mean diagonal): ``|e @ C|^2`` is the mean squared logit error ``(q . R e)^2``
    of a pre-RoPE key error ``e`` over the queries (of each KV head's group) and ``deltas``."""
    d = spec.head_dim
    q = queries.double().reshape(queries.shape[0], -1, d)  # [N, H_q, D]
    qq = torch.einsum("nhd,nhe->hde", q, q) / q.shape[0]
    qq = qq.reshape(num_kv_heads, -1, d, d).mean(1)  # [H_kv, D, D]
    cos, sin = rope.cos_sin(rope.inv_freq(d, spec.rope_theta).double(), deltas.double())
    eye = torch.eye(d, dtype=torch.float64)
    # R_delta as a matrix acting on column vectors: R e = e * cos + rotate_half(e) * sin
    rot = torch.diag_embed(cos) + sin[:, :, None] * rope.rotate_half(eye).T[None]  # [T, D, D]
    m = torch.einsum("tji,hjk,tkl->hil", rot, qq, rot) / len(deltas)
    ridge = 1e-6 * m.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
    return torch.linalg.cholesky(m + ridge).float()


class MetricCodebook(_ReweightedCodebook):
    """Codes by the error ``|e @ C|^2`` (``weight`` is ``C [H, D, D]``): the beam of
    :mod:`commvq.quant.beam` on ``x @ C`` against the tables' rows mapped by ``C``."""

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        c = self.weight
        stages = [
            _mapped_stage(rows @ c) for _, rows in beam_search.stage_tables(as_float(self.thetas))
        ]
        chunk = beam_search.default_chunk(self.thetas.shape[2] // 2)
        return torch.cat(
            [
                beam_search.encode_chunk_tables(x[:, i : i + chunk] @ c, stages, self.beam)[0]
                for i in range(0, x.shape[1], chunk)
            ],
            1,
        )


def _mapped_stage(rows: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """A stage as :func:`commvq.quant.beam.stage_tables` gives it, for any decode rows
    ``[H, 2E, D]`` (A rows, then B rows): ``(W, n, G)`` with ``|x - a_A - b_B|^2 = |x|^2 -
    2 x.(W[:, A] + W[:, E+B]) + n[A] + n[B] + G[A, B]``, and the rows."""
    e = rows.shape[1] // 2
    n_a, n_b = (rows[:, :e] ** 2).sum(-1), (rows[:, e:] ** 2).sum(-1)
    g = 2 * rows[:, :e] @ rows[:, e:].transpose(-1, -2) + (n_b - n_a)[:, None, :]
    return (rows.transpose(-1, -2), n_a, g), rows


def weigh(cb: KeyCodebook, mode: str, queries: torch.Tensor, spec: ModelSpec, deltas):
    """``cb`` encoding by the error ``mode`` names, from one layer's collected queries."""
    if mode == "pairs":
        return WeightedCodebook(cb, pair_weights(queries, spec.num_kv_heads, spec.head_dim))
    if mode == "metric":
        return MetricCodebook(cb, logit_metric(queries, spec.num_kv_heads, spec, deltas))
    return cb


@contextlib.contextmanager
def weighted_loader(queries: KVStore, mode: str, deltas: torch.Tensor):
    """``io.load_key_codebook`` returns codebooks encoding by the ``mode`` error in this block."""
    plain = io.load_key_codebook

    def load(folder, layer, spec, beam=None):
        cb = plain(folder, layer, spec, beam)
        return weigh(cb, mode, queries.layer(layer).read(), spec, deltas)

    io.load_key_codebook = load
    try:
        yield
    finally:
        io.load_key_codebook = plain


def offline_errors(args, spec: ModelSpec, queries: KVStore, mode: str) -> dict[str, float]:
    """Key MSE and logit error, means over the layers (as compare-codebooks' table)."""
    keys = KVStore(args.key_dir)
    start, stop = (int(v) for v in args.rows.split(":"))
    err = {"relative_mse": 0.0, "relative_logit_error": 0.0}
    for layer in range(spec.num_layers):
        k = keys.layer(layer).read(start, stop).float()
        q = queries.layer(layer).read()
        w = pair_weights(q, spec.num_kv_heads, spec.head_dim)
        cb = io.load_key_codebook(args.codebooks, layer, spec, args.beam or None)
        cb = weigh(cb, mode, q, spec, args.delta_range)
        for name, value in key_errors(k, cb.to(torch.device(args.device)), w).items():
            err[name] += value / spec.num_layers
    return err


def model_errors(args, queries: KVStore, mode: str, out: Path) -> dict:
    from commvq.cli import main as cli

    argv = ["-q", "eval", "ppl", "--methods", "commvq", "--key_dir", str(args.codebooks)]
    argv += ["--ppl_tokens", str(args.ppl_tokens), "--ppl_docs", str(args.ppl_docs)]
    argv += ["--device", args.device, "--output", str(out)]
    with weighted_loader(queries, mode, args.delta_range):
        if cli(argv) != 0:
            raise SystemExit(f"eval ppl failed (--encode_by {mode})")
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
    ap.add_argument("--encode_by", default="key,pairs", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument(
        "--deltas", default="128:2048", help="relative distances the metric averages over, a:b"
    )
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    modes = args.encode_by.split(",")
    if not set(modes) <= set(MODES):
        raise SystemExit(f"--encode_by {args.encode_by}: a comma list of {', '.join(MODES)}")
    lo, hi = (int(v) for v in args.deltas.split(":"))
    args.delta_range = torch.arange(lo, hi)
    spec = ModelSpec.from_dict(KVStore(args.key_dir).settings["spec"])
    queries = KVStore(args.query_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            t0 = time.perf_counter()
            row = {"encode_by": mode}
            row.update(offline_errors(args, spec, queries, mode))
            if args.ppl_docs:
                row.update(model_errors(args, queries, mode, Path(tmp) / mode))
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    print(f"codebooks {args.codebooks}  key rows {args.rows}  deltas {args.deltas}", end="")
    print(f"  commit {commit_id()}")
    print(f"{'encode by':10s} {'key MSE':>9s} {'logit err':>9s} {'ppl':>8s} {'KL':>8s}  KL per doc")
    for r in rows:
        docs = ", ".join(f"{v:.5f}" for v in r.get("kl_docs", []))
        print(
            f"{r['encode_by']:10s} {r['relative_mse']:9.5f} {r['relative_logit_error']:9.5f} "
            f"{r.get('ppl', float('nan')):8.3f} {r.get('kl', float('nan')):8.5f}  {docs}"
        )
    print(
        json.dumps(
            {
                "bench": "weighted_encoding",
                "codebooks": str(args.codebooks),
                "deltas": args.deltas,
                "rows": rows,
                "commit": commit_id(),
            }
        )
    )


if __name__ == "__main__":
    main()
