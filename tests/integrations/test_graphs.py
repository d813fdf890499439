"""When a layer's decode step is captured, replayed, dropped (no GPU: capture and replay are faked)."""

import types

import torch

from commvq.integrations.hf import graphs


class _FakeGraph:
    def __init__(self, owner):
        self.owner = owner

    def replay(self):
        self.owner.out.copy_(self.owner.q * 2)


def _layer(version=0, window=4, w=2):
    return types.SimpleNamespace(store_version=version, num_sink=0, num_compressed=8, window=window,
                                 num_window=w, layer_idx=0, win_k=torch.zeros(1, 1, w, 2),
                                 win_v=torch.zeros(1, 1, w, 2))


def test_capture_on_the_second_step_and_drop_on_a_new_store(monkeypatch):
    handles = iter(range(100))
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: next(handles))
    pool = graphs.GraphPool()
    g = graphs.DecodeGraph(pool)
    captured = []

    def capture(layer, query, scaling, mask):
        g.q, g.out = torch.empty_like(query), torch.empty_like(query)
        g.k = g.v = torch.zeros(1, 1, layer.window + 1, 2)
        g.length = torch.zeros((), dtype=torch.long)
        if mask is not None:
            g.mask = torch.ones(1, 1, 1, layer.num_compressed + layer.window + 1, dtype=torch.bool)
        g.graph = _FakeGraph(g)
        captured.append(pool.handle())
        pool.live += 1

    monkeypatch.setattr(g, "_capture", capture)
    q = torch.ones(1, 2, 1, 2)
    layer = _layer()
    assert g.run(layer, q, 0.5) is None and not captured  # first step with this store: eager
    out = g.run(layer, q, 0.5)
    assert torch.equal(out, q * 2) and captured == [0] and pool.live == 1 and g.replays == 1
    layer.num_window, layer.win_k, layer.win_v = 3, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)
    assert torch.equal(g.run(layer, q * 3, 0.5), q * 6) and g.length == 3 and len(captured) == 1
    assert g.k[0, 0, :3].eq(1).all()  # the window copied into the fixed slots
    layer.store_version = 1  # a flush replaced the store: dropped, eager once, then captured again
    assert g.run(layer, q, 0.5) is None and pool.live == 0
    assert g.run(layer, q, 0.5) is not None and captured == [0, 1]  # a new pool: the old one died with its graph
    for version in range(2, 6):  # a store replaced every step (beam search) never captures
        layer.store_version = version
        assert g.run(layer, q, 0.5) is None
    assert len(captured) == 2
    # a padded batch's mask: a new graph, the mask's last row copied into the fixed buffer
    mask = torch.ones(1, 1, 1, 8 + layer.num_window, dtype=torch.bool)
    mask[..., :3] = False
    assert g.run(layer, q, 0.5, mask) is None  # first step with a mask
    assert g.run(layer, q, 0.5, mask) is not None and len(captured) == 3
    assert torch.equal(g.mask[..., :11], mask[..., -1:, :11]) and g.mask[..., 11:].all()
    layer.num_window = layer.window + 2  # more than the buffers hold: eager
    assert g.run(layer, q, 0.5) is None
    g.release()
    assert g.graph is None and pool.live == 0
