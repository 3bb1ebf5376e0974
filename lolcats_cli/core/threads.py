"""How many CPU threads torch uses: the cores actually free, unless the user said otherwise.

torch starts with one intra-op thread per physical core. On a shared or busy machine that oversubscribes
the cores: on a 2-core CPU at load 1 to 2, one thread ran 2x to 15x faster than two. So the CLI picks the
count once, at start-up, from what is free:

1. ``--threads N`` (``lolcats --threads N COMMAND``) or ``LOLCATS_THREADS=N``: exactly that;
2. ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) set by the user: left alone, torch already follows it;
3. else the CPUs this process may run on (``os.sched_getaffinity``) minus the 1-minute load average
   (``os.getloadavg``), rounded, at least 1.

:func:`choose_threads` is the rule (a pure function); :func:`apply_threads` applies it and returns the
sentence the CLI prints once ("using N threads: ..."). Library users set ``torch.set_num_threads`` themselves;
nothing here runs unless called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import ConfigError

ENV = "LOLCATS_THREADS"
_USER_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _count(value: str | int, where: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{where}: expected a number of threads >= 1, got {value!r}",
                          f"e.g. {where}=1, or unset it to let lolcats pick from the free cores")
    return n


def choose_threads(cpus: int, load: float | None, env: Mapping[str, str], requested: int | None = None) -> tuple[int | None, str]:
    """``(threads, why)``: the thread count to set (None = leave torch as the user configured it) and why.

    ``requested`` is ``--threads``; ``env`` the environment (``LOLCATS_THREADS``, ``OMP_NUM_THREADS``);
    ``cpus`` the usable CPUs and ``load`` the 1-minute load average (None = unknown: use every CPU).
    """
    if requested is not None:
        return _count(requested, "--threads"), "as --threads asks"
    if env.get(ENV, "").strip():
        return _count(env[ENV], ENV), f"as {ENV} asks"
    for name in _USER_ENV:
        if env.get(name, "").strip():
            return None, f"{name}={env[name].strip()} is set"
    cpus = max(1, cpus)
    if load is None:
        return cpus, f"{cpus} CPUs, load unknown"
    free = max(1, min(cpus, round(cpus - load)))
    return free, f"load {load:.1f} on {cpus} CPUs leaves {free} free"


def apply_threads(requested: int | None = None, env: Mapping[str, str] | None = None) -> str:
    """Set torch's intra-op thread count by :func:`choose_threads`; return the line to print once."""
    import torch

    threads, why = choose_threads(usable_cpus(), load_average(), os.environ if env is None else env, requested)
    if threads is not None:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    tail = "" if requested is not None or why.startswith(f"as {ENV}") else f" (override with --threads N or {ENV}=N)"
    return f"using {n} thread{'s' if n != 1 else ''}: {why}{tail}"


__all__ = ["ENV", "choose_threads", "apply_threads", "usable_cpus", "load_average"]
