#!/usr/bin/env python
"""Where a CommVQ decode step spends its time, per layer, at Llama-3.1-8B shapes: the key-scores
kernel in each style and launch configuration, the values kernel in each configuration, and the
softmax between them; FP16 SDPA on the same card as the yardstick. Used to pick the defaults of
:mod:`commvq.kernels.decode`.

    python benchmarks/decode_breakdown.py [--contexts 32768,131072] [--batch 1]

Prints a table and a last JSON line (``--small``: tiny shapes, a smoke test for the interpreter).
"""

from __future__ import annotations

import itertools
import json

import torch

try:
    from _meta import commit_id
except ImportError:
    from benchmarks._meta import commit_id
import torch.nn.functional as F
from decode_attention import make_state, parse_args, timed

from commvq import rope
from commvq.kernels import decode


def measure(batch, n, bits, hq, hkv, d, freqs, device, gen, score_cfgs, value_cfgs) -> list[dict]:
    """Rows for one (bits, context): FP16 SDPA, every scores configuration, softmax, values."""
    r = round(bits * d / 12)
    st = make_state(batch, n, hkv, d, r, bits, device, gen)
    q = torch.randn(batch, hq, d, generator=gen).to(device)
    k16 = torch.randn(batch, hkv, n, d, generator=gen).to(device, torch.bfloat16)
    v16 = torch.randn_like(k16)
    base = {"bits": bits, "context": n, "batch": batch}
    rows = [
        {
            **base,
            "part": "fp16_sdpa",
            "cfg": "",
            "ms": timed(
                lambda: F.scaled_dot_product_attention(
                    q[:, :, None].to(k16.dtype), k16, v16, enable_gqa=True
                ),
                device,
            ),
        }
    ]
    s = None
    for style, bn, warps in score_cfgs:
        tables = decode.prepare_tables(st["thetas"], style)

        def run(style=style, bn=bn, warps=warps, tables=tables):
            return decode.commvq_scores_triton(
                q,
                st["kcodes"],
                st["prescale"],
                st["pos"],
                st["thetas"],
                freqs,
                12,
                0.1,
                block=bn,
                style=style,
                tables=tables,
                num_warps=warps,
            )

        try:
            ms = timed(run, device)
            s = run()
        except Exception as exc:  # a configuration the card cannot run (out of resources)
            ms = float("nan")
            print(f"scores {style} {bn} {warps}: {type(exc).__name__}: {str(exc)[:200]}")
        rows.append({**base, "part": "scores", "cfg": f"{style} BN{bn} w{warps}", "ms": ms})
    p = torch.softmax(s, -1)
    rows.append(
        {**base, "part": "softmax", "cfg": "", "ms": timed(lambda: torch.softmax(s, -1), device)}
    )
    for tpp, bf, bk, warps in value_cfgs:

        def run_v(tpp=tpp, bf=bf, bk=bk, warps=warps):
            return decode.commvq_values_triton(
                p,
                st["vcodes"],
                st["factor"],
                st["codebook"],
                st["scale"],
                hkv,
                tokens_per_prog=tpp,
                block_bits=bf,
                block_tokens=bk,
                num_warps=warps,
            )

        try:
            ms = timed(run_v, device)
        except Exception as exc:
            ms = float("nan")
            print(f"values {tpp} {bf} {bk}: {type(exc).__name__}: {str(exc)[:200]}")
        rows.append(
            {**base, "part": "values", "cfg": f"T{tpp or 'auto'} BF{bf} BK{bk} w{warps}", "ms": ms}
        )
    return rows


def main() -> None:
    args, device = parse_args(__doc__, "32768,131072")
    if not args.batch.isdigit():
        raise SystemExit(
            f"--batch {args.batch}: give a number of sequences (max is decode_attention's)"
        )
    hq, hkv, d = (32, 8, 128) if not args.small else (4, 2, 16)
    contexts = [int(c) for c in args.contexts.split(",")] if not args.small else [100]
    freqs = rope.inv_freq(d, 5e5).to(device)
    gen = torch.Generator().manual_seed(0)
    score_cfgs = [("trick", 32, 4), ("regdecode", 32, 4), ("regdecode", 64, 4)]
    score_cfgs += [("regdecode16", bn, w) for bn, w in itertools.product((16, 32, 64), (2, 4, 8))]
    value_cfgs = [
        (None, 256, 64, 4),
        (None, 256, 64, 8),
        (None, 128, 64, 4),
        (512, 256, 64, 4),
        (2048, 256, 64, 4),
        (2048, 256, 32, 4),
    ]
    if args.small:
        score_cfgs, value_cfgs = score_cfgs[:3], value_cfgs[:1]
    rows = []
    for bits, n in itertools.product((2, 1), contexts):
        rows += measure(
            int(args.batch), n, bits, hq, hkv, d, freqs, device, gen, score_cfgs, value_cfgs
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    commit = commit_id()
    print(
        f"card {card}; commit {commit}; per layer per decode step; Hq {hq}, Hkv {hkv}, head_dim {d}"
    )
    print(f"{'bits':>4} {'context':>8} {'part':>10} {'config':>26} {'ms':>9}")
    for r_ in rows:
        print(
            f"{r_['bits']:>4} {r_['context']:>8} {r_['part']:>10} {r_['cfg']:>26} {r_['ms']:>9.3f}"
        )
    print(json.dumps({"bench": "decode_breakdown", "card": card, "commit": commit, "rows": rows}))


if __name__ == "__main__":
    main()
