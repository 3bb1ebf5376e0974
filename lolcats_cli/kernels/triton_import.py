"""Triton, imported lazily by the fused kernels' ``build()`` functions (a CPU install without it imports lolcats
fine, and ``TRITON_INTERPRET`` is read when the kernels are defined): whether it is installed, the import, and
whether a fused replacement of a PyTorch computation runs on a tensor."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch
from torch import Tensor

from ..switches import switch, triton_interpreting


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


def fused_wanted(env: str, x: Tensor) -> bool:
    """Whether a fused Triton form of a PyTorch computation runs on ``x``: the switch ``env`` not 0 on a CUDA
    tensor, or 1 on a CPU tensor under ``TRITON_INTERPRET=1`` (the tests); not inside ``torch.compile`` (which
    fuses the PyTorch form itself); triton installed. ValueError for a value of ``env`` that is not a switch."""
    value = switch(env, "on for CUDA tensors")
    if value is False or not (x.is_cuda or (value and triton_interpreting())):
        return False
    return not torch.compiler.is_compiling() and triton_available()


__all__ = ["fused_wanted", "import_triton", "triton_available"]
