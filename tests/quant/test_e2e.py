import math

import pytest
import torch

from commvq import rope
from commvq.quant import commutative, e2e, residual


def _data(n=600, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, h * d, generator=g)
    k = torch.randn(n, 3, generator=g) @ basis + 0.1 * torch.randn(n, h * d, generator=g)
    return residual.normalize(k, h)


def test_losses_definition():
    x, _ = _data(50)
    thetas = torch.randn(2, 3, 8, 4) * 0.1
    codes = residual.encode(x, thetas)
    recon, commit = e2e.losses(x, thetas, codes, torch.ones(2, 1, 8))
    full = residual.decode(codes, thetas)
    assert torch.allclose(recon, ((x - full) ** 2).sum() / (x**2).sum())
    stages = residual.stage_decodes(codes, thetas)
    want = sum(((x - stages[:r].sum(0) - stages[r]) ** 2).sum() for r in range(3)) / (
        3 * (x**2).sum()
    )
    assert torch.allclose(commit, want)


def test_closed_form_gradient_equals_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 16, generator=g, dtype=torch.float64)
    thetas = torch.randn(3, 4, 16, 8, generator=g, dtype=torch.float64) * 0.3
    w = torch.rand(3, 1, 16, generator=g, dtype=torch.float64) + 0.5
    codes, res = residual.encode_with_residuals(x, thetas)
    assert torch.allclose(res[-1], x - residual.decode(codes, thetas))
    assert torch.allclose(res, x - torch.cumsum(residual.stage_decodes(codes, thetas), 0))
    p = thetas.clone().requires_grad_(True)
    recon, commit = e2e.losses(x, p, codes, w)
    (recon + 0.3 * commit).backward()
    recon2, commit2, grad = e2e.loss_and_grad(x, thetas, codes, res, w, 0.3)
    assert torch.allclose(recon2, recon.detach()) and torch.allclose(commit2, commit.detach())
    assert torch.allclose(grad, p.grad, rtol=1e-10, atol=1e-14)


def test_gradient_steps_keep_the_commutative_structure():
    x, s = _data()
    thetas0 = e2e.init_random(x, 3, 4, torch.Generator().manual_seed(0))
    res = e2e.train(
        x[:, :500], x[:, 500:], thetas0, e2e.E2ESettings(epochs=3, batch_size=64, lr=5e-3)
    )
    th = res.thetas.double()[0]  # head 0, [R, 2E, P]
    codes = residual.encode(x.double()[:1, :20], res.thetas.double()[:1])[0]  # [T, R]
    q = torch.randn(8, dtype=torch.float64)
    pos = torch.randint(0, 50_000, (20,))
    cos, sin = rope.cos_sin(rope.inv_freq(8, 1e4).double(), pos)
    keys = residual.decode(codes[None], th[None])[0] * s[:20, None].double()
    want = rope.apply_rope(keys, cos, sin) @ q
    got = commutative.scores_from_codes(q, th, codes, s[:20].double(), cos[:, :4], sin[:, :4])
    assert torch.allclose(got, want, atol=1e-9)


def test_training_lowers_heldout_error_and_best_epoch_never_worse_than_start():
    x, _ = _data(800)
    thetas0 = e2e.init_kmeans(x[:, :700], 3, 4, torch.Generator().manual_seed(1), subsample=300)
    logs = []
    res = e2e.train(
        x[:, :700],
        x[:, 700:],
        thetas0,
        e2e.E2ESettings(epochs=4, batch_size=32, lr=3e-3),
        on_epoch=lambda entry, best: logs.append((entry, best is not None)),
    )
    assert len(res.history) == 4 and [e.epoch for e, _ in logs] == [1, 2, 3, 4]
    assert res.best_heldout <= res.init_heldout
    assert res.best_heldout < res.init_heldout  # it does learn here
    for entry, _ in logs:
        assert math.isclose(entry.loss, entry.recon + 0.25 * entry.commit, rel_tol=1e-6)
    # a learning rate far too large: the chosen epoch is still never worse than the start
    wild = e2e.train(
        x[:, :700], x[:, 700:], thetas0, e2e.E2ESettings(epochs=2, batch_size=32, lr=5.0)
    )
    assert wild.best_heldout <= wild.init_heldout
    if wild.best_epoch == 0:
        assert torch.equal(wild.thetas, thetas0)


def test_kmeanspp_seeds_are_data_points_and_spread_out():
    x, _ = _data(300)
    g = torch.Generator().manual_seed(0)
    c = e2e.kmeanspp_centers(x, 16, g)
    assert c.shape == (2, 16, 8)
    for h in range(2):
        d = ((c[h][:, None] - x[h][None]) ** 2).sum(-1)
        assert torch.allclose(
            d.min(1).values, torch.zeros(16), atol=1e-6
        )  # every seed is a data point
        assert len(torch.unique(d.argmin(1))) == 16


def test_kmeanspp_puts_one_seed_in_each_far_cluster():
    """D^2 sampling: with k tight clusters far apart, the k seeds land one per cluster."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(2, 5, 8, generator=g) * 100
    label = torch.randint(0, 5, (2, 400), generator=g)
    x = torch.gather(centers, 1, label[..., None].expand(-1, -1, 8)) + 0.01 * torch.randn(
        2, 400, 8, generator=g
    )
    for seed in range(5):
        c = e2e.kmeanspp_centers(x, 5, torch.Generator().manual_seed(seed))
        nearest_cluster = torch.cdist(c, centers).argmin(-1)  # [2, 5]
        for h in range(2):
            assert sorted(nearest_cluster[h].tolist()) == [0, 1, 2, 3, 4], (seed, h)


def test_non_finite_data_stops_with_a_clear_error():
    x, _ = _data(200)
    x[:, :150] = float("nan")
    thetas0 = e2e.init_random(x[:, 150:], 2, 4, torch.Generator().manual_seed(0))
    try:
        e2e.train(x, x[:, 150:], thetas0, e2e.E2ESettings(epochs=2, batch_size=20))
    except FloatingPointError as e:
        assert "non-finite" in str(e) and "lower --lr" in str(e)
    else:
        raise AssertionError("training on NaN data should stop")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_training_equals_eager_training():
    x, _ = _data(700)
    x = x.cuda()
    thetas0 = e2e.init_random(x, 3, 4, torch.Generator().manual_seed(0))
    runs = []
    for graphs in (False, True):
        settings = e2e.E2ESettings(epochs=2, batch_size=64, lr=3e-3, cuda_graphs=graphs)
        runs.append(e2e.train(x[:, :600], x[:, 600:], thetas0, settings, seed=4))
    assert torch.allclose(runs[0].thetas, runs[1].thetas, atol=1e-5)
    assert [round(h.loss, 5) for h in runs[0].history] == [
        round(h.loss, 5) for h in runs[1].history
    ]
