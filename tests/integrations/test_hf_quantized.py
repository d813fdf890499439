"""transformers' QuantizedCache (optimum-quanto backend) as an evaluation method beside CommVQ."""

import pytest
import torch

from commvq.evals.ppl import ppl_kl
from commvq.integrations.hf import quantized
from commvq.integrations.hf.attention import cache_kwargs, use_commvq
from commvq.integrations.hf.loader import load_model
from commvq.pipeline import evaluate, methods

pytestmark = pytest.mark.skipif(not quantized.has_quanto(), reason="needs optimum-quanto")


@pytest.fixture(scope="module")
def lm(tiny_models):
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    use_commvq(
        loaded.model
    )  # as the evaluation runs it: other caches go through the same attention
    return loaded


def test_held_bytes_counts_packed_data_and_group_parameters():
    from optimum.quanto import MaxOptimizer, qint2, quantize_weight

    t = torch.randn(16, 128)
    scale, shift = MaxOptimizer()(t, qint2, 0, 64)
    q = quantize_weight(t, qint2, 0, scale, shift, 64)
    groups = t.numel() // 64
    assert quantized.held_bytes(q) == t.numel() * 2 // 8 + groups * (
        scale.element_size() + shift.element_size()
    )
    assert quantized.held_bytes(t) == t.numel() * 4


def test_bytes_per_token_match_the_bits_they_report(lm):
    spec = lm.spec
    two = evaluate.bytes_per_token(lm, methods.Method("hf-quanto2"), window=8)
    four = evaluate.bytes_per_token(lm, methods.Method("hf-quanto4"), window=8)
    group = min(64, spec.head_dim)
    overhead = 2 * 32 / group  # a float32 scale and shift per group (the tiny model is float32)
    for r, nbits in ((two, 2), (four, 4)):
        assert r["key_bits"] == pytest.approx(
            nbits + overhead, rel=0.05
        )  # packing may pad a little
        assert r["value_bits"] == pytest.approx(nbits + overhead, rel=0.05)
        assert r["bytes_per_token_layer"] == pytest.approx(
            (r["key_bits"] + r["value_bits"]) * spec.kv_dim / 8
        )
    extra = four["bytes_per_token_layer"] - two["bytes_per_token_layer"]
    assert extra == pytest.approx(
        2 * 2 * spec.kv_dim / 8, rel=0.1
    )  # 2 more bits for keys and for values


def test_more_bits_stay_closer_to_the_exact_model(lm):
    ids = torch.randint(1, 300, (1, 96), generator=torch.Generator().manual_seed(0))
    makers = {
        name: (lambda name=name: methods.Method(name).make_cache(lm.model, 8))
        for name in ("hf-quanto2", "hf-quanto4")
    }
    stats = ppl_kl(lm.model, ids, makers, chunk=16, skip=8)
    kl2, kl4 = (stats[n]["kl"] / stats[n]["tokens"] for n in ("hf-quanto2", "hf-quanto4"))
    assert 0 <= kl4 < kl2


def test_a_missing_backend_is_a_one_line_error(lm, monkeypatch):
    monkeypatch.setattr(quantized, "has_quanto", lambda: False)
    with pytest.raises(ImportError, match="pip install optimum-quanto"):
        methods.Method("hf-quanto2").make_cache(lm.model, 8)
    with pytest.raises(ValueError, match="hf-quanto4"):
        methods.resolve(["hf-quanto3"], workdir=None)


def test_generate_runs_on_the_quantized_cache(lm):
    ids = torch.randint(1, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = methods.Method("hf-quanto4").make_cache(lm.model, 8)
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        do_sample=False,
        **cache_kwargs(lm.model, cache),
    )
    assert out.shape == (2, 46) and torch.equal(out[:, :40], ids)
    assert cache.get_seq_length() == 45  # the last new token is not fed back
