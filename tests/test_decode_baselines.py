"""The decode-then-attend baselines of ``benchmarks/decode_attention.py`` compute the same
attention: the half-precision path the benchmark compiles against the float32 one."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_attention as bench  # noqa: E402

from commvq import rope  # noqa: E402
from commvq.quant.commutative import decode_table  # noqa: E402


def test_fused_baseline_matches_float32_decode():
    gen = torch.Generator().manual_seed(3)
    b, n, hq, hkv, d, window = 2, 37, 4, 2, 16, 5
    dev = torch.device("cpu")
    for bits in (2, 1):
        r = round(bits * d / 12) or 1
        st = bench.make_state(b, n, hkv, d, r, bits, dev, gen)
        st["table16"] = decode_table(st["thetas"]).to(torch.float16)
        st["codebook16"] = st["codebook"]
        q = torch.randn(b, hq, d, generator=gen)
        win_k, win_v = (
            torch.randn(b, hkv, window, d, generator=gen),
            torch.randn(b, hkv, window, d, generator=gen),
        )
        freqs = rope.inv_freq(d, 1e4)
        args = (q, st, win_k, win_v, freqs, hkv, r, bits, torch.float32)
        ref = bench.naive(*args)
        out = bench.naive_fused(*args, compiled=False)
        assert out.shape == ref.shape == (b, hq, 1, d)
        assert torch.allclose(out, ref, atol=2e-3, rtol=1e-2), (bits, (out - ref).abs().max())
        st["thetas"] = st["thetas"] * 2  # the fused path reads its own table: a changed table shows
        assert not torch.allclose(bench.naive(*args), out, atol=2e-3, rtol=1e-2)
