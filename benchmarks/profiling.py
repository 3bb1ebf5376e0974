"""Where a CUDA call's time goes: the profiler's kernel time per call and its top kernels (shared by the
benchmarks; run them as scripts, ``python benchmarks/<name>.py``, so this module is importable)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def gpu_busy_ms(step: Callable[[], Any], n: int, device: torch.device, top: int = 0) -> tuple[float, list]:
    """Milliseconds of GPU kernel time per call of ``step`` (the profiler's sum over kernels), without the
    host-side launch overhead that dominates a small model's wall time; and the ``top`` kernels by their time
    per call, ``[[name, ms], ...]`` (where the step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize(device)
    events = [(e.key, getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)))
              for e in prof.key_averages()]  # fmt: skip
    kernels = sorted(((name[:90], us / n / 1000) for name, us in events if us > 0), key=lambda x: -x[1])
    return sum(us for _, us in events) / n / 1000, [list(k) for k in kernels[:top]]


def print_kernels(top: list, indent: str = "      ") -> None:
    for name, ms in top:
        print(f"{indent}{ms:8.3f} ms  {name}")
