import math

import torch

from commvq.quant import commutative, em


def _data(h=2, n=500, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True), torch.rand(n, generator=g, dtype=torch.float64) + 0.5


def test_schedule():
    assert [em.stage_factor(s) for s in range(0, 21, 4)] == [1, 0.1, 0.01, 1e-3, 1e-4, 1e-5]
    assert em.stage_factor(1) == em.stage_factor(4) == 0.1 and em.stage_factor(5) == 0.01
    assert math.isclose(em.temperature(0, 100, 1e-3, 1e-5), 1e-3)
    assert math.isclose(em.temperature(99, 100, 1e-3, 1e-5), 1e-5)
    assert math.isclose(em.temperature(33, 67, 1e-3, 1e-5), 1e-4)


def test_e_step_statistics_equal_materialized_soft_assignment():
    x, s = _data()
    theta = torch.randn(2, 8, 4, dtype=torch.float64) * 0.3
    tau = 0.05
    stats = em.e_step(x, s, theta, tau, chunk=37)
    d = torch.cdist(x, commutative.codewords(theta))
    gamma = torch.softmax(-d / tau, -1)  # [H, N, 16]
    g4 = gamma.view(2, -1, 4, 4)
    assert torch.allclose(stats.count, g4.sum(1), atol=1e-9)
    assert torch.allclose(stats.sum_a, torch.einsum("hte,htd->hed", g4.sum(-1), x), atol=1e-9)
    assert torch.allclose(stats.sum_b, torch.einsum("hte,htd->hed", g4.sum(-2), x), atol=1e-9)
    hard = commutative.codewords(theta)[torch.arange(2)[:, None], d.argmin(-1)]
    assert torch.allclose(stats.hard_sqerr, (((x - hard) * s[:, None]) ** 2).sum((1, 2)))


def test_m_step_equals_least_squares_reference():
    x, s = _data(h=1, n=300, d=6)
    e, p = 3, 3
    theta0 = torch.randn(1, 2 * e, p, dtype=torch.float64) * 0.3
    tau = 0.1
    got = em.m_step(em.e_step(x, s, theta0, tau), eps=0.0)[0]
    # reference: materialize the soft assignment and the soft means, then solve
    # min_theta sum_k N_k |c_k(theta) - m_k|^2 with torch.linalg.lstsq, pair by pair
    gamma = torch.softmax(-torch.cdist(x, commutative.codewords(theta0))[0] / tau, -1)  # [N, E*E]
    counts = gamma.sum(0)
    means = (gamma.T @ x[0]) / counts[:, None]  # [E*E, D]
    design = torch.zeros(2, e * e, 2 * e, dtype=torch.float64)  # re rows, im rows
    for a in range(e):
        for b in range(e):
            k = a * e + b
            design[0, k, 2 * a], design[0, k, 2 * b + 1] = 1, -1
            design[1, k, 2 * a + 1], design[1, k, 2 * b] = 1, 1
    w = counts.sqrt()[:, None]
    lhs = torch.cat((design[0] * w, design[1] * w))  # [2 E*E, 2E]
    for f in range(p):
        rhs = torch.cat((means[:, f : f + 1] * w, means[:, p + f : p + f + 1] * w))
        want = torch.linalg.lstsq(lhs, rhs).solution[:, 0]
        assert torch.allclose(got[:, f], want, atol=1e-8)


def test_m_step_never_increases_the_soft_objective():
    x, s = _data()
    for seed in range(3):
        torch.manual_seed(seed)
        theta = torch.randn(2, 8, 4, dtype=torch.float64) * 0.3
        stats = em.e_step(x, s, theta, 0.02)
        new = em.m_step(stats, eps=0.0)
        before, after = em.soft_objective(stats, theta), em.soft_objective(stats, new)
        assert torch.all(after <= before + 1e-9)
        for _ in range(3):  # and the new theta is a minimum: perturbations only make it worse
            assert torch.all(
                em.soft_objective(stats, new + 1e-3 * torch.randn_like(new)) >= after - 1e-12
            )


def test_soft_objective_matches_its_definition():
    x, s = _data(h=1, n=80)
    theta = torch.randn(1, 8, 4, dtype=torch.float64) * 0.3
    stats = em.e_step(x, s, theta, 0.05)
    d2 = torch.cdist(x, commutative.codewords(theta)) ** 2
    gamma = torch.softmax(-d2.sqrt() / 0.05, -1)
    assert torch.allclose(em.soft_objective(stats, theta), (gamma * d2).sum((1, 2)))


def test_fit_stage_is_deterministic_and_chunk_independent():
    x, s = _data(n=400)
    runs = []
    for chunk in (50, 400, 1000):
        g = torch.Generator().manual_seed(3)
        runs.append(em.fit_stage(x, s, 4, 0, em.EMSettings(max_iters=6, chunk=chunk), g))
    for r in runs[1:]:
        assert torch.allclose(r.theta, runs[0].theta, atol=1e-10)
        assert torch.allclose(r.mse, runs[0].mse)
    assert torch.all(runs[0].iters >= 1)


def test_fit_stage_beats_its_initialization_and_stopping_rule_holds():
    x, s = _data(n=600)
    res = em.fit_stage(x, s, 4, 0, em.EMSettings(max_iters=30), torch.Generator().manual_seed(0))
    best_possible = (
        (
            x
            - commutative.codewords(res.theta)[
                torch.arange(2)[:, None], commutative.nearest(x, res.theta)
            ]
        )
        * s[:, None]
    ) ** 2
    assert torch.allclose(best_possible.sum((1, 2)) / x[0].numel(), res.mse.double(), rtol=1e-5)
    assert torch.all(res.iters <= 30)


def test_heads_stop_on_their_own_and_keep_their_best_iterate():
    """A head that stops improving leaves the batch; the others go on; each keeps the iterate of its
    lowest hard error (the E-step is recorded to know which heads ran and what they scored). The
    host reads an iteration's error after queuing the next, so a stopping head runs once more,
    and that run counts for nothing."""
    x, s = _data(h=4, n=300)
    seen = []  # (heads, theta, hard error) per call

    def recording(xa, sa, theta, *args, **kw):
        stats = em.e_step(xa, sa, theta, *args, **kw)
        heads = [next(i for i in range(len(x)) if torch.equal(xa[j], x[i])) for j in range(len(xa))]
        seen.append((heads, theta.clone(), stats.hard_sqerr.cpu() / (x.shape[1] * x.shape[2])))
        return stats

    res = em.fit_stage(
        x,
        s,
        4,
        0,
        em.EMSettings(max_iters=40, tol=1.0),
        torch.Generator().manual_seed(0),
        recording,
    )
    assert (
        len(set(res.iters.tolist())) > 1 and int(res.iters.max()) < 40
    )  # heads stopped at different steps
    for i in range(len(x)):
        runs = [
            (theta[heads.index(i)], float(err[heads.index(i)]))
            for heads, theta, err in seen
            if i in heads
        ]
        assert len(runs) - int(res.iters[i]) in ((0,) if res.iters[i] == 40 else (1,))
        runs = runs[: int(res.iters[i])]
        best = min(range(len(runs)), key=lambda k: runs[k][1])
        assert math.isclose(float(res.mse[i]), runs[best][1], rel_tol=1e-6)
        assert torch.equal(res.theta[i], runs[best][0])
        assert runs[-1][1] >= min(
            r[1] for r in runs[:-1]
        )  # it stopped on an iterate that did not improve


def test_more_stages_lower_residual_error():
    x, s = _data(n=300)
    fitted = em.fit(x, s, 4, 4, em.EMSettings(max_iters=10), seed=0)
    assert fitted.thetas.shape == (2, 4, 8, 4)
    assert torch.all(fitted.residual_mse[1:] < fitted.residual_mse[:-1])
