"""The Triton kernels read untied tables (``a_A + i b_B``, complex theta) as the torch references
do: the scores styles and the coarse rank, the greedy and beam encoders, the nearest codeword."""

import torch

from tests.helpers import kernel_tests


def _db(x, ref):
    import math

    return -20 * math.log10(float((x - ref).norm() / ref.norm().clamp_min(1e-30)) + 1e-30)


def _untied(hkv, r, e, p, gen, scale=0.2):
    return (
        torch.complex(
            torch.randn(hkv, r, 2 * e, p, generator=gen),
            torch.randn(hkv, r, 2 * e, p, generator=gen),
        )
        * scale
    )


def _compare(device, cases):
    from commvq import rope
    from commvq.kernels import coarse as coarse_kernels
    from commvq.kernels import decode
    from commvq.kernels import reference as ref
    from commvq.kernels.beam import beam_encode_triton
    from commvq.kernels.encode import encode_triton
    from commvq.kernels.nearest import nearest_triton
    from commvq.quant import beam, commutative, residual
    from commvq.quant.packing import pack_codes

    for b, hkv, g, d, r, n in cases:
        gen = torch.Generator().manual_seed(n + d)
        e = 64
        thetas = _untied(hkv, r, e, d // 2, gen).to(device)
        codes = torch.randint(0, e * e, (b, n, hkv, r), generator=gen).to(device)
        packed = pack_codes(codes.reshape(b, n, hkv * r), 12)
        prescale = (torch.rand(b, n, generator=gen) + 0.5).half().to(device)
        pos = torch.randint(0, 100_000, (b, n), generator=gen).to(torch.int32).to(device)
        freqs = rope.inv_freq(d, 5e5).to(device)
        q = torch.randn(b, hkv * g, d, generator=gen).to(device)
        # the reference against decoded, rotated keys
        k = residual.decode(codes.reshape(b * n, hkv, r).transpose(0, 1), thetas)  # [Hkv, BN, D]
        k = k.reshape(hkv, b, n, d).permute(1, 0, 2, 3) * prescale.float()[:, None, :, None]
        cos, sin = rope.cos_sin(freqs, pos)
        k = rope.apply_rope(k, cos[:, None], sin[:, None])
        heads = torch.arange(hkv * g, device=device) // g
        dense = torch.einsum("bhd,bhnd->bhn", q, k[:, heads]) * 0.7
        want = ref.commvq_scores(q[:, :, None], codes, prescale.float(), pos, thetas, freqs, 0.7)
        assert _db(want[:, :, 0], dense) > 60, ("reference", b, hkv, g, d, r, n)
        for style in decode.STYLES:
            got = decode.commvq_scores_triton(
                q, packed, prescale, pos, thetas, freqs, 12, scale=0.7, style=style
            )
            assert _db(got, dense) > (50 if style == "regdecode16" else 60), (style, b, d, r, n)
        offsets = torch.randn(b, hkv * g, generator=gen).to(device)
        stages = max(1, r // 2)
        first = ref.commvq_scores(
            q[:, :, None],
            codes[..., :stages],
            prescale.float(),
            pos,
            thetas[:, :stages],
            freqs,
            0.7,
        )[:, :, 0]
        got_r = coarse_kernels.commvq_rank_triton(
            q, packed, prescale, pos, thetas, freqs, 12, offsets, stages, 0.7
        )
        assert _db(got_r, (first - offsets[..., None]).amax(1)) > 50, ("rank", b, d, r, n)
        # encoders: the kernels against the torch encoders on the same untied tables
        x = torch.randn(hkv, n, d, generator=gen).to(device) * 0.5
        th = commutative.as_float(thetas)
        assert torch.equal(encode_triton(x, th).cpu(), residual.encode(x, th).cpu())
        assert torch.equal(
            nearest_triton(x, th[:, 0]).cpu(), commutative.nearest(x, th[:, 0]).cpu()
        )

        got_b, want_b = beam_encode_triton(x, th, 4), beam.beam_encode(x, th, 4)
        err_got, err_want = (
            float(((x - residual.decode(c, th)) ** 2).sum()) for c in (got_b, want_b)
        )
        assert err_got <= err_want * (1 + 1e-4), ("beam", hkv, d, r, n)


test_untied_kernels_on_gpu, test_untied_kernels_in_interpreter = kernel_tests(
    __name__,
    "_compare",
    [(1, 1, 4, 64, 5, 300), (2, 3, 3, 64, 11, 257), (1, 8, 4, 128, 21, 130)],
    [(1, 2, 3, 16, 3, 45)],
    900,
)
