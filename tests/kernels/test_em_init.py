"""The EM initialization's E-step kernel against the pure-torch reference (GPU; interpreter on
CPU)."""

import importlib.util

import pytest
import torch

from tests.helpers import run_in_triton_interpreter

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _centers(device, cases):
    """The initialization's E-step against free centers: kernel vs the torch reference."""
    from commvq.kernels import split16
    from commvq.kernels.em_init import e_step_centers_triton
    from commvq.quant import em

    for h, n, d, e, tau, chunk in cases:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(h, n, d, generator=g)
        x = (x / x.norm(dim=-1, keepdim=True) / h**0.5).to(device)
        s = (torch.rand(n, generator=g) + 0.5).to(device)
        centers = x[:, torch.randint(0, n, (e * e,), generator=g).to(device)]
        a = em.e_step_centers(x.double(), s.double(), centers.double(), tau, chunk=64)
        b = e_step_centers_triton(x, s, centers, tau, chunk=chunk)
        for name in ("count", "sum_a", "sum_b", "sum_xx", "hard_sqerr"):
            want, got = getattr(a, name), getattr(b, name)
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            assert err < 1e-4, f"{name} rel err {err} for case {(h, n, d, e, tau, chunk)}"
        assert float((b.hard.long() != a.hard).float().mean()) < 0.01
        cache = {}  # as EM's stages pass it: the halves of x made once, kept for the E-steps
        kept = e_step_centers_triton(x, s, centers, tau, chunk=chunk, cache=cache)
        if split16.supported(x.device):
            assert cache["x_split"].shape == (h, n, 3 * d)
            assert cache["x_unscale"].shape == (h, n)
        else:  # no float16 products with a float32 output: float32 products, nothing to keep
            assert "x_split" not in cache and "x_unscale" not in cache
        for name in ("count", "sum_a", "sum_b", "sum_xx", "hard_sqerr", "hard"):
            assert torch.equal(getattr(kept, name), getattr(b, name)), name


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_init_e_step_matches_torch_on_gpu():
    _centers(
        "cuda",
        [(8, 5000, 128, 64, 1.0, 2048), (2, 999, 64, 64, 0.01, 8192), (1, 300, 16, 8, 1.0, 100)],
    )


@pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (its interpreter runs the kernel on the CPU)"
)
def test_init_e_step_matches_torch_in_interpreter():
    code = (
        "from tests.kernels.test_em_init import _centers\n"
        "_centers('cpu', [(2, 150, 16, 8, 1.0, 64), (1, 90, 8, 16, 0.05, 1000)])\n"
        "import commvq.kernels.split16 as s16; s16.supported = lambda device: False  "
        "# an older torch\n"
        "_centers('cpu', [(2, 150, 16, 8, 1.0, 64)])\n"
    )
    run_in_triton_interpreter(code, timeout=600)
