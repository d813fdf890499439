"""CommVQCache: a transformers ``Cache`` that holds codes, not keys and values.

Per layer: an optional exact "sink" (the first ``sink`` tokens), compressed blocks of ``window``
tokens (key and value parts from ``commvq.codecs.cache_parts``: CommVQ codes, KIVI-style, or
dense for the identity baseline), and a full-precision window of the most recent 1..``window``
tokens, flushed to codes every ``window`` new tokens. Prefill attention is exact unless
``quantize_prefill``. Decode attention scores keys from their codes (the Triton kernel assembles
each key in registers; torch uses the commutative trick or a transient decode) and mixes values from
codes, in one softmax with the window; or coarse to fine (``decode="coarse"``,
:mod:`commvq.integrations.hf.coarse_step`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from commvq import io
from commvq.codecs import cache_parts as parts
from commvq.codecs.value_codec import ValueCodec
from commvq.integrations.hf import coarse_step
from commvq.integrations.hf.attention import pass_to_attention, use_commvq
from commvq.integrations.hf.graphs import DecodeGraph, GraphPool
from commvq.integrations.hf.loader import check_supported
from commvq.quant import coarse as cq
from commvq.spec import ModelSpec

METHODS = ("fp16", "kivi2", "kivi1", "commvq")


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b if a is None else torch.cat((a, b), dim=dim)


class CommVQLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        layer_idx: int,
        keys: parts.KeysPart,
        values: parts.ValuesPart,
        window: int = 128,
        sink: int = 0,
        quantize_prefill: bool = False,
        graphs: GraphPool | None = None,
        coarse: cq.CoarseSettings | None = None,
    ) -> None:
        super().__init__()
        if window < 1 or sink < 0:
            raise ValueError(f"window={window} must be >= 1 and sink={sink} >= 0")
        self.layer_idx, self.keys_part, self.values_part = layer_idx, keys, values
        self.coarse = coarse  # None: exact decode
        self.coarse_log: list[dict] | None = None  # a list: each coarse step's figures go there
        self.window, self.sink, self.quantize_prefill = window, sink, quantize_prefill
        self.win_k = self.win_v = self.win_pos = None  # [B, H, w, D], [B, w]
        self.sink_k = self.sink_v = None
        # compressed tokens, oldest first; the version moves whenever ``store`` is replaced (a
        # captured step reads its tensors)
        self.store: dict[str, dict[str, torch.Tensor]] | None = None
        self.store_version = 0
        self.num_compressed = 0
        self.graph = DecodeGraph(graphs) if graphs is not None else None

    # --- the CacheLayerMixin contract -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, t, _ = key_states.shape
        self.win_k = _cat(self.win_k, key_states, 2)
        self.win_v = _cat(self.win_v, value_states, 2)
        unknown = torch.full((b, t), -1, dtype=torch.long, device=key_states.device)
        self.win_pos = _cat(self.win_pos, unknown, 1)
        pass_to_attention(self)
        return self.win_k, self.win_v

    def load_prefill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold an exact prefill's keys (after RoPE) and values ``[B, H, n, D]`` of positions
        ``0..n-1``, as a prefill through this layer leaves them (window, sink, compressed blocks):
        the prefill's attention is exact, so one forward pass can fill every kind of cache."""
        if self.is_initialized or self.quantize_prefill:
            raise RuntimeError(
                "load_prefill needs an empty layer that attends exactly at prefill "
                "(quantize_prefill=False)"
            )
        self.lazy_initialization(keys, values)
        b, _, n, _ = keys.shape
        self.win_k, self.win_v = keys, values
        self.win_pos = torch.arange(n, device=keys.device).expand(b, n).clone()
        self.flush()

    @property
    def num_sink(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    @property
    def num_window(self) -> int:
        return 0 if self.win_k is None else self.win_k.shape[2]

    def get_seq_length(self) -> int:
        return self.num_sink + self.num_compressed + self.num_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.win_k = self.win_v = self.win_pos = self.sink_k = self.sink_v = None
        self.store, self.num_compressed = None, 0
        self.store_version += 1
        if self.graph is not None:
            self.graph.release()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        n = abs(tokens_to_remove)
        if tokens_to_remove > 0 or n >= self.num_window:
            raise NotImplementedError(
                f"CommVQCache can drop at most the {self.num_window - 1} most recent "
                f"full-precision tokens (asked to crop {tokens_to_remove}); compressed blocks "
                "cannot be cropped"
            )
        if n:
            self.win_k, self.win_v, self.win_pos = (
                self.win_k[:, :, :-n],
                self.win_v[:, :, :-n],
                self.win_pos[:, :-n],
            )

    def _select(self, fn) -> None:
        for name in ("win_k", "win_v", "win_pos", "sink_k", "sink_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if self.store is not None:
            self.store = {part: {k: fn(v) for k, v in d.items()} for part, d in self.store.items()}
            self.store_version += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    # --- compression ------------------------------------------------------------------------
    def set_positions(self, position_ids: torch.Tensor | None, num_new: int) -> None:
        b = self.win_pos.shape[0]
        if position_ids is None:
            start = self.get_seq_length() - num_new
            position_ids = torch.arange(start, start + num_new, device=self.win_pos.device)[None]
        self.win_pos[:, -num_new:] = position_ids.to(self.win_pos.device).expand(b, -1)

    def flush(self) -> None:
        """Once the window holds more than ``window`` tokens: move the oldest into the sink until it
        is full, then compress the oldest whole blocks of ``window`` tokens, keeping the most recent
        1..window (blocks stay aligned to ``window`` whatever the sink, as KIVI's groups need)."""
        if self.num_window <= self.window:
            return
        take_sink = min(self.sink - self.num_sink, self.num_window - 1)
        if take_sink > 0:
            self.sink_k = _cat(self.sink_k, self.win_k[:, :, :take_sink], 2)
            self.sink_v = _cat(self.sink_v, self.win_v[:, :, :take_sink], 2)
            self.win_k, self.win_v = self.win_k[:, :, take_sink:], self.win_v[:, :, take_sink:]
            self.win_pos = self.win_pos[:, take_sink:]
        n = ((self.num_window - 1) // self.window) * self.window
        if n <= 0:
            return
        k, v, pos = self.win_k[:, :, :n], self.win_v[:, :, :n], self.win_pos[:, :n]
        if k.shape[2]:
            block = {
                "k": self.keys_part.compress(self.layer_idx, k, pos),
                "v": self.values_part.compress(self.layer_idx, v),
            }
            if self.store is None:
                self.store = block
            else:
                self.store = {
                    part: {name: torch.cat((self.store[part][name], t), 1) for name, t in d.items()}
                    for part, d in block.items()
                }
            self.store_version += 1
            self.num_compressed += k.shape[2]
        self.win_k, self.win_v, self.win_pos = (
            self.win_k[:, :, n:],
            self.win_v[:, :, n:],
            self.win_pos[:, n:],
        )

    # --- attention --------------------------------------------------------------------------
    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention output ``[B, Hq, Tq, D]`` over sink + codes + window, then flush."""
        tq = query.shape[2]
        self.set_positions(position_ids, tq)
        copies = self._flush_keeping_copies() if self.quantize_prefill else None
        out = None
        if self.num_compressed == 0 and self.num_sink == 0:
            out = self._dense(module, query, attention_mask, scaling)
        elif copies is None and self._graphable(query, attention_mask):
            out = self.graph.run(self, query, scaling, attention_mask)
        if out is None:
            out = self._mixed(query, attention_mask, scaling, copies=copies)
        if not self.quantize_prefill:
            self.flush()
        return out

    def _flush_keeping_copies(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Flush before attending (``quantize_prefill``), keeping the exact keys and values of the
        tokens it compresses and the index of the first in the compressed store: a query of this
        step sees a block compressed only once the whole block lies before it (so no query learns
        of a later token through a block's codes, e.g. KIVI's per-channel groups), and the block's
        exact tokens until then."""
        ns0, nc0, k, v = self.num_sink, self.num_compressed, self.win_k, self.win_v
        self.flush()
        taken, n = self.num_sink - ns0, self.num_compressed - nc0
        return (k[:, :, taken : taken + n], v[:, :, taken : taken + n], nc0) if n else None

    def _visible(
        self, tq: int, w: int, copies: tuple | None, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([tq, keys], [keys])``: which of sink, codes, exact copies and window each query of
        this step may see. Keys in the order they arrived; the step's queries are the last ``tq``
        to arrive."""
        ns, nc, win = self.num_sink, self.num_compressed, self.window
        arange = lambda n: torch.arange(n, device=device)  # noqa: E731
        nx, nc0 = (copies[0].shape[2], copies[2]) if copies is not None else (0, nc)
        q = ns + nc + w - tq + arange(tq)[:, None]  # arrival index of each query
        c = arange(nc)
        cx = nc0 + arange(nx)  # the copies' places in the compressed store
        arrival = torch.cat((arange(ns), ns + c, ns + cx, ns + nc + arange(w)))
        seen = arrival[None, :] <= q
        block_end = lambda i: ns + (i // win + 1) * win - 1  # noqa: E731  last arrival of a code's block
        coded_now = c >= nc0
        seen[:, ns : ns + nc] &= ~coded_now | (block_end(c)[None, :] < q)
        seen[:, ns + nc : ns + nc + nx] &= block_end(cx)[None, :] >= q
        return seen, arrival

    def _dense(self, module, query, attention_mask, scaling) -> torch.Tensor:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(
            module, query, self.win_k, self.win_v, attention_mask, scaling=scaling
        )
        return out.transpose(1, 2)

    def _graphable(self, query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        """Whether this step may run as a captured graph: one query token on a GPU, no mask or a
        boolean one, CommVQ parts on their Triton kernels, and no capture of the caller's own in
        progress."""
        if attention_mask is not None and (
            attention_mask.dtype != torch.bool
            or attention_mask.dim() != 4
            or attention_mask.shape[-1] < self.get_seq_length()
        ):
            return False
        return (
            self.graph is not None
            and self.coarse_log is None  # the log reads figures back to the host
            and query.shape[2] == 1
            and query.is_cuda
            and self.num_compressed > 0
            and all(part.graphable(query) for part in (self.keys_part, self.values_part))
            and not torch.cuda.is_current_stream_capturing()
        )

    def _mixed(
        self,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        window: tuple | None = None,
        copies: tuple | None = None,
    ) -> torch.Tensor:
        """Attention over sink, codes and window. ``window``: ``(keys, values, length)``, fixed
        buffers of ``window + 1`` slots whose first ``length`` (a GPU scalar) hold the window, in
        place of the window itself (the step a :class:`DecodeGraph` captures). ``copies``: the exact
        tokens this step compressed (see :meth:`_flush_keeping_copies`)."""
        tq, ns = query.shape[2], self.num_sink
        win_k, win_v, length = window if window is not None else (self.win_k, self.win_v, None)
        w = win_k.shape[2]
        qs = query.float() * scaling  # scaled once here, not the scores of every cached token
        nc = self.num_compressed
        if coarse_step.applies(self, nc, copies, tq):
            return coarse_step.attend(self, qs, attention_mask, win_k, win_v, length)
        scores = []
        if ns:
            scores.append(parts.grouped(qs, self.sink_k.float().transpose(-1, -2)))
        if nc:
            scores.append(self.keys_part.scores(self.layer_idx, qs, self.store["k"]))
        nx = 0 if copies is None else copies[0].shape[2]
        if nx:
            scores.append(parts.grouped(qs, copies[0].float().transpose(-1, -2)))
        scores.append(parts.grouped(qs, win_k.float().transpose(-1, -2)))
        s = torch.cat(scores, -1)
        total = s.shape[-1]
        seen = None
        if tq > 1 or nx:  # one query that arrived last sees everything; several see by arrival
            seen, arrival = self._visible(tq, w, copies, s.device)
        if attention_mask is not None:
            mask = attention_mask[..., -tq:, :]
            mask = mask[..., arrival] if seen is not None else mask[..., :total]
            s = (
                s.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else s + mask.float()
            )
        if seen is not None:
            s = s.masked_fill(~seen, float("-inf"))
        if length is not None:  # the buffers' slots past the window
            s[..., total - w :] = s[..., total - w :].masked_fill(
                torch.arange(w, device=s.device) >= length, float("-inf")
            )
        p = torch.softmax(s, -1)
        if (
            attention_mask is not None
        ):  # a row the mask hides entirely (padding) gives NaN: no weight
            p = p.nan_to_num(0.0)
        out = parts.grouped(p[..., total - w :], win_v.float())
        if ns:
            out = out + parts.grouped(p[..., :ns], self.sink_v.float())
        if nc:
            out = out + self.values_part.values(
                self.layer_idx, p[..., ns : ns + nc], self.store["v"]
            )
        if nx:
            out = out + parts.grouped(p[..., ns + nc : ns + nc + nx], copies[1].float())
        return out

    def nbytes(self) -> int:
        """Bytes actually held: window, sink, and every stored block tensor."""
        tensors = [
            t
            for t in (self.win_k, self.win_v, self.win_pos, self.sink_k, self.sink_v)
            if t is not None
        ]
        if self.store is not None:
            tensors += [t for d in self.store.values() for t in d.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class CommVQCache(Cache):
    """A compressed KV cache for ``model.generate(past_key_values=...)`` and forward passes."""

    def __init__(
        self,
        num_layers: int,
        keys: parts.KeysPart,
        values: parts.ValuesPart,
        window: int = 128,
        sink: int = 0,
        quantize_prefill: bool = False,
        graphs: bool = True,
        coarse: cq.CoarseSettings | None = None,
    ) -> None:
        """``graphs``: on a GPU, run single-token decode steps as captured CUDA graphs where they
        can be (:mod:`commvq.integrations.hf.graphs`; same results, less host time). ``coarse``:
        score the compressed tokens coarse to fine (:mod:`commvq.quant.coarse`; the keys must
        store the bound for its stages); None: exactly."""
        pool = GraphPool() if graphs else None
        coarse_step.check_keys(keys, coarse)
        super().__init__(
            layers=[
                CommVQLayer(i, keys, values, window, sink, quantize_prefill, pool, coarse)
                for i in range(num_layers)
            ]
        )
        self.keys_part, self.values_part, self.coarse = keys, values, coarse

    def record_coarse(self, log: list[dict] | None) -> None:
        """Every coarse step of every layer appends its figures to ``log`` (None: stop); each
        step then also scores every token exactly, to count the mass actually dropped."""
        for layer in self.layers:
            layer.coarse_log = log

    def load_prefill(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Every layer's :meth:`CommVQLayer.load_prefill` (e.g. from a ``DynamicCache`` that an
        exact prefill filled)."""
        if len(keys) != len(self.layers) or len(values) != len(self.layers):
            raise ValueError(f"{len(keys)} layers of keys for a cache of {len(self.layers)}")
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            layer.load_prefill(k, v)

    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        key_dir: str | Path | None = None,
        value_dir: str | Path | None = None,
        window: int = 128,
        sink: int = 0,
        quantize_prefill: bool = False,
        kernels: str = "auto",
        graphs: bool = True,
        beam: int | None = None,
        codec_dtype: torch.dtype = torch.float16,
        decode: str = "exact",
        coarse: cq.CoarseSettings | None = None,
    ) -> CommVQCache:
        """CommVQ keys from ``key_dir`` and values from ``value_dir`` (either may be None: dense);
        ``graphs``: decode steps as CUDA graphs on a GPU (see ``__init__``); ``beam``: the key
        encoder's beam width at prefill and at every flush (None: the width the codebooks were
        trained for, from their config.json; 1: greedy). The codes' format is the same for every
        width. ``codec_dtype``: what the value codec's weights are held in (float16, half the
        memory of float32 at the same quality, measured; its arithmetic is float32 either way).
        ``decode``: ``exact`` (every compressed token scored from all its stages) or ``coarse``
        (scored from the first ``coarse.stages``, the best-ranked rescored exactly; ``coarse``:
        its settings, default :class:`~commvq.quant.coarse.CoarseSettings`); the keys then also
        store one byte per token and KV head.

        Switches ``model`` to the ``commvq`` attention (other caches keep working with it).
        """
        if decode not in ("exact", "coarse"):
            raise ValueError(f"decode={decode!r}: use exact or coarse")
        if decode == "coarse" and key_dir is None:
            raise ValueError("decode='coarse' needs CommVQ keys (a key_dir)")
        coarse = (coarse or cq.CoarseSettings()) if decode == "coarse" else None
        spec = ModelSpec.from_config(model.config)
        check_supported(model)
        use_commvq(model)
        device = next(model.parameters()).device
        keys: parts.KeysPart = parts.DenseKeys()
        if key_dir is not None:
            rotary = model.base_model.rotary_emb
            books = [
                io.load_key_codebook(key_dir, i, spec, beam).to(device, kernels)
                for i in range(spec.num_layers)
            ]
            keys = parts.CommVQKeys(
                books,
                rotary.inv_freq.to(device),
                float(getattr(rotary, "attention_scaling", 1.0)),
                kernels=kernels,
                coarse_stages=None if coarse is None else coarse.stages,
                coarse_pairs=1.0 if coarse is None else coarse.pairs,
            )
        values: parts.ValuesPart = parts.DenseValues()
        if value_dir is not None:
            codec = (
                ValueCodec.load(value_dir, spec.num_layers, spec.kv_dim)
                .to(device)
                .held_in(codec_dtype)
            )
            values = parts.CommVQValues(codec, spec.num_kv_heads, kernels)
        return cls(spec.num_layers, keys, values, window, sink, quantize_prefill, graphs, coarse)

    @classmethod
    def baseline(
        cls, model: Any, method: str, window: int = 128, group: int = 32, sink: int = 0
    ) -> CommVQCache:
        """``fp16`` (the identity codec) or ``kivi2`` / ``kivi1`` through the same cache (same
        window and sink as the CommVQ cache it is compared with)."""
        if method not in ("fp16", "kivi2", "kivi1"):
            raise ValueError(f"baseline {method!r}: use fp16, kivi2 or kivi1")
        spec = ModelSpec.from_config(model.config)
        check_supported(model)
        use_commvq(model)
        if method == "fp16":
            return cls(spec.num_layers, parts.DenseKeys(), parts.DenseValues(), window, sink)
        bits = int(method[-1])
        if window % group:
            raise ValueError(f"KIVI needs window={window} to be a multiple of group={group}")
        return cls(
            spec.num_layers,
            parts.KiviKeys(bits, group),
            parts.KiviValues(bits, group),
            window,
            sink,
        )

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
