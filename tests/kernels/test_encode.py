"""The one-launch greedy encoder against the pure-torch one (GPU; interpreter on CPU)."""

import importlib.util

import pytest
import torch

from tests.helpers import run_in_triton_interpreter

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _compare(device, cases):
    from commvq.kernels.encode import encode_triton, encode_triton_with_residuals
    from commvq.quant import residual

    for h, n, d, e, r in cases:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(h, n, d, generator=g).to(device)
        thetas = (
            torch.randn(h, r, 2 * e, d // 2, generator=g)
            * 0.3
            * 0.6 ** torch.arange(r)[None, :, None, None]
        )
        thetas = thetas.to(device)
        got = encode_triton(x, thetas)
        want = residual.encode(x.double(), thetas.double())
        assert got.shape == want.shape == (h, n, r)
        agree = (got == want).all(-1).float().mean()
        assert agree > 0.98, f"{agree} for {(h, n, d, e, r)}"
        err_got = ((x.double() - residual.decode(got, thetas.double())) ** 2).sum()
        err_want = ((x.double() - residual.decode(want, thetas.double())) ** 2).sum()
        assert abs(float(err_got / err_want) - 1) < 1e-4
        codes, res = encode_triton_with_residuals(x, thetas)
        assert torch.equal(codes, got) and res.shape == (r, h, n, d)
        want_res = x.double() - torch.cumsum(residual.stage_decodes(codes, thetas.double()), 0)
        assert float((res.double() - want_res).abs().max()) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_encode_kernel_matches_torch_on_gpu():
    _compare("cuda", [(8, 1000, 128, 64, 21), (3, 333, 64, 64, 11), (2, 50, 16, 8, 3)])


@pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (its interpreter runs the kernel on the CPU)"
)
def test_encode_kernel_matches_torch_in_interpreter():
    code = (
        "from tests.kernels.test_encode import _compare\n"
        "_compare('cpu', [(2, 40, 16, 8, 3), (1, 20, 32, 16, 2)])\n"
    )
    run_in_triton_interpreter(code, timeout=600)
