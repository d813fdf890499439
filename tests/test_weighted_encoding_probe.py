"""The probe ``benchmarks/weighted_encoding.py`` encodes by the query-weighted error through scaled
keys and tables: its codes must be those that minimize that error over every codeword."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import weighted_encoding as probe  # noqa: E402

from commvq.codecs.key_codebook import KeyCodebook  # noqa: E402
from commvq.quant.commutative import codewords, untie  # noqa: E402


def test_scaled_tables_pick_the_codeword_of_least_weighted_error():
    gen = torch.Generator().manual_seed(0)
    h, e, p, n = 2, 4, 3, 200
    theta = torch.randn(h, 1, 2 * e, p, generator=gen)
    x = torch.randn(h, n, 2 * p, generator=gen)
    w = torch.rand(h, p, generator=gen) * 10 + 0.1  # far from uniform
    for thetas in (theta, untie(theta)):
        codes = probe.WeightedCodebook(KeyCodebook(thetas, code_bits=4), w).encode_normalized(x)
        c = codewords(thetas[:, 0])  # [H, E*E, D]
        diff = (x[:, :, None, :] - c[:, None]) ** 2
        weighted = (diff * torch.cat((w, w), -1)[:, None, None, :]).sum(-1)
        assert torch.equal(codes[..., 0], weighted.argmin(-1))
        plain = KeyCodebook(thetas, code_bits=4).encode_normalized(x)[..., 0]
        assert not torch.equal(plain, codes[..., 0])  # the weights do change the codes here


def test_metric_is_the_mean_squared_logit_error_over_queries_and_distances():
    from commvq import rope
    from commvq.spec import ModelSpec

    gen = torch.Generator().manual_seed(1)
    h_kv, group, d = 2, 2, 8
    spec = ModelSpec(
        model_type="llama",
        num_layers=1,
        num_heads=h_kv * group,
        num_kv_heads=h_kv,
        head_dim=d,
        hidden_size=h_kv * group * d,
        max_position=4096,
        rope_theta=50.0,
    )
    q = torch.randn(64, h_kv * group * d, generator=gen) + 0.5  # queries with a mean direction
    deltas = torch.arange(3, 40)
    c = probe.logit_metric(q, h_kv, spec, deltas)
    e = torch.randn(5, h_kv, d, generator=gen)  # pre-RoPE key errors
    cos, sin = rope.cos_sin(rope.inv_freq(d, spec.rope_theta), deltas)  # [T, D]
    rotated = rope.apply_rope(e[:, :, None, :], cos, sin)  # [5, H, T, D]: R_delta e
    qh = q.reshape(64, h_kv, group, d)
    logits = torch.einsum("nhgd,khtd->khngt", qh.double(), rotated.double())
    want = (logits**2).mean((2, 3, 4))  # over queries of the group and distances
    got = (torch.einsum("khd,hde->khe", e, c) ** 2).sum(-1)
    assert torch.allclose(got.double(), want, rtol=1e-4)


def test_identity_metric_codes_are_the_beams():
    gen = torch.Generator().manual_seed(2)
    h, r, e, p = 2, 3, 4, 3
    theta = torch.randn(h, r, 2 * e, p, generator=gen)
    x = torch.randn(h, 300, 2 * p, generator=gen)
    eye = torch.eye(2 * p).expand(h, -1, -1)
    for thetas in (theta, untie(theta)):
        for beam in (1, 4):
            base = KeyCodebook(thetas, code_bits=4, beam=beam)
            got = probe.MetricCodebook(base, eye).encode_normalized(x)
            assert torch.equal(got, base.encode_normalized(x))
