"""The naive O(T^2) hybrid attention: the reference every other form is tested against.

Semantics (METHOD.md section 1), per head h and query n, with s_ni = q_n . k_i * scale in fp32:

    c_n = max_{i in W(n)} s_ni                       (window max; the linear branch is not shifted)
    num = g_h sum_{W(n)} exp(s_ni - c_n) v_i + sum_{L(n)} (phi_q(q_n) . phi_k(k_j)) v_j
    den = g_h sum_{W(n)} exp(s_ni - c_n)     + sum_{L(n)}  phi_q(q_n) . phi_k(k_j)
    y_n = num / den,        g_h = sigmoid(window_logits[h])
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..api import Window, window_masks

FeatureFn = Callable[[Tensor], Tensor]

# Smallest denominator: only reached when every feature of the linear branch is exactly zero (ReLU maps).
DEN_EPS = 1e-12


def expand_kv(x: Tensor, num_heads: int) -> Tensor:
    """``(B, Hkv, T, D) -> (B, H, T, D)``: repeat each KV head for the query heads of its group."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def hybrid_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: FeatureFn,
    phi_k: FeatureFn,
    window_logits: Tensor,
    window: Window,
    scale: float | None = None,
) -> Tensor:
    """Hybrid attention over one whole sequence that starts at position 0.

    q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``, all after RoPE; H a multiple of Hkv.
    phi_q, phi_k: ``(B, H, T, D) -> (B, H, T, F)``. window_logits ``(H,)``. Returns ``(B, H, T, Dv)`` in
    q's dtype. Builds T x T matrices: for tests and short sequences only.
    """
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    k, v = expand_kv(k, H), expand_kv(v, H)
    pos = torch.arange(T, device=q.device)
    in_window, in_linear = window_masks(window, pos, pos)  # (T, T)

    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    s = s.masked_fill(~in_window, float("-inf"))
    c = s.amax(dim=-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # no window (pure linear): no shift
    g = torch.sigmoid(window_logits.float()).view(1, H, 1, 1)
    a_window = g * torch.exp(s - c)

    fq, fk = phi_q(q).float(), phi_k(k).float()
    a_linear = torch.einsum("bhnf,bhmf->bhnm", fq, fk) * in_linear

    a = a_window + a_linear
    y = torch.einsum("bhnm,bhmd->bhnd", a, v.float()) / a.sum(dim=-1, keepdim=True).clamp_min(DEN_EPS)
    return y.to(q.dtype)
