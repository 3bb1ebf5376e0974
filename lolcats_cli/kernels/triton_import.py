"""Triton, imported lazily by the fused kernels' ``build()`` functions (a CPU install without it imports lolcats
fine, and ``TRITON_INTERPRET`` is read when the kernels are defined): whether it is installed, and the import."""

from __future__ import annotations

import importlib.util
from types import ModuleType


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def import_triton(what: str) -> tuple[ModuleType, ModuleType]:
    """``(triton, triton.language)``; RuntimeError saying that ``what`` needs triton when it is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(f"{what} needs the triton package (pip install triton)") from e
    return triton, tl


__all__ = ["import_triton", "triton_available"]
