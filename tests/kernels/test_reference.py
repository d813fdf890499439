"""The pure-torch compressed-attention math against decode-then-attend (float64)."""

import torch

from commvq import rope
from commvq.kernels import reference as ref
from commvq.quant import binary, residual


def test_scores_from_codes_equal_scores_of_decoded_rotated_keys():
    torch.manual_seed(0)
    b, hkv, g, d, r, e, n, tq = 2, 2, 3, 16, 3, 8, 37, 4
    thetas = torch.randn(hkv, r, 2 * e, d // 2, dtype=torch.float64) * 0.3
    codes = torch.randint(0, e * e, (b, n, hkv, r))
    s = torch.rand(b, n, dtype=torch.float64) + 0.5
    pos = torch.randint(0, 100_000, (b, n))
    freqs = rope.inv_freq(d, 1e4).double()
    q = torch.randn(b, hkv * g, tq, d, dtype=torch.float64)
    got = ref.commvq_scores(q, codes, s, pos, thetas, freqs, rope_scale=0.9, chunk=10)
    keys = residual.decode(codes.permute(2, 0, 1, 3).reshape(hkv, b * n, r), thetas).reshape(
        hkv, b, n, d
    )
    keys = keys.permute(1, 0, 2, 3) * s[:, None, :, None]  # [B, Hkv, N, D]
    # angles as the model computes them (float32 product), then exact trigonometry
    ang = (pos.float()[..., None] * freqs.float()).double()
    cos, sin = (
        torch.cat((ang.cos(), ang.cos()), -1),
        torch.cat((ang.sin(), ang.sin()), -1),
    )  # [B, N, D]
    rotated = rope.apply_rope(keys, cos[:, None], sin[:, None]) * 0.9
    want = q @ rotated.repeat_interleave(g, dim=1).transpose(-1, -2)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def test_values_from_codes_equal_probability_weighted_decoded_values():
    torch.manual_seed(1)
    b, hkv, g, d, qb, n, tq = 2, 2, 2, 8, 2, 11, 3
    f = hkv * d
    groups = f * qb // 2
    codebook = torch.randn(f * qb, f, dtype=torch.float64)
    scale = torch.rand(f, dtype=torch.float64) + 0.5
    idx = torch.randint(0, 4, (b, n, groups))
    factor = torch.rand(b, n, dtype=torch.float64)
    probs = torch.softmax(torch.randn(b, hkv * g, tq, n, dtype=torch.float64), -1)
    got = ref.commvq_values(probs, idx, factor, codebook, scale, hkv)
    v_hat = binary.decode(
        binary.bits_from_index(idx).double(), codebook, factor, scale
    )  # [B, N, F]
    v_heads = v_hat.reshape(b, n, hkv, d).permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    assert torch.allclose(got.double(), probs @ v_heads, atol=1e-4)
