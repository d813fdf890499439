"""GPU kernels of a function by torch.profiler: what the benchmarks that break a step down share."""

from __future__ import annotations

from collections import defaultdict

import torch


def kernel_times(fn, steps: int) -> dict[str, tuple[float, float]]:
    """Run ``fn`` once, then ``steps`` times under the profiler: per kernel name, ``(launches per
    step, microseconds of GPU time per step)``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    us, calls = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us[ev.name] += ev.device_time / steps
            calls[ev.name] += 1
    return {name: (calls[name] / steps, us[name]) for name in us}
