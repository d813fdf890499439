#!/usr/bin/env python
"""Accuracy of the products EM's distances use, against float64, on key-like data (GPU).

    python benchmarks/split_precision.py [--num_samples 65536]

For ``x @ W`` (normalized synthetic keys, the search table of a random codebook) and each way of
computing it: float32 on the CUDA cores, TF32, split float16 halves in one product (K tripled, as
``commvq.kernels.split16``: small terms first), the same with the large ``hi @ hi`` term first,
and the three half products apart (float32 sums between them). Per
entry the error is taken over the scale ``|x| |w|`` of its dot product; the table gives its RMS and
its mean along the sign of the exact value (a bias toward zero is positive). Last line JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

try:
    from _meta import commit_id
    from em_layer import add_layer_args, layer_keys
except ImportError:
    from benchmarks._meta import commit_id
    from benchmarks.em_layer import add_layer_args, layer_keys

from commvq.kernels import split16
from commvq.quant.commutative import search_tables


def errors(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> dict:
    rel = (got.double() - want) / scale
    return {"rms": float(rel.square().mean().sqrt()), "toward_zero": float((-rel * want.sign()).mean()),
            "max": float(rel.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_args(ap)
    args = ap.parse_args()
    args.num_samples = min(args.num_samples, 65536)
    x, _ = layer_keys(args)
    g = torch.Generator(device=x.device).manual_seed(0)
    theta = torch.randn(x.shape[0], 128, x.shape[2] // 2, device=x.device, generator=g) * 0.05
    w = search_tables(theta)[0].contiguous()
    want = x.double() @ w.double()
    scale = x.double().norm(dim=-1, keepdim=True) * w.double().norm(dim=-2, keepdim=True)
    rows = {"float32": torch.bmm(x, w)}
    with split16.tf32_products():
        rows["tf32"] = torch.bmm(x, w)
    rows["split, one product"] = split16.matmul(x, w)
    a3, ra = split16.split_rows(x)
    b3, cb = split16.split_cols(w)
    k = x.shape[-1]
    big_first = torch.cat((a3[..., k:], a3[..., :k]), -1)  # [hi | hi | lo] by [hi; lo; hi]
    rows["split, hi @ hi first"] = split16.product(big_first, b3) * ra[..., :, None] * cb[..., None, :]
    parts = [split16.product(a3[..., i * k:(i + 1) * k].contiguous(), b3[..., i * k:(i + 1) * k, :].contiguous())
             for i in range(3)]  # lo @ hi, hi @ lo, hi @ hi
    rows["split, three products"] = (parts[0] + parts[1] + parts[2]) * ra[..., :, None] * cb[..., None, :]
    out = {}
    print(f"{'product':<26}{'rms':>12}{'toward zero':>14}{'max':>12}")
    for name, got in rows.items():
        out[name] = errors(got, want, scale)
        print(f"{name:<26}{out[name]['rms']:>12.3e}{out[name]['toward_zero']:>14.3e}{out[name]['max']:>12.3e}")
    print(json.dumps({"bench": "split_precision", "card": torch.cuda.get_device_name(), "rows": out,
                      "commit": commit_id()}))


if __name__ == "__main__":
    main()
