"""The kernel registry: every :class:`~.base.Kernel` by name, and the choice of one per device.

Adding a kernel: one file defining a ``Kernel`` subclass, plus its import and its entry in :data:`KERNELS`
below. Kernels are referenced by plain ``from .x import Y`` imports (never by string), so the ``hf`` export
bundles every registered kernel with its runtime.

The choice, in order: a kernel set on the attention module (``LinearizedAttention.kernel = "naive"``), the
environment variable ``LOLCATS_KERNEL`` (a name from :data:`KERNELS`), else the available kernel of highest
priority on the device (made once per device type and remembered).
"""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError, did_you_mean
from .base import Kernel
from .chunked import ChunkedKernel
from .naive import NaiveKernel
from .recall import RecallKernel
from .triton_hybrid import TritonKernel

ENV_VAR = "LOLCATS_KERNEL"
KERNELS: dict[str, Kernel] = {
    kernel.name: kernel for kernel in (ChunkedKernel(), NaiveKernel(), RecallKernel(), TritonKernel())
}
_auto: dict[str, Kernel] = {}  # device type -> the automatic choice


def get_kernel(name: str) -> Kernel:
    """The registered kernel called ``name``; ConfigError naming the choices otherwise."""
    kernel = KERNELS.get(name)
    if kernel is None:
        raise ConfigError(
            f"{name!r} is not an attention kernel; {did_you_mean(str(name), KERNELS)}valid: {', '.join(KERNELS)}",
            hint=f"set {ENV_VAR} to one of the names, or unset it for the automatic choice",
        )
    return kernel


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to :data:`KERNELS` under ``kernel.name`` (replacing one of that name) and forget the
    automatic choices, so the next one sees it; returns ``kernel``."""
    if not isinstance(kernel, Kernel) or not kernel.name:
        raise ConfigError(f"{kernel!r} is not a named lolcats_cli.kernels.Kernel", hint="subclass Kernel, set name")
    KERNELS[kernel.name] = kernel
    _auto.clear()
    return kernel


def auto_kernel(device: torch.device | str) -> Kernel:
    """The available kernel of highest priority (>= 0) on ``device``, chosen once per device type."""
    kind = torch.device(device).type
    if kind not in _auto:
        ready = [k for k in KERNELS.values() if k.priority >= 0 and k.available(torch.device(device))]
        if not ready:
            raise ConfigError(f"no attention kernel is available on {kind}", hint=f"set {ENV_VAR}=naive")
        _auto[kind] = max(ready, key=lambda k: k.priority)
    return _auto[kind]


def select_kernel(choice: str | Kernel | None, device: torch.device | str) -> Kernel:
    """The kernel that runs on ``device``: ``choice`` (a Kernel, or a name) when given, else the one named
    by ``LOLCATS_KERNEL``, else :func:`auto_kernel`. ConfigError for an unknown or unavailable kernel."""
    if choice is None:
        choice = os.environ.get(ENV_VAR) or None
        if choice is None:
            return auto_kernel(device)
    kernel = choice if isinstance(choice, Kernel) else get_kernel(choice)
    if not kernel.available(torch.device(device)):
        raise ConfigError(f"attention kernel {kernel.name!r} is not available on {torch.device(device).type}",
                          hint=f"choose another one ({', '.join(KERNELS)}) or unset {ENV_VAR}")
    return kernel


__all__ = ["ENV_VAR", "KERNELS", "auto_kernel", "get_kernel", "register_kernel", "select_kernel"]
