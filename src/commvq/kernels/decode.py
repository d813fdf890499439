"""Decode attention over a CommVQ-compressed cache (Triton), for one new query token per sequence.

Keys, style ``regdecode16`` (the default; "register decode, fp16": each key is decoded in
registers from an fp16 codebook): :func:`_scores_regdecode_kernel` reads each token's packed codes
and, per KV head, sums in fp32 registers the stage codewords ``a_A + i a_B`` its codes select from
the layer's codebook ``a [E, D]`` (fp16, laid out once per codebook by :func:`prepare_tables`),
rotates each pair once by the token's angle, scales by its prescale and dots the result with the
``g`` query heads of that KV head: the key never reaches memory (``regdecode``: the same from the
fp32 codebook). ``trick``: :func:`_scores_kernel`, the commutative trick with per-step tables
``u[h, r, e] = q_j . M(a_{h,r,e})`` per query head (the same scores, gathering g times more; about
90x slower on an H100, kept as a cross-check). Values: :func:`_values_kernel` accumulates
``sum_n p_n f_n bits_n`` from the packed 2-bit patterns with tensor-core dot products, split over
tokens; the codebook product ``@ E`` happens once per step. The softmax runs over the compressed
scores and the full-precision window together. References: :mod:`commvq.kernels.reference`;
timings: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from commvq.quant import commutative


@triton.jit
def _load_code(row, off, row_bytes, tmask, CODE_BITS: tl.constexpr):
    """The code at bit offset ``off`` of each token's packed row (little-endian bit stream)."""
    byte = off // 8
    lo = tl.load(row + byte, mask=tmask, other=0).to(tl.int32)
    # the next byte, clamped to the row: a code that ends in its first byte masks it out anyway
    hi = tl.load(row + tl.minimum(byte + 1, row_bytes - 1), mask=tmask, other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (off % 8)) & ((1 << CODE_BITS) - 1)


@triton.jit
def _scores_kernel(
    u_ptr,
    codes_ptr,
    prescale_ptr,
    pos_ptr,
    freq_ptr,
    out_ptr,
    N,
    row_bytes,
    scale,
    R: tl.constexpr,
    S: tl.constexpr,
    E: tl.constexpr,
    TE: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    HKV: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    t = pid_n * BN + tl.arange(0, BN)
    tmask = t < N
    gd = tl.arange(0, GP * D)
    row = codes_ptr + (b * N + t) * row_bytes
    ua = tl.zeros([BN, GP * D], tl.float32)
    ub = tl.zeros([BN, GP * D], tl.float32)
    for r in range(S):  # the first S of the row's R stages (S = R: the exact scores)
        code = _load_code(row, (h * R + r) * CODE_BITS, row_bytes, tmask, CODE_BITS)
        a_idx = code // E
        b_idx = code % E
        base = u_ptr + (((b * HKV + h) * R + r) * TE) * (GP * D)
        ua += tl.load(
            base + a_idx[:, None] * (GP * D) + gd[None, :], mask=tmask[:, None], other=0.0
        ).to(tl.float32)
        ub += tl.load(
            base + (TE - E + b_idx)[:, None] * (GP * D) + gd[None, :],
            mask=tmask[:, None],
            other=0.0,
        ).to(tl.float32)
    # rotation of each pair by the token's angle, as the model computes it (float32 product)
    d = gd % D
    f = d % P
    pos = tl.load(pos_ptr + b * N + t, mask=tmask, other=0).to(tl.float32)
    ang = pos[:, None] * tl.load(freq_ptr + f)[None, :]
    c = tl.cos(ang)
    s = tl.sin(ang)
    first = d < P
    rot_a = tl.where(first[None, :], c, s)  # u0 * cos + u1 * sin
    rot_b = tl.where(first[None, :], -s, c)  # -u0 * sin + u1 * cos
    per = ua * rot_a + ub * rot_b  # [BN, GP*D]
    score = tl.sum(tl.reshape(per, [BN, GP, D]), axis=2)  # [BN, GP]
    pre = tl.load(prescale_ptr + b * N + t, mask=tmask, other=0.0).to(tl.float32)
    score = score * pre[:, None] * scale
    j = tl.arange(0, GP)
    tl.store(
        out_ptr + ((b * HKV + h) * G + j[None, :]) * N + t[:, None],
        score,
        mask=tmask[:, None] & (j[None, :] < G),
    )


@triton.jit
def _key_sum(
    a_ptr,
    row,
    row_bytes,
    h,
    tmask,
    R: tl.constexpr,
    S: tl.constexpr,
    E: tl.constexpr,
    TE: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BN: tl.constexpr,
):
    """``(re, im) [BN, P]`` (fp32) of each token's KV head ``h`` summed over its first ``S`` of
    ``R`` stages: per stage the codeword ``a_A + i b_B`` from the codebook ``a [Hkv, R, TE, D]``
    (``[Re a_e | Im a_e]``; ``TE = E``: tied tables, ``b = a``; ``TE = 2E``: untied, ``b`` in
    rows ``E..2E-1``), formed in the table's dtype."""
    f = tl.arange(0, P)
    kre = tl.zeros([BN, P], tl.float32)
    kim = tl.zeros([BN, P], tl.float32)
    for r in range(S):  # the first S of the row's R stages (S = R: the exact scores)
        code = _load_code(row, (h * R + r) * CODE_BITS, row_bytes, tmask, CODE_BITS)
        ra = a_ptr + ((h * R + r) * TE + code // E)[:, None] * D + f[None, :]
        rb = a_ptr + ((h * R + r) * TE + TE - E + code % E)[:, None] * D + f[None, :]
        kre += (tl.load(ra) - tl.load(rb + P)).to(tl.float32)
        kim += (tl.load(ra + P) + tl.load(rb)).to(tl.float32)
    return kre, kim


@triton.jit
def _rotation(pos, freq, FAST: tl.constexpr):
    """``cos, sin`` of the float32 angles ``pos * freq`` (as the model computes them). ``FAST`` (on
    a GPU): reduced to ``[-pi, pi]`` by ``2 pi`` in two float32 parts with fused multiply-adds (each
    product exact, each step rounded once: under 1e-6 off for angles up to 1e8), then the hardware's
    approximations; else the accurate library functions (the interpreter has only these)."""
    ang = pos[:, None] * freq[None, :]
    if FAST:
        k = tl.floor(ang * 0.15915494309189535 + 0.5)
        red = tl.fma(-k, 6.2831854820251465, ang)  # float32(2 pi)
        red = tl.fma(-k, -1.7484555314695172e-07, red)  # float32(2 pi - float32(2 pi))
        return tl.extra.cuda.libdevice.fast_cosf(red), tl.extra.cuda.libdevice.fast_sinf(red)
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _rotated(kre, kim, c, s):
    """The key's pairs ``(re, im) [BN, P]`` rotated by their angles' ``cos, sin``."""
    return kre * c - kim * s, kre * s + kim * c


@triton.jit
def _query_dot(rre, rim, qh, f, P: tl.constexpr):
    """Each token's dot ``[BN]`` of its rotated key with the query at ``qh`` (``[re | im]``)."""
    return tl.sum(rre * tl.load(qh + f)[None, :] + rim * tl.load(qh + P + f)[None, :], axis=1)


@triton.jit
def _scores_regdecode_kernel(
    a_ptr,
    codes_ptr,
    prescale_ptr,
    pos_ptr,
    freq_ptr,
    q_ptr,
    out_ptr,
    idx_ptr,
    N,
    NS,
    row_bytes,
    scale,
    R: tl.constexpr,
    S: tl.constexpr,
    E: tl.constexpr,
    TE: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    HKV: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BN: tl.constexpr,
    FAST: tl.constexpr,
    HAS_IDX: tl.constexpr,
):
    """The scores with each token's key assembled in registers from the codebook
    ``a [Hkv, R, E, D]`` (``[Re a_e | Im a_e]``; fp16 or fp32): per stage the codeword
    ``a_A + i a_B`` is formed in the table's dtype and summed over stages in fp32; 2R gathered
    half-rows per token and KV head, the key never reaches memory; then one rotation per pair and a
    dot with each of the ``G`` query heads. Only the first ``S`` stages are summed (``S < R``: the
    coarse scores of :mod:`commvq.quant.coarse`). ``HAS_IDX``: output ``t`` scores the stored
    token ``idx[b, t]`` of ``NS`` (the picks of a coarse step), else token ``t`` itself."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    t = pid_n * BN + tl.arange(0, BN)
    tmask = t < N
    src = tl.load(idx_ptr + b * N + t, mask=tmask, other=0) if HAS_IDX else t
    f = tl.arange(0, P)
    row = codes_ptr + (b * NS + src) * row_bytes
    kre, kim = _key_sum(a_ptr, row, row_bytes, h, tmask, R, S, E, TE, D, P, CODE_BITS, BN)
    pre = tl.load(prescale_ptr + b * NS + src, mask=tmask, other=0.0).to(tl.float32) * scale
    pos = tl.load(pos_ptr + b * NS + src, mask=tmask, other=0).to(tl.float32)
    c, s = _rotation(pos, tl.load(freq_ptr + f), FAST)
    rre, rim = _rotated(kre, kim, c, s)
    for j in tl.static_range(G):
        score = _query_dot(rre, rim, q_ptr + ((b * HKV + h) * G + j) * D, f, P) * pre
        tl.store(out_ptr + ((b * HKV + h) * G + j) * N + t, score, mask=tmask)


@triton.jit
def _values_kernel(
    p_ptr,
    factor_ptr,
    codes_ptr,
    out_ptr,
    idx_ptr,
    N,
    NS,
    row_bytes,
    tokens_per_prog,
    p_sb,
    p_sh,
    HQ: tl.constexpr,
    HQP: tl.constexpr,
    NBITS: tl.constexpr,
    BK: tl.constexpr,
    BF: tl.constexpr,
    HAS_IDX: tl.constexpr,
):
    """``out[b, split, hq, k] = sum_n p[b, hq, n] f[b, n] bits[b, n, k]`` over this split's
    tokens."""
    split = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2)
    k = kb * BF + tl.arange(0, BF)  # bit index
    byte = kb * (BF // 8) + tl.arange(0, BF // 8)
    # bit k is sign k % 2 of group k // 2, whose pattern i (signs (i >> 1, i & 1) as in
    # quant.binary.PATTERNS) sits at bits 2 (k // 2 % 4) of byte k // 8: bit (k % 8) ^ 1 of that
    # byte
    shift = (tl.arange(0, BF) % 8) ^ 1
    hq = tl.arange(0, HQP)
    acc = tl.zeros([HQP, BF], tl.float32)
    start = split * tokens_per_prog
    for n0 in range(start, start + tokens_per_prog, BK):
        n = n0 + tl.arange(0, BK)
        nmask = n < N
        src = tl.load(idx_ptr + b * N + n, mask=nmask, other=0) if HAS_IDX else n
        packed = tl.load(
            codes_ptr + (b * NS + src[:, None]) * row_bytes + byte[None, :],
            mask=nmask[:, None],
            other=0,
        ).to(tl.int32)  # [BK, BF // 8]
        wide = tl.reshape(tl.broadcast_to(packed[:, :, None], [BK, BF // 8, 8]), [BK, BF])
        # +-1.0 as float16 bit patterns: 0x3C00, with the sign bit where the bit is 0
        signs = (
            (((((wide >> shift[None, :]) & 1) ^ 1) << 15) | 0x3C00)
            .to(tl.int16)
            .to(tl.float16, bitcast=True)
        )
        f = tl.load(factor_ptr + b * NS + src, mask=nmask, other=0.0).to(tl.float32)
        p = tl.load(
            p_ptr + b * p_sb + hq[:, None] * p_sh + n[None, :],
            mask=(hq[:, None] < HQ) & nmask[None, :],
            other=0.0,
        )
        w = (p * f[None, :]).to(tl.float16)  # [HQP, BK]
        acc += tl.dot(w, signs)
    tl.store(
        out_ptr + ((b * tl.num_programs(0) + split) * HQP + hq[:, None]) * NBITS + k[None, :], acc
    )


def trick_tables(
    q: torch.Tensor, thetas: torch.Tensor, heads_padded: int | None = None
) -> torch.Tensor:
    """``u [B, Hkv, R, TE, GP*D]`` (fp32): per KV head, stage and table entry (``TE``: E, or 2E
    for untied tables), the two components ``[q_re R + q_im I | -q_re I + q_im R]`` of each of
    its ``G`` query heads (zero-padded to GP)."""
    b, hq, d = q.shape
    hkv, r = thetas.shape[:2]
    te = commutative.score_entries(thetas)
    g = hq // hkv
    # [B, Hkv, 1, G, D] against [1, Hkv, R, 1, 2E, P]: [B, Hkv, R, G, TE, P, 2]
    u = commutative.score_table(
        q.float().reshape(b, hkv, 1, g, d), commutative.as_float(thetas)[None, :, :, None]
    )
    u = u.permute(0, 1, 2, 4, 3, 6, 5).reshape(b, hkv, r, te, g, d)  # [B, Hkv, R, TE, G, (2, P)]
    gp = heads_padded or g
    if gp > g:
        u = torch.nn.functional.pad(u, (0, 0, 0, gp - g))
    return u.reshape(b, hkv, r, te, gp * d).contiguous()


# the scores styles (values of the ``style`` arguments here and of ``CommVQKeys(kernel_style=)``):
# "regdecode16": keys decoded in registers from the fp16 codebook (the default), "regdecode": the
# same from the fp32 codebook, "trick": the commutative trick with per-query tables (a check)
STYLES = ("regdecode16", "regdecode", "trick")
BLOCKS = {"regdecode16": 64, "regdecode": 64, "trick": 32}  # tokens per program, fastest on an H100


def prepare_tables(thetas: torch.Tensor, style: str) -> tuple[torch.Tensor, ...]:
    """The per-layer tables a scores ``style`` reads (build once per codebook, reuse every step):
    ``regdecode`` (keys decoded in registers from the codebook): the codebook
    ``a [Hkv, R, E, D]`` (``[Re a_e | Im a_e]``; ``[Hkv, R, 2E, D]`` for untied tables, ``a`` then
    ``b``) in fp32; ``regdecode16`` (the default): the same in fp16; ``trick``: none (its tables
    depend on the query)."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: use one of {', '.join(STYLES)}")
    if style == "trick":
        return ()
    hkv, r, e2, p = thetas.shape
    if commutative.is_untied(thetas):
        z = commutative.as_float(thetas)
        a = torch.cat((z.real, z.imag), dim=-1)  # [Hkv, R, 2E, D]: a's entries, then b's
    else:
        a = thetas.float().reshape(hkv, r, e2 // 2, 2 * p)  # rows 2e, 2e+1: Re a_e, Im a_e
    return ((a.half() if style == "regdecode16" else a).contiguous(),)


def commvq_scores_triton(
    q: torch.Tensor,
    packed: torch.Tensor,
    prescale: torch.Tensor,
    positions: torch.Tensor,
    thetas: torch.Tensor,
    inv_freq: torch.Tensor,
    code_bits: int,
    scale: float = 1.0,
    block: int | None = None,
    style: str = "regdecode16",
    tables: tuple | None = None,
    num_warps: int = 4,
    stages: int | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores ``[B, Hq, N]`` (fp32, times ``scale``) of one query per sequence ``q [B, Hq, D]``
    against packed key codes ``[B, N, row_bytes]``. ``style``: ``regdecode16`` ("register decode,
    fp16": each token's key assembled in registers from the fp16 codebook, stage codewords summed
    in fp32; the default), ``regdecode`` (the same from the fp32 codebook) or ``trick`` (per-query
    tables, the commutative trick; slow, kept as a check). ``tables``: :func:`prepare_tables` of
    ``thetas`` for this style, if already built. ``stages``: sum only the first ``stages`` residual
    stages (the coarse scores; None: all of them, the exact scores). ``index [B, K]``: score only
    those stored tokens (``[B, Hq, K]``; regdecode styles)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("commvq_scores_triton needs CUDA tensors")
    if tables is None:
        tables = prepare_tables(thetas, style)
    b, hq, d = q.shape
    hkv, r, e2, _ = thetas.shape
    ns = packed.shape[1]
    n = ns if index is None else index.shape[1]
    g = hq // hkv
    block = block or BLOCKS[style]
    if index is not None and style == "trick":
        raise ValueError("index needs style regdecode16 or regdecode")
    out = torch.empty(b, hq, n, device=q.device, dtype=torch.float32)
    if n == 0:
        return out
    grid = (triton.cdiv(n, block), hkv, b)
    s = r if stages is None else stages
    if not 1 <= s <= r:
        raise ValueError(f"stages={stages}: between 1 and the codebooks' {r} stages")
    common = dict(
        R=r,
        S=s,
        E=e2 // 2,
        TE=commutative.score_entries(thetas),
        G=g,
        D=d,
        P=d // 2,
        HKV=hkv,
        CODE_BITS=code_bits,
        num_warps=num_warps,
    )
    args = (
        packed.contiguous(),
        prescale.contiguous(),
        positions.contiguous(),
        inv_freq.float().contiguous(),
    )
    if style == "trick":
        gp = triton.next_power_of_2(g)
        _scores_kernel[grid](
            trick_tables(q, thetas, gp),
            *args,
            out,
            n,
            packed.shape[2],
            scale,
            GP=gp,
            BN=block,
            **common,
        )
    else:
        _scores_regdecode_kernel[grid](
            tables[0],
            *args,
            q.float().contiguous(),
            out,
            out if index is None else index.contiguous(),
            n,
            ns,
            packed.shape[2],
            scale,
            BN=block,
            FAST=q.is_cuda,
            HAS_IDX=index is not None,
            **common,
        )
    return out


def values_split(
    n: int, nbits: int, batch: int, block_bits: int, block_tokens: int, programs: int = 512
) -> tuple[int, int]:
    """``(bits per block, tokens per program)`` of the values kernel's split-K: about ``programs``
    programs in all (splits x bit blocks x batch; 512 was the fastest measured on an H100)."""
    bf = block_bits
    while nbits % bf and bf > 16:
        bf //= 2
    splits = max(1, programs // ((nbits // bf) * batch))
    return bf, max(block_tokens, triton.cdiv(triton.cdiv(n, splits), block_tokens) * block_tokens)


def value_table(codebook: torch.Tensor, scale: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The value codebook per KV head with its channel scale folded in: ``[Hkv, nbits, D]`` (fp32;
    build once per codec, reuse every step)."""
    nbits, f = codebook.shape
    d = f // num_kv_heads
    table = codebook.float().reshape(nbits, num_kv_heads, d).permute(1, 0, 2)
    return (table * scale.float().reshape(num_kv_heads, 1, d)).contiguous()


def mix_values_torch(part: torch.Tensor, table: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """:func:`mix_values` in torch (the reference): summed over splits, then one batched
    product."""
    b = part.shape[0]
    hkv, nbits, d = table.shape
    mixed = part.sum(1)[:, :num_q_heads].reshape(b, hkv, num_q_heads // hkv, nbits)
    return (mixed @ table).reshape(b, num_q_heads, d)


@triton.jit
def _mix_kernel(
    part_ptr,
    table_ptr,
    out_ptr,
    S,
    HQP,
    NBITS,
    HKV,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BK: tl.constexpr,
    SB: tl.constexpr,
):
    """One KV head's query heads x ``BK`` bits: their partial sums added over the splits, times
    the table's rows of those bits, added into ``out [B, Hq, D]`` (split over the bits)."""
    b = tl.program_id(0) // HKV
    h = tl.program_id(0) % HKV
    g = tl.arange(0, GP)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    d = tl.arange(0, DP)
    gm = g < G
    km = k < NBITS
    rows = h * G + g
    sb = tl.arange(0, SB)
    base = part_ptr + b.to(tl.int64) * S * HQP * NBITS
    at = rows[None, :, None] * NBITS + k[None, None, :]
    mask = gm[None, :, None] & km[None, None, :]
    acc = tl.zeros((GP, BK), dtype=tl.float32)
    for s0 in range(0, S, SB):
        si = s0 + sb
        ptr = base + si[:, None, None].to(tl.int64) * HQP * NBITS + at
        acc += tl.sum(tl.load(ptr, mask=mask & (si < S)[:, None, None], other=0.0), 0)
    t = tl.load(
        table_ptr + (h * NBITS + k[:, None]).to(tl.int64) * D + d[None, :],
        mask=km[:, None] & (d < D)[None, :],
        other=0.0,
    )
    mixed = tl.sum(acc[:, :, None] * t[None, :, :], 1)  # [GP, DP]
    out = out_ptr + (b * HKV * G + rows[:, None]).to(tl.int64) * D + d[None, :]
    tl.atomic_add(out, mixed, mask=gm[:, None] & (d < D)[None, :])


def mix_values(
    part: torch.Tensor, table: torch.Tensor, num_q_heads: int, kernel: bool = False
) -> torch.Tensor:
    """The values kernel's partial sums ``[B, splits, HQP, nbits]`` -> ``[B, Hq, D]``: summed over
    splits, then the product with :func:`value_table`. ``kernel``: in one Triton kernel split
    over the bits (where it can run), for torch's batched product of 4 query rows by ``nbits``
    cannot split its long inner dimension: a cuBLAS gemv of 33 us (1 bit) and 65 us (2 bits) in
    a 0.18-0.23 ms coarse step on an H100 (``decode_coarse.py --profile 1``). Off by default
    until the kernel is timed on a card (``benchmarks/decode_coarse.py --mix kernel``); else in
    torch."""
    if not kernel or (not part.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"):
        return mix_values_torch(part, table, num_q_heads)
    b, splits, hqp, nbits = part.shape
    hkv, _, d = table.shape
    g = num_q_heads // hkv
    out = torch.zeros(b, num_q_heads, d, device=part.device, dtype=torch.float32)
    bk = 16
    grid = (b * hkv, triton.cdiv(nbits, bk))
    _mix_kernel[grid](
        part.contiguous(),
        table.contiguous(),
        out,
        splits,
        hqp,
        nbits,
        hkv,
        G=g,
        GP=triton.next_power_of_2(g),
        D=d,
        DP=triton.next_power_of_2(d),
        BK=bk,
        SB=16,
        num_warps=4,
    )
    return out


def commvq_values_triton(
    probs: torch.Tensor,
    packed: torch.Tensor,
    factor: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    num_kv_heads: int,
    tokens_per_prog: int | None = None,
    block_bits: int = 256,
    block_tokens: int = 64,
    num_warps: int = 4,
    table: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    mix_kernel: bool = False,
) -> torch.Tensor:
    """``sum_n p_n v_hat_n`` per query head: ``probs [B, Hq, N]`` -> ``[B, Hq, D]`` (fp32).

    Split-K over tokens: ``tokens_per_prog`` (default: :func:`values_split`) tokens per program,
    partial sums added afterwards. ``table``: :func:`value_table` of ``codebook`` and ``scale``, if
    already built. ``index [B, N]``: ``probs``' token ``n`` is the stored token ``index[b, n]``.
    ``mix_kernel``: :func:`mix_values` on its kernel."""
    b, hq, n = probs.shape
    nbits = codebook.shape[0]
    hqp = max(16, triton.next_power_of_2(hq))
    bf, auto_tokens = values_split(n, nbits, b, block_bits, block_tokens)
    tokens_per_prog = tokens_per_prog or auto_tokens
    splits = max(1, triton.cdiv(n, tokens_per_prog))
    part = torch.empty(b, splits, hqp, nbits, device=probs.device, dtype=torch.float32)
    grid = (splits, nbits // bf, b)
    p = probs.float()
    if p.stride(2) != 1:
        p = (
            p.contiguous()
        )  # a slice of a wider row (the softmax over compressed and window) is read in place
    _values_kernel[grid](
        p,
        factor.contiguous(),
        packed.contiguous(),
        part,
        part if index is None else index.contiguous(),
        n,
        packed.shape[1],
        packed.shape[2],
        tokens_per_prog,
        p.stride(0),
        p.stride(1),
        HQ=hq,
        HQP=hqp,
        NBITS=nbits,
        BK=block_tokens,
        BF=bf,
        HAS_IDX=index is not None,
        num_warps=num_warps,
    )
    table = value_table(codebook, scale, num_kv_heads) if table is None else table
    return mix_values(part, table, hq, kernel=mix_kernel)
