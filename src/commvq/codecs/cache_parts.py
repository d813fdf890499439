"""How a compressed KV cache stores keys and values, and attends to them.

A cache block holds ``n`` tokens of one layer. A *key part* turns post-RoPE keys into stored
tensors and scores queries against them; a *value part* stores values and mixes them by
attention probabilities. Parts: dense (the identity codec: FP16/BF16), KIVI-style scalar
quantization, and CommVQ (codes only; nothing is decoded to dense keys or values).
Stored tensors all have a leading ``[B, n]``; ``scores`` returns raw dot products
``[B, Hq, Tq, N]``.
"""

from __future__ import annotations

import torch

from commvq import rope
from commvq.codecs import kivi
from commvq.codecs.key_codebook import KeyCodebook
from commvq.codecs.value_codec import ValueCodec
from commvq.kernels import reference as ref
from commvq.quant import coarse
from commvq.quant.packing import pack_codes, unpack_2bit, unpack_codes


def use_kernels(kernels: str, x: torch.Tensor, tq: int, head_dim: int) -> bool:
    """Whether the Triton decode kernels serve this call (one query token, CUDA, power-of-2
    head_dim)."""
    if kernels == "torch" or tq != 1 or head_dim & (head_dim - 1):
        return False
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        if kernels == "triton":
            raise
        return False
    return True


def rebuilt_on_change(store: dict, key, sources: tuple[torch.Tensor, ...], build):
    """``build()``, kept in ``store[key]`` and rebuilt only when one of the ``sources`` tensors is
    replaced or changed in place (its version counter moves): tables derived from parameters."""
    versions = tuple(t._version for t in sources)
    hit = store.get(key)
    if (
        hit is None
        or hit[1] != versions
        or any(a is not b for a, b in zip(hit[0], sources, strict=True))
    ):
        hit = store[key] = (sources, versions, build())
    return hit[2]


def grouped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x [B, Hq, T, K] @ y [B, Hkv, K, M]`` with each KV head serving its ``Hq / Hkv`` query heads
    (grouped-query attention), without repeating ``y``: ``[B, Hq, T, M]``."""
    b, hq, t, k = x.shape
    hkv, m = y.shape[1], y.shape[-1]
    return torch.bmm(x.reshape(b * hkv, hq // hkv * t, k), y.reshape(b * hkv, k, m)).reshape(
        b, hq, t, m
    )


def take_block(block: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tokens ``idx [B, k]`` of a stored block (every tensor ``[B, n, ...]``): a block of
    ``k`` tokens the parts score and mix as any other."""
    return {name: coarse.take_rows(t, idx) for name, t in block.items()}


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, n, H, D]`` -> ``[B, H, n, D]``."""
    return x.permute(0, 2, 1, 3)


class KeysPart:
    """The key side of a cache: ``compress`` a block of post-RoPE keys ``[B, H, n, D]`` (with their
    positions) into stored tensors, and ``scores`` queries ``[B, Hq, Tq, D]`` against stored
    blocks."""

    name = "keys"

    def compress(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def scores(self, layer: int, q: torch.Tensor, block: dict) -> torch.Tensor:
        raise NotImplementedError

    def scores_at(self, layer: int, q: torch.Tensor, block: dict, index: torch.Tensor):
        """``scores`` of the stored tokens ``index [B, k]`` only: ``[B, Hq, Tq, k]``."""
        return self.scores(layer, q, take_block(block, index))

    def graphable(self, q: torch.Tensor) -> bool:
        """Whether single-token work for ``q`` runs on kernels a CUDA graph can capture
        (default: no)."""
        return False


class ValuesPart:
    """The value side of a cache: ``compress`` a block of values ``[B, H, n, D]``, and mix stored
    blocks by attention probabilities ``[B, Hq, Tq, N]`` (``values``)."""

    name = "values"

    def compress(self, layer: int, v: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def values(self, layer: int, probs: torch.Tensor, block: dict) -> torch.Tensor:
        raise NotImplementedError

    def values_at(self, layer: int, probs: torch.Tensor, block: dict, index: torch.Tensor):
        """``values`` of the stored tokens ``index [B, k]`` weighted by ``probs [B, Hq, Tq, k]``."""
        return self.values(layer, probs, take_block(block, index))

    def graphable(self, q: torch.Tensor) -> bool:
        """Whether single-token mixing for ``q`` runs on kernels a CUDA graph can capture
        (default: no)."""
        return False


class DenseKeys(KeysPart):
    """Keys as the model computed them (after RoPE), in the model's dtype."""

    name = "dense"

    def compress(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"k": k.transpose(1, 2).contiguous()}

    def scores(self, layer: int, q: torch.Tensor, block: dict) -> torch.Tensor:
        return grouped(q.float(), _heads_first(block["k"]).float().transpose(-1, -2))


class DenseValues(ValuesPart):
    name = "dense"

    def compress(self, layer: int, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": v.transpose(1, 2).contiguous()}

    def values(self, layer: int, probs: torch.Tensor, block: dict) -> torch.Tensor:
        return grouped(probs.float(), _heads_first(block["v"]).float())


def _kivi_store(x: torch.Tensor, bits: int, group: int, dim: int) -> dict[str, torch.Tensor]:
    """Quantize ``x [B, n, H, D]`` in groups of ``group`` tokens per channel (keys, ``dim=1``) or of
    ``group`` channels per token (values, ``dim=-1``). Stored: packed codes ``[B, n, H, D*bits/8]``,
    and 16-bit minima and steps ``[B, n/group, H, D]`` (keys) or ``[B, n, H, D/group]`` (values)."""
    codes, lo, step = kivi.quantize(x, bits, group, dim)
    return {"codes": pack_codes(codes, bits), "lo": lo.half(), "step": step.half()}


def _kivi_load(store: dict, bits: int, group: int, dim: int) -> torch.Tensor:
    """Dequantize a :func:`_kivi_store` block back to ``[B, n, H, D]``."""
    packed = store["codes"]
    codes = unpack_codes(packed, packed.shape[-1] * 8 // bits, bits)
    return kivi.dequantize(codes, store["lo"], store["step"], group, dim)


class KiviKeys(KeysPart):
    """KIVI: keys quantized per channel, in groups of ``group`` tokens (blocks are multiples of
    it)."""

    def __init__(self, bits: int, group: int = 32) -> None:
        self.bits_, self.group, self.name = bits, group, f"kivi{bits}"

    def compress(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        x = k.transpose(1, 2)  # [B, n, H, D]
        if x.shape[1] % self.group:
            raise ValueError(
                f"KIVI keys need blocks of a multiple of {self.group} tokens (got {x.shape[1]})"
            )
        return _kivi_store(x, self.bits_, self.group, dim=1)

    def scores(self, layer: int, q: torch.Tensor, block: dict) -> torch.Tensor:
        k = _kivi_load(block, self.bits_, self.group, dim=1)
        return grouped(q.float(), _heads_first(k).float().transpose(-1, -2))


class KiviValues(ValuesPart):
    """KIVI: values quantized per token, in groups of ``group`` channels."""

    def __init__(self, bits: int, group: int = 32) -> None:
        self.bits_, self.group, self.name = bits, group, f"kivi{bits}"

    def compress(self, layer: int, v: torch.Tensor) -> dict[str, torch.Tensor]:
        x = v.transpose(1, 2)
        return _kivi_store(x, self.bits_, min(self.group, x.shape[-1]), dim=-1)

    def values(self, layer: int, probs: torch.Tensor, block: dict) -> torch.Tensor:
        d = block["codes"].shape[-1] * 8 // self.bits_
        v = _kivi_load(block, self.bits_, min(self.group, d), dim=-1)
        return grouped(probs.float(), _heads_first(v).float())


class CommVQKeys(KeysPart):
    """12-bit residual codes of the pre-RoPE keys (un-rotated with the model's own angles), one
    prescale and one position per token. Scores come from the codes: in torch by the commutative
    trick (per-query tables) or a transient decode, whichever costs less; on a GPU by the decode
    kernel, which sums each key from its codewords in registers (``kernels/decode.py``)."""

    name = "commvq"

    def __init__(
        self,
        codebooks: list[KeyCodebook],
        inv_freq: torch.Tensor,
        rope_scale: float = 1.0,
        scoring: str = "auto",
        kernels: str = "auto",
        kernel_style: str = "regdecode16",
        coarse_stages: int | None = None,
        coarse_pairs: float = 1.0,
    ) -> None:
        """``coarse_stages``: also store, per token and KV head, the bound of what the stages after
        the first ``coarse_stages`` add (one byte; the coarse decode mode's ``S``);
        ``coarse_pairs``: the share of RoPE pairs its coarse scores sum
        (:func:`commvq.quant.coarse.coarse_pairs`)."""
        if scoring not in ("auto", "trick", "decode"):
            raise ValueError(f"scoring={scoring!r}: use auto, trick or decode")
        self.kernels, self.kernel_style = kernels, kernel_style
        self._tables: dict[int, tuple] = {}  # per layer: the kernel's tables, built on first use
        self.codebooks, self.inv_freq, self.rope_scale = codebooks, inv_freq.float(), rope_scale
        self.scoring = scoring
        cb = codebooks[0]
        self.code_bits, self.num_heads, self.stages = cb.code_bits, cb.num_heads, cb.num_stages
        if coarse_stages is not None and not 1 <= coarse_stages <= self.stages:
            raise ValueError(
                f"coarse stages={coarse_stages}: between 1 and the codebooks' {self.stages}"
            )
        self.coarse_stages, self.coarse_pairs = coarse_stages, coarse_pairs
        self._pairs: dict = {}  # per layer: the coarse pairs' channels and their kernel table

    def graphable(self, q: torch.Tensor) -> bool:
        """Whether single-token scoring of ``q [B, Hq, 1, D]`` runs on the kernels (capturable in a
        graph)."""
        return use_kernels(self.kernels, q, 1, q.shape[-1])

    def angles(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ang = pos.float()[..., None] * self.inv_freq.to(pos.device)  # as the model computes it
        return torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)

    def compress(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, n, d = k.shape
        cos, sin = self.angles(pos)  # [B, n, D]
        pre = rope.unapply_rope(k.float(), cos[:, None], sin[:, None]) / self.rope_scale
        flat = pre.transpose(1, 2).reshape(b * n, h * d)
        codes, s = self.codebooks[layer].encode(
            flat
        )  # greedy or beam, torch or Triton: the codebook's
        packed = pack_codes(codes.reshape(b * n, h * self.stages), self.code_bits)
        out = {
            "codes": packed.reshape(b, n, -1),
            "prescale": s.reshape(b, n).half(),
            "pos": pos.to(torch.int32),
        }
        if self.coarse_stages is not None:
            d = coarse.tail_norms(
                codes.permute(1, 0, 2), self.codebooks[layer].thetas, self.coarse_stages
            )  # [H, B*n]
            out["tail"] = coarse.tail_code(d.t()).reshape(b, n, h)
        return out

    def scores_at(
        self,
        layer: int,
        q: torch.Tensor,
        block: dict,
        index: torch.Tensor,
        stages: int | None = None,
    ) -> torch.Tensor:
        """Scores of the stored tokens ``index [B, k]``, exact or (``stages``) from the first
        stages only: on the kernel read through the index (no gathered copy of their codes), else
        of a gathered block."""
        if use_kernels(self.kernels, q, q.shape[2], q.shape[3]) and self.kernel_style != "trick":
            return self.scores(layer, q, block, stages, index=index)
        return self.scores(layer, q, take_block(block, index), stages)

    def coarse_columns(self, layer: int, device) -> torch.Tensor | None:
        """The channels ``[2 P']`` (the chosen pairs' first halves, then their second halves) the
        coarse scores sum, or None when they sum every pair."""
        if self.coarse_pairs >= 1:
            return None
        thetas = self.codebooks[layer].thetas

        def build() -> torch.Tensor:
            pairs = coarse.coarse_pairs(thetas, self.coarse_stages, self.coarse_pairs)
            return torch.cat((pairs, pairs + thetas.shape[-1]))

        return rebuilt_on_change(self._pairs, layer, (thetas,), build).to(device)

    def coarse_scores(self, layer: int, q: torch.Tensor, block: dict) -> torch.Tensor:
        """Scores ``[B, Hq, Tq, N]`` from the first ``coarse_stages`` stages of each key only, over
        the coarse pairs (the query's other pairs zeroed)."""
        cols = self.coarse_columns(layer, q.device)
        if cols is not None:
            mask = torch.zeros(q.shape[-1], device=q.device, dtype=q.dtype)
            q = q * mask.index_fill(0, cols, 1.0)
        return self.scores(layer, q, block, self.coarse_stages)

    def rerank(
        self, layer: int, q: torch.Tensor, block: dict, offsets: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`coarse_rank` of the stored tokens ``index [B, m]`` over every pair: ``[B, m]``
        (on the kernel read through the index, no score written)."""
        if use_kernels(self.kernels, q, q.shape[2], q.shape[3]) and self.kernel_style != "trick":
            from commvq.kernels.coarse import commvq_rank_triton

            args, tables = self._kernel_inputs(layer, q, block)
            offsets = offsets.reshape(q.shape[0], q.shape[1])
            return commvq_rank_triton(
                *args, offsets, self.coarse_stages, self.rope_scale, tables=tables, index=index
            )
        every = self.scores_at(layer, q, block, index, self.coarse_stages)
        return (every - offsets).amax(dim=(1, 2))

    def coarse_rank(
        self, layer: int, q: torch.Tensor, block: dict, offsets: torch.Tensor
    ) -> torch.Tensor:
        """Each token's best coarse score over the query rows ``q [B, Hq, 1, D]``, each row less
        its offset ``[B, Hq, 1, 1]``: ``[B, N]`` (on the kernel without writing any score)."""
        if use_kernels(self.kernels, q, q.shape[2], q.shape[3]) and self.kernel_style != "trick":
            from commvq.kernels.coarse import column_tables, commvq_rank_triton

            args, tables = self._kernel_inputs(layer, q, block)
            cols = self.coarse_columns(layer, q.device)
            if cols is not None:  # the kernel sums the chosen pairs' columns only
                thetas = args[4]
                tables = rebuilt_on_change(
                    self._pairs, (layer, "table"), (thetas,), lambda: column_tables(thetas, cols)
                )
            offsets = offsets.reshape(q.shape[0], q.shape[1])
            return commvq_rank_triton(
                *args, offsets, self.coarse_stages, self.rope_scale, tables=tables, columns=cols
            )
        return (self.coarse_scores(layer, q, block) - offsets).amax(dim=(1, 2))

    def _kernel_inputs(self, layer: int, q: torch.Tensor, block: dict) -> tuple[tuple, tuple]:
        """The decode kernels' first arguments (query, codes, prescales, positions, codebooks,
        RoPE frequencies, code bits) and the layer's tables, built once per codebook."""
        from commvq.kernels.decode import prepare_tables

        thetas = self.codebooks[layer].thetas
        tables = rebuilt_on_change(
            self._tables, layer, (thetas,), lambda: prepare_tables(thetas, self.kernel_style)
        )
        inputs = (block["codes"], block["prescale"], block["pos"], thetas)
        return (q[:, :, 0], *inputs, self.inv_freq.to(q.device), self.code_bits), tables

    def bound_width(self, block: dict) -> torch.Tensor:
        """``prescale * rope_scale * d`` per token and KV head ``[B, Hkv, N]``: times a query's
        norm, how far a coarse score can lie from the exact one."""
        if "tail" not in block:
            raise ValueError("these codes carry no coarse bound: make the keys with coarse_stages")
        w = coarse.tail_value(block["tail"]) * block["prescale"].float()[..., None]
        return (w * self.rope_scale).permute(0, 2, 1)

    def use_trick(self, q: torch.Tensor) -> bool:
        """The commutative trick costs ``Hq*Tq*R*P`` per token (plus a table per query); decoding
        the keys transiently for this one call costs ``Hkv*R*D + Hq*Tq*D``. ``auto`` takes the trick
        for single-token decoding on a GPU and whichever is cheaper elsewhere."""
        if self.scoring != "auto":
            return self.scoring == "trick"
        hq, tq = q.shape[1], q.shape[2]
        if q.is_cuda and tq == 1:
            return True
        return hq * tq * self.stages < self.num_heads * self.stages * 2 + hq * tq * 2

    def scores(
        self,
        layer: int,
        q: torch.Tensor,
        block: dict,
        stages: int | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores ``[B, Hq, Tq, N]`` of the keys' codes; ``stages``: from the first ``stages``
        residual stages only (None: all, the exact scores)."""
        if use_kernels(self.kernels, q, q.shape[2], q.shape[3]):
            from commvq.kernels.decode import commvq_scores_triton

            args, tables = self._kernel_inputs(layer, q, block)
            s = commvq_scores_triton(
                *args,
                self.rope_scale,
                style=self.kernel_style,
                tables=tables,
                stages=stages,
                index=index,
            )
            return s[:, :, None]
        b, n = block["codes"].shape[:2]
        codes = unpack_codes(block["codes"], self.num_heads * self.stages, self.code_bits)
        stages = stages or self.stages
        codes = codes.reshape(b, n, self.num_heads, self.stages)[..., :stages]
        cb = self.codebooks[layer]
        thetas = cb.thetas[:, :stages]
        if self.use_trick(q):
            return ref.commvq_scores(
                q,
                codes,
                block["prescale"],
                block["pos"],
                thetas,
                self.inv_freq.to(q.device),
                self.rope_scale,
            )
        # transient decode for this call only: the cache keeps holding codes
        k = KeyCodebook(thetas, cb.code_bits).decode(
            codes.reshape(b * n, self.num_heads, stages), block["prescale"].reshape(-1)
        )
        k = k.reshape(b, n, self.num_heads, -1)
        cos, sin = self.angles(block["pos"])
        k = rope.apply_rope(k.float(), cos[:, :, None], sin[:, :, None]) * self.rope_scale
        return grouped(q.float(), _heads_first(k).float().transpose(-1, -2))


class CommVQValues(ValuesPart):
    """Learned binary codes (2 bits per group of patterns, packed) and one factor per token."""

    name = "commvq"

    def __init__(
        self, codec: ValueCodec, num_kv_heads: int, kernels: str = "auto", mix_kernel: bool = True
    ) -> None:
        """``mix_kernel``: the values kernel's partial sums mixed with the codec's table by one
        Triton kernel where the kernels run (:func:`commvq.kernels.decode.mix_values`; on an H100
        it saves about 25 us of a 128K step's 33 us torch product at 1 bit), else by torch's
        sum and product."""
        self.codec, self.num_kv_heads, self.kernels = codec.eval(), num_kv_heads, kernels
        self.mix_kernel = mix_kernel
        self._tables: dict[
            int, tuple
        ] = {}  # per layer: the kernel's value table, built on first use

    def graphable(self, q: torch.Tensor) -> bool:
        """Whether single-token mixing for ``q`` runs on the kernels (capturable in a graph)."""
        return use_kernels(self.kernels, q, 1, self.codec.layers[0].width // self.num_kv_heads)

    def compress(self, layer: int, v: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, n, d = v.shape
        packed, factor = self.codec.layers[layer].encode(
            v.transpose(1, 2).reshape(b * n, h * d).float()
        )
        return {"codes": packed.reshape(b, n, -1), "factor": factor.reshape(b, n).half()}

    def values_at(self, layer: int, probs: torch.Tensor, block: dict, index: torch.Tensor):
        return self.values(layer, probs, block, index)

    def values(
        self, layer: int, probs: torch.Tensor, block: dict, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``index [B, k]``: ``probs``' tokens are those stored tokens (read through it on the
        kernel, gathered in torch)."""
        lc = self.codec.layers[layer]
        if use_kernels(self.kernels, probs, probs.shape[2], lc.width // self.num_kv_heads):
            from commvq.kernels.decode import commvq_values_triton, value_table

            table = rebuilt_on_change(
                self._tables,
                layer,
                (lc.codebook, lc.scale),
                lambda: value_table(lc.codebook.detach(), lc.scale.detach(), self.num_kv_heads),
            )
            out = commvq_values_triton(
                probs[:, :, 0],
                block["codes"],
                block["factor"],
                lc.codebook.detach(),
                lc.scale,
                self.num_kv_heads,
                table=table,
                index=index,
                mix_kernel=self.mix_kernel,
            )
            return out[:, :, None]
        if index is not None:
            block = take_block(block, index)
        idx = unpack_2bit(block["codes"], lc.groups)
        return ref.commvq_values(
            probs, idx, block["factor"], lc.codebook.detach(), lc.scale, self.num_kv_heads
        )
