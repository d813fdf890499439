"""Helpers of the cache parts: grouped-query products and tables memoized on their parameters."""

import torch

from commvq.codecs import cache_parts as parts


def test_grouped_equals_repeated_kv_heads():
    gen = torch.Generator().manual_seed(0)
    for b, hkv, g, t, k, m in [(2, 3, 4, 1, 8, 5), (1, 2, 1, 3, 4, 7), (3, 1, 6, 2, 5, 1)]:
        x = torch.randn(b, hkv * g, t, k, generator=gen)
        y = torch.randn(b, hkv, k, m, generator=gen)
        want = x @ y.repeat_interleave(g, dim=1)
        torch.testing.assert_close(parts.grouped(x, y), want)
    # a slice of a wider row (the softmax's window part) works in place
    p = torch.randn(2, 8, 1, 20, generator=gen)
    v = torch.randn(2, 2, 6, 3, generator=gen)
    torch.testing.assert_close(
        parts.grouped(p[..., 14:], v), p[..., 14:] @ v.repeat_interleave(4, dim=1)
    )


def test_memo_rebuilds_only_when_a_source_changes():
    store, builds = {}, []
    w = torch.nn.Parameter(torch.ones(3))

    def build():
        builds.append(1)
        return w.detach() * 2

    first = parts.rebuilt_on_change(store, 0, (w,), build)
    assert parts.rebuilt_on_change(store, 0, (w,), build) is first and len(builds) == 1
    with torch.no_grad():
        w.add_(1.0)  # trained or reloaded in place
    torch.testing.assert_close(
        parts.rebuilt_on_change(store, 0, (w,), build), torch.full((3,), 4.0)
    )
    assert len(builds) == 2
    w2 = torch.nn.Parameter(torch.zeros(3))  # replaced (e.g. moved to another device)
    assert parts.rebuilt_on_change(store, 0, (w2,), lambda: w2.detach() + 1).sum() == 3
    assert (
        parts.rebuilt_on_change(store, 1, (w2,), lambda: w2.detach()).sum() == 0
    )  # one entry per key
