"""Refinement of value codes: the fast forms against a brute-force reference, per-token monotony,
and the local optimum it reaches."""

import pytest
import torch

from commvq.quant import binary
from commvq.quant.value_refine import _Forms, decode_error, refine_codes


def _case(n_tok=64, width=12, quant_bits=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    nbits = width * quant_bits
    codebook = torch.randn(nbits, width, generator=g) / nbits**0.5
    scale = torch.rand(width, generator=g) + 0.2
    v = torch.randn(n_tok, width, generator=g) * torch.linspace(2.0, 0.3, width)
    u, _ = binary.normalize(v, scale)
    idx = torch.randint(0, 4, (n_tok, nbits // 2), generator=g)
    return idx, u, codebook, scale


def test_forms_error_equals_the_direct_error():
    idx, u, codebook, scale = _case()
    bits = binary.bits_from_index(idx).float()
    fast = _Forms(u, codebook, scale).error(bits)
    torch.testing.assert_close(fast, decode_error(bits, u, codebook, scale), rtol=1e-4, atol=1e-5)


def test_best_patterns_equal_a_brute_force_over_each_groups_four_patterns():
    idx, u, codebook, scale = _case(quant_bits=2)
    bits = binary.bits_from_index(idx).float()
    groups = torch.tensor([0, 3, 7])
    got = _Forms(u, codebook, scale).best_patterns(bits, groups)
    for j, g in enumerate(groups.tolist()):
        errs = []
        for k in range(4):
            trial = idx.clone()
            trial[:, g] = k
            errs.append(decode_error(binary.bits_from_index(trial), u, codebook, scale))
        want = torch.stack(errs, -1).argmin(-1)
        assert torch.equal(got[:, j], want)


@pytest.mark.parametrize("colors", [1, 3, 6])
def test_refinement_never_raises_any_tokens_error_and_lowers_the_total(colors):
    idx, u, codebook, scale = _case(n_tok=200)
    before = decode_error(binary.bits_from_index(idx), u, codebook, scale)
    out = refine_codes(idx, u, codebook, scale, sweeps=2, colors=colors)
    after = decode_error(binary.bits_from_index(out), u, codebook, scale)
    assert out.shape == idx.shape and out.dtype == idx.dtype
    assert int(out.min()) >= 0 and int(out.max()) <= 3
    assert bool((after <= before + 1e-6).all())
    assert float(after.sum()) < 0.9 * float(before.sum())  # random codes leave much to gain
    # more sweeps never undo what fewer did, token by token
    more = decode_error(
        binary.bits_from_index(refine_codes(idx, u, codebook, scale, 4, colors)),
        u,
        codebook,
        scale,
    )
    assert bool((more <= after + 1e-6).all())


def test_one_group_at_a_time_ends_where_no_single_group_change_helps():
    idx, u, codebook, scale = _case(n_tok=40)
    n = idx.shape[1]
    out = refine_codes(idx, u, codebook, scale, sweeps=30, colors=n)
    err = decode_error(binary.bits_from_index(out), u, codebook, scale)
    for g in range(n):
        for k in range(4):
            trial = out.clone()
            trial[:, g] = k
            alt = decode_error(binary.bits_from_index(trial), u, codebook, scale)
            assert bool((alt >= err - 1e-5).all())


def test_zero_sweeps_keep_the_codes_and_bad_settings_are_refused():
    idx, u, codebook, scale = _case()
    assert torch.equal(refine_codes(idx, u, codebook, scale, 0), idx)
    with pytest.raises(ValueError, match="sweeps=-1"):
        refine_codes(idx, u, codebook, scale, -1)
    with pytest.raises(ValueError, match="colors=0"):
        refine_codes(idx, u, codebook, scale, 1, colors=0)
