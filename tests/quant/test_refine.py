import pytest
import torch

from commvq.quant import e2e, refine, residual
from commvq.quant.beam import beam_encode


def _data(h=2, n=400, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, h * d, generator=g)
    k = torch.randn(n, 3, generator=g) @ basis + 0.2 * torch.randn(n, h * d, generator=g)
    return residual.normalize(k, h)[0].double()


def _design(codes, shape):
    """The decode of ``codes`` as a dense matrix over the flattened thetas of one head."""
    n_par = torch.Size(shape).numel()
    cols = []
    for j in range(n_par):
        unit = torch.zeros(n_par, dtype=torch.float64)
        unit[j] = 1
        cols.append(residual.decode(codes[None], unit.view(shape)[None])[0].reshape(-1))
    return torch.stack(cols, 1)


def test_joint_solve_equals_a_dense_least_squares_fit():
    x = _data(n=150)
    g = torch.Generator().manual_seed(1)
    thetas = torch.randn(2, 3, 8, 4, generator=g, dtype=torch.float64) * 0.3
    codes = residual.encode(x, thetas)
    normal = refine.Normal.zeros(2, 3, 4, 4, x.device)
    for i in range(0, 150, 40):  # gathered in chunks
        normal.add(x[:, i : i + 40], codes[:, i : i + 40], thetas)
    got = refine.solve(normal, thetas, commit_weight=0.0, ridge=0.0)
    for h in range(2):
        a = _design(codes[h], thetas.shape[1:])
        want = torch.linalg.lstsq(a, x[h].reshape(-1, 1), driver="gelsd").solution
        fit_want = (a @ want).view(150, 8)
        fit_got = residual.decode(codes[h : h + 1], got[h : h + 1])[0]
        assert torch.allclose(
            fit_got, fit_want, atol=1e-9
        )  # same fit (entries no code uses may differ)


def test_weighted_solve_equals_a_dense_weighted_least_squares_fit():
    """Each vector's equations scaled by its weight (the squared prescale): the fit that a dense
    least squares over rows times ``sqrt(w)`` gives, gathered in float32 chunks as on a GPU."""
    x = _data(n=150)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(150, generator=g, dtype=torch.float64) * 5 + 0.01
    thetas = torch.randn(2, 3, 8, 4, generator=g, dtype=torch.float64) * 0.3
    codes = residual.encode(x, thetas)
    normal = refine.Normal.zeros(2, 3, 4, 4, x.device)
    for i in range(0, 150, 40):
        normal.add(
            x[:, i : i + 40].float(), codes[:, i : i + 40], thetas.float(), None, w[i : i + 40]
        )
    got = refine.solve(normal, thetas, commit_weight=0.0, ridge=0.0)
    unweighted = refine.Normal.zeros(2, 3, 4, 4, x.device)
    unweighted.add(x, codes, thetas)
    plain = refine.solve(unweighted, thetas, commit_weight=0.0, ridge=0.0)
    sw = w.sqrt().repeat_interleave(8)[:, None]
    for h in range(2):
        a = _design(codes[h], thetas.shape[1:])
        want = torch.linalg.lstsq(a * sw, x[h].reshape(-1, 1) * sw, driver="gelsd").solution
        fit_want = (a @ want).view(150, 8)
        fit_got = residual.decode(codes[h : h + 1], got[h : h + 1])[0]
        assert torch.allclose(fit_got, fit_want, atol=1e-5)  # float32 gathering
        fit_plain = residual.decode(codes[h : h + 1], plain[h : h + 1])[0]
        assert not torch.allclose(fit_plain, fit_want, atol=1e-3)  # the weights matter


def test_split_weights_are_tf32_exact_and_sum_back():
    w = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 100
    hi, lo = refine._split_weights(w)
    assert torch.equal(hi + lo, w)
    bits = hi.view(torch.int32) & ((1 << 13) - 1)  # float32 mantissa bits beyond TF32's 10
    assert int(bits.abs().sum()) == 0
    assert float((lo.abs() / w).max()) < 2**-8


def test_weighted_error_is_the_error_in_the_keys_own_scale():
    """``relative_error`` of unit keys with weights ``s^2`` is the relative MSE of the keys."""
    g = torch.Generator().manual_seed(4)
    k = torch.randn(300, 16, generator=g, dtype=torch.float64) * torch.rand(300, 1, generator=g)
    x, s = residual.normalize(k, 2)
    thetas = torch.randn(2, 2, 8, 4, generator=g) * 0.3
    got = refine.relative_error(x, thetas, 1, chunk=64, weights=s**2)
    k_hat = residual.from_heads(residual.decode(residual.encode(x, thetas), thetas)) * s[:, None]
    want = float(((k - k_hat.double()) ** 2).sum() / (k**2).sum())
    assert abs(got - want) < 1e-5 * want
    assert abs(refine.relative_error(x, thetas, 1, chunk=64) - want) > 1e-3 * want


def test_solve_with_commitment_minimizes_the_e2e_loss_for_fixed_codes_and_targets():
    x = _data()
    g = torch.Generator().manual_seed(2)
    thetas0 = torch.randn(2, 3, 8, 4, generator=g, dtype=torch.float64) * 0.3
    codes = residual.encode(x, thetas0)
    normal = refine.Normal.zeros(2, 3, 4, 4, x.device)
    normal.add(x, codes, thetas0)
    got = refine.solve(normal, thetas0, commit_weight=0.7, ridge=0.0)
    targets = x - (
        torch.cumsum(residual.stage_decodes(codes, thetas0), 0)
        - residual.stage_decodes(codes, thetas0)
    )

    def loss(th):
        stages = residual.stage_decodes(codes, th)
        return ((x - stages.sum(0)) ** 2).sum() + 0.7 / 3 * ((targets - stages) ** 2).sum()

    p = got.clone().requires_grad_(True)
    loss(p).backward()
    used = (
        residual.code_onehot(codes, 4, torch.float64, by_head=True).sum(-1) > 0
    )  # [H, R, 2E] rows in use
    grad_rows = p.grad.view(2, 3, 4, 2, 4).abs().amax((-1, -2))  # per table entry
    assert float(grad_rows[used[..., :4] | used[..., 4:]].max()) < 1e-8
    assert float(loss(got)) < float(loss(thetas0))


@pytest.mark.parametrize("beam", [1, 4])
def test_refinement_never_ends_worse_than_its_start_on_heldout(beam):
    x = _data(n=700, seed=beam)
    thetas0 = e2e.init_kmeans(x[:, :500], 3, 4, torch.Generator().manual_seed(0))
    settings = refine.RefineSettings(rounds=3, beam=beam, chunk=128)
    seen = []
    res = refine.refine(
        x[:, :500], x[:, 500:], thetas0, settings, on_round=lambda log, best: seen.append(log)
    )
    assert [log.round for log in seen] == [1, 2, 3] and len(res.history) == 3
    assert res.best_heldout <= res.init_heldout
    assert res.best_heldout == pytest.approx(refine.relative_error(x[:, 500:], res.thetas, beam))
    if res.best_round == 0:
        assert torch.equal(res.thetas, thetas0)
    # on the training split the solve lowers what the round's codes leave
    codes = beam_encode(x[:, :500], thetas0, beam)
    before = float(((x[:, :500] - residual.decode(codes, thetas0)) ** 2).sum())
    assert seen[0].train == pytest.approx(before / float((x[:, :500] ** 2).sum()))


def test_relaxation_noise_moves_the_solve_is_seeded_and_never_ends_worse():
    """Noise on the solve's targets changes the rounds' codebooks (not the last round's, where it
    has decayed to none), repeats with its seed, and the kept result is never worse than the
    start on the held-out split."""
    x = _data(n=700, seed=2)
    thetas0 = e2e.init_kmeans(x[:, :500], 3, 4, torch.Generator().manual_seed(0))

    def run(noise, seed=0):
        settings = refine.RefineSettings(rounds=3, beam=2, chunk=128, noise=noise, seed=seed)
        return refine.refine(x[:, :500], x[:, 500:], thetas0, settings)

    plain, noisy, again, other = run(0.0), run(1.0), run(1.0), run(1.0, seed=1)
    held = lambda r: [h.heldout for h in r.history]  # noqa: E731
    assert held(noisy) == held(again)
    assert held(noisy) != held(plain) and held(noisy) != held(other)
    assert noisy.best_heldout <= noisy.init_heldout
    with pytest.raises(ValueError, match="noise"):
        refine.RefineSettings(noise=-0.1)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="beam"):
        refine.RefineSettings(beam=0)
    with pytest.raises(ValueError, match="commit_weight"):
        refine.RefineSettings(commit_weight=-1)


def test_revival_restarts_only_little_used_entries_near_the_most_used():
    g = torch.Generator().manual_seed(0)
    thetas = torch.randn(2, 3, 8, 5, generator=g)  # [H, R, 2E, P]: E = 4
    use = torch.tensor([10.0, 0.0, 5.0, 9.0]).expand(2, 3, 4).clone()
    use[1, 2] = torch.tensor([4.0, 4.0, 4.0, 4.0])  # nothing below a tenth of the mean there
    out, n = refine.revive_entries(thetas, use, 0.1, g)
    assert n == 5  # entry 1 of every (head, stage) but the even one
    z, z0 = out.view(2, 3, 4, 2, 5), thetas.view(2, 3, 4, 2, 5)
    keep = torch.ones(2, 3, 4, dtype=torch.bool)
    keep[:, :, 1] = False
    keep[1, 2, 1] = True
    assert torch.equal(z[keep], z0[keep])
    moved = z[0, 0, 1] - z0[0, 0, 0]  # a copy of the most used entry (0), nudged by 1%
    assert 0 < float(moved.norm()) <= 0.0101 * float(z0[0, 0, 0].norm())


def test_refinement_with_revival_keeps_its_best_round():
    x = _data(n=700, seed=3)
    thetas0 = e2e.init_kmeans(x[:, :500], 3, 4, torch.Generator().manual_seed(0))
    held = x[:, 500:]
    res = refine.refine(x[:, :500], held, thetas0, refine.RefineSettings(rounds=3, revive=0.5))
    assert res.best_heldout <= res.init_heldout
    assert refine.relative_error(held, res.thetas, 1) == pytest.approx(res.best_heldout)


def test_step_search_descends_the_sizes_while_the_beam_error_falls():
    x = _data(n=600, seed=4).float()
    before = e2e.init_kmeans(x, 3, 4, torch.Generator().manual_seed(0)).float()
    calls = []

    def counting_encode(xc, thetas, beam):
        calls.append(xc.shape[1])
        return beam_encode(xc, thetas, beam)

    settings = refine.RefineSettings(beam=2, chunk=1024, encode_fn=counting_encode)
    good = refine.refine(x, x, before, refine.RefineSettings(rounds=2, beam=2)).thetas
    g = torch.Generator().manual_seed(5)
    # a step onto fitted tables from near them (the full step must win), and one far off them
    noise = torch.randn(before.shape, generator=g)
    for start, solved in ((good + 0.05 * noise, good), (good, good + 3.0 * noise)):
        calls.clear()
        got, size = refine.search_step(start, solved, x, settings)
        errs = [
            refine.relative_error(x, start + s * (solved - start), 2, settings.chunk)
            for s in refine.STEP_SIZES
        ]
        # the first size whose next one does not lower the error (the last size otherwise)
        stop = next((i for i in range(len(errs) - 1) if not errs[i + 1] < errs[i]), len(errs) - 1)
        assert size == refine.STEP_SIZES[stop]
        assert errs[stop] == min(errs[: stop + 2])  # no size tried is better
        assert len(calls) == min(stop + 2, len(errs))  # one encode of the sample per size tried
        assert torch.allclose(got, start + size * (solved - start))
        if solved is good:
            assert size == 1.0 and len(calls) == 2  # the full step best: two encodes, not four
    assert size < 1.0


def test_sample_rows_spread_over_the_rows():
    assert refine.sample_rows(10, 4).tolist() == [0, 3, 6, 9]
    assert refine.sample_rows(3, 8).tolist() == [0, 1, 2]


def test_step_settings_are_checked():
    with pytest.raises(ValueError, match="step='half'"):
        refine.RefineSettings(step="half")
    with pytest.raises(ValueError, match="search_rows=0"):
        refine.RefineSettings(search_rows=0)
