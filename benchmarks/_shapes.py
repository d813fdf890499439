"""Randomly initialized models of real shapes, for speed measurements (weights need not be real)."""

from __future__ import annotations

import torch

SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
}


def byte_tokenizer(texts: list[str], vocab: int = 2000):
    """A small BPE tokenizer trained on ``texts`` in a second (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def random_model(
    shape: str,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    num_layers: int | None = None,
):
    """A LoadedModel of random weights with the shapes of ``shape``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from commvq.data.corpus import CorpusSource, iter_documents
    from commvq.integrations.hf.loader import LoadedModel
    from commvq.spec import ModelSpec

    kw = dict(SHAPES[shape])
    if num_layers is not None:
        kw["num_hidden_layers"] = num_layers
    config = LlamaConfig(**kw, tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    docs = []
    for d in iter_documents(CorpusSource("embedded")):
        docs.append(d)
        if len(docs) == 20:
            break
    return LoadedModel(
        model=model,
        tokenizer=byte_tokenizer(docs),
        spec=ModelSpec.from_config(config),
        name=f"random-{shape}",
    )
