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


def _reference_encode(x, thetas, beam):
    """The beam by its definition, slowly: every kept sequence's ``2E`` candidates (per second
    index ``b``, the two best first indices ``a``, from the whole ``E x E`` table), slot 0 the
    nearest extension of slot 0, the other slots the best of all other candidates."""
    from commvq.quant.commutative import codewords

    h, n, _ = x.shape
    e = thetas.shape[2] // 2
    seqs = [[[((), x[i, j])] for j in range(n)] for i in range(h)]
    for r in range(thetas.shape[1]):
        words = codewords(thetas[:, r])  # [H, E*E, D], code order a*E + b
        for i in range(h):
            for j in range(n):
                cands = []  # (error, slot, code), in the order (slot, b, k)
                for slot, (_, res) in enumerate(seqs[i][j]):
                    err = ((res[None] - words[i]) ** 2).sum(-1).view(e, e)  # [a, b]
                    for b in range(e):
                        order = sorted(range(e), key=lambda a: (float(err[a, b]), a))[:2]
                        cands += [(float(err[a, b]), slot, a * e + b) for a in order]
                first = min(range(min(2, e) * e), key=lambda c: (cands[c][0], c))  # slot 0's
                rest = sorted((c for c in range(len(cands)) if c != first), key=lambda c: cands[c])
                kept = [first] + rest[: min(beam, len(cands)) - 1]
                old = seqs[i][j]
                seqs[i][j] = [
                    (
                        old[cands[c][1]][0] + (cands[c][2],),
                        old[cands[c][1]][1] - words[i, cands[c][2]],
                    )
                    for c in kept
                ]
    out = torch.zeros(h, n, thetas.shape[1], dtype=torch.long)
    for i in range(h):
        for j in range(n):
            best = min(seqs[i][j], key=lambda s: float((s[1] ** 2).sum()))
            out[i, j] = torch.tensor(best[0])
    return out


@pytest.mark.parametrize(("e", "beam"), [(1, 3), (2, 2), (2, 8), (4, 3), (4, 8), (8, 5), (8, 16)])
def test_the_beam_keeps_the_sequences_of_its_definition(e, beam):
    # the fast path looks up the runner-ups of the few (slot, b) pairs that can hold the kept
    # candidates only; it keeps the same sequences as the definition over all candidates
    x, thetas = _case(h=2, n=12, d=8, e=e, r=3, seed=e + beam)
    assert torch.equal(beam_search.beam_encode(x, thetas, beam), _reference_encode(x, thetas, beam))
