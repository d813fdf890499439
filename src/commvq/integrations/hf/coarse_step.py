"""One decoding step of a cache layer, coarse to fine (:mod:`commvq.quant.coarse` has the math).

Sink and window are scored exactly; every compressed token is scored from its first ``S`` stages
and ranked (with ``rerank``, the best candidates are ranked again over every pair); the ``budget``
best are scored exactly from all their stages and mix their values in one softmax with sink and
window; the rest get no weight. On a GPU without a margin or a log the
coarse pass writes each token's rank directly (no score per query head reaches memory); otherwise
the coarse scores are kept, for the margin's bounds and the log's figures.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from commvq.codecs import cache_parts as parts
from commvq.kernels.reference import kv_head_of
from commvq.quant import coarse as cq


def check_keys(keys: Any, settings: cq.CoarseSettings | None) -> None:
    """A coarse cache needs keys that store the bound of its stages and sum its pairs."""
    if settings is None:
        return
    if getattr(keys, "coarse_stages", None) != settings.stages:
        raise ValueError(
            f"coarse decode over {settings.stages} stages needs keys that store its bound: "
            f"CommVQKeys(coarse_stages={settings.stages})"
        )
    if keys.coarse_pairs != settings.pairs:
        raise ValueError(
            f"coarse decode over {settings.pairs} of the pairs needs keys that sum them: "
            f"CommVQKeys(coarse_pairs={settings.pairs})"
        )


def applies(layer: Any, nc: int, copies: tuple | None, tq: int) -> bool:
    """Whether ``layer``'s step scores its ``nc`` compressed tokens coarse to fine: a decoding step
    (one query token per sequence; a longer step, a chunk of a prefill, attends exactly; so does
    the quantized prefill's own step, ``copies``) of a coarse layer not in ``exact_layers``, with
    more tokens than its budget (or a margin to apply)."""
    settings = layer.coarse
    if settings is None or not nc or copies is not None or tq != 1:
        return False
    if layer.layer_idx in settings.exact_layers:
        return False
    if not hasattr(layer.keys_part, "coarse_scores"):
        raise ValueError(f"coarse decode needs CommVQ keys, not {layer.keys_part.name}")
    return settings.budget(nc) < nc or settings.margin < float("inf")


def pick(
    keys: Any,
    rank: torch.Tensor,
    k: int,
    select: str = "topk",
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``k`` best-ranked of ``rank [B, N]`` in increasing order (:func:`cq.pick`), or
    ``source [B, N]``'s entries there; with ``select="radix"`` and where the keys' decode kernels
    serve, by the radix select kernel (no full top-k, no sort; the source read in the same
    pass)."""
    if select == "radix" and k < rank.shape[1] and parts.use_kernels(keys.kernels, rank, 1, 2):
        from commvq.kernels.select import top_k_positions_triton

        return top_k_positions_triton(rank, k, source=source)
    at = cq.pick(rank, k)
    return at if source is None else torch.gather(source, 1, at)


def choose(
    layer: Any,
    qs: torch.Tensor,
    rank: torch.Tensor,
    others_best: torch.Tensor,
    comp_bias: torch.Tensor | None,
    scores: bool = False,
) -> tuple[torch.Tensor, tuple | None]:
    """The budget ``[B, k]`` (increasing) from the first pass's ``rank [B, N]``; with
    ``rerank``, picked from the best candidates ranked again over every pair, and, if
    ``scores``, those ``(candidates [B, m], their scores [B, Hq, 1, m])`` (else None)."""
    settings, keys = layer.coarse, layer.keys_part
    n = rank.shape[1]
    k, m = settings.budget(n), settings.candidates(n)
    if m <= k:
        return pick(keys, rank, k, settings.select), None
    cand = pick(keys, rank, m, settings.select)
    block, rescored = layer.store["k"], None
    if scores or comp_bias is not None:
        s2 = keys.scores_at(layer.layer_idx, qs, block, cand, keys.coarse_stages)
        if comp_bias is not None:
            s2 = s2 + cq.take_cols(comp_bias, cand)
        second, rescored = cq.rank(s2, others_best), (cand, s2)
    else:  # on the kernel: ranks only, no score written
        second = keys.rerank(layer.layer_idx, qs, block, others_best, cand)
    return pick(keys, second, k, settings.select, source=cand), rescored


def _has_triton() -> bool:
    """Whether the fused window kernels' module can load (it imports triton)."""
    return importlib.util.find_spec("triton") is not None


def _bias(attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """The model's mask of the step's one query row as an additive bias ``[B|1, H|1, 1, total]``
    (0 / -inf for a boolean mask), or None."""
    if attention_mask is None:
        return None
    m = attention_mask[..., -1:, :total]
    return torch.where(m, 0.0, float("-inf")) if m.dtype == torch.bool else m.float()


def attend(
    layer: Any,
    qs: torch.Tensor,
    attention_mask: torch.Tensor | None,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    length: torch.Tensor | None,
) -> torch.Tensor:
    """Attention output ``[B, Hq, 1, D]`` of the scaled query ``qs [B, Hq, 1, D]`` over the layer's
    sink, compressed tokens (coarse to fine) and window (``length``: how many of ``win_k``'s slots
    hold it, as in :meth:`CommVQLayer._mixed`)."""
    settings, keys = layer.coarse, layer.keys_part
    ns, nc, w = layer.num_sink, layer.num_compressed, win_k.shape[2]
    bias = _bias(attention_mask, ns + nc + w)
    fast = settings.margin == float("inf") and layer.coarse_log is None and settings.fill == "none"
    fused = settings.fused and fast and not ns and bias is None
    fused = fused and keys.kernels != "torch" and _has_triton()
    if fused:  # the window's scores and their best in one kernel
        from commvq.kernels import window

        s_win, others_best = window.window_scores(qs, win_k, length)
        s_sink = s_win[..., :0]
    else:
        s_win = parts.grouped(qs, win_k.float().transpose(-1, -2))
        if length is not None:  # the buffers' slots past the window
            s_win = s_win.masked_fill(torch.arange(w, device=qs.device) >= length, float("-inf"))
        s_sink = parts.grouped(qs, layer.sink_k.float().transpose(-1, -2)) if ns else s_win[..., :0]
        if bias is not None:
            s_sink, s_win = s_sink + bias[..., :ns], s_win + bias[..., ns + nc :]
        others_best = torch.cat((s_sink, s_win), -1).amax(-1, keepdim=True)  # [B, Hq, 1, 1]
    comp_bias = None if bias is None else bias[..., ns : ns + nc]
    k = settings.budget(nc)
    block = layer.store["k"]
    if fast:
        rank = keys.coarse_rank(layer.layer_idx, qs, block, others_best)  # [B, N]
        if comp_bias is not None:  # a token no row may see ranks last
            rank = rank + comp_bias.amax(dim=(1, 2))
        idx, c, fails = choose(layer, qs, rank, others_best, comp_bias)[0], None, None
    else:
        c = keys.coarse_scores(layer.layer_idx, qs, block)
        if comp_bias is not None:
            c = c + comp_bias
        idx, rescored = choose(layer, qs, cq.rank(c, others_best), others_best, comp_bias, True)
        if rescored is not None:  # the candidates' coarse scores are those over every pair
            cand, s2 = rescored
            c = c.scatter(-1, cand[:, None, None, :].expand_as(s2), s2)
        width = keys.bound_width(block)  # [B, Hkv, N]
        heads = kv_head_of(qs.shape[1], width.shape[1], qs.device)
        upper, best_lower = cq.bounds(
            c, qs.norm(dim=-1)[..., None] * width[:, heads][:, :, None, :], others_best
        )
        fails = cq.take_cols(upper, idx) < best_lower - settings.margin
    exact = keys.scores_at(layer.layer_idx, qs, block, idx)
    store_v, values = layer.store["v"], layer.values_part
    if fused:  # the softmax over budget and window, and the window's values, in one kernel
        p_exact, out = window.merge(exact, s_win, win_v)
        return out + values.values_at(layer.layer_idx, p_exact, store_v, idx)
    if comp_bias is not None:
        exact = exact + cq.take_cols(comp_bias, idx)
    if fails is not None:
        exact = exact.masked_fill(fails, float("-inf"))
        if layer.coarse_log is not None:
            log_step(layer, qs, (s_sink, c, s_win), comp_bias, idx, fails, upper, best_lower)
    logits = [s_sink, exact, s_win]
    if settings.fill == "coarse":  # the dropped tokens' share, by their coarse scores
        fill_logit, fill_w = cq.fill_terms(c, ~kept_mask(c, idx, fails))
        logits.append(fill_logit)
    p = torch.softmax(torch.cat(logits, -1), -1)
    if bias is not None:  # a row the mask hides entirely (padding) gives NaN: no weight
        p = p.nan_to_num(0.0)
    out = parts.grouped(p[..., ns + k : ns + k + w], win_v.float())
    if ns:
        out = out + parts.grouped(p[..., :ns], layer.sink_v.float())
    if settings.fill == "coarse":
        out = out + values.values(layer.layer_idx, p[..., -1:] * fill_w, store_v)
    return out + values.values_at(layer.layer_idx, p[..., ns : ns + k], store_v, idx)


def kept_mask(c: torch.Tensor, idx: torch.Tensor, fails: torch.Tensor) -> torch.Tensor:
    """The compressed tokens ``[B, Hq, 1, N]`` that get exact weights: picked (``idx [B, k]``)
    and not ruled out by the margin (``fails [B, Hq, 1, k]``)."""
    kept = torch.zeros_like(c, dtype=torch.bool)
    return kept.scatter_(-1, idx[:, None, None, :].expand(*fails.shape), ~fails)


def log_step(layer, qs, pieces, comp_bias, idx, fails, upper, best_lower) -> None:
    """One coarse step's figures in ``layer.coarse_log``: the share of compressed tokens dropped,
    the mass the bound allows them and the mass the exact softmax gives them (an exact pass over
    every token: a diagnostic, not for speed), per query row averaged and largest; the share each
    margin's bound alone would prune; and the mass dropped by the same budget picked from the
    exact scores (an oracle) and per KV head (from the coarse and from the exact scores)."""
    s_sink, c, s_win = pieces
    dropped = ~kept_mask(c, idx, fails)
    exact = layer.keys_part.scores(layer.layer_idx, qs, layer.store["k"])
    if comp_bias is not None:
        exact = exact + comp_bias
    full = torch.cat((s_sink, exact, s_win), -1)
    ns, nc = s_sink.shape[-1], c.shape[-1]
    p = torch.softmax(full, -1)[..., ns : ns + nc]
    lost = torch.where(dropped, p, 0.0).sum(-1)
    bound = cq.dropped_mass_bound(upper, best_lower, dropped)
    entry = {
        "layer": layer.layer_idx,
        "tokens": nc,
        "dropped_share": float((dropped & torch.isfinite(c)).float().mean()),
        "mass_dropped": float(lost.mean()),
        "mass_dropped_max": float(lost.max()),
        "mass_bound": float(bound.mean()),
        "mass_bound_max": float(bound.max()),
    }
    for m in (0.0, 5.0, 10.0):
        entry[f"bound_prunes_m{m:g}"] = float((upper < best_lower - m).float().mean())
    if layer.coarse.pairs < 1:  # the stored bound does not cover the pairs left out
        entry.update({k: float("nan") for k in entry if k.startswith(("mass_bound", "bound_"))})
    k = idx.shape[1]
    oracle = cq.pick(cq.rank(exact, full.amax(-1, keepdim=True)), k)
    entry["mass_dropped_oracle"] = float((p.sum(-1) - cq.take_cols(p, oracle).sum(-1)).mean())
    others_best = torch.cat((s_sink, s_win), -1).amax(-1, keepdim=True)
    for name, x in (("coarse", c), ("oracle", exact)):
        best = torch.maximum(x.amax(-1, keepdim=True), others_best)
        hkv = layer.keys_part.num_heads
        entry[f"mass_dropped_per_head_{name}"] = _per_head_loss(x - best, p, k, hkv)
    layer.coarse_log.append(entry)


def _per_head_loss(rel: torch.Tensor, p: torch.Tensor, k: int, hkv: int) -> float:
    """Mean mass ``p [B, Hq, 1, N]`` outside the ``k`` tokens each KV head would pick by ``rel``
    (the best over its query heads) instead of one pick per sequence."""
    b, hq, tq, n = rel.shape
    if k >= n:
        return 0.0
    best = rel.reshape(b, hkv, hq // hkv * tq, n).amax(2)
    keep = torch.zeros(b, hkv, n, dtype=torch.bool, device=rel.device)
    keep.scatter_(-1, best.topk(k, dim=-1).indices, True)
    keep = keep.repeat_interleave(hq // hkv, 1)[:, :, None]
    return float(torch.where(keep, 0.0, p).sum(-1).mean())
