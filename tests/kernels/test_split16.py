"""Products through float16 halves against float64: float32-like accuracy whatever the scale of a
row."""

import pytest
import torch

from commvq.kernels import split16

HAS_CUDA = torch.cuda.is_available()


def _operands(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 500, 128, generator=g)
    a *= torch.logspace(-6, 3, 500)[None, :, None]  # rows over nine orders of magnitude
    a[0, 7] = 0.0  # an all-zero row
    a[1, :, 5] *= 40.0  # an outlier channel
    b = torch.randn(3, 128, 96, generator=g) * torch.logspace(-3, 2, 96)
    return a.to(device), b.to(device)


def _relative_errors(got, a, b):
    """Per output entry, the error against float64 over the scale ``|a_i| |b_j|`` of its dot
    product."""
    want = a.double() @ b.double()
    scale = a.double().norm(dim=-1, keepdim=True) * b.double().norm(dim=-2, keepdim=True)
    return ((got.double() - want).abs() / scale.clamp_min(1e-300)).amax().item()


def test_halves_keep_22_bits_per_row():
    a, _ = _operands("cpu")
    a_split, a_unscale = split16.split_rows(a, rows_per_pass=333)  # passes that cut heads apart
    k = a.shape[-1]
    assert a_split.dtype == torch.float16 and a_split.shape == (3, 500, 3 * k)
    assert torch.equal(a_split[..., k : 2 * k], a_split[..., 2 * k :])  # [lo | hi | hi]
    lo, hi = a_split[..., :k].double(), a_split[..., k : 2 * k].double()
    back = (lo + hi) * a_unscale.double()[..., None]
    top = a.double().abs().amax(-1, keepdim=True)
    assert float(((back - a.double()).abs() / top.clamp_min(1e-300)).max()) < 2.0**-21
    assert torch.equal(
        torch.log2(a_unscale), torch.log2(a_unscale).round()
    )  # powers of two: exact unscaling
    assert float(back[0, 7].abs().max()) == 0.0


def test_split_product_is_float32_accurate_on_cpu():
    a, b = _operands("cpu")
    err = _relative_errors(split16.matmul(a, b), a, b)
    err32 = _relative_errors(a @ b, a, b)
    assert err < 4 * err32 + 2.0**-22, (err, err32)
    assert err < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_split_product_is_float32_accurate_on_gpu():
    a, b = _operands("cuda")
    m = torch.backends.cuda.matmul
    before = (m.fp32_precision, m.allow_fp16_reduced_precision_reduction)
    err = _relative_errors(split16.matmul(a, b), a, b)
    err32 = _relative_errors(torch.bmm(a, b), a, b)
    with split16.tf32_products():
        err_tf32 = _relative_errors(torch.bmm(a, b), a, b)
    assert (
        m.fp32_precision,
        m.allow_fp16_reduced_precision_reduction,
    ) == before  # the contexts restore them
    assert err < 4 * err32 + 2.0**-22, (err, err32)
    assert err_tf32 > 30 * err  # the split is what makes tensor cores precise enough
