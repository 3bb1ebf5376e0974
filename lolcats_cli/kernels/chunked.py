"""Chunked hybrid attention: the semantics of :func:`~lolcats_cli.kernels.naive.hybrid_attention_naive` in
memory linear in T.

Queries are split into chunks of C. Window keys are never more than ``P = window.span`` behind their query, so
for the chunk of queries ``[c0, c0 + C)`` the *local* keys ``[c0 - P, c0 + C)`` hold every window key and the
most recent linear keys; masks from :func:`~lolcats_cli.api.window_masks` on absolute positions split them.
Every key older than ``c0 - P`` is in the linear branch of each query of the chunk, so it enters through a
prefix state ``S = sum phi_k(k) v^T`` ``(F, Dv)`` and ``z = sum phi_k(k)`` ``(F,)``, an exclusive cumulative
sum over chunks. The largest tensors are ``(B, H, T, C + P)``: no T x T matrix is ever built. Sink keys
(the first ``window.sinks`` positions) are put in front of every chunk's local keys (:func:`with_sinks`) and
kept out of the prefix state. Chunks are
attended in groups of about :data:`GROUP_QUERIES` queries (a short loop over groups, not over tokens).

The building blocks (:func:`attend_chunks`, :func:`chunk_masks`, :func:`kv_state`) are shared with the
recurrent form (``recurrent.py``), which runs them on one chunk made of the window buffer and the new tokens.
Keys and values stay at KV-head count: each KV head serves its group of query heads through grouped einsums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import Window, window_masks
from .naive import DEN_EPS, FeatureFn, expand_kv

# Queries per chunk by default. On CPU (H=9, D=64, F=128, T=4096) 64 beat 32, 96 and 128 for spans of 64
# and 128; local keys per chunk are then 64 + span.
DEFAULT_CHUNK = 64
# Chunks are attended in groups of about this many queries: the group's (C, C + span) tensors then stay in
# cache (1.5x faster at T = 16384 than one group) and, without autograd, bound the transient memory.
GROUP_QUERIES = 2048


def check_inputs(q: Tensor, k: Tensor, v: Tensor, window_logits: Tensor) -> None:
    """Raise ``ValueError`` unless q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)`` and
    window_logits ``(H,)`` fit together, with H a multiple of Hkv."""
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


def grouped(x: Tensor, num_kv_heads: int) -> Tensor:
    """``(B, H, ...) -> (B, Hkv, H // Hkv, ...)``: query heads grouped under their KV head (a view)."""
    return x.unflatten(1, (num_kv_heads, x.shape[1] // num_kv_heads))


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
) -> Tensor:
    """Hybrid attention of N query chunks over their local keys plus their prefix states, all fp32.

    q ``(B, H, N, C, D)``, fq ``(B, H, N, C, F)``; local k ``(B, Hkv, N, K, D)``, v ``(B, Hkv, N, K, Dv)``,
    fk ``(B, H, N, K, F)``; prefix S ``(B, H, N, F, Dv)``, z ``(B, H, N, F)``; masks ``(N, C, K)``;
    window_logits ``(H,)``. Returns ``(B, H, N, C, Dv)``.
    """
    H, Hkv = q.shape[1], k.shape[1]
    s = torch.einsum("bhgncd,bhnkd->bhgnck", grouped(q, Hkv), k).flatten(1, 2) * scale
    s = s.masked_fill(~in_window, float("-inf"))
    c = s.amax(dim=-1, keepdim=True)  # window max: shifts the window branch only, as in naive
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # no window key: no shift
    g = torch.sigmoid(window_logits.float()).view(1, H, 1, 1, 1)
    a = g * torch.exp(s - c) + torch.einsum("bhncf,bhnkf->bhnck", fq, fk) * in_linear  # (B, H, N, C, K)

    num = torch.einsum("bhgnck,bhnkd->bhgncd", grouped(a, Hkv), v).flatten(1, 2)
    num = num + torch.einsum("bhncf,bhnfd->bhncd", fq, S)
    den = a.sum(dim=-1) + torch.einsum("bhncf,bhnf->bhnc", fq, z)
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


def _pad_time(x: Tensor, left: int, right: int) -> Tensor:
    """Zero-pad dim 2 (time) of ``(B, h, T, X)``."""
    return F.pad(x, (0, 0, left, right))


def _local_keys(x: Tensor, span: int, chunk: int) -> Tensor:
    """``(B, h, span + N * chunk, X) -> (B, h, N, chunk + span, X)``: chunk n's local keys (a strided view)."""
    return x.unfold(2, chunk + span, chunk).transpose(-1, -2)


def _exclusive_scan(x: Tensor) -> Tensor:
    """``(B, H, N, ...) -> (B, H, N, ...)``: slice n is the sum of slices ``0 .. n-1`` along dim 2.

    A loop over chunks: 3x faster than ``torch.cumsum`` over a middle dim on CPU (measured at N = 256).
    """
    sums = [torch.zeros_like(x[:, :, 0])]
    for n in range(x.shape[2] - 1):
        sums.append(sums[-1] + x[:, :, n])
    return torch.stack(sums, dim=2)


def chunked_from_features(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    window_logits: Tensor,
    window: Window,
    scale: float,
    chunk_size: int,
) -> Tensor:
    """The chunked form given the features: fq ``(B, H, T, F)`` = phi_q(q), fk ``(B, H, T, F)`` = phi_k of
    the keys expanded to the query heads, both fp32. q, k, v as in :func:`hybrid_attention_chunked`, T >= 1.
    Returns ``(B, H, T, Dv)`` fp32.
    """
    T, P, C = q.shape[2], window.span, chunk_size
    N = -(-T // C)
    right = N * C - T
    sinks = min(window.sinks, T)
    fk = not_sinks(fk, torch.arange(T, device=q.device), sinks)

    q_c = _pad_time(q.float(), 0, right).unflatten(2, (N, C))  # (B, H, N, C, D)
    fq_c = _pad_time(fq, 0, right).unflatten(2, (N, C))  # (B, H, N, C, F)
    fk_p = _pad_time(fk, P, right)  # (B, H, P + N*C, F); padding has zero features
    v_p = _pad_time(v.float(), P, right)  # (B, Hkv, P + N*C, Dv)
    k_loc = _local_keys(_pad_time(k.float(), P, right), P, C)  # (B, Hkv, N, C + P, D)

    # Block n of the left-padded keys is [nC - P, (n+1)C - P): the keys chunk n + 1 no longer sees locally.
    S_blk, z_blk = kv_state(fk_p[:, :, : N * C].unflatten(2, (N, C)), v_p[:, :, : N * C].unflatten(2, (N, C)))
    S, z = _exclusive_scan(S_blk), _exclusive_scan(z_blk)

    c0 = torch.arange(N, device=q.device) * C  # (N,)
    q_pos = c0.unsqueeze(-1) + torch.arange(C, device=q.device)  # (N, C)
    k_pos = c0.unsqueeze(-1) + torch.arange(-P, C, device=q.device)  # (N, C + P)
    in_window, in_linear = chunk_masks(window, q_pos, k_pos, c0 - P)
    # Sink j reaches chunk n through the sink block only when it is not among the chunk's local keys.
    sink_window = (torch.arange(sinks, device=q.device) < (c0 - P)[:, None])[:, None, :].expand(N, C, sinks)

    per_chunk = (q_c, fq_c, k_loc, _local_keys(v_p, P, C), _local_keys(fk_p, P, C), S, z)  # dim 2: chunk
    step = max(1, GROUP_QUERIES // C)
    parts = []
    for n in range(0, N, step):
        g = slice(n, n + step)
        qg, fqg, kg, vg, fkg, Sg, zg = [x[:, :, g] for x in per_chunk]
        iw, il = in_window[g], in_linear[g]
        if sinks:
            kg, vg, fkg, iw, il = with_sinks(kg, vg, fkg, iw, il, k[:, :, :sinks], v[:, :, :sinks], sink_window[g])
        parts.append(attend_chunks(qg, fqg, kg, vg, fkg, Sg, zg, iw, il, window_logits, scale))
    y = torch.cat(parts, dim=2)
    return y.flatten(2, 3)[:, :, :T]


def hybrid_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: FeatureFn,
    phi_k: FeatureFn,
    window_logits: Tensor,
    window: Window,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Hybrid attention over one whole sequence that starts at position 0, in O(T) memory.

    q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``, all after RoPE; H a multiple of Hkv.
    phi_q, phi_k: ``(B, H, T, D) -> (B, H, T, F)``. window_logits ``(H,)``. Computes in fp32 and returns
    ``(B, H, T, Dv)`` in q's dtype. chunk_size: queries per chunk (default 64).
    Same values and gradients as :func:`~lolcats_cli.kernels.naive.hybrid_attention_naive`.
    """
    check_inputs(q, k, v, window_logits)
    B, H, T, D = q.shape
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    if T == 0:
        return q.new_zeros(B, H, 0, v.shape[-1])
    fq, fk = phi_q(q).float(), phi_k(expand_kv(k, H)).float()
    scale = D**-0.5 if scale is None else scale
    y = chunked_from_features(q, k, v, fq, fk, window_logits, window, scale, chunk_size)
    return y.to(q.dtype)


__all__ = ["hybrid_attention_chunked", "not_sinks", "with_sinks"]
