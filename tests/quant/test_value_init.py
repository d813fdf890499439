"""The transform-coding start of the value codec: bit allocation, exact nearest patterns, error."""

import math

import pytest
import torch

from commvq.codecs.value_codec import LayerValueCodec
from commvq.quant import binary, value_init


def _correlated_values(n: int, f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.exp(-torch.arange(f) / (f / 8))  # a few strong directions, as real values have
    mix = torch.linalg.qr(torch.randn(f, f, generator=g))[0]
    return (torch.randn(n, f, generator=g) * spectrum) @ mix.T + 0.05 * torch.randn(f, generator=g)


def test_allocation_spends_every_bit_on_the_strong_axes_first():
    power = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.01])
    for total in range(0, 17, 2):
        bits = value_init.allocate_bits(power, total)
        assert int(bits.sum()) == total and int(bits.max()) <= 2 and int((bits == 1).sum()) % 2 == 0
        assert torch.all(bits[:-1] >= bits[1:]), bits  # never more bits on a weaker axis
    assert value_init.allocate_bits(power, 16).tolist() == [2] * 8
    for bad in (17, 18, -2):
        with pytest.raises(ValueError, match="an even number, at most 2"):
            value_init.allocate_bits(power, bad)


@pytest.mark.parametrize("total", [8, 12, 16])
def test_pattern_logits_pick_the_nearest_pattern(total):
    """argmax of the linear logits = the pattern whose decoded point is nearest, group by group."""
    g = torch.Generator().manual_seed(1)
    power = torch.tensor([3.0, 2.0, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    groups = value_init.group_layout(value_init.allocate_bits(power, total))
    assert len(groups) == total // 2
    a, b = value_init.pattern_weights(power, groups, binary.PATTERNS, 4.0)
    z = torch.randn(500, 8, generator=g, dtype=torch.float64) * power.sqrt()
    picked = (torch.einsum("nf,gpf->ngp", z, a) + b).argmax(-1)  # [N, groups]
    rms = power.sqrt()
    for k, ((i, wi), (j, wj)) in enumerate(groups):
        pts = binary.PATTERNS.double() * torch.tensor([wi * rms[i], wj * rms[j]], dtype=torch.float64)
        if i == j:
            dist = (z[:, i, None] - pts.sum(-1)) ** 2
        else:
            dist = (z[:, i, None] - pts[:, 0]) ** 2 + (z[:, j, None] - pts[:, 1]) ** 2
        assert torch.equal(picked[:, k], dist.argmin(-1))


@pytest.mark.parametrize("bits", [1, 2])
def test_the_start_beats_the_rotation_start_and_meets_lloyd_max(bits):
    f = 32
    v = _correlated_values(6000, f)
    train, held = v[:4000], v[4000:]
    scale = train.abs().mean(0)
    pca = LayerValueCodec(f, bits, scale).init_from_values(train).eval()
    rot = LayerValueCodec(f, bits, scale).init_projection(torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        err_pca = float(((pca(held) - held) ** 2).sum(-1).mean() / (held**2).sum(-1).mean())
        err_rot = float(((rot(held) - held) ** 2).sum(-1).mean() / (held**2).sum(-1).mean())
    assert err_pca < 0.6 * err_rot, (err_pca, err_rot)
    if bits == 2:  # every axis at 2 bits: about Lloyd-Max's 0.1175 of the energy (a little less: renormalized)
        assert err_pca < value_init.DISTORTION[2] * 1.15, err_pca
    # deterministic, and the codes decode to what forward returns
    codes, factor = pca.encode(held)
    assert torch.allclose(pca.decode(codes, factor), pca(held), atol=1e-5)


def test_the_start_needs_enough_samples():
    codec = LayerValueCodec(16, 2, torch.ones(16))
    with pytest.raises(ValueError, match="need at least 16"):
        codec.init_from_values(torch.randn(8, 16))
    assert math.isclose(float(value_init.principal_axes(torch.eye(4))[0].sum()), 1.0)
