"""Perplexity and next-token KL against the exact model, each token attending to a compressed
cache: the document is fed in chunks, every method in lockstep with the exact reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


@torch.no_grad()
def ppl_kl(
    model: Any,
    ids: torch.Tensor,
    make_caches: dict[str, Callable[[], Any]],
    chunk: int,
    skip: int,
    pairs: dict[str, str] | None = None,
    prefill: int = 0,
) -> dict[str, dict[str, float]]:
    """Per method: ``nll`` (sum), ``kl`` (sum), ``tokens`` over positions ``>= skip`` of
    ``ids [1, L]``. ``prefill``: feed the first ``prefill`` tokens as one step (a prompt: exact
    attention, then compressed) and score from there on only, so that a long context costs one
    step.

    ``make_caches`` maps a method name to a factory of its cache; the reference is a plain
    ``DynamicCache`` with exact attention. ``pairs`` (method -> another of ``make_caches``): also
    ``kl_pair`` (sum), the method's KL to that other method's next-token distribution.
    """
    pairs = pairs or {}
    from commvq.integrations.hf.attention import cache_kwargs, exact_cache

    caches = {name: make() for name, make in make_caches.items()}
    ref_cache = exact_cache()
    stats = {name: {"nll": 0.0, "kl": 0.0, "tokens": 0} for name in caches}
    length = ids.shape[1]
    skip = max(skip, prefill)
    for start, end in steps(length - 1, chunk, prefill):
        part = ids[:, start:end]
        targets = ids[:, start + 1 : start + 1 + part.shape[1]]
        keep = torch.arange(start, start + part.shape[1], device=ids.device) >= skip
        ref = torch.log_softmax(
            model(part, **cache_kwargs(model, ref_cache), use_cache=True).logits.float(), -1
        )
        logps = {}
        for name, cache in caches.items():
            logp = logps[name] = torch.log_softmax(
                model(part, **cache_kwargs(model, cache), use_cache=True).logits.float(), -1
            )
            nll = -logp.gather(-1, targets[..., None]).squeeze(-1)[0]
            kl = (ref.exp() * (ref - logp)).sum(-1)[0]
            stats[name]["nll"] += float(nll[keep].sum())
            stats[name]["kl"] += float(kl[keep].sum())
            stats[name]["tokens"] += int(keep.sum())
        for name, other in pairs.items():
            kl = (logps[other].exp() * (logps[other] - logps[name])).sum(-1)[0]
            stats[name]["kl_pair"] = stats[name].get("kl_pair", 0.0) + float(kl[keep].sum())
    return stats


def steps(n: int, chunk: int, prefill: int = 0) -> list[tuple[int, int]]:
    """The ``(start, end)`` spans feeding positions ``0..n-1``: ``[0, prefill)`` first when
    ``prefill > 0``, then ``chunk`` at a time."""
    first = min(prefill, n)
    head = [(0, first)] if first else []
    return head + [(s, min(s + chunk, n)) for s in range(first, n, chunk)]
