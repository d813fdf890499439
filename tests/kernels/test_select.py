"""The radix select kernel (the k highest of each row, positions in increasing order) against the
torch reference ``topk`` + sort; on a GPU, or in Triton's interpreter on a CPU (small rows)."""

import importlib.util

import pytest
import torch

from tests.helpers import kernel_tests

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _distinct(b, n, gen, scale):
    """Rows of distinct scores (a shuffled grid, both signs), distinct in their 24 highest bits."""
    return torch.stack(
        [(torch.randperm(n, generator=gen).float() - n / 2) * scale for _ in range(b)]
    )


def _check(device, cases):
    from commvq.kernels.select import top_k_positions_triton
    from commvq.quant.coarse import pick

    for b, n, k in cases:
        gen = torch.Generator().manual_seed(n + k)
        x = _distinct(b, n, gen, 0.37).to(device)
        got = top_k_positions_triton(x, k)
        assert got.dtype == torch.int64 and got.shape == (b, k)
        assert torch.equal(got, pick(x, k)), ("distinct", b, n, k)
        # with a source: its entries at the chosen positions (the cascade's candidates)
        src = torch.randint(0, 10**9, (b, n), generator=gen).to(device)
        got = top_k_positions_triton(x, k, source=src)
        assert torch.equal(got, torch.gather(src, 1, pick(x, k))), ("source", b, n, k)
        # the same ordering far from 1: large and tiny magnitudes
        for scale in (1e3, 1e-3):
            got = top_k_positions_triton(x * scale, k)
            assert torch.equal(got, pick(x * scale, k)), ("scale", scale, b, n, k)
        # ties: every score equal -> the first k positions
        got = top_k_positions_triton(torch.zeros(b, n, device=device), k)
        assert torch.equal(got.cpu(), torch.arange(k).expand(b, k)), ("ties", b, n, k)
        # -inf (a token no row may see): finite scores first, then the earliest -inf ones
        y = torch.full((b, n), float("-inf"))
        finite = torch.rand(b, n, generator=gen) < 0.3
        y[finite] = torch.randn(int(finite.sum()), generator=gen)
        got = top_k_positions_triton(y.to(device), k).cpu()
        for row in range(b):
            fin = finite[row].nonzero().squeeze(1)
            if fin.numel() >= k:
                want = pick(y[row : row + 1], k)[0]
            else:  # every finite one, then the earliest -inf positions
                rest = (~finite[row]).nonzero().squeeze(1)[: k - fin.numel()]
                want = torch.cat((fin, rest)).sort().values
            assert torch.equal(got[row], want), ("-inf", row, b, n, k)


GRID = [(1, 131072, 4096), (3, 32768 + 5, 1024), (2, 9000, 8999), (4, 4096, 1), (1, 600, 256)]


test_select_matches_topk_on_gpu, test_select_matches_topk_in_interpreter = kernel_tests(
    __name__,
    "_check",
    GRID,
    # rows up to ONE_PROGRAM scores take one program each, longer ones the chunked passes
    [(1, 9000, 300), (2, 5000, 4999), (3, 4096 + 3, 1), (2, 300, 150), (1, 4096, 1000)],
)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_select_rejects_bad_k():
    from commvq.kernels.select import top_k_positions_triton

    device = "cuda" if HAS_CUDA else "cpu"
    with pytest.raises(ValueError, match="k=0"):
        top_k_positions_triton(torch.zeros(1, 4, device=device), 0)
    with pytest.raises(ValueError, match="source"):
        top_k_positions_triton(torch.zeros(1, 4, device=device), 2, source=torch.zeros(1, 3))
