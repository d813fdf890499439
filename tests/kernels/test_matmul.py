"""The 3xTF32 batched matmuls against float64 (GPU; Triton's interpreter on CPU)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _compare(device, tol):
    from commvq.kernels import matmul

    g = torch.Generator().manual_seed(0)
    for bat, m, k, n in [(2, 37, 45, 19), (1, 300, 128, 128), (3, 16, 16, 16)]:
        a = torch.randn(bat, m, k, generator=g).to(device)
        b = torch.randn(bat, k, n, generator=g).to(device)
        want = a.double() @ b.double()
        got = matmul.bmm(a, b)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert float((got.double() - want).abs().max() / want.abs().max()) < tol
        # strided operands: a transposed view, a slice of a bigger tensor
        at = torch.randn(bat, k, m, generator=g).to(device).transpose(1, 2)
        got = matmul.bmm(at, b[:, :, : n - 3])
        want = at.double() @ b[:, :, : n - 3].double()
        assert float((got.double() - want).abs().max() / want.abs().max()) < tol
    for bat, t, m, n, split in [(2, 1000, 16, 24, 256), (1, 77, 128, 128, 32), (3, 64, 20, 16, 64)]:
        a = torch.randn(bat, t, m, generator=g).to(device)
        b = torch.randn(bat, t, n, generator=g).to(device)
        want = a.double().transpose(1, 2) @ b.double()
        got = matmul.split_sum_tn(a, b, split)
        assert got.dtype == torch.float64 and got.shape == want.shape
        assert float((got - want).abs().max() / want.abs().max()) < tol
        assert torch.equal(got, matmul.split_sum_tn(a, b, split))  # deterministic


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_tf32x3_matmuls_are_float32_accurate_on_gpu():
    _compare("cuda", 1e-5)


@pytest.mark.skipif(HAS_CUDA or not HAS_TRITON, reason="interpreter check only without a GPU, with triton installed")
def test_matmuls_in_interpreter():
    code = "from tests.kernels.test_matmul import _compare\n_compare('cpu', 1e-5)\n"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
