import pytest
import torch

from commvq.codecs import kivi
from commvq.codecs.value_codec import LayerValueCodec, ValueCodec
from commvq.quant import binary, packing


@pytest.mark.parametrize("bits", [1, 2])
def test_shapes_and_code_size(bits):
    c = LayerValueCodec(48, bits)
    assert c.groups == 48 * bits // 2
    assert c.fc1.out_features == min(4096, 4 * c.groups) and c.fc2.out_features == 4 * c.groups
    assert c.codebook.shape == (48 * bits, 48)
    packed, factor = c.encode(torch.randn(5, 48))
    assert (
        packed.dtype == torch.uint8 and packed.shape == (5, 48 * bits // 8) and factor.shape == (5,)
    )
    assert c.code_size() == 48 * bits + 16


def test_argmax_encoding_is_deterministic_and_decode_matches_forward():
    c = LayerValueCodec(32, 2, torch.rand(32) + 0.5).eval()
    v = torch.randn(20, 32)
    a, fa = c.encode(v)
    b, fb = c.encode(v)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert torch.allclose(c.decode(a, fa), c(v), atol=1e-5)


def test_pack_unpack_exact():
    idx = torch.randint(0, 4, (7, 13))
    assert torch.equal(packing.unpack_2bit(packing.pack_2bit(idx), 13), idx)
    codes = torch.randint(0, 4096, (3, 21))
    assert torch.equal(packing.unpack_codes(packing.pack_codes(codes, 12), 21, 12), codes)
    assert packing.pack_codes(codes, 12).shape == (3, 32)  # 21 * 12 bits = 31.5 bytes


def test_decode_is_linear_in_the_bits_given_the_factor():
    e = torch.randn(8, 4)
    scale = torch.rand(4) + 0.5
    f = torch.tensor([0.7])
    b1, b2 = torch.randn(1, 8), torch.randn(1, 8)
    lhs = binary.decode(2 * b1 - 3 * b2, e, f, scale)
    rhs = 2 * binary.decode(b1, e, f, scale) - 3 * binary.decode(b2, e, f, scale)
    assert torch.allclose(lhs, rhs, atol=1e-5)


def test_gradients_reach_every_trainable_tensor():
    c = ValueCodec(2, 16, 2, {0: torch.ones(16), 1: torch.ones(16) * 2}).train()
    v = torch.randn(30, 16)
    loss = sum(((layer(v) - v) ** 2).mean() for layer in c.layers)
    loss.backward()
    for name, p in c.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_save_load_reproduces_codes(tmp_path):
    c = ValueCodec(3, 16, 1, {i: torch.rand(16) + 0.5 for i in range(3)})
    v = torch.randn(9, 16)
    c.save(tmp_path / "codec", {"model": "toy"})
    d = ValueCodec.load(tmp_path / "codec", num_layers=3, width=16)
    for i in range(3):
        assert torch.equal(c.layers[i].encode(v)[0], d.layers[i].encode(v)[0])
    with pytest.raises(ValueError, match="num_layers=3, the model has 4"):
        ValueCodec.load(tmp_path / "codec", num_layers=4)
    with pytest.raises(FileNotFoundError, match="train-values"):
        ValueCodec.load(tmp_path / "none")


def test_kivi_fake_quant_levels_and_error():
    x = torch.randn(4, 64, 32)
    for bits in (1, 2):
        q = kivi.quantize_values(x, bits, group=32)
        for row in q.reshape(-1, 32):
            assert len(torch.unique(row)) <= 2**bits
    assert ((kivi.quantize_values(x, 2) - x) ** 2).mean() < (
        (kivi.quantize_values(x, 1) - x) ** 2
    ).mean()
    assert kivi.quantize_keys(x, 2, group=32).shape == x.shape


@pytest.mark.parametrize("bits", [1, 2])
def test_projection_init_is_a_sign_quantizer(bits):
    c = LayerValueCodec(64, bits).init_projection(torch.Generator().manual_seed(0)).eval()
    v = torch.randn(500, 64) * torch.linspace(0.5, 2, 64)
    u, _ = binary.normalize(v, c.scale)
    idx = c.logits(v)[0].argmax(-1)
    agree = (binary.bits_from_index(idx) == torch.sign(u @ c.codebook.detach().T)).float().mean()
    assert agree > 0.95
    with torch.no_grad():
        rel = float(((c(v) - v) ** 2).sum() / (v**2).sum())
    assert rel < (0.5 if bits == 1 else 0.3)
    fresh = ValueCodec.from_scales({0: torch.ones(64)}, bits, seed=3)
    again = ValueCodec.from_scales({0: torch.ones(64)}, bits, seed=3)
    assert torch.equal(fresh.layers[0].codebook, again.layers[0].codebook)


def test_codec_held_in_float16_computes_what_its_rounded_float32_copy_does(tmp_path):
    """Holding the weights in float16 changes only their storage: codes, factors and decodes equal
    those of a float32 codec whose weights were rounded to float16 (what ``eval-values --rounded``
    measures), at half the bytes; bfloat16 is refused."""
    import copy

    from commvq.pipeline.eval_values import rounded

    torch.manual_seed(0)
    v = torch.randn(3000, 64) * torch.linspace(0.5, 2, 64)
    codec = ValueCodec(2, 64, 2)
    codec.layers[0].init_from_values(v)  # step units and all: the widest range of weights
    codec.layers[1].init_projection(torch.Generator().manual_seed(1))
    codec.eval()
    ref = rounded(codec, torch.float16)
    held = copy.deepcopy(codec).held_in(torch.float16)
    assert all(p.dtype == torch.float16 for p in held.parameters())
    assert int(held.layers[0].step_units) == int(codec.layers[0].step_units) > 0
    size = sum(p.numel() * p.element_size() for p in codec.parameters())
    assert sum(p.numel() * p.element_size() for p in held.parameters()) * 2 == size
    for i in range(2):
        codes, factor = held.layers[i].encode(v[:500])
        want_codes, want_factor = ref.layers[i].encode(v[:500])
        assert torch.equal(codes, want_codes) and torch.equal(factor, want_factor)
        assert torch.equal(
            held.layers[i].decode(codes, factor), ref.layers[i].decode(codes, factor)
        )
        with torch.no_grad():
            assert torch.equal(held.layers[i](v[:500]), ref.layers[i](v[:500]))
    assert not torch.equal(codec.layers[1].codebook, ref.layers[1].codebook)  # the rounding is real
    with pytest.raises(ValueError, match="bfloat16"):
        copy.deepcopy(codec).held_in(torch.bfloat16)
