"""A layer's decode graph on a CPU: when it is captured, replayed and dropped, and that what it
replays (the layer's attention on the fixed buffers it fills) gives the eager step's output. Only
the CUDA recording is stood in for: its replay runs the recorded step again, as a graph does."""

import types

import pytest
import torch

from commvq.codecs import cache_parts as parts
from commvq.integrations.hf import graphs, use_commvq
from commvq.integrations.hf.attention import cache_kwargs
from commvq.integrations.hf.cache import CommVQCache
from commvq.integrations.hf.loader import load_model


@pytest.fixture(scope="module")
def model(tiny_models):
    m = load_model(str(tiny_models["llama"]), model_dtype="float32", device="cpu").model
    use_commvq(m)
    return m


def _feed(model, cache, ids):
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(model, cache))


def _graph(monkeypatch):
    handles = iter(range(100))
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: next(handles))
    g = graphs.DecodeGraph(graphs.GraphPool())
    recorded = []

    def record(step, device):
        g.out = step()
        recorded.append(g.pool.handle())
        return types.SimpleNamespace(replay=lambda: g.out.copy_(step()))

    monkeypatch.setattr(g, "_record", record)
    return g, recorded


def test_replays_give_the_eager_step_and_are_dropped_when_the_store_changes(model, monkeypatch):
    ids = torch.randint(1, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = CommVQCache(2, parts.DenseKeys(), parts.DenseValues(), window=8, sink=2, graphs=False)
    _feed(model, cache, ids[:, :27])
    layer = cache.layers[1]
    assert layer.num_compressed > 0 and layer.num_window <= 4
    g, recorded = _graph(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    assert g.run(layer, q, 0.25) is None and not recorded  # the first step with this store: eager
    for step in range(3):  # captured once, then replayed as the window grows
        q = torch.randn(2, 4, 1, 16, generator=gen)
        torch.testing.assert_close(g.run(layer, q, 0.25), layer._mixed(q, None, 0.25))
        _feed(model, cache, ids[:, 27 + step : 28 + step])
    assert len(recorded) == 1 and g.replays == 3 and g.pool.live == 1
    version = layer.store_version
    _feed(
        model, cache, ids[:, 30:38]
    )  # a flush replaces the store: dropped, eager once, captured again
    assert layer.store_version > version
    assert g.run(layer, q, 0.25) is None and g.pool.live == 0
    torch.testing.assert_close(g.run(layer, q, 0.25), layer._mixed(q, None, 0.25))
    assert recorded == [0, 1]  # a new pool: the old one died with its graph
    for _ in range(3):  # a store replaced every step (beam search) never captures
        layer.store_version += 1
        assert g.run(layer, q, 0.25) is None
    assert len(recorded) == 2
    g.release()
    assert g.graph is None and g.pool.live == 0


def test_a_padded_batch_replays_with_its_mask_and_an_overfull_window_stays_eager(
    model, monkeypatch
):
    ids = torch.randint(1, 100, (2, 30), generator=torch.Generator().manual_seed(2))
    cache = CommVQCache(2, parts.DenseKeys(), parts.DenseValues(), window=8, sink=2, graphs=False)
    _feed(model, cache, ids[:, :27])
    layer = cache.layers[0]
    g, recorded = _graph(monkeypatch)
    total = layer.get_seq_length()
    mask = torch.ones(2, 1, 1, total, dtype=torch.bool)
    mask[1, ..., :5] = False  # the second row left-padded
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    assert g.run(layer, q, 0.25, mask) is None
    torch.testing.assert_close(g.run(layer, q, 0.25, mask), layer._mixed(q, mask, 0.25))
    assert (
        len(recorded) == 1
        and g.mask.shape[-1] == layer.num_sink + layer.num_compressed + layer.window + 1
    )
    monkeypatch.setattr(type(layer), "num_window", property(lambda self: self.window + 2))
    assert g.run(layer, q, 0.25, mask) is None  # more tokens than the buffers hold: eager
