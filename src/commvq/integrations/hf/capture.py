"""Capture the outputs of q_proj / k_proj / v_proj (queries, keys, values before RoPE)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from commvq.integrations.hf.loader import attention_modules

PROJECTIONS = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
Sink = Callable[[str, int, torch.Tensor], None]


@contextlib.contextmanager
def capture_projections(
    model: Any, sink: Sink, kinds: tuple[str, ...] = ("key", "value")
) -> Iterator[None]:
    """Within the block, every forward calls ``sink(kind, layer, output [B, T, width])``.

    Hooks are removed on exit, also after an error.
    """
    handles = []
    try:
        for layer, attn in enumerate(attention_modules(model)):
            for kind in kinds:
                proj = getattr(attn, PROJECTIONS[kind])

                def hook(_mod, _inp, out, kind=kind, layer=layer):
                    sink(kind, layer, out)

                handles.append(proj.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
