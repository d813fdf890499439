"""The dense part of a coarse decoding step on its kernels (the window's scores and best; the
softmax merge with the window's values) against the torch reference; on a GPU, or in Triton's
interpreter on a CPU (small shapes)."""

import torch

from tests.helpers import kernel_tests


def _check(device, cases):
    from commvq.kernels import window

    for b, hkv, g, d, w, k, dtype in cases:
        gen = torch.Generator().manual_seed(w + k)
        dt = getattr(torch, dtype)
        qs = torch.randn(b, hkv * g, 1, d, generator=gen).to(device)
        win_k = torch.randn(b, hkv, w, d, generator=gen).to(device, dt)
        win_v = torch.randn(b, hkv, w, d, generator=gen).to(device, dt)
        for length in (None, torch.tensor(w - 3, device=device)):
            got = window.window_scores(qs, win_k, length)
            want = window.window_scores_torch(qs, win_k, length)
            for a, r in zip(got, want, strict=True):
                assert a.shape == r.shape
                assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), ("scores", b, hkv, g, d, w)
            if length is not None:
                assert bool(torch.isinf(got[0][..., w - 3 :]).all())
        s_win = want[0]
        exact = torch.randn(b, hkv * g, 1, k, generator=gen).to(device) * 3
        p, out = window.merge(exact, s_win, win_v)
        p_ref, out_ref = window.merge_torch(exact, s_win, win_v)
        assert torch.allclose(p, p_ref, atol=1e-6, rtol=1e-4), ("weights", b, hkv, g, d, w, k)
        assert torch.allclose(out, out_ref, atol=1e-5, rtol=1e-4), ("window out", b, g, d, w, k)
        # the weights and the window's share sum to one
        share = torch.softmax(torch.cat((exact, s_win), -1), -1)[..., k:].sum(-1)
        assert torch.allclose(p.sum(-1) + share, torch.ones_like(share), atol=1e-5)


GRID = [
    (1, 8, 4, 128, 129, 4096, "bfloat16"),
    (2, 8, 4, 128, 128, 2048, "float32"),
    (3, 3, 3, 64, 97, 5000, "bfloat16"),
    (1, 2, 1, 64, 16, 1, "float32"),
]

test_window_kernels_match_torch_on_gpu, test_window_kernels_match_torch_in_interpreter = (
    kernel_tests(
        __name__,
        "_check",
        GRID,
        [(1, 2, 2, 64, 17, 1500, "bfloat16"), (2, 3, 1, 16, 8, 3, "float32")],
    )
)
