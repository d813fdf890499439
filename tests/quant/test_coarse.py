"""The coarse-to-fine decode's math: the stored bound never falls short, the picks are the best
ranked, and the mass bound covers the mass the exact softmax gives the dropped tokens."""

import math

import pytest
import torch

from commvq.quant import coarse, residual


def test_tail_byte_rounds_up_by_at_most_one_step():
    d = torch.cat((torch.rand(10_000), torch.rand(1000) * 1e-3, torch.tensor([0.0, 1.0, 2.5])))
    v = coarse.tail_value(coarse.tail_code(d))
    assert (v >= d * (1 + coarse.TAIL_SLACK)).all()
    big = d > 2.0**-13
    step = 2 ** (1 / coarse.TAIL_STEPS)
    assert (v[big] <= d[big] * (1 + coarse.TAIL_SLACK) * step * (1 + 1e-6)).all()
    codes = coarse.tail_code(d.sort().values)
    assert (codes[1:].int() >= codes[:-1].int()).all() and codes.dtype == torch.uint8


def test_tail_norm_is_what_the_later_stages_add():
    g = torch.Generator().manual_seed(1)
    thetas = torch.randn(2, 5, 16, 4, generator=g)
    codes = torch.randint(0, 64, (2, 30, 5), generator=g)
    full = residual.decode(codes, thetas)
    first = residual.decode(codes[..., :2], thetas[:, :2])
    got = coarse.tail_norms(codes, thetas, 2)
    assert torch.allclose(got, (full - first).norm(dim=-1), atol=1e-5)
    assert (coarse.tail_norms(codes, thetas, 5) == 0).all()


def test_budget_and_settings():
    s = coarse.CoarseSettings(stages=3, keep=0.1, min_tokens=16)
    assert s.budget(1000) == 100 and s.budget(50) == 16 and s.budget(10) == 10
    for bad in (
        dict(stages=0),
        dict(keep=0.0),
        dict(keep=1.5),
        dict(min_tokens=0),
        dict(margin=-1.0),
        dict(margin=math.nan),
        dict(fill="mean"),
    ):
        with pytest.raises(ValueError, match="coarse"):
            coarse.CoarseSettings(**bad)


def test_pairs_setting_and_the_pairs_it_picks():
    for bad in (dict(pairs=0.3), dict(pairs=0.0), dict(pairs=1.5), dict(pairs=0.5, margin=5.0)):
        with pytest.raises(ValueError, match="coarse pairs"):
            coarse.CoarseSettings(**bad)
    assert coarse.CoarseSettings(pairs=0.25).pairs == 0.25
    thetas = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    thetas[:, 0, :, 5] += 1.0  # loud in stage 0
    thetas[:, 1, :, 2] += 2.0  # louder, in stage 1
    thetas[:, 2, :, 7] += 5.0  # loudest, but in stage 2
    assert coarse.coarse_pairs(thetas, 2, 0.25).tolist() == [2, 5]
    assert coarse.coarse_pairs(thetas, 1, 0.125).tolist() == [5]
    assert coarse.coarse_pairs(thetas, 3, 0.125).tolist() == [7]
    assert coarse.coarse_pairs(thetas, 1, 1.0).tolist() == list(range(8))


def test_pick_takes_the_best_in_order_and_take_gathers_them():
    scores = torch.randn(3, 50)
    idx = coarse.pick(scores, 7)
    assert idx.shape == (3, 7) and (idx[:, 1:] > idx[:, :-1]).all()
    for b in range(3):
        assert set(idx[b].tolist()) == set(scores[b].topk(7).indices.tolist())
    assert torch.equal(coarse.pick(scores, 50), torch.arange(50).expand(3, -1))
    block = torch.randn(3, 50, 4, 2)
    got = coarse.take_rows(block, idx)
    assert torch.equal(got, torch.stack([block[b, idx[b]] for b in range(3)]))
    x = torch.randn(1, 5, 2, 50)  # a batch-1 mask broadcast over three sequences
    cols = coarse.take_cols(x, idx)
    assert torch.equal(cols, torch.stack([x[0][..., idx[b]] for b in range(3)]))


def test_rank_is_each_tokens_best_chance_over_rows():
    c = torch.tensor([[[[0.0, 5.0, 1.0]], [[3.0, 0.0, 0.0]]]])  # [1, 2, 1, 3]
    best = c.amax(-1, keepdim=True)
    assert torch.equal(coarse.rank(c, best), torch.tensor([[0.0, 0.0, -3.0]]))


def test_mass_bound_covers_the_exact_softmax_mass_of_dropped_tokens():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        exact = torch.randn(2, 3, 1, 200, generator=g) * 4
        width = torch.rand(2, 3, 1, 200, generator=g) * 2
        c = exact + (torch.rand(exact.shape, generator=g) * 2 - 1) * width  # within the bound
        others = torch.randn(2, 3, 1, 10, generator=g) * 4
        upper, best_lower = coarse.bounds(c, width, others.amax(-1, keepdim=True))
        dropped = torch.rand(exact.shape, generator=g) < 0.7
        p = torch.softmax(torch.cat((exact, others), -1), -1)[..., :200]
        actual = torch.where(dropped, p, 0.0).sum(-1)
        bound = coarse.dropped_mass_bound(upper, best_lower, dropped)
        assert (actual <= bound + 1e-6).all()
        assert (upper >= exact - 1e-6).all() and (
            best_lower <= torch.cat((exact, others), -1).amax(-1, keepdim=True) + 1e-6
        ).all()


def test_fill_terms_are_the_dropped_tokens_share_and_spread():
    c = torch.tensor([[[[2.0, 0.5, -1.0, 1.0]]]])
    dropped = torch.tensor([False, True, True, False])
    logit, w = coarse.fill_terms(c, dropped)
    assert torch.allclose(logit, torch.logsumexp(torch.tensor([0.5, -1.0]), 0).reshape(1, 1, 1, 1))
    assert torch.allclose(
        w[0, 0, 0], torch.tensor([0.0, *torch.softmax(torch.tensor([0.5, -1.0]), 0), 0.0])
    )
    # nothing dropped: no share (its logit -inf) and no spread (not NaN)
    logit, w = coarse.fill_terms(c, torch.zeros(4, dtype=torch.bool))
    assert logit.item() == float("-inf") and torch.equal(w, torch.zeros_like(c))
