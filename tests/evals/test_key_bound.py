"""The Gaussian rate-distortion bound used to read key-codebook errors."""

import math

import torch

from commvq.evals.keys import gaussian_bound, water_filling


def test_isotropic_closed_form():
    # D(R) of n iid N(0, s2) components at R bits: n * s2 * 2**(-2R/n)
    for n, bits in ((4, 3.0), (64, 60.0), (64, 132.0)):
        got = water_filling(torch.full((n,), 0.5), bits)
        assert math.isclose(got, n * 0.5 * 2 ** (-2 * bits / n), rel_tol=1e-9)


def test_water_filling_limits_and_monotone():
    ev = torch.tensor([4.0, 1.0, 0.25, 0.01, 0.0], dtype=torch.float64)
    assert math.isclose(water_filling(ev, 0.0), float(ev.sum()), rel_tol=1e-12)
    dists = [water_filling(ev, b) for b in (0.5, 1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(dists[:-1], dists[1:], strict=True))
    # at low rate only the largest component gets bits: D = sum - lambda_0 (1 - 2**(-2R))
    assert math.isclose(water_filling(ev, 0.5), float(ev.sum()) - 4.0 * (1 - 2**-1.0), rel_tol=1e-9)


def test_gaussian_bound_matches_sampled_gaussian():
    torch.manual_seed(0)
    d, heads, n = 8, 2, 200_000
    scales = torch.linspace(0.2, 2.0, d)
    mean = torch.linspace(-1, 1, d)
    keys = (torch.randn(n, heads, d) * scales + mean).reshape(n, heads * d)
    want = 2 * water_filling(scales**2, 6.0) / (2 * float((scales**2 + mean**2).sum()))
    assert math.isclose(gaussian_bound(keys, heads, 6.0), want, rel_tol=0.02)
    # and no rate at all leaves the variance (the mean is free)
    zero = gaussian_bound(keys, heads, 0.0)
    assert math.isclose(zero, float((scales**2).sum() / (scales**2 + mean**2).sum()), rel_tol=0.02)
