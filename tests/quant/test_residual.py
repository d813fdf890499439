import torch

from commvq.quant import em, residual


def test_residuals_for_bits_matches_reference_settings():
    assert residual.residuals_for_bits(2, 128) == 21 and residual.residuals_for_bits(1, 128) == 11
    assert residual.residuals_for_bits(2, 64) == 11 and residual.residuals_for_bits(1, 64) == 5
    assert residual.residuals_for_bits(1, 128, code_bits=6) == 21


def test_normalize_prescale_round_trip():
    k = torch.randn(20, 3 * 8)
    x, s = residual.normalize(k, 3)
    assert x.shape == (3, 20, 8)
    assert torch.allclose(residual.from_heads(x).norm(dim=-1), torch.ones(20), atol=1e-6)
    assert torch.allclose(residual.from_heads(x) * s[:, None], k, atol=1e-6)


def test_greedy_encode_decode_and_more_stages_lower_error():
    torch.manual_seed(0)
    x, s = residual.normalize(torch.randn(400, 2 * 8), 2)
    fitted = em.fit(
        x, s, num_stages=4, num_entries=4, settings=em.EMSettings(max_iters=8, chunk=128), seed=1
    )
    errs = []
    for r in range(1, 5):
        codes = residual.encode(x, fitted.thetas[:, :r], chunk=97)
        assert codes.shape == (2, 400, r)
        errs.append(((x - residual.decode(codes, fitted.thetas[:, :r])) ** 2).sum())
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False))
    # the encoder reproduces the residual the trainer left
    final = (
        (x - residual.decode(residual.encode(x, fitted.thetas), fitted.thetas)) * s[:, None]
    ) ** 2
    assert torch.allclose(final.sum((1, 2)) / (400 * 8), fitted.residual_mse[-1], rtol=1e-4)


def test_encode_does_not_depend_on_chunk():
    x, _ = residual.normalize(torch.randn(300, 16), 2)
    thetas = torch.randn(2, 3, 8, 4) * 0.2
    assert torch.equal(residual.encode(x, thetas, chunk=11), residual.encode(x, thetas, chunk=1000))


def test_one_hot_stage_decodes_equal_gathers_with_equal_gradients():
    thetas = (torch.randn(2, 3, 8, 4, dtype=torch.float64) * 0.3).requires_grad_()
    codes = torch.randint(0, 16, (2, 30, 3))
    from commvq.quant.commutative import decode

    fast = residual.stage_decodes(codes, thetas)
    slow = torch.stack([decode(thetas[:, r], codes[..., r]) for r in range(3)])
    assert torch.allclose(fast, slow)
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), thetas)[0]
    g_slow = torch.autograd.grad((slow * w).sum(), thetas)[0]
    assert torch.allclose(g_fast, g_slow)
