"""Hybrid attention behind one seam: a :class:`Kernel` per implementation, chosen once per device.

Modules: ``blocks`` (the shared math: window-softmax weights, chunk attention, linear state), ``naive`` (the
O(T^2) reference), ``chunked`` (linear memory; the default), ``recurrent`` (the decode state and step),
``padded`` (left-padded batches), ``base`` (the :class:`Kernel` signature), ``registry`` (names and the
choice: ``LOLCATS_KERNEL``), ``compare`` (tolerances for tests). Every fast path keeps the naive reference
beside it and a test that they agree.
"""

from __future__ import annotations

from torch import Tensor

from ..api import Window
from .base import Kernel
from .blocks import FeatureFn
from .chunked import hybrid_attention_chunked, hybrid_prefill
from .naive import hybrid_attention_naive
from .recurrent import HybridState, hybrid_step
from .registry import ENV_VAR, KERNELS, auto_kernel, get_kernel, register_kernel, select_kernel


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: FeatureFn,
    phi_k: FeatureFn,
    window_logits: Tensor,
    window: Window,
    scale: float | None = None,
    *,
    pads: Tensor | None = None,
    log_decay: Tensor | None = None,
) -> Tensor:
    """Hybrid attention over whole sequences through the kernel :func:`~.registry.select_kernel` picks for
    q's device (``LOLCATS_KERNEL``, else the automatic choice).

    q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``; pads ``(B,)`` leading pad tokens or None;
    log_decay ``(H,)`` or None; returns ``(B, H, T, Dv)`` in q's dtype.
    """
    kernel = select_kernel(None, q.device)
    return kernel.attention(q, k, v, phi_q, phi_k, window_logits, window, scale=scale, pads=pads, log_decay=log_decay)


__all__ = [
    "ENV_VAR",
    "KERNELS",
    "HybridState",
    "Kernel",
    "auto_kernel",
    "get_kernel",
    "hybrid_attention",
    "hybrid_attention_chunked",
    "hybrid_attention_naive",
    "hybrid_prefill",
    "hybrid_step",
    "register_kernel",
    "select_kernel",
]
