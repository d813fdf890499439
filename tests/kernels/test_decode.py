"""Triton decode attention (scores from codes, values from bits) against the pure-torch reference,
over a grid of shapes; on a GPU, or in Triton's interpreter on a CPU (a few small shapes)."""

import torch

from tests.helpers import kernel_tests


def _db(x, ref):
    """Error in dB below the reference: -20 log10(|x - ref| / |ref|)."""
    import math

    return -20 * math.log10(float((x - ref).norm() / ref.norm().clamp_min(1e-30)) + 1e-30)


def _first_stages(q, codes, prescale, pos, thetas, freqs, stages):
    """The torch reference's scores ``[B, Hq, N]`` (scale 0.7) from the first ``stages`` stages."""
    from commvq.kernels import reference as ref

    return ref.commvq_scores(
        q[:, :, None],
        codes[..., :stages],
        prescale.float(),
        pos,
        thetas[:, :stages].float(),
        freqs,
        0.7,
    )[:, :, 0]


def _compare(device, cases):
    import triton

    from commvq import rope
    from commvq.kernels import coarse as coarse_kernels
    from commvq.kernels import decode
    from commvq.kernels import reference as ref
    from commvq.quant.packing import pack_2bit, pack_codes

    for b, hkv, g, d, r, n, qbits in cases:
        gen = torch.Generator().manual_seed(n + d)
        e = 64
        thetas = (torch.randn(hkv, r, 2 * e, d // 2, generator=gen) * 0.2).to(device)
        codes = torch.randint(0, e * e, (b, n, hkv, r), generator=gen).to(device)
        packed = pack_codes(codes.reshape(b, n, hkv * r), 12)
        prescale = (torch.rand(b, n, generator=gen) + 0.5).half().to(device)
        # positions up to 1M: the kernel reduces the angles itself before the hardware's sin/cos
        pos = torch.randint(0, 1_000_000, (b, n), generator=gen).to(torch.int32).to(device)
        freqs = rope.inv_freq(d, 5e5).to(device)
        q = torch.randn(b, hkv * g, d, generator=gen).to(device)
        want = ref.commvq_scores(
            q[:, :, None], codes, prescale.float(), pos, thetas.float(), freqs, 0.7
        )[:, :, 0]
        for style in decode.STYLES:
            got = decode.commvq_scores_triton(
                q, packed, prescale, pos, thetas, freqs, 12, scale=0.7, style=style
            )
            assert _db(got, want) > (50 if style == "regdecode16" else 60), (
                style,
                b,
                hkv,
                g,
                d,
                r,
                n,
            )
        # the coarse pass: the first stages only, against the reference over those stages
        stages = max(1, r // 3)
        inputs = (codes, prescale, pos, thetas, freqs, stages)
        want_c = _first_stages(q, *inputs)
        got_c = decode.commvq_scores_triton(
            q, packed, prescale, pos, thetas, freqs, 12, scale=0.7, stages=stages
        )
        assert _db(got_c, want_c) > 50, ("coarse", b, hkv, g, d, r, n, stages)
        offsets = torch.randn(b, hkv * g, generator=gen).to(device)
        got_r = coarse_kernels.commvq_rank_triton(
            q, packed, prescale, pos, thetas, freqs, 12, offsets, stages, 0.7
        )
        want_r = (want_c - offsets[..., None]).amax(1)
        assert _db(got_r, want_r) > 50, ("rank", b, hkv, g, d, r, n, stages)
        # over a quarter of the pairs: the reference with the query's other pairs zeroed
        pairs = torch.arange(1, d // 2, 4)
        cols = torch.cat((pairs, pairs + d // 2)).to(device)
        got_p = coarse_kernels.commvq_rank_triton(
            q, packed, prescale, pos, thetas, freqs, 12, offsets, stages, 0.7, columns=cols
        )
        q_p = torch.zeros_like(q)
        q_p[..., cols] = q[..., cols]
        want_p = (_first_stages(q_p, *inputs) - offsets[..., None]).amax(1)
        assert _db(got_p, want_p) > 50, ("rank over pairs", b, hkv, g, d, r, n, stages)
        # exact scores of picked tokens, read through their indices
        pick = torch.randint(0, n, (b, max(1, n // 3)), generator=gen).sort(1).values.to(device)
        got_ri = coarse_kernels.commvq_rank_triton(
            q, packed, prescale, pos, thetas, freqs, 12, offsets, stages, 0.7, index=pick
        )
        assert torch.allclose(got_ri, torch.gather(got_r, 1, pick), atol=1e-5), ("rank at", b, n)
        got_i = decode.commvq_scores_triton(
            q, packed, prescale, pos, thetas, freqs, 12, scale=0.7, index=pick
        )
        full = decode.commvq_scores_triton(q, packed, prescale, pos, thetas, freqs, 12, scale=0.7)
        want_i = torch.gather(full, 2, pick[:, None].expand(-1, hkv * g, -1))
        assert torch.allclose(got_i, want_i, atol=1e-5), ("index", b, hkv, g, d, r, n)
        f = hkv * d
        groups = f * qbits // 2
        idx = torch.randint(0, 4, (b, n, groups), generator=gen).to(device)
        vpacked = pack_2bit(idx)
        factor = torch.rand(b, n, generator=gen).half().to(device)
        codebook = torch.randn(f * qbits, f, generator=gen).to(device)
        scale = (torch.rand(f, generator=gen) + 0.5).to(device)
        # the weights as the cache passes them: a slice of the softmax over compressed and window
        # tokens
        probs = torch.softmax(torch.randn(b, hkv * g, n + 9, generator=gen).to(device), -1)[
            ..., 4 : n + 4
        ]
        got_v = decode.commvq_values_triton(probs, vpacked, factor, codebook, scale, hkv)
        want_v = ref.commvq_values(probs[:, :, None], idx, factor.float(), codebook, scale, hkv)[
            :, :, 0
        ]
        assert _db(got_v, want_v) > 40, ("values", b, hkv, g, d, n, qbits)
        dense = decode.commvq_values_triton(
            probs.contiguous(), vpacked, factor, codebook, scale, hkv
        )
        assert torch.equal(got_v, dense), (
            "a strided slice and its contiguous copy give the same values"
        )
        # values of picked tokens, read through their indices, against a gathered block
        from commvq.quant.coarse import take_rows

        probs_k = probs[..., : pick.shape[1]].contiguous()
        got_iv = decode.commvq_values_triton(
            probs_k, vpacked, factor, codebook, scale, hkv, index=pick
        )
        want_iv = decode.commvq_values_triton(
            probs_k, take_rows(vpacked, pick), take_rows(factor, pick), codebook, scale, hkv
        )
        assert torch.allclose(got_iv, want_iv, atol=1e-5), ("values index", b, hkv, g, d, n)
        # the mix of partial sums with the table (one kernel) against torch's sum and product,
        # over a number of splits no block divides
        table = decode.value_table(codebook, scale, hkv)
        hqp = max(16, triton.next_power_of_2(hkv * g))
        part = torch.randn(b, 37, hqp, f * qbits, generator=gen).to(device)
        got_m = decode.mix_values(part, table, hkv * g, kernel=True)
        want_m = decode.mix_values_torch(part, table, hkv * g)
        assert _db(got_m, want_m) > 60, ("mix", b, hkv, g, d, qbits)


GRID = [
    (1, 8, 4, 128, 21, 1000, 2),
    (2, 3, 3, 64, 11, 777, 2),
    (1, 2, 1, 64, 5, 130, 1),
    (2, 8, 8, 128, 11, 333, 1),
    (1, 4, 4, 128, 21, 4096 + 17, 2),
]


test_decode_kernels_match_reference_on_gpu, test_decode_kernels_match_reference_in_interpreter = (
    kernel_tests(
        __name__, "_compare", GRID, [(1, 2, 3, 16, 3, 45, 2), (2, 1, 2, 16, 2, 33, 1)], 900
    )
)
