"""Hybrid attention of left-padded batches: each row exactly as if it had no padding.

Rows of a batch may start with pad tokens; ``pads`` ``(B,)`` counts them. Pad keys contribute nothing to
either branch, and a row's window positions count from its first real token, so a left-padded row gives the
output of its real tokens alone. The other forms know one shared position per batch, so (i) over whole
prompts, :func:`padded_attention` shifts each row left so it starts at position 0, runs a kernel's
whole-sequence form, and shifts the output back; (ii) for decode steps, :func:`padded_step` runs
:func:`~.blocks.attend_chunks` with per-row window masks; :func:`padded_prefill_state` builds the state.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..api import Window, window_masks
from .blocks import (
    FeatureFn,
    attend_chunks,
    decay_matrix,
    decay_scales,
    decay_state,
    decay_weights,
    expand_kv,
    kv_state,
    not_sinks,
    with_sinks,
)
from .recurrent import HybridState, last_positions

# Kernel.sequence: (q, k, v, phi_q, phi_k, window_logits, window, scale, *, log_decay)
SequenceFn = Callable[..., Tensor]


def shift_rows(x: Tensor, shift: Tensor) -> Tensor:
    """``(B, h, T, X)``: row b rotated left by ``shift[b]`` along time, ``out[b, :, i] = x[b, :, (i + s_b) % T]``."""
    B, h, T, X = x.shape
    idx = (torch.arange(T, device=x.device)[None] + shift[:, None]) % T  # (B, T)
    return x.gather(2, idx[:, None, :, None].expand(B, h, T, X))


def keep_real(x: Tensor, real: Tensor) -> Tensor:
    """``(B, h, T, X)`` with the positions where ``real`` ``(B, T)`` is False set to 0 (NaN-safe, unlike ``*``)."""
    return torch.where(real[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def folded_before_rows(window: Window, lengths: Tensor) -> Tensor:
    """Per row ``clamp(window.start(L), 0, L)`` for lengths ``L`` ``(B,)``: keys before it are in S and z."""
    return torch.minimum(window.start(lengths).clamp_min(0), lengths)


def padded_attention(
    sequence: SequenceFn, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn,
    window_logits: Tensor, window: Window, pads: Tensor, scale: float | None = None, log_decay: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Hybrid attention over whole left-padded sequences through ``sequence`` (a kernel's unpadded form).

    q ``(B, H, T, D)``, k/v ``(B, Hkv, T, D)``; ``pads`` ``(B,)`` leading pad counts. Rows are rotated so
    their real tokens start at position 0 (the pads go to the end, where causal attention hides them), run
    through ``sequence``, and rotated back. Returns ``(B, H, T, Dv)``; pad rows are 0.
    """
    T = q.shape[2]
    real = torch.arange(T, device=q.device)[None] >= pads[:, None]  # (B, T)
    q, k, v = keep_real(q, real), keep_real(k, real), keep_real(v, real)
    y = sequence(
        shift_rows(q, pads), shift_rows(k, pads), shift_rows(v, pads), phi_q, phi_k, window_logits, window, scale,
        log_decay=log_decay,
    )  # fmt: skip
    return keep_real(shift_rows(y, (T - pads) % T), real)


def padded_prefill_state(
    k: Tensor, v: Tensor, phi_k: FeatureFn, window: Window, pads: Tensor, num_heads: int, fk: Tensor | None = None,
    log_decay: Tensor | None = None,
) -> HybridState:  # fmt: skip
    """The decode state after left-padded prompts: k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``, pads ``(B,)``.

    Row b has ``n_b = T - pads[b]`` real tokens; S and z hold its real non-sink keys before ``f(n_b)``; the
    buffers hold the last ``span`` positions of the padded layout (pads in them are masked out by
    :func:`padded_step`); the sink buffers hold each row's first ``sinks`` real tokens. ``fk`` ``(B, H, T, F)``:
    phi_k of the keys expanded to the query heads, when the caller has it already (pad positions are ignored).
    With ``log_decay`` S and z are decayed to the row's length: key at padded position t weighs ``d^(T - t)``.
    """
    T = k.shape[2]
    rel = torch.arange(T, device=k.device)[None] - pads[:, None]  # (B, T) position within the row
    real = rel >= 0
    k, v = keep_real(k, real), keep_real(v, real)
    fold = real & (rel < folded_before_rows(window, T - pads)[:, None])  # (B, T)
    if fk is None:
        fk = phi_k(expand_kv(k, num_heads))
    fk = keep_real(not_sinks(fk.float(), rel, window.sinks), fold)
    if log_decay is not None:
        fk = fk * decay_weights(log_decay, (T - torch.arange(T, device=k.device))[None])
    S, z = kv_state(fk, v.float())
    span = window.span
    k_sink, v_sink = row_sinks(k, pads, window.sinks), row_sinks(v, pads, window.sinks)
    return HybridState(last_positions(k, span), last_positions(v, span), S, z, T, k_sink, v_sink)


def row_sinks(x: Tensor, pads: Tensor, sinks: int) -> Tensor | None:
    """``(B, h, sinks, X)``: each row's first ``sinks`` real positions of ``x`` ``(B, h, T, X)`` (zeros past
    the row's end), or None without sinks."""
    if not sinks:
        return None
    T = x.shape[2]
    if T == 0:  # an empty prompt: no sink seen yet
        return x.new_zeros(x.shape[0], x.shape[1], sinks, x.shape[3])
    idx = pads[:, None] + torch.arange(sinks, device=x.device)[None]  # (B, sinks) padded positions
    got = x.gather(2, idx.clamp_max(T - 1)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
    return keep_real(got, idx < T)


def padded_step(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    state: HybridState, pads: Tensor, scale: float | None = None, log_decay: Tensor | None = None,
) -> tuple[Tensor, HybridState]:  # fmt: skip
    """:func:`~.recurrent.hybrid_step` for rows that started with ``pads`` ``(B,)`` pad tokens.

    q ``(B, H, t, D)``, k/v ``(B, Hkv, t, D)`` at padded positions ``state.length ..``; each row's window is
    placed by its own positions (padded position minus its pads), and pad keys are left out of both branches.
    Returns ``(B, H, t, Dv)`` in q's dtype and the new state.
    """
    H, t = q.shape[1], q.shape[2]
    P, L = window.span, state.length
    scale = q.shape[3] ** -0.5 if scale is None else scale
    k_all = torch.cat([state.k_buf.to(k.dtype), k], dim=2)  # (B, Hkv, P + t, D): padded positions [L - P, L + t)
    v_all = torch.cat([state.v_buf.to(v.dtype), v], dim=2)
    rel_k = torch.arange(L - P, L + t, device=q.device)[None] - pads[:, None]  # (B, P + t)
    rel_q = rel_k[:, P:]  # (B, t)
    real_k = rel_k >= 0
    k_all, v_all, q = keep_real(k_all, real_k), keep_real(v_all, real_k), keep_real(q, rel_q >= 0)
    lo = folded_before_rows(window, (L - pads).clamp_min(0))  # (B,) keys before lo are already in S, z
    hi = folded_before_rows(window, (L + t - pads).clamp_min(0))
    fresh = (real_k & (rel_k >= lo[:, None]))[:, None, :]  # (B, 1, P + t)
    in_window, in_linear = window_masks(window, rel_q, rel_k)  # (B, t, P + t)
    masks = [(m & fresh)[:, None, None] for m in (in_window, in_linear)]  # (B, 1, 1, t, P + t)

    fk = not_sinks(phi_k(expand_kv(k_all, H)).float(), rel_k, window.sinks)  # (B, H, P + t, F)
    k_loc, v_loc, fk_loc = k_all.float().unsqueeze(2), v_all.float().unsqueeze(2), fk.unsqueeze(2)
    # decay depends on position differences only: the padded positions give the rows' own
    pos = torch.arange(L - P, L + t, device=q.device)
    lin_decay = decay_matrix(log_decay, pos[None, None, P:], pos[None, None])  # (1, H, 1, t, P + t)
    prefix_decay = decay_scales(log_decay, pos[None, None, P:], torch.full((1, 1), L, device=q.device))
    k_sink, v_sink = state.k_sink, state.v_sink
    if k_sink is not None and v_sink is not None:
        # a row's sink j comes from the sink buffer once it is older than the row's fresh keys (from lo)
        sink_window = torch.arange(window.sinks, device=q.device)[None] < lo[:, None]  # (B, sinks)
        sink_window = sink_window[:, None, None, None, :].expand(-1, 1, 1, t, -1)  # (B, 1, 1, t, sinks)
        k_loc, v_loc, fk_loc, masks[0], masks[1] = with_sinks(
            k_loc, v_loc, fk_loc, masks[0], masks[1], k_sink.float(), v_sink.float(), sink_window
        )
    y = attend_chunks(
        q.float().unsqueeze(2), phi_q(q).float().unsqueeze(2), k_loc, v_loc, fk_loc,
        state.S.unsqueeze(2), state.z.unsqueeze(2), masks[0], masks[1], window_logits, scale,
        lin_decay, prefix_decay,
    ).squeeze(2)  # fmt: skip

    leaving = real_k & (rel_k >= lo[:, None]) & (rel_k < hi[:, None])  # (B, P + t): keys that leave the window
    fk_in = keep_real(fk, leaving)
    if log_decay is not None:  # keys enter decayed to the new length
        fk_in = fk_in * decay_weights(log_decay, (L + t - pos)[None])
    dS, dz = kv_state(fk_in, v_all.float())
    if k_sink is not None and v_sink is not None:  # rows still in their first tokens: fill their sinks
        k_sink, v_sink = _fill_sinks(k_sink, k, rel_q), _fill_sinks(v_sink, v, rel_q)
    S, z = decay_state(state.S, log_decay, t) + dS, decay_state(state.z, log_decay, t) + dz
    new = HybridState(k_all[:, :, t:].clone(), v_all[:, :, t:].clone(), S, z, L + t, k_sink, v_sink)
    return y.to(q.dtype), new


def _fill_sinks(buf: Tensor, x: Tensor, rel: Tensor) -> Tensor:
    """``buf`` ``(B, h, sinks, X)`` with each new token of ``x`` ``(B, h, t, X)`` whose row position ``rel``
    ``(B, t)`` is a sink position written into its slot."""
    slot = rel[:, None, :] == torch.arange(buf.shape[2], device=rel.device)[None, :, None]  # (B, sinks, t)
    new = torch.einsum("bst,bhtx->bhsx", slot.to(x.dtype), x).to(buf.dtype)
    return torch.where(slot.any(dim=-1)[:, None, :, None], new, buf)


__all__ = [
    "folded_before_rows", "keep_real", "padded_attention", "padded_prefill_state", "padded_step", "row_sinks",
    "shift_rows",
]
