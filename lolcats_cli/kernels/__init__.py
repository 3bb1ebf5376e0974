"""Hybrid attention in three forms: the naive O(T^2) reference, the chunked linear-memory form, and the
recurrent (prefill + step) form. Every fast path keeps the naive reference beside it and a test that they agree."""

from __future__ import annotations

from torch import Tensor

from ..api import Window
from .chunked import hybrid_attention_chunked
from .naive import FeatureFn, hybrid_attention_naive
from .recurrent import HybridState, hybrid_prefill, hybrid_step


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: FeatureFn,
    phi_k: FeatureFn,
    window_logits: Tensor,
    window: Window,
    scale: float | None = None,
) -> Tensor:
    """Hybrid attention over a whole sequence through the fastest available form (the chunked one today).

    q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``; returns ``(B, H, T, Dv)`` in q's dtype.
    """
    return hybrid_attention_chunked(q, k, v, phi_q, phi_k, window_logits, window, scale)


__all__ = [
    "HybridState",
    "hybrid_attention",
    "hybrid_attention_chunked",
    "hybrid_attention_naive",
    "hybrid_prefill",
    "hybrid_step",
]
