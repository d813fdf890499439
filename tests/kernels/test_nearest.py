"""The fused nearest-codeword kernel against the pure-torch search (GPU; interpreter on CPU)."""

import importlib.util

import pytest
import torch

from tests.helpers import run_in_triton_interpreter

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _compare(device, cases):
    from commvq.kernels.nearest import nearest_triton
    from commvq.quant.commutative import codewords, nearest

    for h, n, d, e in cases:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(h, n, d, generator=g).to(device)
        theta = (torch.randn(h, 2 * e, d // 2, generator=g) * 0.3).to(device)
        got = nearest_triton(x, theta)
        want = nearest(x.double(), theta.double())
        agree = (got == want).float().mean()
        assert agree > 0.995, f"{agree} for {(h, n, d, e)}"
        cw = codewords(theta.double())
        rows = torch.arange(h, device=device)[:, None]
        d_got = ((x.double() - cw[rows, got]) ** 2).sum(-1)
        d_want = ((x.double() - cw[rows, want]) ** 2).sum(-1)
        assert torch.allclose(d_got, d_want, rtol=1e-5, atol=1e-6)  # any disagreement is a near-tie


def _fit_with_kernel(device):
    """EM's residual update between stages through the kernel: the same stages as through torch."""
    from commvq.kernels.nearest import nearest_triton
    from commvq.quant import em

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 16, generator=g)
    x, s = (x / x.norm(dim=-1, keepdim=True)).to(device), torch.ones(300, device=device)
    settings = em.EMSettings(max_iters=4, chunk=128)
    calls = []

    def counted(*a):
        calls.append(1)
        return nearest_triton(*a)

    got = em.fit(x, s, 3, 4, settings, seed=1, nearest_fn=counted)
    want = em.fit(x, s, 3, 4, settings, seed=1)
    assert len(calls) == 3 * 3  # three stages, three chunks each
    assert torch.allclose(got.thetas, want.thetas, atol=1e-5) and torch.allclose(
        got.residual_mse, want.residual_mse
    )


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_nearest_kernel_matches_torch_on_gpu():
    _compare("cuda", [(8, 2048, 128, 64), (3, 1000, 64, 64), (2, 77, 16, 8)])
    _fit_with_kernel("cuda")


@pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (its interpreter runs the kernel on the CPU)"
)
def test_nearest_kernel_matches_torch_in_interpreter():
    code = (
        "from tests.kernels.test_nearest import _compare, _fit_with_kernel\n"
        "_compare('cpu', [(2, 70, 16, 8), (1, 40, 8, 16)])\n_fit_with_kernel('cpu')\n"
    )
    run_in_triton_interpreter(code, timeout=600)
