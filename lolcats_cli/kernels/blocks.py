"""The building blocks every form of hybrid attention shares.

* :func:`hybrid_weights`: the window softmax (max shift over the window keys, exp, the per-head window
  factor) plus the linear terms: the one implementation of docs/method.md section 1's weights, used by the naive,
  chunked, recurrent and padded forms and by the attention cross-entropy of transfer training;
* :func:`attend_chunks`: hybrid attention of query chunks over their local keys plus a prefix linear state,
  with :func:`chunk_masks`, :func:`with_sinks` and :func:`kv_state` (the chunked form runs it on many chunks,
  the recurrent step on one chunk made of the window buffer and the new tokens);
* the optional per-head decay of the linear branch (:func:`decay_matrix`, :func:`decay_scales`,
  :func:`decay_weights`): the linear term of key j at query n is multiplied by ``exp(log_decay[h] * (n - j))``;
  a prefix state is kept *decayed to a position* (its chunk start, or the state's length), so every factor
  is ``exp`` of a non-positive number;
* grouped-query helpers (:func:`expand_kv`, :func:`grouped`) and the input checks.

Keys and values stay at KV-head count: each KV head serves its group of query heads through grouped einsums.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import Window, window_masks

FeatureFn = Callable[[Tensor], Tensor]  # (B, H, T, D) -> (B, H, T, F)

# Smallest denominator: only reached when every feature of the linear branch is exactly zero (ReLU maps).
DEN_EPS = 1e-12


def check_inputs(q: Tensor, k: Tensor, v: Tensor, window_logits: Tensor, log_decay: Tensor | None = None) -> None:
    """Raise ``ValueError`` unless q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``,
    window_logits ``(H,)`` and log_decay (None or ``(H,)``) fit together, with H a multiple of Hkv."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, heads, T, dim); got shape {tuple(x.shape)}")
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k must have shape (B={B}, Hkv, T={T}, D={D}) to match q; got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape (B, Hkv, T, Dv) = {tuple(k.shape[:3])} + (Dv,); got {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if tuple(window_logits.shape) != (H,):
        raise ValueError(f"window_logits must have shape (H,) = ({H},); got {tuple(window_logits.shape)}")
    if log_decay is not None and tuple(log_decay.shape) != (H,):
        raise ValueError(f"log_decay must be None or have shape (H,) = ({H},); got {tuple(log_decay.shape)}")


def expand_kv(x: Tensor, num_heads: int) -> Tensor:
    """``(B, Hkv, T, D) -> (B, H, T, D)``: repeat each KV head for the query heads of its group."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def grouped(x: Tensor, num_kv_heads: int) -> Tensor:
    """``(B, H, ...) -> (B, Hkv, H // Hkv, ...)``: query heads grouped under their KV head (a view)."""
    return x.unflatten(1, (num_kv_heads, x.shape[1] // num_kv_heads))


def hybrid_weights(s: Tensor, linear: Tensor, in_window: Tensor, in_linear: Tensor, window_logits: Tensor) -> Tensor:
    """Unnormalised hybrid attention weights ``a`` ``(B, H, ..., K)`` fp32 of queries over K keys.

    s ``(B, H, ..., K)``: the scores ``q . k * scale`` in fp32; linear ``(B, H, ..., K)``: ``phi_q(q) . phi_k(k)``;
    masks (bool, broadcastable to s): which keys are in the window and in the linear branch; window_logits
    ``(H,)``. ``a = g_h exp(s - c)`` on window keys, with c the row's max over its window keys (no shift for
    a row without any) and ``g_h = sigmoid(window_logits[h])``, plus ``linear`` on linear keys.
    """
    s = s.masked_fill(~in_window, float("-inf"))
    c = s.amax(dim=-1, keepdim=True)  # window max: shifts the window branch only
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # no window key: no shift
    g = torch.sigmoid(window_logits.float()).view(1, -1, *([1] * (s.dim() - 2)))
    return g * torch.exp(s - c) + linear * in_linear


def _per_head(log_decay: Tensor, dims_after: int) -> Tensor:
    """log_decay ``(H,)`` as fp32 ``(1, H, 1, ..., 1)`` with ``dims_after`` trailing singleton dims."""
    return log_decay.float().view(1, -1, *([1] * dims_after))


def decay_matrix(log_decay: Tensor | None, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
    """``exp(log_decay[h] * (q - k))`` for query positions q_pos ``(Bq, ..., C)`` and key positions k_pos
    ``(Bq, ..., K)`` (Bq is 1 or the batch): ``(Bq, H, ..., C, K)`` fp32, the factor of each linear term.
    Differences below 0 (non-causal keys, never in the linear branch) count as 0, so every factor is in
    (0, 1]. None when log_decay is None."""
    if log_decay is None:
        return None
    diff = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).clamp_min(0).float().unsqueeze(1)  # (Bq, 1, ..., C, K)
    return torch.exp(_per_head(log_decay, diff.dim() - 2) * diff)


def decay_scales(log_decay: Tensor | None, q_pos: Tensor, start: Tensor) -> Tensor | None:
    """``exp(log_decay[h] * (q - start))``: the factor on a prefix state decayed to position start
    ``(Bq, ...)`` for queries q_pos ``(Bq, ..., C)``: ``(Bq, H, ..., C)`` fp32, or None without decay."""
    if log_decay is None:
        return None
    diff = (q_pos - start.unsqueeze(-1)).clamp_min(0).float().unsqueeze(1)  # (Bq, 1, ..., C)
    return torch.exp(_per_head(log_decay, diff.dim() - 2) * diff)


def decay_weights(log_decay: Tensor | None, steps: Tensor) -> Tensor | None:
    """``exp(log_decay[h] * steps)`` for ``steps`` ``(Bq, ..., T)`` >= 0 (how far each key is decayed into a
    state): ``(Bq, H, ..., T, 1)`` fp32, ready to multiply features ``(B, H, ..., T, F)``; None without decay."""
    if log_decay is None:
        return None
    diff = steps.clamp_min(0).float().unsqueeze(1)  # (Bq, 1, ..., T)
    return torch.exp(_per_head(log_decay, diff.dim() - 2) * diff).unsqueeze(-1)


def decay_state(x: Tensor, log_decay: Tensor | None, steps: int) -> Tensor:
    """A state ``(B, H, ...)`` (S or z) moved ``steps`` positions on: times ``exp(log_decay[h] * steps)``."""
    if log_decay is None or steps == 0:
        return x
    return x * torch.exp(_per_head(log_decay, x.dim() - 2) * steps)


def kv_state(fk: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Linear-attention state of a run of keys: ``S = sum_t fk_t v_t^T``, ``z = sum_t fk_t``.

    fk ``(B, H, ..., T, F)`` fp32, v ``(B, Hkv, ..., T, Dv)`` fp32 (same middle dims) ->
    S ``(B, H, ..., F, Dv)``, z ``(B, H, ..., F)``.
    """
    S = torch.einsum("bhg...tf,bh...td->bhg...fd", grouped(fk, v.shape[1]), v).flatten(1, 2)
    return S, fk.sum(dim=-2)


def chunk_masks(window: Window, q_pos: Tensor, k_pos: Tensor, fresh_from: Tensor) -> tuple[Tensor, Tensor]:
    """Window and local-linear masks ``(N, C, K)`` for N chunks of queries against their local keys.

    q_pos ``(N, C)``, k_pos ``(N, K)`` absolute positions; fresh_from ``(N,)``: keys before it are already
    in the chunk's prefix state (or do not exist) and are left out of both masks.
    """
    in_window, in_linear = window_masks(window, q_pos, k_pos)
    fresh = (k_pos >= fresh_from.clamp_min(0).unsqueeze(-1)).unsqueeze(-2)  # (N, 1, K)
    return in_window & fresh, in_linear & fresh


def attend_chunks(
    q: Tensor,
    fq: Tensor,
    k: Tensor,
    v: Tensor,
    fk: Tensor,
    S: Tensor,
    z: Tensor,
    in_window: Tensor,
    in_linear: Tensor,
    window_logits: Tensor,
    scale: float,
    lin_decay: Tensor | None = None,
    prefix_decay: Tensor | None = None,
    parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Hybrid attention of N query chunks over their local keys plus their prefix states, all fp32.

    q ``(B, H, N, C, D)``, fq ``(B, H, N, C, F)``; local k ``(B, Hkv, N, K, D)``, v ``(B, Hkv, N, K, Dv)``,
    fk ``(B, H, N, K, F)``; prefix S ``(B, H, N, F, Dv)``, z ``(B, H, N, F)``; masks ``(N, C, K)`` (or with
    leading batch dims that broadcast); window_logits ``(H,)``. With a decay: lin_decay ``(Bq, H, N, C, K')``
    (K' <= K: the last K' keys; keys put in front of them, sinks or a recall cache, are never linear) multiplies the
    local linear terms (:func:`decay_matrix`) and prefix_decay ``(Bq, H, N, C)`` the prefix
    state's terms (:func:`decay_scales`, the state being decayed to the chunk's start). Returns ``(B, H, N, C, Dv)``,
    or with ``parts`` the unnormalised numerator ``(B, H, N, C, Dv)`` and denominator ``(B, H, N, C)``.
    """
    Hkv = k.shape[1]
    s = torch.einsum("bhgncd,bhnkd->bhgnck", grouped(q, Hkv), k).flatten(1, 2) * scale
    linear = torch.einsum("bhncf,bhnkf->bhnck", fq, fk)
    if lin_decay is not None:
        extra = linear.shape[-1] - lin_decay.shape[-1]  # keys put in front (sinks, a recall cache): never linear
        linear = linear * (F.pad(lin_decay, (extra, 0), value=1.0) if extra else lin_decay)
    a = hybrid_weights(s, linear, in_window, in_linear, window_logits)  # (B, H, N, C, K)

    fq_prefix = fq if prefix_decay is None else fq * prefix_decay.unsqueeze(-1)
    num = torch.einsum("bhgnck,bhnkd->bhgncd", grouped(a, Hkv), v).flatten(1, 2)
    num = num + torch.einsum("bhncf,bhnfd->bhncd", fq_prefix, S)
    den = a.sum(dim=-1) + torch.einsum("bhncf,bhnf->bhnc", fq_prefix, z)
    if parts:
        return num, den
    return num / den.clamp_min(DEN_EPS).unsqueeze(-1)


def with_sinks(
    k: Tensor,
    v: Tensor,
    fk: Tensor,
    in_window: Tensor,
    in_linear: Tensor,
    k_sink: Tensor,
    v_sink: Tensor,
    sink_window: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Put the sink keys in front of N chunks' local keys, for :func:`attend_chunks`.

    k ``(B, Hkv, N, K, D)``, v ``(B, Hkv, N, K, Dv)``, fk ``(B, H, N, K, F)``, masks ``(..., C, K)``;
    k_sink ``(B, Hkv, s, D)``, v_sink ``(B, Hkv, s, Dv)``: the keys and values of positions ``[0, s)``;
    sink_window ``(..., C, s)``: which query sees which sink *through this block* (False where the sink is
    among the local keys already, so no key counts twice). Sinks are never in the linear branch: their
    features are zero and their linear mask False. Returns k, v, fk, in_window, in_linear with ``s + K`` keys.
    """
    N, s = k.shape[2], k_sink.shape[2]
    ks = k_sink.to(k.dtype).unsqueeze(2).expand(-1, -1, N, -1, -1)
    vs = v_sink.to(v.dtype).unsqueeze(2).expand(-1, -1, N, -1, -1)
    fks = fk.new_zeros(*fk.shape[:3], s, fk.shape[-1])
    lead = torch.broadcast_shapes(in_window.shape[:-1], sink_window.shape[:-1])
    iw = torch.cat([sink_window.expand(*lead, s), in_window.expand(*lead, in_window.shape[-1])], dim=-1)
    il = torch.cat([torch.zeros_like(iw[..., :s]), in_linear.expand(*lead, in_linear.shape[-1])], dim=-1)
    return torch.cat([ks, k], dim=3), torch.cat([vs, v], dim=3), torch.cat([fks, fk], dim=3), iw, il


def not_sinks(x: Tensor, positions: Tensor, sinks: int) -> Tensor:
    """``x`` ``(B, H, T, F)`` with the rows at ``positions`` ``(T,)`` or ``(B, T)`` below ``sinks`` zeroed
    (sink keys never enter the linear state). Autograd-safe; ``x`` itself when ``sinks`` is 0."""
    if sinks <= 0:
        return x
    keep = positions >= sinks
    keep = keep[:, None, :, None] if keep.dim() == 2 else keep[:, None]
    return x * keep.to(x.dtype)


__all__ = [
    "DEN_EPS",
    "FeatureFn",
    "attend_chunks",
    "check_inputs",
    "chunk_masks",
    "decay_matrix",
    "decay_scales",
    "decay_state",
    "decay_weights",
    "expand_kv",
    "grouped",
    "hybrid_weights",
    "kv_state",
    "not_sinks",
    "with_sinks",
]
