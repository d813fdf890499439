"""transformers' own quantized KV cache (``QuantizedCache``) as a baseline beside the CommVQ cache,
and the bytes it really holds.

Group-wise integer keys and values (transformers' defaults: groups of 64 values, or of ``head_dim``
when that is smaller, so that any token count divides into groups; a scale and a shift per group)
with the most recent ``window`` tokens kept in full precision, as transformers runs it
(``residual_length``). The evaluation names them ``hf-quanto2`` / ``hf-quanto4``
(:mod:`commvq.pipeline.methods`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch


def has_quanto() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:  # no optimum at all
        return False


def make_cache(model: Any, backend: str, nbits: int, window: int) -> Any:
    """A fresh ``transformers.QuantizedCache`` of ``nbits`` with transformers' ``backend``."""
    if backend == "quanto" and not has_quanto():
        raise ImportError(
            "the quanto backend needs optimum-quanto: pip install optimum-quanto==0.2.7"
        )
    from transformers import QuantizedCache

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return QuantizedCache(
        backend=backend,
        config=cfg,
        nbits=nbits,
        residual_length=window,
        q_group_size=min(64, head_dim),
    )


def held_bytes(t: Any) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (packed data, scales,
    shifts)."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(held_bytes(getattr(t, n)) for n in names)


def quantized_part(layer: Any) -> tuple[int, int, int]:
    """``(key bytes, value bytes, tokens)`` of one layer's quantized (not full-precision) part."""
    keys, values = layer._quantized_keys, layer._quantized_values
    tokens = keys.shape[0] * keys.shape[-2]  # batch x sequence
    return held_bytes(keys), held_bytes(values), tokens
