"""The ``commvq`` attention function, registered with transformers' attention interface.

A :class:`CommVQCache` layer hands its state to this function through a per-thread slot set in
``update`` (the model calls ``cache.update`` right before its attention function); other caches
fall through to transformers' SDPA attention, so a model switched to ``commvq`` still works with
any cache. Registration is an explicit, idempotent call.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

NAME = "commvq"
_slot = threading.local()


def pass_to_attention(layer: Any) -> None:
    """Called by a cache layer's ``update``: the next attention call on this thread is its own."""
    if getattr(_slot, "layer", None) is not None:
        _slot.layer = None
        raise RuntimeError(
            "CommVQCache was updated twice without an attention call: the model does not use the "
            "'commvq' attention; call commvq.integrations.hf.use_commvq(model) first"
        )
    _slot.layer = layer


def layer_for_attention() -> Any:
    """The cache layer handed over by its ``update`` for this attention call (then forgotten), or
    None."""
    layer = getattr(_slot, "layer", None)
    _slot.layer = None
    return layer


def commvq_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a CommVQ cache layer (codes + full-precision window) or, for any other
    cache, transformers' SDPA attention."""
    layer = layer_for_attention()
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(module, query, attention_mask, scaling, kwargs.get("position_ids"))
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def register_commvq_attention() -> None:
    """Register ``commvq`` (attention function and mask builder); safe to call any number of
    times."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, commvq_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_commvq(model: Any) -> Any:
    """Switch ``model`` to the ``commvq`` attention (registering it first); returns the model."""
    register_commvq_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:  # older transformers
        model.config._attn_implementation = NAME
    return model


def exact_cache() -> Any:
    """transformers' own cache (``DynamicCache``): exact keys and values, the reference."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` where the model's forward (and ``generate``) take ``cache``
    (transformers >= 5.24, where ``past_key_values`` warns that it goes away), else
    ``{"past_key_values": cache}``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}
