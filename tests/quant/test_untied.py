"""Untied tables (``a_A + i b_B``): the paper's tied codebook untied decodes and encodes alike, the
encoders stay exact for any untied tables, and the joint solve is the dense least squares."""

import pytest
import torch

from commvq.quant import beam, commutative, refine, residual


def _tied(h=2, r=3, e=8, p=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(h, r, 2 * e, p, generator=gen)


def _untied(h=2, r=3, e=8, p=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.complex(
        torch.randn(h, r, 2 * e, p, generator=gen), torch.randn(h, r, 2 * e, p, generator=gen)
    )


def test_untie_keeps_the_codebook():
    th = _tied()
    u = commutative.untie(th)
    assert commutative.is_untied(u) and not commutative.is_untied(th)
    assert commutative.untie(u) is u
    x = torch.randn(2, 200, 8, generator=torch.Generator().manual_seed(2))
    codes = torch.randint(0, 64, (2, 200, 3), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(residual.decode(codes, th), residual.decode(codes, u), atol=1e-6)
    assert torch.equal(residual.encode(x, th), residual.encode(x, u))
    assert torch.equal(beam.encode(x, th, 4), beam.encode(x, u, 4))
    for r in range(3):
        assert torch.allclose(
            commutative.codewords(th[:, r]), commutative.codewords(u[:, r]), atol=1e-6
        )


def test_untied_search_is_exact():
    """Nearest codeword and the separable distances of untied tables against brute force over
    the materialized codewords (the B table's own norms folded into G)."""
    u = _untied()[:, 0]
    x = torch.randn(2, 300, 8, generator=torch.Generator().manual_seed(4))
    cw = commutative.codewords(u)  # [H, E*E, D]
    d2 = ((x[:, :, None, :] - cw[:, None]) ** 2).sum(-1)
    assert torch.allclose(commutative.squared_distances(x, u), d2, atol=1e-3)
    assert torch.equal(commutative.nearest(x, u), d2.argmin(-1))
    # a b table unlike a: the decode reads it
    a_only = u.clone()
    a_only[:, 8:] = a_only[:, :8]
    assert not torch.allclose(commutative.codewords(u), commutative.codewords(a_only))


def test_untied_beam_keeps_greedy_and_never_loses_to_it():
    u = _untied(seed=5)
    x = torch.randn(2, 150, 8, generator=torch.Generator().manual_seed(6))
    greedy = residual.encode(x, u)
    assert torch.equal(beam.encode(x, u, 1), greedy)

    def err(codes):
        return ((x - residual.decode(codes, u)) ** 2).sum(-1)

    assert bool((err(beam.beam_encode(x, u, 8)) <= err(greedy) + 1e-5).all())


def test_untied_score_tables_give_q_dot_rotated_key():
    from commvq import rope

    u = _untied(h=1, r=2, seed=7)[0]  # [R, 2E, P]
    gen = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 64, (5, 2), generator=gen)
    q = torch.randn(8, generator=gen)
    pos = torch.arange(5) * 7
    cos, sin = rope.cos_sin(rope.inv_freq(8, 1e4), pos)  # [T, D]
    pre = torch.rand(5, generator=gen) + 0.5
    got = commutative.scores_from_codes(q, u, codes, pre, cos[:, :4], sin[:, :4])
    k = residual.decode(codes[None], u[None])[0] * pre[:, None]
    want = rope.apply_rope(k, cos, sin) @ q
    assert torch.allclose(got, want, atol=1e-4)


def test_untied_solve_equals_dense_least_squares():
    """With the codes fixed the untied solve (no commitment, no ridge) reaches the error of the
    dense minimum-norm least squares over all stages' A and B tables."""
    h, r, e, p = 2, 3, 8, 4
    u = commutative.untie(_tied(h, r, e, p))
    x = torch.randn(h, 300, 2 * p, generator=torch.Generator().manual_seed(9))
    codes = residual.encode(x, u)
    normal = refine.Normal.zeros(h, r, e, p, x.device, untied=True)
    normal.add(x, codes, u)
    z = refine.solve(normal, u, commit_weight=0.0, ridge=0.0)
    assert commutative.is_untied(z) and z.shape == u.shape
    for head in range(h):
        phi = torch.zeros(300, r * 2 * e, dtype=torch.complex128)
        rows = torch.arange(300)
        for s in range(r):
            phi[rows, s * 2 * e + codes[head, :, s] // e] += 1
            phi[rows, s * 2 * e + e + codes[head, :, s] % e] += 1j
        xc = torch.complex(x[head, :, :p].double(), x[head, :, p:].double())
        best = torch.linalg.pinv(phi) @ xc
        dense = float((phi @ best - xc).abs().pow(2).sum())
        ours = float((phi @ z[head].reshape(-1, p).to(torch.complex128) - xc).abs().pow(2).sum())
        assert ours == pytest.approx(dense, rel=1e-6)


def test_untied_refinement_never_ends_worse_and_beats_tied_where_tables_differ():
    """Keys made by an untied codebook: untied refinement from the tied start gets below what
    tied refinement reaches, and neither ends worse than the start on the held-out split."""
    gen = torch.Generator().manual_seed(10)
    truth = _untied(h=1, r=2, e=8, p=4, seed=11)
    codes = torch.randint(0, 64, (1, 3000, 2), generator=gen)
    x = residual.decode(codes, truth) + 0.05 * torch.randn(1, 3000, 8, generator=gen)
    train, held = x[:, :2500], x[:, 2500:]
    start = _tied(h=1, r=2, e=8, p=4, seed=12) * 0.5
    settings = refine.RefineSettings(rounds=6, beam=4)
    tied = refine.refine(train, held, start, settings)
    untied = refine.refine(train, held, commutative.untie(start), settings)
    assert untied.init_heldout == pytest.approx(tied.init_heldout, rel=1e-5)
    for res in (tied, untied):
        assert res.best_heldout <= res.init_heldout
    assert untied.best_heldout < 0.9 * tied.best_heldout
    with pytest.raises(ValueError, match="revive"):
        refine.refine(train, held, commutative.untie(start), refine.RefineSettings(revive=0.1))


def _gauge(thetas: torch.Tensor) -> torch.Tensor:
    """Each stage's shift ``c`` in the null direction ``a += c, b += i c`` (codewords unchanged):
    ``(mean a - i mean b) / 2``, ``[H, R, P]``."""
    e = thetas.shape[2] // 2
    return (thetas[:, :, :e].mean(2) - 1j * thetas[:, :, e:].mean(2)) / 2


def test_untied_rounds_keep_the_null_direction_where_it_started():
    """Shifting a stage's A table by ``c`` and its B table by ``i c`` changes no codeword, so no
    equation fixes that shift: the ridge holds it at the start and multiplies any rounding of the
    right-hand sides in that direction by 1/ridge. On keys with a large common offset (like
    SmolLM2's first layer) float32 sums moved the shift by several times the entries' spread in 4
    rounds, and the float32 encoders then work on tables far larger than their codewords' spread;
    float64 sums keep it where it started."""
    from commvq.quant import em

    gen = torch.Generator().manual_seed(0)
    h, n, d = 1, 12000, 16
    x = torch.randn(h, 1, d, generator=gen) * 3 + 0.1 * torch.randn(h, n, d, generator=gen)
    x = (x / x.norm(dim=-1, keepdim=True)).contiguous()
    xt, xv = x[:, :10000].contiguous(), x[:, 10000:].contiguous()
    fitted = em.fit(xt, torch.ones(10000), 3, 16, em.EMSettings(max_iters=8))
    start = commutative.untie(fitted.thetas)
    # whole steps: a searched one could damp the drift and hide what the sums do
    res = refine.refine(xt, xv, start, refine.RefineSettings(rounds=4, step="full"))
    assert res.best_round > 0  # the rounds did move the codebook
    shift = (_gauge(res.thetas) - _gauge(start)).abs()
    spread = (start[:, :, :16] - start[:, :, :16].mean(2, keepdim=True)).abs().mean((2, 3))
    assert float(shift.amax()) < 1e-3 * float(spread.amin()), (shift.amax(), spread)


def _key_like(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Unit-norm vectors of a decaying spectrum in a random basis with one outlier channel (the
    synthetic keys of benchmarks/em_layer.py), ``[1, n, d]``."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.exp(-torch.arange(d) / (d / 6))
    mix = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    k = (torch.randn(n, d, generator=gen) * spectrum) @ mix.T
    k[:, int(torch.randint(0, d, (1,), generator=gen))] *= 8.0
    return residual.normalize(k, 1)[0].contiguous()


def test_searched_steps_stop_the_runaway_of_full_ones():
    """With many stages the solve's full step gives tables that the beam encodes worse than the
    codes they were fitted to; the next solve fits those worse codes, and the error runs away
    round after round (held-out error x10 by round 8 on the synthetic Llama-shape layer of
    docs/benchmarks.md). A searched step (the size the beam encodes best on a training sample)
    keeps lowering it."""
    from commvq.quant import em

    x = _key_like(2600, 64)
    xt, xv = x[:, :2000].contiguous(), x[:, 2000:].contiguous()
    fitted = em.fit(xt, torch.ones(2000), 16, 8, em.EMSettings(max_iters=5))
    start = commutative.untie(fitted.thetas)

    def run(step):
        return refine.refine(xt, xv, start, refine.RefineSettings(rounds=8, beam=4, step=step))

    full, searched = run("full"), run("search")
    assert full.history[-1].heldout > 3 * full.best_heldout  # the fault is there to be stopped
    held = [log.heldout for log in searched.history]
    assert held[-1] <= 1.001 * min(held)  # still at its lowest after the last round
    assert searched.best_heldout < full.best_heldout
    assert {log.step_size for log in searched.history} <= set(refine.STEP_SIZES)
    assert {log.step_size for log in full.history} == {1.0}
