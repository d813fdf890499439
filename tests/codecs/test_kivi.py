import pytest
import torch

from commvq.codecs import cache_parts as parts
from commvq.codecs import kivi


@pytest.mark.parametrize("dim", [1, -1])
def test_quantize_round_trip_is_within_half_a_step(dim):
    x = torch.randn(2, 64, 3, 32)
    codes, lo, step = kivi.quantize(x, 2, 16, dim)
    assert codes.shape == x.shape and int(codes.max()) <= 3
    assert lo.shape[dim] == x.shape[dim] // 16 and step.shape == lo.shape
    back = kivi.dequantize(codes, lo, step, 16, dim)
    half = step.repeat_interleave(16, dim=dim) / 2
    assert (back - x).abs().le(half + 1e-6).all()


def test_the_cache_stores_what_fake_quant_computes():
    """The cache's packed KIVI blocks decode to the fake-quantized tensor (up to fp16 scalars)."""
    k = torch.randn(1, 2, 64, 16)  # [B, H, n, D]
    block = parts.KiviKeys(2, 32).compress(0, k, torch.arange(64)[None])
    stored = parts._kivi_load(block, 2, 32, dim=1)  # [B, n, H, D]
    want = kivi.quantize_keys(k, 2, 32).transpose(1, 2)
    assert torch.allclose(stored, want, atol=1e-2)
    with pytest.raises(ValueError, match="multiple of group"):
        kivi.quantize(torch.randn(5, 7), 2, 4, dim=-1)
