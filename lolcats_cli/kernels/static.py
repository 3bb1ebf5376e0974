"""The static decode form: the fixed-size state in preallocated buffers and a one-token step that updates them
in place, with no data-dependent Python control flow and no host synchronisation.

:func:`~.recurrent.hybrid_step` (the reference) concatenates the window buffer with the new tokens and copies
it back every step, and reads the state's length on the host. Here (per layer, for a batch of B rows):

* ``k_ring`` ``(B, Hkv, P, D)``, ``v_ring``: the keys and values of the last ``P = window.span`` positions, the
  key of (padded) position p in slot ``p % P``; a step writes one slot (``index_copy_``), nothing moves;
* ``k_sink``, ``v_sink`` ``(B, Hkv, sinks, D)``: each row's first ``sinks`` keys and values (or None);
* ``S`` ``(B, H, F, Dv)``, ``z`` ``(B, H, F)`` fp32: the linear state of :class:`~.recurrent.HybridState`, with
  the decay (``log_decay``) applied to S lazily: the state's S is ``exp(s_log) * S``, ``s_log`` ``(B, H)`` fp32.
  A step where no key leaves a row's window adds ``log_decay`` to the row's ``s_log`` and leaves its S alone (a
  terrace window drops keys once every ``size`` steps, so S is rewritten that rarely); a step where keys leave
  applies the pending decay, adds them and sets ``s_log`` to 0. z is small and kept decayed. S may be kept in bf16
  or fp16 (``from_hybrid(..., s_dtype=)``: half the state's bytes); steps compute in fp32 and round S once per
  rewrite;
* ``length``: a 0-d long tensor, the padded position of the next token (shared by the rows), and ``pads``
  ``(B,)``: each row's leading pad tokens, so left-padded rows decode exactly as alone.

:func:`static_step` is the same computation as ``hybrid_step`` with ``t = 1`` (``padded_step`` for padded
rows): every mask is computed on the device from ``length``, the keys that leave the window (at most
:func:`fold_width` per step: 1 for a sliding window, ``size`` for a terrace) are gathered from the ring and
folded into S and z under a mask. So the step can be captured in a CUDA graph or compiled with
``torch.compile(fullgraph=True)``. Windows must keep each query in its own window (``start(n) <= n``) and have a
span of at least 1: :func:`static_supported` says whether one does. No transformers dependency.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..api import Window
from .blocks import DEN_EPS, FeatureFn, decay_state, decay_weights, expand_kv, grouped, hybrid_weights, kv_state
from .recurrent import HybridState

# How far ahead of a window's start the fold width and the window checks look (positions 0 .. this * span).
_PROBE_SPANS = 8


def _probe(window: Window) -> Tensor:
    return torch.arange(_PROBE_SPANS * max(window.span, 1) + window.sinks + 2)


def static_supported(window: Window) -> str | None:
    """None when the static step can run ``window``, else why not (a sentence)."""
    if window.span < 1:
        return f"the window {window!r} has no softmax keys (span 0): the static step needs a ring of at least one key"
    n = _probe(window)
    if bool((window.start(n) > n).any()):
        return f"the window {window!r} leaves a query out of its own window (start(n) > n)"
    return None


def fold_width(window: Window) -> int:
    """The most keys that leave ``window`` in one step: ``max_n f(n + 1) - f(n)``, ``f(n) = clamp(start(n), 0, n)``
    (1 for a sliding window, ``size`` for a terrace); checked over the first ``8 x span`` positions."""
    n = _probe(window)
    f = torch.minimum(window.start(n).clamp_min(0), n)
    return max(int((f[1:] - f[:-1]).max().item()), 1)


def _folded_before(window: Window, rel: Tensor) -> Tensor:
    """``f(rel) = clamp(start(rel), 0, rel)`` per row, rel ``(B,)`` >= 0."""
    return torch.minimum(window.start(rel).clamp_min(0), rel)


@dataclasses.dataclass
class StaticState:
    """The decode state of one layer in preallocated buffers (see the module docstring)."""

    k_ring: Tensor
    v_ring: Tensor
    S: Tensor
    z: Tensor
    length: Tensor  # 0-d long: padded position of the next token
    pads: Tensor  # (B,) long
    k_sink: Tensor | None = None
    v_sink: Tensor | None = None
    s_log: Tensor | None = None  # (B, H) fp32: the decay not yet applied to S (zeros when not given)

    def __post_init__(self) -> None:
        if self.s_log is None:
            self.s_log = torch.zeros(self.S.shape[:2], dtype=torch.float32, device=self.S.device)

    @classmethod
    def from_hybrid(cls, state: HybridState, pads: Tensor | None = None, s_dtype: torch.dtype | None = None
                    ) -> StaticState:  # fmt: skip
        """The same state in ring layout (copies): the buffer's position ``L - P + i`` goes to slot ``(L + i) % P``;
        S in ``s_dtype`` (default: as it is, fp32)."""
        P, L = state.k_buf.shape[2], state.length
        shift = L % P if P else 0
        B, device = state.S.shape[0], state.S.device
        sinks = [None if x is None else x.clone() for x in (state.k_sink, state.v_sink)]
        return cls(
            torch.roll(state.k_buf, shift, dims=2).contiguous(), torch.roll(state.v_buf, shift, dims=2).contiguous(),
            state.S.to(s_dtype or state.S.dtype, copy=True), state.z.clone(), torch.tensor(L, device=device),
            torch.zeros(B, dtype=torch.long, device=device) if pads is None else pads.to(device, torch.long).clone(),
            *sinks,
        )  # fmt: skip

    def load_(self, state: HybridState, pads: Tensor | None = None) -> None:
        """Copy ``state`` into these buffers (same shapes): the addresses a captured graph reads stay the same."""
        src = StaticState.from_hybrid(state, pads)
        for name in ("k_ring", "v_ring", "S", "z", "length", "pads", "k_sink", "v_sink", "s_log"):
            dst, new = getattr(self, name), getattr(src, name)
            if (dst is None) != (new is None) or (dst is not None and dst.shape != new.shape):
                raise ValueError(f"cannot load a state whose {name} has another shape into these buffers")
            if dst is not None:
                dst.copy_(new)

    def to_hybrid(self) -> HybridState:
        """The :class:`~.recurrent.HybridState` these buffers hold (copies; reads ``length`` on the host)."""
        P, L = self.k_ring.shape[2], int(self.length.item())
        shift = -(L % P) if P else 0
        sinks = [None if x is None else x.clone() for x in (self.k_sink, self.v_sink)]
        return HybridState(
            torch.roll(self.k_ring, shift, dims=2).contiguous(), torch.roll(self.v_ring, shift, dims=2).contiguous(),
            self.S.float() * self.s_log.exp()[:, :, None, None], self.z.clone(), L, *sinks,
        )  # fmt: skip

    def nbytes(self) -> int:
        """Bytes held by the buffers: independent of the length."""
        tensors = (self.k_ring, self.v_ring, self.S, self.z, self.length, self.pads, self.k_sink, self.v_sink,
                   self.s_log)  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def static_step(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    state: StaticState, scale: float | None = None, *, log_decay: Tensor | None = None, fold: int = 1,
) -> Tensor:  # fmt: skip
    """Attend one new token per row and advance ``state`` in place; returns ``(B, H, 1, Dv)`` in q's dtype.

    q ``(B, H, 1, D)``, k ``(B, Hkv, 1, D)``, v ``(B, Hkv, 1, Dv)`` after RoPE, at padded position
    ``state.length``; ``fold``: :func:`fold_width` of the window (computed once by the caller). Equal to
    :func:`~.recurrent.hybrid_step` (``padded_step`` for rows with pads) with one token.
    """
    B, H, _, D = q.shape
    Hkv, P, s = k.shape[1], state.k_ring.shape[2], window.sinks
    scale = D**-0.5 if scale is None else scale
    L, pads, dev = state.length, state.pads, q.device

    # 1. the new key and value into slot L % P: the ring now holds padded positions [L - P + 1, L]
    slot = torch.remainder(L, P).view(1)
    state.k_ring.index_copy_(2, slot, k.to(state.k_ring.dtype))
    state.v_ring.index_copy_(2, slot, v.to(state.v_ring.dtype))
    j = torch.arange(P, device=dev)
    ring_rel = (L - torch.remainder(L - j, P))[None] - pads[:, None]  # (B, P) each slot's position in its row
    rel = L - pads  # (B,) this token's position in its row
    start = window.start(rel)
    lo, hi = _folded_before(window, rel), _folded_before(window, rel + 1)  # keys before lo are in S, z

    # 2. attention over the sinks and the ring (their keys never in the linear branch: start(n) <= n) + S, z
    sink = (ring_rel >= 0) & (ring_rel < s)
    in_window = (ring_rel >= lo[:, None]) & ((ring_rel >= start[:, None]) | sink)  # (B, P)
    qg = grouped(q.float(), Hkv)  # (B, Hkv, G, 1, D)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, state.k_ring.float()).flatten(1, 2) * scale  # (B, H, 1, P)
    values = [state.v_ring]
    if state.k_sink is not None and state.v_sink is not None:
        s_sink = torch.einsum("bhgqd,bhkd->bhgqk", qg, state.k_sink.float()).flatten(1, 2) * scale
        scores = torch.cat([s_sink, scores], dim=-1)  # (B, H, 1, s + P)
        in_window = torch.cat([torch.arange(s, device=dev)[None] < lo[:, None], in_window], dim=-1)
        values = [state.v_sink, state.v_ring]
    zero = scores.new_zeros(())
    a = hybrid_weights(scores, zero, in_window[:, None, None], zero.bool(), window_logits)  # (B, H, 1, K)
    ag = grouped(a, Hkv)
    num = sum(  # (B, H, 1, Dv)
        torch.einsum("bhgqk,bhkd->bhgqd", ag[..., i : i + x.shape[2]], x.float()).flatten(1, 2)
        for i, x in zip((0, ag.shape[-1] - P), values)
    )
    fq = phi_q(q).float()  # (B, H, 1, F); z is decayed to L, S up to its pending factor exp(s_log)
    S = state.S.float()
    num = num + torch.einsum("bhqf,bhfd->bhqd", fq, S) * state.s_log.exp()[:, :, None, None]
    den = a.sum(dim=-1) + torch.einsum("bhqf,bhf->bhq", fq, state.z)
    y = num / den.clamp_min(DEN_EPS).unsqueeze(-1)

    # 3. fold the keys at row positions [lo, hi) (at most `fold`, all in the ring) into S and z
    pos = lo[:, None] + torch.arange(fold, device=dev)[None]  # (B, fold)
    idx = torch.remainder(pos + pads[:, None], P)[:, None, :, None]
    k_out = state.k_ring.gather(2, idx.expand(B, Hkv, fold, D))
    v_out = state.v_ring.gather(2, idx.expand(B, Hkv, fold, state.v_ring.shape[-1]))
    leaving = (pos < hi[:, None]) & (pos >= s)  # (B, fold)
    fk = phi_k(expand_kv(k_out, H)).float() * leaving[:, None, :, None]
    if log_decay is not None:  # keys enter decayed to the new length
        fk = fk * decay_weights(log_decay, rel[:, None] + 1 - pos)
    dS, dz = kv_state(fk, v_out.float())
    if log_decay is None:
        state.S.copy_(S + dS)
    else:  # rows where keys leave: the pending decay applied, s_log back to 0; other rows: s_log += log_decay
        pending = state.s_log + log_decay.float()[None]  # (B, H)
        moved = leaving.any(dim=1)[:, None]  # (B, 1)
        state.S.copy_(torch.where(moved[:, :, None, None], S * pending.exp()[:, :, None, None] + dS, S))
        state.s_log.copy_(torch.where(moved, torch.zeros_like(pending), pending))
    state.z.copy_(decay_state(state.z, log_decay, 1) + dz)

    # 4. a row still in its first `sinks` tokens keeps this one as a sink
    if state.k_sink is not None and state.v_sink is not None:
        is_slot = (torch.arange(s, device=dev)[None] == rel[:, None])[:, None, :, None]  # (B, 1, s, 1)
        state.k_sink.copy_(torch.where(is_slot, k.to(state.k_sink.dtype), state.k_sink))
        state.v_sink.copy_(torch.where(is_slot, v.to(state.v_sink.dtype), state.v_sink))
    state.length.add_(1)
    return y.to(q.dtype)


__all__ = ["StaticState", "fold_width", "static_step", "static_supported"]
