"""Per-layer attention with exact queries and keys and a value tensor of our choice.

Used to train and evaluate value codecs against the frozen model: the layer input comes from one
no-grad forward pass; queries and keys are the module's own projections and RoPE.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from commvq.integrations.hf.loader import decoder_layers


@torch.no_grad()
def layer_inputs(model: Any, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state entering each decoder layer, ``[B, T, hidden]`` per layer."""
    base = model.base_model
    out = base(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    return list(out.hidden_states[: len(decoder_layers(model))])


class LayerAttention:
    """Exact q, k, v of one layer for a batch; ``output(v)`` recomputes attention with another v."""

    @torch.no_grad()
    def __init__(self, model: Any, layer: int, hidden: torch.Tensor) -> None:
        base = model.base_model
        block = decoder_layers(model)[layer]
        self.attn = attn = block.self_attn
        b, t, _ = hidden.shape
        x = block.input_layernorm(hidden)
        d = attn.head_dim
        q = attn.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        self.v = attn.v_proj(x)  # [B, T, H_kv * D]
        pos = torch.arange(t, device=hidden.device)[None].expand(b, -1)
        cos, sin = base.rotary_emb(x, pos)
        modeling = sys.modules[type(attn).__module__]
        self.q, self.k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
        self.head_dim = d
        self.exact = self.output(self.v)

    def output(self, v: torch.Tensor) -> torch.Tensor:
        """Attention-module output ``[B, T, hidden]`` (after o_proj) with values ``v [B, T, F]``."""
        b, t, _ = v.shape
        vh = v.view(b, t, -1, self.head_dim).transpose(1, 2).to(self.q.dtype)
        o = F.scaled_dot_product_attention(
            self.q, self.k, vh, is_causal=True, enable_gqa=self.q.shape[1] != vh.shape[1]
        )
        return self.attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
