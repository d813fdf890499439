#!/usr/bin/env python
"""Where the time of one key-codebook training step goes, per GPU kernel (torch profiler).

    python benchmarks/train_profile.py [--what em,em_stage,e2e,encode] [--num_samples 1000000] \
        [--steps 20]

``em``: one fused E-step (all heads) at Llama-3.1-8B shapes on synthetic key-like data, plus the
rest of an iteration (M-step), random codebooks, tokens unsorted. ``em_stage``: a real stage-0
fit, timed, with the kernels of three of its E-steps (sorted tokens, pruned rows).
``e2e``: one E2E optimizer step (batch 256, R stages), uncaptured
so the profiler sees every kernel, and the same step replayed from its CUDA graph, timed. Prints a
table per part (kernel, calls per step, microseconds per step) and a last JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

try:
    from _meta import commit_id
    from _profile import kernel_times
    from em_layer import add_layer_args, layer_keys
except ImportError:
    from benchmarks._meta import commit_id
    from benchmarks._profile import kernel_times
    from benchmarks.em_layer import add_layer_args, layer_keys

from commvq.quant import e2e, em


def kernel_table(fn, steps: int, title: str, top: int = 25) -> dict[str, float]:
    """Run ``fn`` ``steps`` times under the profiler; print and return microseconds per step by
    kernel."""
    times = kernel_times(fn, steps)
    total = sum(us for _, us in times.values())
    launches = sum(c for c, _ in times.values())
    if top:
        print(f"\n{title}: {total:.1f} us of kernels per step, {launches:.0f} kernels per step")
        print(f"{'kernel':<70}{'calls':>7}{'us/step':>10}")
        for name, (c, us) in sorted(times.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"{name[:69]:<70}{c:>7.1f}{us:>10.1f}")
    return {
        "total_us": round(total, 1),
        "kernels_per_step": launches,
        "by_kernel": {k: round(us, 1) for k, (_, us) in times.items()},
    }


def wall(fn, steps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e6


def profile_em(x, s, steps: int) -> dict:
    from commvq.kernels.em_estep import e_step_triton

    g = torch.Generator(device=x.device).manual_seed(1)
    out = {}
    cache = {}  # as EM keeps it within a stage: the split halves of x are made once
    for tau in (1e-3, 1e-4):
        theta = torch.randn(x.shape[0], 128, x.shape[2] // 2, device=x.device, generator=g) * 0.05

        def one(theta=theta, tau=tau):
            em.m_step(e_step_triton(x, s, theta, tau, cache=cache))

        out[f"tau{tau:g}"] = kernel_table(
            one, steps, f"EM iteration (E-step + M-step), tau {tau:g}"
        )
        out[f"tau{tau:g}"]["wall_us"] = round(wall(one, steps), 1)
        print(f"wall time per iteration: {out[f'tau{tau:g}']['wall_us']:.0f} us")
    return out


def profile_em_stage(x, s, iters=(2, 50, 98)) -> dict:
    """A real stage-0 fit (hint-sorted tokens, the temperature schedule): wall time of the init and
    of the whole stage, and the kernels of a few of its E-steps."""
    from commvq.kernels import em_estep as k
    from commvq.kernels.em_init import e_step_centers_triton

    out, calls = {}, [0]

    def estep(*a, **kw):
        calls[0] += 1
        if calls[0] not in iters:
            return k.e_step_triton(*a, **kw)
        kept = {}

        def one():
            kept["stats"] = k.e_step_triton(*a, **kw)

        table = kernel_table(one, 1, f"E-step {calls[0]} of a real stage, tau {a[3]:.2e}")
        table["wall_us"] = round(wall(one, 2), 1)
        table["rows_evaluated"] = float(kept["stats"].work)
        print(f"wall {table['wall_us']:.0f} us, rows evaluated {kept['stats'].work:.3f}")
        for streams in (1, 2, 3):
            tuned = dataclasses.replace(k.TUNING, streams=streams)
            table[f"wall_us_{streams}_streams"] = round(
                wall(lambda t=tuned: k.e_step_triton(*a, **kw, tuning=t), 3), 1
            )
            print(f"  wall with {streams} stream(s): {table[f'wall_us_{streams}_streams']:.0f} us")
        out[f"iter{calls[0]}"] = table
        return kept["stats"]

    settings = em.EMSettings()
    centers = x[:, torch.randint(0, x.shape[1], (4096,), device=x.device)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    em.m_step(em.e_step_centers(x, s, centers, 1.0, settings.chunk))
    torch.cuda.synchronize()
    out["init_torch_s"] = time.perf_counter() - t0
    em.m_step(e_step_centers_triton(x, s, centers, 1.0, settings.chunk))  # compile
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    em.m_step(e_step_centers_triton(x, s, centers, 1.0, settings.chunk))
    torch.cuda.synchronize()
    out["init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    em.fit_stage(
        x, s, 64, 0, settings, torch.Generator().manual_seed(0), estep, e_step_centers_triton
    )
    torch.cuda.synchronize()
    out["stage_s"] = time.perf_counter() - t0
    print(
        f"init E-step + M-step {out['init_s']:.2f} s (torch {out['init_torch_s']:.2f} s); "
        f"stage 0 (init, 100 iterations, profiled ones twice more) {out['stage_s']:.2f} s"
    )
    return out


def profile_e2e(x, steps: int, residuals: int, batch: int) -> dict:
    from commvq.kernels.encode import encode_triton_with_residuals

    thetas = e2e.init_random(x, residuals, 64, torch.Generator().manual_seed(0))
    out = {}
    for graphs in (False, True):
        params = torch.nn.Parameter(thetas.clone())
        settings = e2e.E2ESettings(
            batch_size=batch, cuda_graphs=graphs, encode_fn=encode_triton_with_residuals
        )
        opt, _ = e2e.make_optimizer(params, settings)  # as e2e.train
        w = e2e.pair_weight_vector(None, x.shape[0], x.shape[2], x.device, x.dtype)
        step = e2e._Step(params, opt, w, settings, (x.shape[0], batch, x.shape[2]))
        key = "graph" if graphs else "eager"

        def one(step=step, batch_x=x[:, :batch]):
            step(batch_x)

        out[key] = kernel_table(one, steps, "E2E step, eager") if not graphs else {}
        out[key]["wall_us"] = round(wall(one, steps * 10), 1)
        print(f"E2E step wall time ({key}): {out[key]['wall_us']:.0f} us")
    return out


def tune_encode(x, residuals: int, batch: int) -> dict:
    """Greedy-encode time of one batch for a few block sizes of the encoder kernel
    (microseconds)."""
    import itertools

    from commvq.kernels import encode as enc

    thetas = e2e.init_random(x, residuals, 64, torch.Generator().manual_seed(0))
    xb = x[:, :batch].contiguous()
    out = {}
    for bt, warps, unroll in itertools.product((16, 32), (4, 8), (1, 2, 4, 8)):
        tuning = enc.EncodeTuning(bt=bt, warps=warps, unroll=unroll)
        table = kernel_table(
            lambda t=tuning: enc.encode_triton_with_residuals(xb, thetas, t), 20, "encode", top=0
        )
        us = table["by_kernel"].get("_encode_kernel", float("nan"))
        out[f"BT{bt}_W{warps}_U{unroll}"] = us
        print(
            f"encode kernel, batch {batch}: BT {bt:3d} warps {warps} unroll {unroll}: {us:8.1f} us",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="em,em_stage,e2e,encode")
    add_layer_args(ap)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    x, s = layer_keys(args)
    what = set(args.what.split(","))
    result = {"bench": "train_profile", "card": torch.cuda.get_device_name(), "commit": commit_id()}
    if "em" in what:
        result["em"] = profile_em(x, s, args.steps)
    if "em_stage" in what:
        result["em_stage"] = profile_em_stage(x, s)
    if "e2e" in what:
        result["e2e"] = profile_e2e(x, args.steps * 4, args.residuals, args.batch_size)
    if "encode" in what:
        result["encode"] = tune_encode(x, args.residuals, args.batch_size)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
