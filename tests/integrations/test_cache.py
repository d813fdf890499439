import pytest
import torch

from commvq import rope
from commvq.codecs import cache_parts as parts
from commvq.codecs.key_codebook import KeyCodebook
from commvq.codecs.value_codec import ValueCodec
from commvq.integrations.hf.attention import layer_for_attention
from commvq.integrations.hf.cache import CommVQCache, CommVQLayer
from commvq.integrations.hf.loader import load_model


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return load_model(str(tiny_models["llama"]), device="cpu").model


def _ids(b=2, t=40, seed=0):
    return torch.randint(1, 300, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window,sink", [(16, 0), (8, 3), (128, 0)])
def test_identity_codec_generates_the_same_tokens(tiny, window, sink):
    ids = _ids()
    ref = tiny.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=50, do_sample=False
    )
    cache = CommVQCache(2, parts.DenseKeys(), parts.DenseValues(), window=window, sink=sink)
    from commvq.integrations.hf import use_commvq

    use_commvq(tiny)
    out = tiny.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=50,
        do_sample=False,
        past_key_values=cache,
    )
    assert torch.equal(ref, out)
    layer = cache.layers[0]
    assert layer.get_seq_length() == 89 and 1 <= layer.num_window <= window
    assert layer.num_sink == min(sink, 89) and layer.num_compressed % window == 0


def test_generate_takes_the_cache_by_either_argument_name(tiny):
    """transformers >= 5.24 takes ``cache=`` (``past_key_values=`` warns it goes away); before, only
    ``past_key_values=``. ``cache_kwargs`` picks what the installed version takes, without a
    warning, and both names give the same tokens where both exist."""
    import inspect
    import warnings

    from commvq.integrations.hf import use_commvq
    from commvq.integrations.hf.attention import cache_kwargs

    use_commvq(tiny)
    ids = _ids(1, 20)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    has_new = "cache" in inspect.signature(tiny.forward).parameters
    picked = cache_kwargs(tiny, CommVQCache.baseline(tiny, "fp16", window=8))
    assert list(picked) == (["cache"] if has_new else ["past_key_values"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = tiny.generate(ids, **kw, **picked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = tiny.generate(ids, **kw, past_key_values=CommVQCache.baseline(tiny, "fp16", window=8))
    assert torch.equal(out, old)
    assert picked[next(iter(picked))].layers[0].get_seq_length() == 31


def test_cache_kwargs_follows_the_forward_signature():
    from commvq.integrations.hf.attention import cache_kwargs

    class New:
        def forward(self, input_ids, cache=None, past_key_values=None):
            pass

    class Old:
        def forward(self, input_ids, past_key_values=None):
            pass

    assert cache_kwargs(New(), 1) == {"cache": 1}
    assert cache_kwargs(Old(), 1) == {"past_key_values": 1}


def test_unequal_lengths_and_masks_across_flushes(tiny):
    """Left-padded batch == each row alone, with flushes every 8 tokens."""
    rows = [_ids(1, 37, seed=1)[0], _ids(1, 22, seed=2)[0]]
    pad = 0
    ids = torch.full((2, 37), pad)
    mask = torch.zeros(2, 37, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 37 - len(r) :] = r
        mask[i, 37 - len(r) :] = 1
    batched = tiny.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=30,
        do_sample=False,
        past_key_values=CommVQCache.baseline(tiny, "fp16", window=8),
        pad_token_id=pad,
    )
    for i, r in enumerate(rows):
        alone = tiny.generate(
            r[None],
            attention_mask=torch.ones(1, len(r), dtype=torch.long),
            max_new_tokens=30,
            do_sample=False,
            past_key_values=CommVQCache.baseline(tiny, "fp16", window=8),
        )
        assert torch.equal(batched[i, 37:], alone[0, len(r) :])


def test_beam_search_reorders_the_cache(tiny):
    ids = _ids(1, 20)
    ref = tiny.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False)
    out = tiny.generate(
        ids,
        max_new_tokens=12,
        num_beams=3,
        do_sample=False,
        past_key_values=CommVQCache.baseline(tiny, "fp16", window=8),
    )
    assert torch.equal(ref, out)


def _commvq_parts(h=2, d=16, r=3, e=8, layers=1, bits=2, untied=False):
    g = torch.Generator().manual_seed(0)

    def thetas():
        th = torch.randn(h, r, 2 * e, d // 2, generator=g) * 0.3
        return torch.complex(th, torch.randn(th.shape, generator=g) * 0.3) if untied else th

    books = [KeyCodebook(thetas(), code_bits=6) for _ in range(layers)]
    keys = parts.CommVQKeys(books, rope.inv_freq(d, 1e4), rope_scale=1.0)
    codec = ValueCodec(
        layers, h * d, bits, {i: torch.rand(h * d, generator=g) + 0.5 for i in range(layers)}
    )
    return keys, parts.CommVQValues(codec, h), books, codec


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
@pytest.mark.parametrize("scoring", ["trick", "decode"])
def test_attention_over_codes_matches_attention_over_decoded_keys_and_values(scoring, untied):
    torch.manual_seed(0)
    b, h, g, d, t = 2, 2, 2, 16, 45
    keys, values, books, codec = _commvq_parts(h, d, untied=untied)
    keys.scoring = scoring
    layer = CommVQLayer(0, keys, values, window=16)
    k_pre = torch.randn(b, h, t, d)
    v = torch.randn(b, h, t, d)
    pos = torch.arange(t)[None].expand(b, -1)
    cos, sin = keys.angles(pos)
    k_rot = rope.apply_rope(k_pre, cos[:, None], sin[:, None])
    layer.update(k_rot, v)
    layer_for_attention()
    layer.set_positions(pos, t)
    layer.flush()  # 32 tokens to codes, 13 stay exact
    assert layer.num_compressed == 32 and layer.num_window == 13
    q = torch.randn(b, h * g, 1, d)
    got = layer._mixed(q, None, d**-0.5)
    # reference: decode the compressed tokens, rotate, attend densely
    codes, s = books[0].encode(k_pre[:, :, :32].transpose(1, 2).reshape(b * 32, h * d))
    k_hat = books[0].decode(codes, s).reshape(b, 32, h, d).transpose(1, 2)
    k_hat = rope.apply_rope(k_hat, cos[:, None, :32], sin[:, None, :32])
    lc = codec.layers[0].eval()
    v_hat = (
        lc(v[:, :, :32].transpose(1, 2).reshape(b * 32, h * d)).reshape(b, 32, h, d).transpose(1, 2)
    )
    kk = torch.cat((k_hat, k_rot[:, :, 32:]), 2).repeat_interleave(g, 1)
    vv = torch.cat((v_hat, v[:, :, 32:]), 2).repeat_interleave(g, 1)
    want = torch.softmax(q @ kk.transpose(-1, -2) * d**-0.5, -1) @ vv
    assert torch.allclose(got, want, atol=2e-3, rtol=2e-3), float((got - want).abs().max())


def test_nbytes_equals_the_bits_formula():
    b, h, d, t, r = 1, 2, 16, 70, 3
    keys, values, _, _ = _commvq_parts(h, d, r=r)
    layer = CommVQLayer(0, keys, values, window=16)
    k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    layer.update(k, v)
    layer_for_attention()
    layer.set_positions(None, t)
    layer.flush()
    n, w = layer.num_compressed, layer.num_window
    key_bytes = (h * r * 6 + 7) // 8 + 2 + 4  # packed 6-bit codes, fp16 prescale, int32 position
    value_bytes = h * d * 2 // 8 + 2  # packed 2-bit patterns, fp16 factor
    window_bytes = 2 * h * d * 4 + 8  # float32 test tensors + int64 position
    assert layer.nbytes() == n * (key_bytes + value_bytes) + w * window_bytes


def test_unsupported_uses_raise_clear_errors(tiny):
    from commvq.integrations.hf.attention import cache_kwargs

    cache = CommVQCache.baseline(tiny, "fp16", window=8)
    tiny(
        _ids(1, 30), use_cache=True, **cache_kwargs(tiny, cache)
    )  # forward's past_key_values goes in 5.40
    with pytest.raises(NotImplementedError, match="compressed blocks cannot be cropped"):
        cache.crop(-20)
    layer = cache.layers[0]
    layer.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    with pytest.raises(RuntimeError, match="use_commvq"):
        layer.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    with pytest.raises(ValueError, match="kivi2"):
        CommVQCache.baseline(tiny, "kivi3")


def test_step_on_fixed_window_buffers_equals_the_eager_step(tiny):
    """The step a CUDA graph captures (window copied into ``window + 1`` fixed slots, the rest
    masked by a length tensor) gives the eager step's output, whatever the unused slots hold; CPU,
    no graph."""
    from commvq.integrations.hf.attention import cache_kwargs

    cache = CommVQCache(2, parts.DenseKeys(), parts.DenseValues(), window=8, sink=2, graphs=False)
    from commvq.integrations.hf import use_commvq

    use_commvq(tiny)
    ids = _ids(2, 29)
    with torch.no_grad():
        tiny(ids[:, :25], use_cache=True, **cache_kwargs(tiny, cache))
        for i in range(25, 29):
            tiny(ids[:, i : i + 1], use_cache=True, **cache_kwargs(tiny, cache))
    layer = cache.layers[1]
    w = layer.num_window
    assert layer.num_compressed > 0 and layer.num_sink == 2 and 1 <= w <= 8
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 1, 16, generator=g)
    kbuf = torch.randn(*layer.win_k.shape[:2], 9, layer.win_k.shape[3], generator=g) * 100
    vbuf = torch.randn(*layer.win_v.shape[:2], 9, layer.win_v.shape[3], generator=g) * 100
    kbuf[:, :, :w], vbuf[:, :, :w] = layer.win_k, layer.win_v
    want = layer._mixed(q, None, 0.25)
    got = layer._mixed(q, None, 0.25, (kbuf, vbuf, torch.tensor(w)))
    torch.testing.assert_close(got, want)
    # with a padded batch's boolean mask: the fixed mask buffer's slots past the window hold
    # anything
    total = layer.get_seq_length()
    mask = torch.ones(2, 1, 1, total, dtype=torch.bool)
    mask[1, ..., :5] = False
    mask_buf = torch.rand(2, 1, 1, total - w + 9, generator=g) < 0.5
    mask_buf[..., :total] = mask
    torch.testing.assert_close(
        layer._mixed(q, mask_buf, 0.25, (kbuf, vbuf, torch.tensor(w))), layer._mixed(q, mask, 0.25)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_graphs_give_the_eager_tokens(tiny_models):
    """Greedy decoding through flushes (window 8, batch 2) with the steps replayed as CUDA graphs
    gives the eager steps' tokens and logits; graphs are recaptured after each flush."""
    from commvq.integrations.hf import use_commvq

    model = load_model(str(tiny_models["llama"]), model_dtype="float32", device="cuda").model
    use_commvq(model)
    g = torch.Generator().manual_seed(1)
    books = [
        KeyCodebook((torch.randn(2, 4, 128, 8, generator=g) * 0.2).cuda(), code_bits=12)
        for _ in range(2)
    ]
    codec = ValueCodec(2, 32, 2, {i: torch.rand(32, generator=g) + 0.5 for i in range(2)}).cuda()
    freqs = model.model.rotary_emb.inv_freq
    ids = _ids(2, 30, seed=7).cuda()
    padded = torch.ones_like(ids)
    padded[1, :5] = 0  # the second row left-padded: a boolean mask reaches the attention
    for mask in (None, padded):
        runs = []
        for graphs in (False, True):
            cache = CommVQCache(
                2,
                parts.CommVQKeys(books, freqs, 1.0),
                parts.CommVQValues(codec, 2),
                window=8,
                graphs=graphs,
            )
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=40,
                do_sample=False,
                past_key_values=cache,
                output_scores=True,
                return_dict_in_generate=True,
            )
            runs.append((out.sequences, torch.stack(out.scores, 1), cache))
        (tokens, scores, _), (g_tokens, g_scores, g_cache) = runs
        layer = g_cache.layers[0]
        assert layer.graph.replays >= 20 and layer.store_version >= 5, (
            mask
        )  # replayed, across flushes
        assert runs[0][2].layers[0].graph is None
        assert torch.equal(tokens, g_tokens), mask
        assert torch.allclose(scores, g_scores, atol=1e-4, rtol=1e-4), mask


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_kernels_in_the_cache_match_the_torch_path(tiny_models):
    from commvq.integrations.hf.attention import cache_kwargs

    model = load_model(str(tiny_models["llama"]), model_dtype="float32", device="cuda").model
    g = torch.Generator().manual_seed(0)
    books = [
        KeyCodebook((torch.randn(2, 4, 128, 8, generator=g) * 0.2).cuda(), code_bits=12)
        for _ in range(2)
    ]
    codec = ValueCodec(2, 32, 2, {i: torch.rand(32, generator=g) + 0.5 for i in range(2)}).cuda()
    freqs = model.model.rotary_emb.inv_freq
    logits = []
    for kernels in ("torch", "triton"):
        keys = parts.CommVQKeys(books, freqs, 1.0, kernels=kernels)
        cache = CommVQCache(2, keys, parts.CommVQValues(codec, 2, kernels), window=16)
        from commvq.integrations.hf import use_commvq

        use_commvq(model)
        ids = _ids(2, 50).cuda()
        with torch.no_grad():
            model(ids, use_cache=True, **cache_kwargs(model, cache))
            steps = [
                model(ids[:, i : i + 1], use_cache=True, **cache_kwargs(model, cache)).logits
                for i in range(5)
            ]
        logits.append(torch.cat(steps, 1))
    assert torch.allclose(logits[0], logits[1], atol=2e-3, rtol=2e-3)
    # a ragged batch: the second prompt left-padded by 9, so positions and the mask differ per row
    ids = _ids(2, 40, seed=3).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    scores = []
    for kernels in ("torch", "triton"):
        keys = parts.CommVQKeys(books, freqs, 1.0, kernels=kernels)
        cache = CommVQCache(2, keys, parts.CommVQValues(codec, 2, kernels), window=16)
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            past_key_values=cache,
            output_scores=True,
            return_dict_in_generate=True,
        )
        assert cache.layers[0].num_compressed > 0
        scores.append(torch.stack(out.scores, 1))
    assert torch.isfinite(scores[1]).all()
    assert torch.allclose(scores[0], scores[1], atol=2e-3, rtol=2e-3)


def test_baselines_take_the_sink_too(tiny):
    """A KIVI cache whose sink covers the whole sequence never quantizes: same tokens as the default
    cache."""
    ids = _ids(1, 30, seed=5)
    ref = tiny.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False
    )
    cache = CommVQCache.baseline(tiny, "kivi1", window=32, sink=64)
    out = tiny.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=10,
        do_sample=False,
        past_key_values=cache,
    )
    assert torch.equal(ref, out) and cache.layers[0].num_compressed == 0
    small = CommVQCache.baseline(tiny, "kivi1", window=32, sink=4)
    tiny.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=40,
        do_sample=False,
        past_key_values=small,
    )
    assert small.layers[0].num_sink == 4 and small.layers[0].num_compressed == 64


def test_the_key_encoder_beam_is_the_codebooks_and_never_worse_than_greedy(tiny, tmp_path):
    from commvq import io
    from commvq.quant.packing import unpack_codes
    from commvq.spec import ModelSpec

    keys, _, books, _ = _commvq_parts(h=2, d=16, r=3)
    k_pre = torch.randn(1, 2, 40, 16)
    pos = torch.arange(40)[None]
    cos, sin = keys.angles(pos)
    k_rot = rope.apply_rope(k_pre, cos[:, None], sin[:, None])
    errs = {}
    for beam in (1, 4):
        part = parts.CommVQKeys([books[0].with_beam(beam)], rope.inv_freq(16, 1e4))
        block = part.compress(0, k_rot, pos)
        codes = unpack_codes(block["codes"].reshape(40, -1), 2 * 3, 6).reshape(40, 2, 3)
        want_codes, _ = books[0].with_beam(beam).encode(k_pre[0].transpose(0, 1).reshape(40, 32))
        assert torch.equal(
            codes.long(), want_codes.long()
        )  # the cache stores what the codebook's encoder gives
        decoded = books[0].decode(codes, block["prescale"][0].float())
        errs[beam] = ((decoded - k_pre[0].transpose(0, 1).reshape(40, 32)) ** 2).sum(-1)
    assert bool((errs[4] <= errs[1] + 1e-3).all()) and float(errs[4].sum()) < float(errs[1].sum())
    # from_pretrained takes the beam a folder's config.json records, or the one it is given
    spec = ModelSpec.from_config(tiny.config)
    g = torch.Generator().manual_seed(1)
    folder = tmp_path / "codebook_e2e_6bits_16group_2residuals"
    folder.mkdir()
    for layer in range(spec.num_layers):
        for h in range(spec.num_kv_heads):
            io.save_head(
                io.head_file(folder, layer, h),
                torch.randn(2, 16, 8, generator=g) * 0.3,
                torch.ones(2),
                1.0,
            )
    io.write_config(folder, io.CodebookLayout(6, 16, 2, e2e=True), "e2e", spec, {"beam": 4})
    assert CommVQCache.from_pretrained(tiny, folder).keys_part.codebooks[0].beam == 4
    assert CommVQCache.from_pretrained(tiny, folder, beam=1).keys_part.codebooks[1].beam == 1


def _caches(tiny, quantize_prefill, sink):
    keys, values, _, _ = _commvq_parts(
        h=2, d=16, r=3, layers=2
    )  # one codec for every cache compared

    def commvq():
        return CommVQCache(2, keys, values, window=8, sink=sink, quantize_prefill=quantize_prefill)

    def baseline(name):
        cache = CommVQCache.baseline(tiny, name, window=8, group=4, sink=sink)
        for layer in cache.layers:
            layer.quantize_prefill = quantize_prefill
        return cache

    return {
        "fp16": lambda: baseline("fp16"),
        "kivi2": lambda: baseline("kivi2"),
        "kivi1": lambda: baseline("kivi1"),
        "commvq": commvq,
    }


@pytest.mark.parametrize("quantize_prefill", [False, True])
@pytest.mark.parametrize("sink", [0, 3])
def test_prompt_positions_never_see_later_tokens(tiny, quantize_prefill, sink):
    from commvq.integrations.hf import use_commvq

    use_commvq(tiny)
    ids = _ids(1, 40, seed=5)
    for p in (9, 21, 33):
        changed = ids.clone()
        changed[0, p] = (changed[0, p] + 7) % 300 + 1
        with torch.no_grad():
            exact = tiny(ids).logits
            for name, make in _caches(tiny, quantize_prefill, sink).items():
                a = tiny(ids, past_key_values=make(), use_cache=True).logits
                b = tiny(changed, past_key_values=make(), use_cache=True).logits
                assert torch.allclose(a[:, :p], b[:, :p], atol=1e-5), (
                    name,
                    p,
                )  # earlier positions unchanged
                assert not torch.allclose(a[:, p:], b[:, p:], atol=1e-5), (
                    name,
                    p,
                )  # the change is seen after it
                if (
                    name == "fp16"
                ):  # the identity codec is the exact model, prefill quantized or not
                    assert torch.allclose(a, exact, atol=1e-4), p


class _Tokens:
    """A tokenizer stand-in: token ids as text."""

    eos_token_id = 0

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(str(int(t)) for t in tokens)


def test_one_exact_prefill_shared_by_every_cache_gives_each_cache_its_own_tokens(tiny):
    """What a prefill through a cache leaves (window, sink, compressed blocks) and the tokens that
    follow equal what ``load_prefill`` of one exact prefill gives, for dense, KIVI and CommVQ
    parts, with blocks compressed and a sink."""
    from commvq.evals import synthetic
    from commvq.integrations.hf import use_commvq

    use_commvq(tiny)
    probe = synthetic.Probe(_ids(1, 45, seed=5)[0].tolist(), "no", 45, 0.5)
    pre = synthetic.exact_prefill(tiny, probe)
    keys, values, _, _ = _commvq_parts(layers=2)
    makers = {
        "fp16": lambda: CommVQCache.baseline(tiny, "fp16", window=8, sink=3),
        "kivi2": lambda: CommVQCache.baseline(tiny, "kivi2", window=32),
        "commvq": lambda: CommVQCache(2, keys, values, window=8, sink=2, graphs=False),
    }
    for name, make in makers.items():
        through = make()
        want = synthetic.answer(tiny, _Tokens(), probe, through, max_new_tokens=12)
        shared = make()
        got = synthetic.answer(tiny, _Tokens(), probe, shared, max_new_tokens=12, prefill=pre)
        assert got == want, name
        assert len(want[1].split()) == 12
        assert shared.layers[1].num_compressed == through.layers[1].num_compressed > 0, name
    with pytest.raises(RuntimeError, match="quantize_prefill"):
        CommVQCache(2, keys, values, window=8, quantize_prefill=True).load_prefill(
            pre.keys, pre.values
        )
