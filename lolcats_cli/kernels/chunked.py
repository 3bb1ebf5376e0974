"""Chunked hybrid attention: the semantics of :func:`~lolcats_cli.kernels.naive.hybrid_attention_naive` in
memory linear in T.

Queries are split into chunks of C. Window keys are never more than ``P = window.span`` behind their query, so
for the chunk of queries ``[c0, c0 + C)`` the *local* keys ``[c0 - P, c0 + C)`` hold every window key and the
most recent linear keys; masks from :func:`~lolcats_cli.api.window_masks` on absolute positions split them.
Every key older than ``c0 - P`` is in the linear branch of each query of the chunk, so it enters through a
prefix state ``S = sum phi_k(k) v^T`` ``(F, Dv)`` and ``z = sum phi_k(k)`` ``(F,)``, an exclusive cumulative
sum over chunks (with a decay: each chunk's state is decayed to the chunk's first position, and the scan
multiplies by ``d^C`` per chunk). The largest tensors are ``(B, H, T, C + P)``: no T x T matrix is ever built. Sink keys
(the first ``window.sinks`` positions) are put in front of every chunk's local keys
(:func:`~.blocks.with_sinks`) and kept out of the prefix state. Chunks are attended in groups of about
:data:`GROUP_QUERIES` queries (a short loop over groups, not over tokens).

The building blocks (:func:`~.blocks.attend_chunks`, :func:`~.blocks.chunk_masks`, :func:`~.blocks.kv_state`)
are shared with the recurrent form (``recurrent.py``), which runs them on one chunk made of the window buffer
and the new tokens. :func:`hybrid_prefill` is this form over a prompt plus the decode state after it (the
features of the keys computed once for both); :class:`ChunkedKernel` is the form as a kernel, the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import Window
from .base import Kernel
from .blocks import (
    FeatureFn,
    attend_chunks,
    check_inputs,
    chunk_masks,
    decay_matrix,
    decay_scales,
    decay_weights,
    expand_kv,
    kv_state,
    not_sinks,
    with_sinks,
)
from .padded import padded_prefill_state
from .recurrent import HybridState

# Queries per chunk by default. On CPU (H=9, D=64, F=128, T=4096) 64 beat 32, 96 and 128 for spans of 64
# and 128; local keys per chunk are then 64 + span.
DEFAULT_CHUNK = 64
# Chunks are attended in groups of about this many queries: the group's (C, C + span) tensors then stay in
# cache (1.5x faster at T = 16384 than one group) and, without autograd, bound the transient memory.
GROUP_QUERIES = 2048


def _pad_time(x: Tensor, left: int, right: int) -> Tensor:
    """Zero-pad dim 2 (time) of ``(B, h, T, X)``."""
    return F.pad(x, (0, 0, left, right))


def _local_keys(x: Tensor, span: int, chunk: int) -> Tensor:
    """``(B, h, span + N * chunk, X) -> (B, h, N, chunk + span, X)``: chunk n's local keys (a strided view)."""
    return x.unfold(2, chunk + span, chunk).transpose(-1, -2)


def _exclusive_scan(x: Tensor, factor: Tensor | None = None) -> Tensor:
    """``(B, H, N, ...) -> (B, H, N, ...)``: slice n is the sum of slices ``0 .. n-1`` along dim 2, each
    earlier sum multiplied by ``factor`` (broadcastable to a slice, e.g. the decay over one chunk) per step.

    A loop over chunks: 3x faster than ``torch.cumsum`` over a middle dim on CPU (measured at N = 256).
    """
    sums = [torch.zeros_like(x[:, :, 0])]
    for n in range(x.shape[2] - 1):
        sums.append((sums[-1] if factor is None else sums[-1] * factor) + x[:, :, n])
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
    log_decay: Tensor | None = None,
    parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The chunked form given the features: fq ``(B, H, T, F)`` = phi_q(q), fk ``(B, H, T, F)`` = phi_k of
    the keys expanded to the query heads, both fp32. q, k, v, log_decay as in :func:`hybrid_attention_chunked`,
    T >= 1. Returns ``(B, H, T, Dv)`` fp32, or with ``parts`` its numerator ``(B, H, T, Dv)`` and denominator
    ``(B, H, T)`` (what the delta-rule kernel adds its own linear branch to).
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

    c0 = torch.arange(N, device=q.device) * C  # (N,)
    q_pos = c0.unsqueeze(-1) + torch.arange(C, device=q.device)  # (N, C)
    k_pos = c0.unsqueeze(-1) + torch.arange(-P, C, device=q.device)  # (N, C + P)
    in_window, in_linear = chunk_masks(window, q_pos, k_pos, c0 - P)

    # Block n of the left-padded keys is [nC - P, (n+1)C - P): the keys chunk n + 1 no longer sees locally.
    fk_blk = fk_p[:, :, : N * C].unflatten(2, (N, C))  # (B, H, N, C, F)
    chunk_decay = None
    if log_decay is not None:  # block n's keys decayed to chunk n + 1's start: (n+1)C - j in (P, P + C]
        fk_blk = fk_blk * decay_weights(log_decay, (C + P - torch.arange(C, device=q.device)).expand(1, N, C))
        chunk_decay = torch.exp(log_decay.float() * C).view(1, -1, 1, 1)
    S_blk, z_blk = kv_state(fk_blk, v_p[:, :, : N * C].unflatten(2, (N, C)))
    S = _exclusive_scan(S_blk, chunk_decay)
    z = _exclusive_scan(z_blk, None if chunk_decay is None else chunk_decay.squeeze(-1))
    lin_decay = prefix_decay = None
    if log_decay is not None:
        lin_decay = decay_matrix(log_decay, q_pos[None], k_pos[None])  # (1, H, N, C, C + P)
        prefix_decay = decay_scales(log_decay, q_pos[None], c0[None])  # (1, H, N, C)
    # Sink j reaches chunk n through the sink block only when it is not among the chunk's local keys.
    sink_window = (torch.arange(sinks, device=q.device) < (c0 - P)[:, None])[:, None, :].expand(N, C, sinks)

    per_chunk = (q_c, fq_c, k_loc, _local_keys(v_p, P, C), _local_keys(fk_p, P, C), S, z)  # dim 2: chunk
    step = max(1, GROUP_QUERIES // C)
    outs = []
    for n in range(0, N, step):
        g = slice(n, n + step)
        qg, fqg, kg, vg, fkg, Sg, zg = [x[:, :, g] for x in per_chunk]
        iw, il = in_window[g], in_linear[g]
        ldg = None if lin_decay is None else lin_decay[:, :, g]
        if sinks:
            kg, vg, fkg, iw, il = with_sinks(kg, vg, fkg, iw, il, k[:, :, :sinks], v[:, :, :sinks], sink_window[g])
        pdg = None if prefix_decay is None else prefix_decay[:, :, g]
        outs.append(attend_chunks(qg, fqg, kg, vg, fkg, Sg, zg, iw, il, window_logits, scale, ldg, pdg, parts))
    if parts:
        num = torch.cat([o[0] for o in outs], dim=2).flatten(2, 3)[:, :, :T]
        return num, torch.cat([o[1] for o in outs], dim=2).flatten(2, 3)[:, :, :T]
    y = torch.cat(outs, dim=2)
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
    *,
    log_decay: Tensor | None = None,
) -> Tensor:
    """Hybrid attention over one whole sequence that starts at position 0, in O(T) memory.

    q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``, all after RoPE; H a multiple of Hkv.
    phi_q, phi_k: ``(B, H, T, D) -> (B, H, T, F)``. window_logits ``(H,)``; log_decay None or ``(H,)`` <= 0
    (the linear term of key j at query n times ``exp(log_decay[h] * (n - j))``). Computes in fp32 and returns
    ``(B, H, T, Dv)`` in q's dtype. chunk_size: queries per chunk (default 64).
    Same values and gradients as :func:`~lolcats_cli.kernels.naive.hybrid_attention_naive`.
    """
    check_inputs(q, k, v, window_logits, log_decay)
    B, H, T, D = q.shape
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    if T == 0:
        return q.new_zeros(B, H, 0, v.shape[-1])
    fq, fk = phi_q(q).float(), phi_k(expand_kv(k, H)).float()
    scale = D**-0.5 if scale is None else scale
    y = chunked_from_features(q, k, v, fq, fk, window_logits, window, scale, chunk_size, log_decay)
    return y.to(q.dtype)


def hybrid_prefill(
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
) -> tuple[Tensor, HybridState]:
    """The chunked form over a prompt that starts at position 0, plus the state after it.

    q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)`` (T may be 0); phi maps
    ``(B, H, T, D) -> (B, H, T, F)``; window_logits ``(H,)``; log_decay None or ``(H,)``. Returns
    ``(B, H, T, Dv)`` in q's dtype and the :class:`HybridState` at length T.
    """
    check_inputs(q, k, v, window_logits, log_decay)
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    fk = phi_k(expand_kv(k, H)).float()  # (B, H, T, F)
    if T == 0:
        y = q.new_zeros(B, H, 0, v.shape[-1])
    else:
        fq = phi_q(q).float()
        y = chunked_from_features(q, k, v, fq, fk, window_logits, window, scale, DEFAULT_CHUNK, log_decay)
    no_pads = torch.zeros(B, dtype=torch.long, device=q.device)
    state = padded_prefill_state(k, v, phi_k, window, no_pads, H, fk=fk, log_decay=log_decay)  # phi_k runs once
    return y.to(q.dtype), state


class ChunkedKernel(Kernel):
    """The chunked form (O(T) memory) and its fused prefill; steps through the shared recurrent form."""

    name = "chunked"
    priority = 0
    sequence = staticmethod(hybrid_attention_chunked)  # type: ignore[assignment]

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, *, scale: float | None = None, pads: Tensor | None = None, log_decay: Tensor | None = None,
    ) -> tuple[Tensor, HybridState]:  # fmt: skip
        if pads is not None:
            return super().prefill(
                q, k, v, phi_q, phi_k, window_logits, window, scale=scale, pads=pads, log_decay=log_decay
            )
        return hybrid_prefill(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay=log_decay)


__all__ = [
    "DEFAULT_CHUNK",
    "ChunkedKernel",
    "hybrid_attention_chunked",
    "hybrid_prefill",
    "not_sinks",
    "with_sinks",
]
