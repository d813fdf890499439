import pytest
import torch

from commvq import rope
from commvq.quant import commutative, residual


def _theta(h=2, e=8, p=4, dtype=torch.float64, scale=0.3):
    return torch.randn(h, 2 * e, p, dtype=dtype) * scale


def test_num_entries():
    assert commutative.num_entries(12) == 64 and commutative.num_entries(6) == 8
    for bad in (5, 0, 18):
        with pytest.raises(ValueError):
            commutative.num_entries(bad)


def test_codewords_follow_complex_definition():
    th = _theta(h=1, e=4, p=3)
    re, im = commutative.split_theta(th[0])
    a = torch.complex(re, im)  # [E, P]
    c = commutative.codewords(th)[0]  # [E*E, D]
    for code in range(16):
        z = a[code // 4] + 1j * a[code % 4]
        assert torch.allclose(c[code], torch.cat((z.real, z.imag)))
    assert torch.equal(commutative.join_theta(re, im), th[0])


def test_separable_distances_equal_cdist():
    th = _theta()
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    want = torch.cdist(x, commutative.codewords(th)) ** 2
    assert torch.allclose(commutative.squared_distances(x, th), want, atol=1e-10)


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_fast_search_equals_brute_force_argmin(chunk):
    th = _theta(h=3, e=16, p=8)
    x = torch.randn(3, 300, 16, dtype=torch.float64) * 0.5
    brute = torch.cdist(x, commutative.codewords(th)).argmin(-1)
    assert torch.equal(commutative.nearest(x, th, chunk), brute)


def test_commutativity_identity_float64_large_positions():
    e, p, r, t = 8, 16, 3, 40
    thetas = torch.randn(r, 2 * e, p, dtype=torch.float64)
    codes = torch.randint(0, e * e, (t, r))
    s = torch.rand(t, dtype=torch.float64) + 0.5
    pos = torch.cat(
        [torch.randint(0, 1000, (t // 2,)), torch.randint(100_000, 2_000_000, (t - t // 2,))]
    )
    freqs = rope.inv_freq(2 * p, 5e5).double()
    cos, sin = rope.cos_sin(freqs, pos)
    q = torch.randn(2 * p, dtype=torch.float64)
    keys = residual.decode(codes[None], thetas[None])[0] * s[:, None]  # [T, D]
    want = rope.apply_rope(keys, cos, sin) @ q
    got = commutative.scores_from_codes(q, thetas, codes, s, cos[:, :p], sin[:, :p])
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_score_table_is_q_dot_rotated_entry():
    th = _theta(h=1, e=4, p=2)[0]
    q = torch.randn(4, dtype=torch.float64)
    u = commutative.score_table(q, th)  # [E, P, 2]
    re, im = commutative.split_theta(th)
    for e in range(4):
        for f in range(2):
            m = torch.tensor([[re[e, f], -im[e, f]], [im[e, f], re[e, f]]])
            assert torch.allclose(u[e, f], torch.stack((q[f], q[f + 2])) @ m)


def test_interleave_pairs_layout():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    assert commutative.interleave_pairs(x).tolist() == [1, 10, 2, 20, 3, 30]
