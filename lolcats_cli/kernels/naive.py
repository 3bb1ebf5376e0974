"""The naive O(T^2) hybrid attention: the reference every other form is tested against.

Semantics (docs/method.md section 1), per head h and query n, with s_ni = q_n . k_i * scale in fp32:

    c_n = max_{i in W(n)} s_ni                       (window max; the linear branch is not shifted)
    num = g_h sum_{W(n)} exp(s_ni - c_n) v_i + sum_{L(n)} d_h^(n-j) (phi_q(q_n) . phi_k(k_j)) v_j
    den = g_h sum_{W(n)} exp(s_ni - c_n)     + sum_{L(n)} d_h^(n-j)  phi_q(q_n) . phi_k(k_j)
    y_n = num / den,        g_h = sigmoid(window_logits[h]),   d_h = exp(log_decay[h]) (1 without decay)

The weights come from :func:`~.blocks.hybrid_weights`, shared with every other form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..api import Window, window_masks
from .base import Kernel
from .blocks import DEN_EPS, FeatureFn, check_inputs, decay_matrix, expand_kv, hybrid_weights


def hybrid_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: FeatureFn,
    phi_k: FeatureFn,
    window_logits: Tensor,
    window: Window,
    scale: float | None = None,
    *,
    log_decay: Tensor | None = None,
) -> Tensor:
    """Hybrid attention over one whole sequence that starts at position 0.

    q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``, all after RoPE; H a multiple of Hkv.
    phi_q, phi_k: ``(B, H, T, D) -> (B, H, T, F)``. window_logits ``(H,)``; log_decay None or ``(H,)`` <= 0.
    Returns ``(B, H, T, Dv)`` in q's dtype. Builds T x T matrices: for tests and short sequences only.
    """
    check_inputs(q, k, v, window_logits, log_decay)
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    k, v = expand_kv(k, H), expand_kv(v, H)
    pos = torch.arange(T, device=q.device)
    in_window, in_linear = window_masks(window, pos, pos)  # (T, T)

    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    fq, fk = phi_q(q).float(), phi_k(k).float()
    linear = torch.einsum("bhnf,bhmf->bhnm", fq, fk)
    decay = decay_matrix(log_decay, pos[None], pos[None])  # (1, H, T, T) or None
    if decay is not None:
        linear = linear * decay
    a = hybrid_weights(s, linear, in_window, in_linear, window_logits)
    y = torch.einsum("bhnm,bhmd->bhnd", a, v.float()) / a.sum(dim=-1, keepdim=True).clamp_min(DEN_EPS)
    return y.to(q.dtype)


class NaiveKernel(Kernel):
    """The reference as a kernel: never chosen automatically (T x T memory), only by name (``naive``)."""

    name = "naive"
    priority = -1
    sequence = staticmethod(hybrid_attention_naive)  # type: ignore[assignment]


__all__ = ["DEN_EPS", "FeatureFn", "NaiveKernel", "expand_kv", "hybrid_attention_naive"]
