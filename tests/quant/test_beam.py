import pytest
import torch

from commvq.quant import beam as beam_search
from commvq.quant import residual


def _case(h=2, n=120, d=16, e=8, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, n, d, generator=g, dtype=torch.float64)
    thetas = (
        torch.randn(h, r, 2 * e, d // 2, generator=g, dtype=torch.float64)
        * 0.4
        * 0.6 ** torch.arange(r)[None, :, None, None]
    )
    return x, thetas


def _per_vector_error(x, codes, thetas):
    return ((x - residual.decode(codes, thetas)) ** 2).sum(-1)  # [H, N]


def test_beam_of_width_one_is_greedy():
    x, thetas = _case()
    assert torch.equal(beam_search.beam_encode(x, thetas, 1), residual.encode(x, thetas))
    assert torch.equal(beam_search.encode(x, thetas, 1), residual.encode(x, thetas))


@pytest.mark.parametrize("beam", [2, 3, 4, 8, 16])
def test_a_beam_is_never_worse_than_greedy_on_any_vector(beam):
    x, thetas = _case(seed=beam)
    greedy = _per_vector_error(x, residual.encode(x, thetas), thetas)
    codes = beam_search.beam_encode(x, thetas, beam)
    assert codes.shape == (2, 120, 4) and codes.dtype == torch.long and int(codes.max()) < 64
    got = _per_vector_error(x, codes, thetas)
    assert bool((got <= greedy + 1e-12).all())
    assert float(got.sum()) < float(greedy.sum())  # and it finds better codes for some


def test_wider_beams_leave_less_error_on_these_vectors():
    x, thetas = _case(n=400, seed=5)
    errs = [
        float(_per_vector_error(x, beam_search.beam_encode(x, thetas, b), thetas).sum())
        for b in (1, 2, 4, 8, 16)
    ]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.97 * errs[0]


def test_beam_finds_the_best_sequence_when_it_holds_them_all():
    # 2 stages of 4 codes (E = 2: both first indices are candidates): a beam of 16 keeps every
    # sequence
    x, thetas = _case(h=1, n=40, d=4, e=2, r=2, seed=3)
    got = _per_vector_error(x, beam_search.beam_encode(x, thetas, 16), thetas)
    a, b = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    every = torch.stack((a.flatten(), b.flatten()), -1)  # [16, 2]
    errs = torch.stack([_per_vector_error(x, c.expand(1, 40, 2), thetas) for c in every], -1)
    assert torch.allclose(got, errs.min(-1).values)
    assert float(got.sum()) < float(_per_vector_error(x, residual.encode(x, thetas), thetas).sum())


def test_chunks_and_stage_residuals():
    x, thetas = _case(n=100)
    whole = beam_search.beam_encode(x, thetas, 4, chunk=1000)
    assert torch.equal(beam_search.beam_encode(x, thetas, 4, chunk=7), whole)
    codes = beam_search.beam_encode(x, thetas, 4)
    left = beam_search.stage_residuals(x, codes, thetas)
    assert torch.equal(codes, whole) and left.shape == (4, 2, 100, 16)
    assert torch.allclose(left, x - torch.cumsum(residual.stage_decodes(codes, thetas), 0))
    with pytest.raises(ValueError, match="beam=0"):
        beam_search.beam_encode(x, thetas, 0)
