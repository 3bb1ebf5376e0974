"""The recurrent (decode) form of hybrid attention: the state after a prompt and steps of t >= 1 tokens.

Per sequence the state has a constant size whatever the length: the raw keys and values (after RoPE) of the
last ``span`` positions, kept per KV head, and the linear-attention state ``S = sum phi_k(k) v^T``,
``z = sum phi_k(k)`` over every key that has left the window (at query-head count, fp32).

Sink keys (the first ``window.sinks`` positions) are kept raw in a buffer of their own and never enter S and z.
With a decay (``log_decay``), S and z are kept decayed to the state's length: key j enters with weight
``d^(L - j)`` and the state is multiplied by ``d^t`` when t tokens are consumed.

Invariant at length L: S and z hold exactly the non-sink keys before ``f(L) = clamp(window.start(L), 0, L)``; the
buffer holds positions ``[L - span, L)`` (zeros before position 0), which covers ``[f(L), L)`` since a window
spans at most ``span`` keys. A step is :func:`~.blocks.attend_chunks` on one chunk made of the buffer and the
new tokens; then the keys in ``[f(L), f(L + t))`` are folded into S and z. The prefill that builds the first
state lives with the form that attends the prompt (:func:`~.chunked.hybrid_prefill`; any kernel through
:meth:`~.base.Kernel.prefill`). No transformers dependency: a Cache wrapper lives elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..api import Window
from .blocks import (
    FeatureFn,
    attend_chunks,
    check_inputs,
    chunk_masks,
    decay_matrix,
    decay_scales,
    decay_state,
    decay_weights,
    expand_kv,
    kv_state,
    not_sinks,
    with_sinks,
)


@dataclasses.dataclass
class HybridState:
    """Decode state of one layer for a batch of sequences, all at the same length.

    k_buf ``(B, Hkv, span, D)`` and v_buf ``(B, Hkv, span, Dv)``: keys and values of positions
    ``[length - span, length)``, oldest first (zeros before position 0). S ``(B, H, F, Dv)`` and z
    ``(B, H, F)`` fp32: the linear state of every key before ``clamp(window.start(length), 0, length)``.
    length: tokens consumed so far, the position of the next token. k_sink ``(B, Hkv, sinks, D)`` and
    v_sink: the keys and values of positions ``[0, sinks)`` (zeros for positions not seen yet), or None
    for a window without sinks; they never enter S and z. recall: the recall cache of the ``recall`` kernel
    (:class:`~.recall.RecallSlots`, a dataclass of tensors), or None.
    """

    k_buf: Tensor
    v_buf: Tensor
    S: Tensor
    z: Tensor
    length: int
    k_sink: Tensor | None = None
    v_sink: Tensor | None = None
    recall: Any = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> HybridState:
        """The state with ``fn`` applied to every tensor (batch reordering, device moves)."""
        sinks = [None if x is None else fn(x) for x in (self.k_sink, self.v_sink)]
        recall = None
        if self.recall is not None:
            recall = dataclasses.replace(
                self.recall, **{f.name: fn(getattr(self.recall, f.name)) for f in dataclasses.fields(self.recall)}
            )
        return HybridState(fn(self.k_buf), fn(self.v_buf), fn(self.S), fn(self.z), self.length, *sinks, recall)

    @classmethod
    def empty(
        cls,
        batch: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        v_dim: int,
        feature_dim: int,
        span: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        sinks: int = 0,
    ) -> HybridState:
        """The state before any token; buffers in ``dtype`` (the K/V dtype), S and z in fp32."""
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        k_sink = v_sink = None
        if sinks:
            k_sink = torch.zeros(batch, num_kv_heads, sinks, head_dim, device=device, dtype=dtype)
            v_sink = torch.zeros(batch, num_kv_heads, sinks, v_dim, device=device, dtype=dtype)
        return cls(
            k_buf=torch.zeros(batch, num_kv_heads, span, head_dim, device=device, dtype=dtype),
            v_buf=torch.zeros(batch, num_kv_heads, span, v_dim, device=device, dtype=dtype),
            S=torch.zeros(batch, num_heads, feature_dim, v_dim, device=device, dtype=torch.float32),
            z=torch.zeros(batch, num_heads, feature_dim, device=device, dtype=torch.float32),
            length=0,
            k_sink=k_sink,
            v_sink=v_sink,
        )

    def nbytes(self) -> int:
        """Bytes held by the state's tensors: independent of ``length``."""
        tensors = (self.k_buf, self.v_buf, self.S, self.z, self.k_sink, self.v_sink)
        extra = 0 if self.recall is None else self.recall.nbytes()
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + extra


def folded_before(window: Window, length: int) -> int:
    """``f(length) = clamp(window.start(length), 0, length)``: keys before it are in S and z."""
    start = int(window.start(torch.tensor(length)).item())
    return min(max(start, 0), length)


def last_positions(x: Tensor, n: int) -> Tensor:
    """The last ``n`` time steps of ``(B, h, T, X)``, zero-padded in front when ``T < n``."""
    T = x.shape[2]
    if T >= n:
        return x[:, :, T - n :].clone()  # a copy: a view would keep the whole prompt alive
    return torch.cat([x.new_zeros(*x.shape[:2], n - T, x.shape[3]), x], dim=2)


def check_state(q: Tensor, k: Tensor, v: Tensor, state: HybridState, window: Window) -> None:
    """Raise ``ValueError`` unless ``state`` fits the new tokens and the window."""
    B, H, t, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if t == 0:
        raise ValueError("hybrid_step needs at least one new token (got t=0)")
    expect_k, expect_v = (B, Hkv, window.span, D), (B, Hkv, window.span, Dv)
    if tuple(state.k_buf.shape) != expect_k or tuple(state.v_buf.shape) != expect_v:
        raise ValueError(
            f"state buffers have shapes {tuple(state.k_buf.shape)} and {tuple(state.v_buf.shape)}; "
            f"expected {expect_k} and {expect_v} for this input and a window of span {window.span}"
        )
    if tuple(state.S.shape[:2]) != (B, H) or state.S.shape[-1] != Dv:
        raise ValueError(f"state.S has shape {tuple(state.S.shape)}; expected (B={B}, H={H}, F, Dv={Dv})")
    sinks = 0 if state.k_sink is None else state.k_sink.shape[2]
    if sinks != window.sinks:
        raise ValueError(f"the state holds {sinks} sink keys but the window has sinks={window.sinks}")


def filled_sinks(state: HybridState, k: Tensor, v: Tensor, window: Window) -> tuple[Tensor | None, Tensor | None]:
    """The sink buffers after new keys k and values v ``(B, Hkv, t, X)`` at positions ``state.length ..``: copies
    with the new tokens that are sink positions written in, or the state's own buffers when none is."""
    k_sink, v_sink, L = state.k_sink, state.v_sink, state.length
    if k_sink is None or v_sink is None or L >= window.sinks:
        return k_sink, v_sink
    n = min(L + k.shape[2], window.sinks) - L
    k_sink, v_sink = k_sink.clone(), v_sink.clone()
    k_sink[:, :, L : L + n], v_sink[:, :, L : L + n] = k[:, :, :n], v[:, :, :n]
    return k_sink, v_sink


@dataclasses.dataclass
class StepKeys:
    """The keys one decode step attends beside the state, and those that leave the window in it.

    ``k_all`` ``(B, Hkv, P + t, D)`` and ``v_all``: the buffer and the new tokens, positions ``k_pos`` =
    ``[L - P, L + t)``; ``q_pos`` the new tokens' positions; ``end`` = L + t. Keys in ``[lo, hi)`` (slice ``leaving`` of k_all) are
    the only ones that can be in a query's linear branch in this step (older ones are in S and z, newer ones in
    every query's window); ``fk`` ``(B, H, P + t, F)`` fp32 holds phi_k of those (0 for sinks), zeros elsewhere.
    """

    k_all: Tensor
    v_all: Tensor
    k_pos: Tensor
    q_pos: Tensor
    lo: int
    hi: int
    leaving: slice
    fk: Tensor
    end: int


def step_keys(q: Tensor, k: Tensor, v: Tensor, phi_k: FeatureFn, window: Window, state: HybridState) -> StepKeys:
    """The :class:`StepKeys` of new tokens q ``(B, H, t, D)``, k, v after ``state``. phi_k runs on the leaving keys
    alone (one key per decode step with a sliding window)."""
    H, t, P, L = q.shape[1], q.shape[2], window.span, state.length
    k_all = torch.cat([state.k_buf.to(k.dtype), k], dim=2)
    v_all = torch.cat([state.v_buf.to(v.dtype), v], dim=2)
    k_pos = torch.arange(L - P, L + t, device=q.device)
    lo, hi = folded_before(window, L), folded_before(window, L + t)
    leaving = slice(lo - (L - P), hi - (L - P))
    fk = q.new_zeros(q.shape[0], H, P + t, state.S.shape[2], dtype=torch.float32)
    if hi > lo:
        fk[:, :, leaving] = not_sinks(phi_k(expand_kv(k_all[:, :, leaving], H)).float(), k_pos[leaving], window.sinks)
    return StepKeys(k_all, v_all, k_pos, k_pos[P:], lo, hi, leaving, fk, L + t)


def step_locals(
    keys: StepKeys, window: Window, state: HybridState, log_decay: Tensor | None, softmax: Tensor | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """The arguments of :func:`~.blocks.attend_chunks` for one step as one chunk, after q and phi_q:
    ``(k, v, fk, S, z, in_window, in_linear, lin_decay, prefix_decay)`` with the sink buffer put in front.
    ``softmax`` ``(B, H, P + t)`` bool: keys of k_all kept exact (softmax) wherever they would be linear."""
    t, L, dev = keys.q_pos.shape[0], state.length, keys.k_pos.device
    in_window, in_linear = chunk_masks(window, keys.q_pos[None], keys.k_pos[None], torch.tensor([keys.lo], device=dev))
    if softmax is not None:
        sel = softmax[:, :, None, None, :]  # (B, H, 1, 1, P + t)
        in_window, in_linear = in_window | (in_linear & sel), in_linear & ~sel
    k_loc, v_loc, fk_loc = keys.k_all.float().unsqueeze(2), keys.v_all.float().unsqueeze(2), keys.fk.unsqueeze(2)
    lin_decay = decay_matrix(log_decay, keys.q_pos[None, None], keys.k_pos[None, None])  # (1, H, 1, t, P + t)
    prefix_decay = decay_scales(log_decay, keys.q_pos[None, None], torch.full((1, 1), L, device=dev))
    if state.k_sink is not None and state.v_sink is not None:
        # sink j comes from the sink buffer once it is older than the fresh local keys [lo, L + t)
        sink_window = (torch.arange(window.sinks, device=dev) < keys.lo)[None, None, :].expand(1, t, -1)
        k_loc, v_loc, fk_loc, in_window, in_linear = with_sinks(
            k_loc, v_loc, fk_loc, in_window, in_linear, state.k_sink.float(), state.v_sink.float(), sink_window
        )
    return k_loc, v_loc, fk_loc, in_window, in_linear, lin_decay, prefix_decay


def fold_leaving(keys: StepKeys, S: Tensor, z: Tensor, log_decay: Tensor | None, keep: Tensor | None = None,
                 ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """S and z after the step: decayed by its t tokens, plus the leaving keys (``keep`` ``(B, H, n)``: only those),
    each decayed to the new length."""
    fk_in = keys.fk[:, :, keys.leaving]
    if keep is not None:
        fk_in = fk_in * keep.unsqueeze(-1)
    if log_decay is not None:  # keys enter decayed to the new length L + t
        fk_in = fk_in * decay_weights(log_decay, (keys.end - keys.k_pos[keys.leaving])[None])
    dS, dz = kv_state(fk_in, keys.v_all[:, :, keys.leaving].float())
    t = keys.q_pos.shape[0]
    return decay_state(S, log_decay, t) + dS, decay_state(z, log_decay, t) + dz


def hybrid_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: FeatureFn,
    phi_k: FeatureFn,
    window_logits: Tensor,
    window: Window,
    state: HybridState,
    scale: float | None = None,
    *,
    log_decay: Tensor | None = None,
) -> tuple[Tensor, HybridState]:
    """Attend t >= 1 new tokens at positions ``state.length .. state.length + t - 1`` and advance the state.

    q ``(B, H, t, D)``, k ``(B, Hkv, t, D)``, v ``(B, Hkv, t, Dv)``, after RoPE; log_decay None or ``(H,)``.
    Returns ``(B, H, t, Dv)`` in q's dtype and the new state (``state`` itself is not modified).
    """
    check_inputs(q, k, v, window_logits, log_decay)
    check_state(q, k, v, state, window)
    t, D = q.shape[2], q.shape[3]
    scale = D**-0.5 if scale is None else scale
    keys = step_keys(q, k, v, phi_k, window, state)
    k_loc, v_loc, fk_loc, in_window, in_linear, lin_decay, prefix_decay = step_locals(keys, window, state, log_decay)
    y = attend_chunks(
        q.float().unsqueeze(2), phi_q(q).float().unsqueeze(2), k_loc, v_loc, fk_loc,
        state.S.unsqueeze(2), state.z.unsqueeze(2), in_window, in_linear, window_logits, scale,
        lin_decay, prefix_decay,
    ).squeeze(2)  # fmt: skip
    S, z = fold_leaving(keys, state.S, state.z, log_decay)
    k_sink, v_sink = filled_sinks(state, k, v, window)
    new_state = HybridState(keys.k_all[:, :, t:].clone(), keys.v_all[:, :, t:].clone(), S, z, state.length + t,
                            k_sink, v_sink)  # fmt: skip
    return y.to(q.dtype), new_state


__all__ = [
    "HybridState", "StepKeys", "check_state", "filled_sinks", "fold_leaving", "folded_before", "hybrid_step",
    "last_positions", "step_keys", "step_locals",
]
