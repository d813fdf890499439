import torch

from commvq import rope


def test_unapply_inverts_apply_at_large_positions():
    x = torch.randn(3, 50, 64, dtype=torch.float64)
    pos = torch.randint(0, 200_000, (50,))
    cos, sin = rope.cos_sin(rope.inv_freq(64, 5e5).double(), pos)
    assert torch.allclose(rope.unapply_rope(rope.apply_rope(x, cos, sin), cos, sin), x, atol=1e-10)


def test_apply_rope_is_complex_multiplication_of_pairs():
    x = torch.randn(10, 16, dtype=torch.float64)
    pos = torch.arange(10)
    freqs = rope.inv_freq(16, 1e4).double()
    cos, sin = rope.cos_sin(freqs, pos)
    re, im = rope.split_pairs(rope.apply_rope(x, cos, sin))
    z = torch.complex(*rope.split_pairs(x)) * torch.polar(
        torch.ones(10, 8, dtype=torch.float64), pos[:, None].double() * freqs
    )
    assert torch.allclose(re, z.real) and torch.allclose(im, z.imag)


def test_apply_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope_parameters = {"rope_type": "default", "rope_theta": 1e4}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=rope_parameters)
    emb = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, 2, 12, 16)
    pos = torch.arange(12)[None]
    cos, sin = emb(x, pos)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    mine_cos, mine_sin = rope.cos_sin(rope.inv_freq(16, 1e4), pos[0])
    assert torch.allclose(rope.apply_rope(x, mine_cos, mine_sin), want, atol=1e-5)


def test_merge_inverts_split():
    x = torch.randn(4, 32)
    assert torch.equal(rope.merge_pairs(*rope.split_pairs(x)), x)
