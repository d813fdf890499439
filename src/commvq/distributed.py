"""Several processes (``torchrun``): rank, world size and a barrier; one process otherwise.

The process group (gloo, which works on CPU and GPU tensors alike for a barrier) is created
lazily by the first barrier, never at import, and destroyed at exit.
"""

from __future__ import annotations

import atexit
import os

import torch


def rank_world() -> tuple[int, int]:
    """``(rank, world)`` from torchrun's environment; ``(0, 1)`` for a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    _, world = rank_world()
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        # torn down before the interpreter exits: a process group left to the C++ destructors can
        # abort a rank at exit ("terminate called without an active exception")
        atexit.register(_destroy)
    dist.barrier()


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank(name: str) -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK) when CUDA is present, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: this torch sees no CUDA GPU (a CPU build, or no driver); "
            "use --device cpu or auto"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} GPUs (cuda:0..)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device
