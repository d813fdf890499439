"""Coarse-to-fine decode through the cache: all stages give the exact scores, the stored bound
holds, a margin beyond any error keeps every token (outputs equal exact mode), and over a real
forward pass the mass bound covers the mass actually dropped."""

import math
from dataclasses import replace

import pytest
import torch

from commvq import rope
from commvq.codecs import cache_parts as parts
from commvq.codecs.key_codebook import KeyCodebook
from commvq.codecs.value_codec import ValueCodec
from commvq.integrations.hf import coarse_step
from commvq.integrations.hf.attention import layer_for_attention
from commvq.integrations.hf.cache import CommVQCache, CommVQLayer
from commvq.integrations.hf.loader import load_model
from commvq.quant.coarse import CoarseSettings


def _parts(h=2, d=16, r=4, e=8, layers=1, stages=2, pairs=1.0):
    torch.manual_seed(0)  # the value codec's own initialization: the same parts every call
    g = torch.Generator().manual_seed(0)
    decay = 0.3 * 0.4 ** torch.arange(r).float()[None, :, None, None]  # later stages add less
    books = [
        KeyCodebook(torch.randn(h, r, 2 * e, d // 2, generator=g) * decay, code_bits=6)
        for _ in range(layers)
    ]
    keys = parts.CommVQKeys(
        books, rope.inv_freq(d, 1e4), rope_scale=0.9, coarse_stages=stages, coarse_pairs=pairs
    )
    codec = ValueCodec(
        layers, h * d, 2, {i: torch.rand(h * d, generator=g) + 0.5 for i in range(layers)}
    )
    return keys, parts.CommVQValues(codec, h)


def _filled(coarse, b=2, h=2, d=16, t=75, window=16, stages=2, scoring="auto"):
    keys, values = _parts(h, d, stages=stages, pairs=1.0 if coarse is None else coarse.pairs)
    keys.scoring = scoring
    layer = CommVQLayer(0, keys, values, window=window, coarse=coarse)
    g = torch.Generator().manual_seed(t)  # the same tokens for every mode
    layer.update(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g))
    layer_for_attention()
    layer.set_positions(None, t)
    layer.flush()
    return layer, keys


@pytest.mark.parametrize("scoring", ["trick", "decode"])
def test_all_stages_give_the_exact_scores_and_the_bound_holds(scoring):
    layer, keys = _filled(None, stages=2, scoring=scoring)
    block = layer.store["k"]
    q = torch.randn(2, 4, 3, 16)
    exact = keys.scores(0, q, block)
    assert torch.allclose(keys.scores(0, q, block, stages=keys.stages), exact)
    c = keys.coarse_scores(0, q, block)
    width = keys.bound_width(block)  # [B, Hkv, N]
    b = q.norm(dim=-1)[..., None] * width.repeat_interleave(2, 1)[:, :, None, :]
    err = (exact - c).abs()
    assert (err <= b).all() and (err > 0).any()
    assert float((err / b).max()) > 0.05  # a bound, not a wild overestimate of every error


def test_a_margin_beyond_any_error_keeps_every_token_and_equals_exact_mode():
    q = torch.randn(2, 4, 1, 16)
    exact_layer, _ = _filled(None)
    want = exact_layer._mixed(q, None, 0.25)
    keep_all = CoarseSettings(stages=2, keep=1.0, margin=1e9, exact_layers=())
    layer, _ = _filled(keep_all)
    log = []
    layer.coarse_log = log
    got = layer._mixed(q, None, 0.25)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert log and log[0]["dropped_share"] == 0 and log[0]["mass_dropped"] == 0


def test_a_small_budget_drops_tokens_within_the_mass_bound():
    layer, _ = _filled(CoarseSettings(stages=1, keep=0.1, min_tokens=4, exact_layers=()), t=140)
    log = []
    layer.coarse_log = log
    q = torch.randn(2, 4, 1, 16) * 3
    out = layer._mixed(q, None, 0.25)
    assert out.shape == (2, 4, 1, 16) and torch.isfinite(out).all()
    (entry,) = log
    layer._mixed(torch.randn(2, 4, 5, 16), None, 0.25)  # a chunk of queries attends exactly
    assert len(log) == 1
    assert entry["tokens"] == 128 and entry["dropped_share"] == pytest.approx(1 - 13 / 128)
    assert 0 < entry["mass_dropped"] <= entry["mass_bound"]
    assert entry["mass_dropped_max"] <= entry["mass_bound_max"]


def test_a_margin_drops_what_the_bound_rules_out():
    """margin 0: a kept token whose upper bound lies below its row's best lower bound gets no
    weight; the rest of the budget keeps its exact scores."""
    layer, _ = _filled(CoarseSettings(stages=1, keep=1.0, margin=0.0, exact_layers=()))
    log = []
    layer.coarse_log = log
    q = torch.randn(2, 4, 1, 16) * 20  # sharp rows: the bound rules many tokens out
    layer._mixed(q, None, 1.0)
    (entry,) = log
    assert entry["dropped_share"] == pytest.approx(entry["bound_prunes_m0"], abs=1e-6)
    assert entry["dropped_share"] > 0 and entry["mass_dropped"] <= entry["mass_bound"] + 1e-6


def test_coarse_needs_keys_that_store_the_bound():
    keys, values = _parts(stages=2)
    with pytest.raises(ValueError, match="coarse_stages=3"):
        CommVQCache(1, keys, values, coarse=CoarseSettings(stages=3))
    with pytest.raises(ValueError, match="between 1 and"):
        _parts(stages=9)
    with pytest.raises(ValueError, match="coarse_pairs=0.5"):
        CommVQCache(1, keys, values, coarse=CoarseSettings(stages=2, pairs=0.5))


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return load_model(str(tiny_models["llama"]), device="cpu").model


def _save_books(tmp_path, model, r=4):
    from commvq import io
    from commvq.spec import ModelSpec

    spec = ModelSpec.from_config(model.config)
    folder = tmp_path / f"codebook_e2e_6bits_{spec.head_dim}group_{r}residuals"
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    for layer in range(spec.num_layers):
        for h in range(spec.num_kv_heads):
            thetas = torch.randn(r, 16, spec.head_dim // 2, generator=g) * 0.3
            io.save_head(io.head_file(folder, layer, h), thetas, torch.ones(r), 1.0)
    layout = io.CodebookLayout(6, spec.head_dim, r, e2e=True)
    io.write_config(folder, layout, "e2e", spec, {"beam": 1})
    return folder


def test_generation_through_a_coarse_cache(tiny, tmp_path):
    """A tiny model generates through the coarse mode; with every token kept and no margin it
    generates what exact mode generates, and with a budget its log shows the bound held."""
    from commvq.integrations.hf.attention import cache_kwargs

    key_dir = _save_books(tmp_path, tiny)
    ids = torch.randint(1, 300, (1, 70), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    exact = CommVQCache.from_pretrained(tiny, key_dir, window=16)
    want = tiny.generate(ids, **kw, **cache_kwargs(tiny, exact))
    every = CoarseSettings(stages=1, keep=1.0, margin=1e9, exact_layers=())
    same = CommVQCache.from_pretrained(tiny, key_dir, window=16, decode="coarse", coarse=every)
    assert torch.equal(tiny.generate(ids, **kw, **cache_kwargs(tiny, same)), want)
    small = CoarseSettings(stages=1, keep=0.25, min_tokens=8, exact_layers=())
    cache = CommVQCache.from_pretrained(tiny, key_dir, window=16, decode="coarse", coarse=small)
    log = []
    cache.record_coarse(log)
    out = tiny.generate(ids, **kw, **cache_kwargs(tiny, cache))
    assert out.shape == want.shape and log
    assert all(e["mass_dropped"] <= e["mass_bound"] + 1e-6 for e in log)
    assert any(e["dropped_share"] > 0 for e in log)
    assert not math.isnan(sum(e["mass_bound"] for e in log))
    with pytest.raises(ValueError, match="decode="):
        CommVQCache.from_pretrained(tiny, key_dir, decode="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_coarse_kernels_in_the_cache_match_the_torch_path(tiny_models):
    """On a GPU: the coarse pass on the Triton kernel, the exact pass over the picked tokens and
    the values over them, as one captured graph per step, against the torch path (every token
    kept, so both pick the same); with a budget, graphs on and off give the same logits."""
    from commvq.integrations.hf import use_commvq
    from commvq.integrations.hf.attention import cache_kwargs

    model = load_model(str(tiny_models["llama"]), model_dtype="float32", device="cuda").model
    use_commvq(model)
    g = torch.Generator().manual_seed(0)
    decay = 0.3 * 0.5 ** torch.arange(4).float()[None, :, None, None]
    books = [
        KeyCodebook((torch.randn(2, 4, 128, 8, generator=g) * decay).cuda(), code_bits=12)
        for _ in range(2)
    ]
    codec = ValueCodec(2, 32, 2, {i: torch.rand(32, generator=g) + 0.5 for i in range(2)}).cuda()
    freqs = model.model.rotary_emb.inv_freq
    ids = torch.randint(1, 300, (2, 90), generator=g).cuda()

    def run(kernels, settings, graphs=True, mix_kernel=False):
        stages = None if settings is None else settings.stages
        pairs = 1.0 if settings is None else settings.pairs
        keys = parts.CommVQKeys(
            books, freqs, 1.0, kernels=kernels, coarse_stages=stages, coarse_pairs=pairs
        )
        values = parts.CommVQValues(codec, 2, kernels, mix_kernel=mix_kernel)
        cache = CommVQCache(2, keys, values, window=16, graphs=graphs, coarse=settings)
        with torch.no_grad():
            model(ids[:, :60], use_cache=True, **cache_kwargs(model, cache))
            steps = [
                model(ids[:, i : i + 1], use_cache=True, **cache_kwargs(model, cache)).logits
                for i in range(60, 90)
            ]
        return torch.cat(steps, 1)

    every = CoarseSettings(stages=2, keep=1.0, margin=1e9, exact_layers=())
    got = {(k, m): run(k, m) for k in ("torch", "triton") for m in (None, every)}

    def diff(a, b):  # the largest difference, and at which step
        d = (got[a] - got[b]).abs().amax(dim=(0, 2))
        return float(d.max()), int(d.argmax())

    report = {
        "torch coarse vs exact": diff(("torch", every), ("torch", None)),
        "triton coarse vs exact": diff(("triton", every), ("triton", None)),
        "coarse torch vs triton": diff(("torch", every), ("triton", every)),
        "exact torch vs triton": diff(("torch", None), ("triton", None)),
    }
    # 30 steps through two flushes (the exact-mode test compares 5 steps at 2e-3): float16
    # codebook rows on the kernels against float32 in torch, accumulated over more steps
    assert all(v[0] < 5e-3 for v in report.values()), report
    budget = CoarseSettings(
        stages=1, keep=0.3, min_tokens=8, exact_layers=(), select="topk", fused=False
    )
    with_graphs, without = run("triton", budget), run("triton", budget, graphs=False)
    assert torch.isfinite(with_graphs).all()
    assert torch.allclose(with_graphs, without, atol=1e-4, rtol=1e-4)
    # the radix select picks what the top-k picks (random ranks do not tie), graphs on
    radix = run("triton", replace(budget, select="radix"))
    assert torch.allclose(radix, with_graphs, atol=1e-4, rtol=1e-4)
    # the fill on the kernels (coarse scores written, values over every token) as in torch
    fill = replace(budget, fill="coarse")
    assert torch.allclose(run("triton", fill), run("torch", fill), atol=5e-3)
    # the cascade (half the pairs, then every pair over the candidates), radix picks: with every
    # token a candidate its second rank is the kernel's pass over every pair, read through the
    # candidates' indices, so it picks what one pass over every pair picks, exactly
    every_pair = replace(budget, select="radix")
    all_cand = replace(every_pair, pairs=0.5, rerank=1000.0)
    assert torch.allclose(run("triton", all_cand), run("triton", every_pair), atol=1e-4)
    # over twice the budget, against torch: the kernels' float16 codebook rows can swap two
    # tokens at the border of either pick (two picks per step, 30 steps), which moves a step's
    # logits by more than the rounding alone; most steps pick the same and match
    cascade = replace(budget, pairs=0.5, rerank=2.0, select="radix")
    far = (run("triton", cascade) - run("torch", cascade)).abs().amax(-1)  # [B, steps]
    assert (far < 5e-3).float().mean() >= 0.8, far
    # the values' mix on its kernel, in a graph, exact and coarse: as torch's product
    for settings in (None, budget):
        mixed = run("triton", settings, mix_kernel=True)
        assert torch.allclose(mixed, run("triton", settings), atol=1e-4), settings
    # the window's scores and the merge on their kernels (the default), in graphs, with and
    # without the cascade, as in torch
    for settings in (budget, cascade):
        fused = run("triton", replace(settings, fused=True))
        assert torch.allclose(fused, run("triton", settings), atol=1e-4), settings


@pytest.mark.parametrize("rerank", [0.0, 2.0])
def test_fused_window_and_merge_attend_as_the_unfused_step(rerank, monkeypatch):
    """``fused=True`` (the window's scores and the softmax merge on their kernels, in torch where
    no GPU is) gives the unfused step's output."""
    pytest.importorskip("triton")
    from commvq.kernels import window

    calls = []
    merge = window.merge
    monkeypatch.setattr(window, "merge", lambda *a: calls.append(1) or merge(*a))
    base = CoarseSettings(stages=1, keep=0.2, min_tokens=8, exact_layers=(), pairs=0.5)
    base = replace(base, rerank=rerank, fused=False)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(5)) * 2
    plain, _ = _filled(base, t=140)
    fused, _ = _filled(replace(base, fused=True), t=140)
    want = plain._mixed(q, None, 0.25)
    assert not calls
    assert torch.allclose(fused._mixed(q, None, 0.25), want, atol=1e-5)
    assert calls  # the fused path ran


def test_fused_is_the_default_and_without_triton_attends_in_torch(monkeypatch):
    """The default settings fuse; where triton is not installed the same step runs on torch's
    kernels (the window module, which imports triton, is not touched) and gives the same output."""
    import importlib.util

    assert CoarseSettings().fused
    settings = CoarseSettings(stages=1, keep=0.2, min_tokens=8, exact_layers=())
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(6))
    layer, _ = _filled(settings, t=140, stages=1)
    want = layer._mixed(q, None, 0.25)
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find(name, *a)
    )
    calls = []
    if find("triton") is not None:
        from commvq.kernels import window

        monkeypatch.setattr(window, "merge", lambda *a: calls.append(1))
    coarse_step.check_keys(layer.keys_part, settings)  # no triton needed
    assert torch.allclose(layer._mixed(q, None, 0.25), want, atol=1e-5)
    assert not calls


def test_exact_layers_attend_exactly():
    layer, _ = _filled(CoarseSettings(stages=1, keep=0.1, min_tokens=4), t=140)  # layer 0
    log = []
    layer.coarse_log = log
    q = torch.randn(2, 4, 1, 16)
    exact_layer, _ = _filled(None, t=140)
    assert torch.equal(layer._mixed(q, None, 0.25), exact_layer._mixed(q, None, 0.25))
    assert not log
    with pytest.raises(ValueError, match="exact_layers"):
        CoarseSettings(exact_layers=(-1,))


def test_the_fast_path_picks_and_attends_as_the_path_with_bounds():
    """Without margin and log the coarse pass ranks tokens without keeping their scores; with a
    margin no bound can fail, the scores are kept: the same picks, the same output."""
    q = torch.randn(2, 4, 1, 16) * 2
    fast, _ = _filled(CoarseSettings(stages=1, keep=0.1, min_tokens=4, exact_layers=()), t=140)
    slow, _ = _filled(
        CoarseSettings(stages=1, keep=0.1, min_tokens=4, margin=1e9, exact_layers=()), t=140
    )
    exact, _ = _filled(None, t=140)
    got, want = fast._mixed(q, None, 0.25), slow._mixed(q, None, 0.25)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, exact._mixed(q, None, 0.25), atol=1e-3)  # tokens were dropped


def test_coarse_over_half_the_pairs_sums_those_pairs_and_picks_alike_on_both_paths():
    """pairs 1/2: the coarse scores ignore the query's other pairs and are the chosen pairs'
    share of the first stages' scores; the fast rank picks as the scored path (a log on), whose
    bound figures are void (the bound does not cover the pairs left out)."""
    from commvq.quant.coarse import coarse_pairs

    s = CoarseSettings(stages=1, keep=0.1, min_tokens=4, exact_layers=(), pairs=0.5)
    fast, keys = _filled(s, t=140, stages=1)
    block = fast.store["k"]
    q = torch.randn(2, 4, 1, 16) * 2
    cols = keys.coarse_columns(0, q.device)
    pairs = coarse_pairs(keys.codebooks[0].thetas, 1, 0.5)
    assert torch.equal(cols, torch.cat((pairs, pairs + 8))) and pairs.numel() == 4
    other = torch.ones(16, dtype=torch.bool)
    other[cols] = False
    part = keys.coarse_scores(0, q, block)
    noisy = q + torch.randn_like(q) * other  # only the pairs left out change
    assert torch.allclose(keys.coarse_scores(0, noisy, block), part, atol=1e-5)
    full = keys.scores(0, q, block, stages=1)
    assert torch.allclose(part + keys.scores(0, q * other, block, stages=1), full, atol=1e-5)
    assert not torch.allclose(part, full, atol=1e-2)
    slow, _ = _filled(s, t=140, stages=1)
    slow.coarse_log = []
    got, want = fast._mixed(q, None, 0.25), slow._mixed(q, None, 0.25)
    assert torch.allclose(got, want, atol=1e-6)
    (entry,) = slow.coarse_log
    assert entry["dropped_share"] > 0 and math.isnan(entry["mass_bound"])
    assert math.isnan(entry["bound_prunes_m0"]) and entry["mass_dropped"] > 0


@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_fill_with_every_stage_gives_the_dropped_tokens_their_exact_weights(keep):
    """With S = R the coarse scores are exact, so the fill's share and its spread over the
    dropped tokens' values are theirs in the exact softmax: the output equals exact mode's,
    whatever the budget; without the fill the dropped tokens are missing."""
    q = torch.randn(2, 4, 1, 16)
    want = _filled(None, stages=4)[0]._mixed(q, None, 0.25)
    settings = CoarseSettings(stages=4, keep=keep, min_tokens=4, exact_layers=(), fill="coarse")
    got = _filled(settings, stages=4)[0]._mixed(q, None, 0.25)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    plain = _filled(replace(settings, fill="none"), stages=4)[0]._mixed(q, None, 0.25)
    assert (plain - want).abs().max() > 1e-3


def test_rerank_picks_the_budget_from_the_first_pass_candidates_by_every_pair():
    """The cascade: the first pass over half the pairs names the best ``rerank x budget``
    candidates, the budget is the best of them ranked over every pair (same stages); the fast
    and the scored paths pick alike."""
    from commvq.quant import coarse as cq

    s = CoarseSettings(stages=1, keep=0.1, min_tokens=4, exact_layers=(), pairs=0.5, rerank=2)
    layer, keys = _filled(s, t=140, stages=1)
    block, n = layer.store["k"], layer.num_compressed
    g = torch.Generator().manual_seed(1)  # fixed: the check that the pick changed is not random
    q, best = torch.randn(2, 4, 1, 16, generator=g) * 2, torch.randn(2, 4, 1, 1, generator=g)
    rank = keys.coarse_rank(0, q, block, best)
    idx, (cand, s2) = coarse_step.choose(layer, q, rank, best, None, scores=True)
    k, m = s.budget(n), s.candidates(n)
    assert m == 2 * k < n and idx.shape == (2, k) and cand.shape == (2, m)
    assert torch.equal(cand, cq.pick(rank, m))
    every = keys.scores(0, q, block, stages=1)  # every pair, the first stage
    assert torch.allclose(s2, cq.take_cols(every, cand), atol=1e-5)
    want = torch.gather(cand, 1, cq.pick(cq.rank(cq.take_cols(every, cand), best), k))
    assert torch.equal(idx, want) and (idx.diff(dim=1) > 0).all()
    assert not torch.equal(idx, cq.pick(rank, k))  # the second pass changed the pick
    slow, _ = _filled(replace(s, margin=math.inf), t=140, stages=1)
    slow.coarse_log = []
    assert torch.allclose(layer._mixed(q, None, 0.25), slow._mixed(q, None, 0.25), atol=1e-6)


def test_rerank_over_every_candidate_picks_as_a_pass_over_every_pair():
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(1)) * 2
    every = CoarseSettings(stages=1, keep=0.1, min_tokens=4, exact_layers=())
    want = _filled(every, t=140, stages=1)[0]._mixed(q, None, 0.25)
    cascade = replace(every, pairs=0.25, rerank=100.0)  # every token a candidate
    assert cascade.candidates(124) == 124
    layer, keys = _filled(cascade, t=140, stages=1)
    assert torch.allclose(layer._mixed(q, None, 0.25), want, atol=1e-6)
    # ... where one pass over the quarter picks otherwise

    best = torch.zeros(2, 4, 1, 1)
    rank = keys.coarse_rank(0, q, layer.store["k"], best)
    k = cascade.budget(124)
    assert not torch.equal(
        coarse_step.choose(layer, q, rank, best, None)[0], rank.topk(k).indices.sort().values
    )


@pytest.mark.parametrize("bad", [dict(rerank=2.0), dict(rerank=0.5, pairs=0.5)])
def test_rerank_needs_a_share_of_the_pairs_and_at_least_the_budget(bad):
    with pytest.raises(ValueError, match="rerank"):
        CoarseSettings(**bad)


def test_without_rerank_the_first_pass_alone_picks(monkeypatch):
    """rerank=0 (the default): one pass, no second ranking of any token."""
    from commvq.quant import coarse as cq

    s = CoarseSettings(stages=1, keep=0.1, min_tokens=4, exact_layers=(), pairs=0.25)
    layer, keys = _filled(s, t=140, stages=1)
    assert s.candidates(124) == s.budget(124) == 13

    def second_pass(*args, **kwargs):
        raise AssertionError("a second pass without rerank")

    exact_at = keys.scores_at

    def scores_at(layer_idx, q, block, index, stages=None):  # exact scores only
        if stages is not None:
            second_pass()
        return exact_at(layer_idx, q, block, index)

    monkeypatch.setattr(keys, "rerank", second_pass)
    monkeypatch.setattr(keys, "scores_at", scores_at)
    q, best = torch.randn(2, 4, 1, 16), torch.zeros(2, 4, 1, 1)
    rank = keys.coarse_rank(0, q, layer.store["k"], best)
    idx, rescored = coarse_step.choose(layer, q, rank, best, None, scores=True)
    assert rescored is None and torch.equal(idx, cq.pick(rank, 13))
    layer._mixed(q, None, 0.25)
