"""The one-launch beam encoder against the pure-torch one (GPU; interpreter on CPU)."""

import importlib.util

import pytest
import torch

from tests.helpers import run_in_triton_interpreter

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _compare(device, cases):
    from commvq.kernels.beam import beam_encode_triton
    from commvq.quant import residual
    from commvq.quant.beam import beam_encode

    for h, n, d, e, r, beam in cases:
        g = torch.Generator().manual_seed(n + beam)
        x = torch.randn(h, n, d, generator=g).to(device)
        thetas = (
            torch.randn(h, r, 2 * e, d // 2, generator=g)
            * 0.3
            * 0.6 ** torch.arange(r)[None, :, None, None]
        )
        thetas = thetas.to(device)
        got = beam_encode_triton(x, thetas, beam, chunk=max(1, n // 2))  # two chunks
        want = beam_encode(x.double(), thetas.double(), beam)
        assert got.shape == want.shape == (h, n, r) and got.dtype == torch.long
        # float32 sums against a float64 reference flip near-ties, more of them the more stages and
        # slots
        agree = (got == want).all(-1).float().mean()
        assert agree > 0.9, f"{agree} for {(h, n, d, e, r, beam)}"
        err_got = ((x.double() - residual.decode(got, thetas.double())) ** 2).sum(-1)
        err_want = ((x.double() - residual.decode(want, thetas.double())) ** 2).sum(-1)
        assert abs(float(err_got.sum() / err_want.sum()) - 1) < 1e-3
        xd, td = x.double(), thetas.double()
        greedy = ((xd - residual.decode(residual.encode(xd, td), td)) ** 2).sum(-1)
        assert bool((err_got <= greedy + 1e-4).all())  # the greedy path is kept


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_beam_kernel_matches_torch_on_gpu():
    _compare(
        "cuda",
        [
            (8, 1000, 128, 64, 21, 8),
            (3, 333, 64, 64, 11, 4),
            (2, 50, 16, 8, 3, 2),
            (3, 70, 64, 64, 5, 16),
            (2, 41, 32, 16, 4, 1),
        ],
    )


@pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (its interpreter runs the kernel on the CPU)"
)
def test_beam_kernel_matches_torch_in_interpreter():
    code = (
        "from tests.kernels.test_beam import _compare\n"
        "_compare('cpu', [(2, 37, 16, 8, 3, 2), (1, 20, 32, 16, 4, 8), (2, 9, 16, 8, 2, 1)])\n"
    )
    run_in_triton_interpreter(code, timeout=600)


def test_beam_kernel_refuses_widths_it_has_no_layout_for():
    if not HAS_TRITON:
        pytest.skip("needs triton")
    from commvq.kernels.beam import beam_encode_triton

    x, thetas = torch.zeros(1, 4, 16), torch.zeros(1, 2, 16, 8)
    for beam, match in ((3, "1, 2, 4, 8 or 16"), (16, "exceeds the 8 table entries")):
        with pytest.raises(ValueError, match=match):
            beam_encode_triton(x, thetas, beam)
