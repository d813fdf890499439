#!/usr/bin/env python
"""Memory a CommVQ cache needs at Llama-3.1-8B shapes, every part counted, and the tokens
(batch x context) that fit beside the model's bf16 weights on a card, against FP16.

    python benchmarks/cache_memory.py [--total_bytes N]   (default: this GPU's memory)

Per token and layer: the compressed state's bytes (codes, prescale, position, value bits and
factor; from a real state, as the decode benchmark builds it). Fixed: the value codec's weights
(held in float16, the cache's default, or float32 as trained: docs/benchmarks.md says what each
costs in quality), the values kernel's float32 table (the value codebook with its scale folded in),
the key codebooks (float32) and the decode kernel's float16 tables, for all 32 layers. A table and
a last JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

try:
    from _meta import commit_id
    from decode_attention import LAYERS, WEIGHTS, bytes_per_token
except ImportError:
    from benchmarks._meta import commit_id
    from benchmarks.decode_attention import LAYERS, WEIGHTS, bytes_per_token

from commvq.codecs.value_codec import ValueCodec

HKV, D = 8, 128


def fixed_bytes(bits: int, codec_bytes_per_weight: int) -> dict[str, int]:
    """The parts every token shares, all layers: value codec and its kernel table, key codebooks,
    decode tables."""
    codec = ValueCodec(LAYERS, HKV * D, bits)
    weights = sum(t.numel() for t in codec.parameters()) + sum(t.numel() for t in codec.buffers())
    value_table = codec.layers[0].codebook.numel()  # [Hkv, F*q, D] float32, per layer
    stages = round(bits * D / 12)
    theta = HKV * stages * 128 * (D // 2)  # [Hkv, R, 2E, P] of 12-bit codes, per layer
    return {
        "value_codec": weights * codec_bytes_per_weight,
        "value_tables": LAYERS * value_table * 4,
        "key_codebooks": LAYERS * theta * 4,
        "decode_tables": LAYERS * theta * 2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total_bytes", type=int, default=0, help="card memory (default: this GPU's)")
    args = ap.parse_args()
    total = args.total_bytes or (
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    )
    if not total:
        raise SystemExit("no GPU here: pass --total_bytes (e.g. an H100's as torch reports it)")
    free = total - WEIGHTS
    fp16 = 2 * HKV * D * 2
    rows = [
        {
            "method": "fp16",
            "bytes_per_token_layer": fp16,
            "fixed": {},
            "tokens": int(free // (fp16 * LAYERS)),
        }
    ]
    for bits in (2, 1):
        per = bytes_per_token(HKV, D, round(bits * D / 12), bits)
        for held, size in (("float16", 2), ("float32", 4)):
            fixed = fixed_bytes(bits, size)
            tokens = int((free - sum(fixed.values())) // (per * LAYERS))
            rows.append(
                {
                    "method": f"commvq{bits}",
                    "codec_held_in": held,
                    "bytes_per_token_layer": per,
                    "fixed": fixed,
                    "tokens": tokens,
                }
            )
        rows.append(
            {
                "method": f"commvq{bits}",
                "codec_held_in": "(not counted)",
                "bytes_per_token_layer": per,
                "fixed": {},
                "tokens": int(free // (per * LAYERS)),
            }
        )
    base = rows[0]["tokens"]
    print(
        f"card memory {total:,} B, bf16 weights {WEIGHTS:,.0f} B, {LAYERS} layers, "
        f"{HKV} KV heads x {D}; commit {commit_id()}"
    )
    print(
        f"{'method':<9}{'codec held in':>15}{'B/token/layer':>15}"
        f"{'fixed GB':>10}{'tokens':>12}{'x FP16':>8}"
    )
    for r in rows:
        print(
            f"{r['method']:<9}{r.get('codec_held_in', '-'):>15}{r['bytes_per_token_layer']:>15}"
            f"{sum(r['fixed'].values()) / 1e9:>10.3f}{r['tokens']:>12,}{r['tokens'] / base:>8.2f}"
        )
    print(
        json.dumps(
            {"bench": "cache_memory", "total_bytes": total, "rows": rows, "commit": commit_id()}
        )
    )


if __name__ == "__main__":
    main()
