"""Builders for tiny models and corpora used across the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

WORDS = [
    "the",
    "nation",
    "congress",
    "people",
    "law",
    "war",
    "peace",
    "trade",
    "union",
    "states",
    "treasury",
    "army",
    "navy",
    "commerce",
    "year",
    "report",
    "public",
    "debt",
    "revenue",
    "citizens",
    "government",
    "duty",
    "freedom",
    "labor",
]


def _text(seed: int, n_words: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "."


TEXTS = [_text(i, 60 + 37 * i) for i in range(8)]


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(folder)
    return fast


def tiny_config(arch: str, **overrides):
    import transformers

    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "phi3": transformers.Phi3Config,
    }[arch]
    if arch in ("qwen2", "qwen3"):
        common.setdefault("use_sliding_window", False)
    return cls(**common)


def make_tiny_model(folder: Path, arch: str = "llama", **overrides) -> Path:
    """Save a tiny random model of ``arch`` with a small BPE tokenizer; return the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def check_collected_against_model(lm, key_dir: Path, value_dir: Path, batch: torch.Tensor) -> None:
    """Stored rows of ``batch`` (the run's first batch) equal k_proj / v_proj outputs exactly,
    and the model's own RoPE applied to the stored keys gives the keys in the model's cache."""
    import sys

    from commvq.data.kvstore import KVStore

    keys, values = KVStore(key_dir), KVStore(value_dir)
    b, t = batch.shape
    base = lm.model.base_model
    with torch.inference_mode():
        out = base(input_ids=batch, use_cache=True, output_hidden_states=True)
    modeling = sys.modules[type(base.layers[0].self_attn).__module__]
    cos, sin = base.rotary_emb(out.hidden_states[0], torch.arange(t)[None])
    hd, hkv, width = lm.spec.head_dim, lm.spec.num_kv_heads, lm.spec.kv_dim
    for i, layer in enumerate(base.layers):
        normed = layer.input_layernorm(out.hidden_states[i])
        k = keys.layer(i).read(0, b * t)
        assert torch.equal(k, layer.self_attn.k_proj(normed).reshape(-1, width)), f"layer {i} keys"
        assert torch.equal(
            values.layer(i).read(0, b * t), layer.self_attn.v_proj(normed).reshape(-1, width)
        )
        heads = k.reshape(b, t, hkv, hd).transpose(1, 2)
        rotated, _ = modeling.apply_rotary_pos_emb(heads, heads, cos, sin)
        assert torch.allclose(rotated, out.past_key_values.layers[i].keys, atol=1e-6), (
            f"layer {i} RoPE"
        )


def run_in_triton_interpreter(code: str, timeout: int = 600) -> None:
    """Run ``code`` in a fresh Python with Triton's interpreter on (it must be set before triton is
    imported, hence the subprocess); fail with its stderr if it fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]


def kernel_tests(module: str, check: str, gpu_cases: list, cpu_cases: list, timeout: int = 600):
    """A Triton kernel's two tests, ``module.check(device, cases)``: on a GPU over ``gpu_cases``
    (marked ``gpu``), and in Triton's interpreter on the CPU over the smaller ``cpu_cases``."""
    import importlib
    import importlib.util

    import pytest

    has_triton = importlib.util.find_spec("triton") is not None

    @pytest.mark.gpu
    @pytest.mark.skipif(
        not (torch.cuda.is_available() and has_triton), reason="needs a CUDA GPU and triton"
    )
    def on_gpu():
        getattr(importlib.import_module(module), check)("cuda", gpu_cases)

    @pytest.mark.skipif(not has_triton, reason="needs triton (its interpreter runs on the CPU)")
    def in_interpreter():
        code = f"from {module} import {check}\n{check}('cpu', {cpu_cases!r})\n"
        run_in_triton_interpreter(code, timeout=timeout)

    return on_gpu, in_interpreter
