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


def test_deep_allocation_stays_within_the_spare_units():
    power = torch.tensor([40.0, 20.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.01])
    for max_deep in (0, 1, 2, 3):
        bits = value_init.allocate_bits(power, 16, max_deep)
        assert int(bits.sum()) == 16 and int(bits.max()) <= value_init.MAX_BITS
        assert int((bits > 2).sum()) <= max_deep and torch.all(bits[:-1] >= bits[1:]), bits
    assert value_init.allocate_bits(power, 16, 2)[:2].tolist() == [
        4,
        4,
    ]  # uneven power: the strong axes go deep
    assert (
        len(value_init.steps(value_init.allocate_bits(power, 16, 2)))
        == 2 * value_init.STEPS_PER_DEEP_AXIS
    )


def _nearest_levels(z: torch.Tensor, bits: int, rms: float) -> torch.Tensor:
    """The quantizer the start means for one axis: Lloyd-Max at 1-2 bits, uniform at 3-4."""
    if bits <= 2:
        pos = torch.tensor(value_init.LEVELS[bits], dtype=z.dtype)
        levels = torch.cat([-pos.flip(0), pos]) * rms
    else:
        d = value_init.STEP[bits]
        levels = (torch.arange(2**bits, dtype=z.dtype) - (2**bits - 1) / 2) * d * rms
    return levels[(z[:, None] - levels).abs().argmin(-1)]


@pytest.mark.parametrize(
    ("total", "max_deep"), [(8, 0), (12, 0), (16, 0), (12, 2), (16, 3), (20, 4)]
)
def test_argmax_of_the_logits_is_each_axis_quantizer(total, max_deep):
    """With exact step indicators, argmax of the logits, group by group, decodes every axis to its
    own quantizer's nearest level (Lloyd-Max at 1-2 bits, uniform at 3-4: coarse bits from z, fine
    bits from the remainder)."""
    g = torch.Generator().manual_seed(1)
    power = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    bits = value_init.allocate_bits(power, total, max_deep)
    groups = value_init.group_layout(bits)
    assert len(groups) == total // 2
    a, c, b = value_init.pattern_weights(power, bits, groups, binary.PATTERNS, 4.0)
    rms = power.sqrt()
    z = torch.randn(4000, len(power), generator=g, dtype=torch.float64) * rms
    steps = value_init.steps(bits)
    h = torch.stack([(z[:, i] > t * rms[i]).double() for i, t in steps], -1) if steps else z[:, :0]
    picked = (torch.einsum("nf,gpf->ngp", z, a) + torch.einsum("ns,gps->ngp", h, c) + b).argmax(-1)
    signs = binary.bits_from_index(picked)  # [N, 2 * groups]
    decoded = torch.zeros_like(z)
    for k, half in enumerate(hh for group in groups for hh in group):
        decoded[:, half.axis] += signs[:, k].double() * half.weight * rms[half.axis]
    for i, nb in enumerate(bits.tolist()):
        want = _nearest_levels(z[:, i], nb, float(rms[i])) if nb else torch.zeros_like(z[:, i])
        assert torch.allclose(decoded[:, i], want, atol=1e-9), (i, nb)


def _rel_err(codec, held):
    with torch.no_grad():
        return float(((codec(held) - held) ** 2).sum(-1).mean() / (held**2).sum(-1).mean())


@pytest.mark.parametrize("bits", [1, 2])
def test_the_start_beats_the_rotation_start_and_meets_lloyd_max(bits):
    f = 32
    v = _correlated_values(6000, f)
    train, held = v[:4000], v[4000:]
    scale = train.abs().mean(0)
    pca = LayerValueCodec(f, bits, scale).init_from_values(train).eval()
    rot = LayerValueCodec(f, bits, scale).init_projection(torch.Generator().manual_seed(0)).eval()
    err_pca, err_rot = _rel_err(pca, held), _rel_err(rot, held)
    assert err_pca < 0.6 * err_rot, (err_pca, err_rot)
    assert pca.fixed_features == (bits == 2)  # 2 bits: spare hidden units, so 3-4-bit axes
    if bits == 2:  # deep axes beat every axis at 2 bits (Lloyd-Max's 0.1175 of the energy)
        assert err_pca < value_init.DISTORTION[2] * 0.8, err_pca
    # deterministic, and the codes decode to what forward returns
    codes, factor = pca.encode(held)
    assert torch.allclose(pca.decode(codes, factor), pca(held), atol=1e-5)


def test_the_ramps_follow_the_exact_staircase():
    """The codec's gelu ramps give the codes of exact steps for almost every token: a deep start is
    within a few percent of ideal transform coding at the same allocation. (Values of zero mean over
    channels: the encoder's LayerNorm removes that mean, which no start can recover.)"""
    f = 32
    v = _correlated_values(8000, f, seed=3)
    v = v - v.mean(-1, keepdim=True)
    train, held = v[:4000], v[4000:]
    scale = torch.ones(f)
    codec = LayerValueCodec(f, 2, scale).init_from_values(train).eval()
    u, _ = binary.normalize(train, scale)
    power, axes = value_init.principal_axes(u)
    bits = value_init.allocate_bits(power, 2 * f, (codec.fc1.out_features - 2 * f) // 2 // 3)
    assert int((bits > 2).sum()) > 0
    uh, p = binary.normalize(held, scale)
    z = uh.double() @ axes
    zq = torch.stack(
        [
            _nearest_levels(z[:, i], int(nb), float(power[i].sqrt())) if nb else 0 * z[:, i]
            for i, nb in enumerate(bits.tolist())
        ],
        -1,
    )
    y = (zq @ axes.T).float()
    ideal = y / y.norm(dim=-1, keepdim=True) * p[:, None] * scale
    err_ideal = float(((ideal - held) ** 2).sum(-1).mean() / (held**2).sum(-1).mean())
    assert _rel_err(codec, held) < 1.1 * err_ideal, (_rel_err(codec, held), err_ideal)


def test_training_leaves_a_deep_start_s_features_fixed(tmp_path):
    from commvq.codecs.value_codec import ValueCodec

    f = 32
    v = _correlated_values(4000, f)
    codec = ValueCodec(2, f, 2, {0: torch.ones(f), 1: torch.ones(f)})
    codec.layers[0].init_from_values(v)
    codec.layers[1].init_projection(torch.Generator().manual_seed(0))
    trainable = {id(p) for p in codec.trainable_parameters()}
    assert (
        id(codec.layers[0].fc1.weight) not in trainable
        and id(codec.layers[0].fc2.weight) in trainable
    )
    assert id(codec.layers[1].fc1.weight) in trainable
    back = ValueCodec.load(codec.save(tmp_path / "c"))
    assert back.layers[0].fixed_features and not back.layers[1].fixed_features
    assert torch.equal(back.layers[0].encode(v)[0], codec.layers[0].eval().encode(v)[0])
    # optimizer steps as train-values takes them: the step units stay as they were, the rest moves
    layer = codec.layers[0].train()
    steps = slice(2 * f, 2 * f + int(layer.step_units))
    fc1, fc2 = layer.fc1.weight.clone(), layer.fc2.weight.clone()
    codec.remember_fixed()
    opt = torch.optim.AdamW(codec.trainable_parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        ((layer(v[:256]) - v[:256]) ** 2).mean().backward()
        opt.step()
        codec.restore_fixed()
    assert torch.equal(layer.fc1.weight, fc1) and torch.equal(
        layer.fc2.weight[:, steps], fc2[:, steps]
    )
    assert not torch.equal(layer.fc2.weight[:, : 2 * f], fc2[:, : 2 * f])


def test_values_of_low_rank_give_a_finite_start():
    """Values spanning 6 of 32 dimensions: the spare bits land on empty axes at 1-2 bits only, and
    the weights stay of ordinary size."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4000, 6, generator=g) @ torch.randn(6, 32, generator=g)
    codec = LayerValueCodec(32, 2, torch.ones(32)).init_from_values(v).eval()
    assert codec.fixed_features
    assert (
        float(codec.codebook.detach().abs().max()) < 1e4
        and float(codec.fc1.weight.detach().abs().max()) < 1e6
    )
    assert _rel_err(codec, v) < value_init.DISTORTION[3]


def test_the_start_needs_enough_samples():
    codec = LayerValueCodec(16, 2, torch.ones(16))
    with pytest.raises(ValueError, match="need at least 16"):
        codec.init_from_values(torch.randn(8, 16))
    assert math.isclose(float(value_init.principal_axes(torch.eye(4))[0].sum()), 1.0)
