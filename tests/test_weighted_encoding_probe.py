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
