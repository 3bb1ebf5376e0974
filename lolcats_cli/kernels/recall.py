"""Recall beyond the window without training: a small cache of the keys the linear state recalls worst.

The linear state ``S = sum phi_k(k) v^T`` is an associative memory that blurs what it stores. When a key leaves
the softmax window, this form asks the state how well it would read the key's own value back,
``err = || v - phi_k(k)^T S / phi_k(k)^T z ||^2`` (averaged over the query heads of its KV head, as in LoLA),
and keeps the ``slots`` worst-recalled keys of each KV head *exactly*, as softmax keys beside the window and
the sinks (same max shift, window factor and shared normaliser). At every step the cached keys are scored
again against the state as it is then, like the keys now leaving (``rescore``, the default; off, a key keeps
the score it had on entry, so keys that entered while the state was nearly empty held their slots for good:
on SmolLM2's untrained conversion, 64 slots, passkey at 2048 tokens, 7 of 10 prompts against 2 of 10). A key
pushed out of the cache by a worse one goes into S and z as it would have without the cache (decayed by its
age when there is a decay). Every other key takes its usual path, so with ``slots = 0`` this is the recurrent
form exactly; the state stays constant-size (``slots`` keys and values per KV head more).

Inference only: stage 1 trains the plain op. The whole-sequence form runs the step over chunks of
:data:`CHUNK` tokens, so it is sequential and slower than the chunked kernel. Left-padded batches are not
supported (one prompt per call, as ``lolcats eval`` runs them). Choose it by name: ``LOLCATS_KERNEL=recall``
(slots from ``LOLCATS_RECALL_SLOTS``, default :data:`DEFAULT_SLOTS`; ``LOLCATS_RECALL_RESCORE=0`` keeps the entry
scores).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from ..api import Window
from ..errors import ConfigError
from .base import Kernel
from .blocks import (
    DEN_EPS,
    FeatureFn,
    attend_chunks,
    check_inputs,
    expand_kv,
    kv_state,
)
from .recurrent import HybridState, check_state, filled_sinks, fold_leaving, step_keys, step_locals

DEFAULT_SLOTS = 64
SLOTS_ENV = "LOLCATS_RECALL_SLOTS"
RESCORE_ENV = "LOLCATS_RECALL_RESCORE"
CHUNK = 64  # tokens per step of the whole-sequence form


@dataclasses.dataclass
class RecallSlots:
    """The recall cache of one layer: ``slots`` keys per KV head. k ``(B, Hkv, M, D)``, v ``(B, Hkv, M, Dv)``,
    pos ``(B, Hkv, M)`` their positions (-1: an empty slot), score ``(B, Hkv, M)`` fp32 their recall error
    when they entered (-inf: empty)."""

    k: Tensor
    v: Tensor
    pos: Tensor
    score: Tensor

    @classmethod
    def empty(cls, k: Tensor, v: Tensor, slots: int) -> RecallSlots:
        """Empty slots for keys like k ``(B, Hkv, *, D)`` and values like v."""
        B, Hkv = k.shape[:2]
        return cls(
            k.new_zeros(B, Hkv, slots, k.shape[-1]), v.new_zeros(B, Hkv, slots, v.shape[-1]),
            torch.full((B, Hkv, slots), -1, dtype=torch.long, device=k.device),
            torch.full((B, Hkv, slots), float("-inf"), device=k.device),
        )  # fmt: skip

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos, self.score))


def recall_error(fk: Tensor, v: Tensor, S: Tensor, z: Tensor, num_kv_heads: int) -> Tensor:
    """How badly the state reads each key's value back: fk ``(B, H, n, F)``, v ``(B, Hkv, n, Dv)``, S ``(B, H,
    F, Dv)``, z ``(B, H, F)`` -> ``(B, Hkv, n)`` fp32, the squared error averaged over each KV head's group
    (an empty state reads back 0, so the error is then ``|v|^2``)."""
    den = torch.einsum("bhnf,bhf->bhn", fk, z).clamp_min(DEN_EPS)[..., None]
    read = torch.einsum("bhnf,bhfd->bhnd", fk, S) / den
    err = (read - expand_kv(v.float(), fk.shape[1])).square().sum(dim=-1)  # (B, H, n)
    return err.unflatten(1, (num_kv_heads, -1)).mean(dim=2)


def _per_query_head(x: Tensor, num_heads: int) -> Tensor:
    """``(B, Hkv, ...) -> (B, H, ...)`` for a per-KV-head mask or index."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def recall_step(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    state: HybridState, scale: float | None = None, *, log_decay: Tensor | None = None, slots: int = DEFAULT_SLOTS,
    rescore: bool = True,
) -> tuple[Tensor, HybridState]:  # fmt: skip
    """:func:`~.recurrent.hybrid_step` with a recall cache of ``slots`` keys per KV head in ``state.recall``.

    The keys leaving the window in this step are scored against the state before it; together with the cached
    keys the ``slots`` worst-recalled ones stay (softmax keys for every query of the step once they are out of
    its window), the cached ones pushed out are folded into S and z first, the other leaving keys take their
    usual linear path. Returns ``(B, H, t, Dv)`` in q's dtype and the new state.
    """
    check_inputs(q, k, v, window_logits, log_decay)
    check_state(q, k, v, state, window)
    B, H, t, D = q.shape
    Hkv, P, L = k.shape[1], window.span, state.length
    scale = D**-0.5 if scale is None else scale
    rec = state.recall if isinstance(state.recall, RecallSlots) else RecallSlots.empty(k, v, slots)
    M = rec.pos.shape[-1]
    keys = step_keys(q, k, v, phi_k, window, state)
    leaving, n = keys.leaving, keys.hi - keys.lo

    # choose what the cache keeps: its keys and the leaving (non-sink) ones, by recall error against S, z
    cand_pos = keys.k_pos[leaving].expand(B, Hkv, n)
    cand_score = recall_error(keys.fk[:, :, leaving], keys.v_all[:, :, leaving], state.S, state.z, Hkv)
    cand_score = cand_score.masked_fill(cand_pos < window.sinks, float("-inf"))
    fk_rec = phi_k(expand_kv(rec.k, H)).float() if M else None  # (B, H, M, F)
    old_score = rec.score
    if rescore and M:  # the cached keys scored against the state as it is now, like the candidates
        old_score = recall_error(fk_rec, rec.v, state.S, state.z, Hkv).masked_fill(rec.pos < 0, float("-inf"))
    pool_score = torch.cat([old_score, cand_score], dim=-1)  # (B, Hkv, M + n)
    top = pool_score.topk(M, dim=-1).indices if M else pool_score.new_zeros(B, Hkv, 0, dtype=torch.long)
    keep = torch.zeros_like(pool_score, dtype=torch.bool).scatter(-1, top, True) & (pool_score > float("-inf"))
    kept_old, chosen = keep[..., :M], keep[..., M:]  # (B, Hkv, M), (B, Hkv, n)

    # cached keys pushed out now join the linear state (decayed to position L) before this step attends
    S, z = state.S, state.z
    out_old = ~kept_old & (rec.pos >= 0)
    if bool(out_old.any()):
        w = _per_query_head(out_old, H).float().unsqueeze(-1)  # (B, H, M, 1)
        if log_decay is not None:
            age = (L - _per_query_head(rec.pos, H)).clamp_min(0).float()
            w = w * torch.exp(log_decay.float().view(1, -1, 1) * age).unsqueeze(-1)
        dS, dz = kv_state(fk_rec * w, rec.v.float())
        S, z = S + dS, z + dz

    # chosen leaving keys are softmax keys wherever they are not in the window any more
    sel = torch.zeros(B, H, P + t, dtype=torch.bool, device=q.device)
    sel[:, :, leaving] = _per_query_head(chosen, H)
    k_loc, v_loc, fk_loc, in_window, in_linear, lin_decay, prefix_decay = step_locals(keys, window, state, log_decay,
                                                                                      softmax=sel)  # fmt: skip
    if M:  # the kept cached keys: softmax keys for every query of the step
        rec_window = _per_query_head(kept_old, H)[:, :, None, None, :].expand(B, H, 1, t, M)
        k_loc = torch.cat([rec.k.float().unsqueeze(2), k_loc], dim=3)
        v_loc = torch.cat([rec.v.float().unsqueeze(2), v_loc], dim=3)
        fk_loc = torch.cat([fk_loc.new_zeros(B, H, 1, M, keys.fk.shape[-1]), fk_loc], dim=3)
        in_window = torch.cat([rec_window, in_window.expand(B, H, 1, t, -1)], dim=-1)
        in_linear = torch.cat([torch.zeros_like(rec_window), in_linear.expand(B, H, 1, t, -1)], dim=-1)

    y = attend_chunks(
        q.float().unsqueeze(2), phi_q(q).float().unsqueeze(2), k_loc, v_loc, fk_loc, S.unsqueeze(2), z.unsqueeze(2),
        in_window, in_linear, window_logits, scale, lin_decay, prefix_decay,
    ).squeeze(2)  # fmt: skip

    # leaving keys the cache did not take join the state, decayed to the new length L + t
    S, z = fold_leaving(keys, S, z, log_decay, keep=~_per_query_head(chosen, H))

    pool_k = torch.cat([rec.k, keys.k_all[:, :, leaving]], dim=2)
    pool_v = torch.cat([rec.v, keys.v_all[:, :, leaving]], dim=2)
    pool_pos = torch.cat([rec.pos, cand_pos], dim=-1)
    taken = keep.gather(-1, top)
    new_rec = RecallSlots(
        pool_k.gather(2, top[..., None].expand(-1, -1, -1, D)),
        pool_v.gather(2, top[..., None].expand(-1, -1, -1, v.shape[-1])),
        torch.where(taken, pool_pos.gather(-1, top), torch.full_like(top, -1)),
        torch.where(taken, pool_score.gather(-1, top), torch.full_like(pool_score[..., :M], float("-inf"))),
    )  # fmt: skip
    k_sink, v_sink = filled_sinks(state, k, v, window)
    new = HybridState(keys.k_all[:, :, t:].clone(), keys.v_all[:, :, t:].clone(), S, z, L + t, k_sink, v_sink,
                      recall=new_rec)  # fmt: skip
    return y.to(q.dtype), new


def slots_from_env() -> int:
    """The cache size from ``LOLCATS_RECALL_SLOTS`` (default :data:`DEFAULT_SLOTS`); ConfigError if not an int >= 0."""
    raw = os.environ.get(SLOTS_ENV, str(DEFAULT_SLOTS))
    try:
        slots = int(raw)
    except ValueError:
        slots = -1
    if slots < 0:
        raise ConfigError(f"{SLOTS_ENV}={raw!r} is not a number of keys", hint=f"e.g. {SLOTS_ENV}=64 (0 = no cache)")
    return slots


def rescore_from_env() -> bool:
    """``LOLCATS_RECALL_RESCORE``: 1 (the default) rescores the cached keys every step, 0 keeps their entry
    scores; ConfigError for anything else."""
    raw = os.environ.get(RESCORE_ENV, "1").strip()
    if raw not in ("0", "1"):
        raise ConfigError(f"{RESCORE_ENV}={raw!r} is not 0 or 1", hint=f"{RESCORE_ENV}=1 (the default) or 0")
    return raw == "1"


class RecallKernel(Kernel):
    """The recurrent form with a recall cache, as a kernel (only by name: ``LOLCATS_KERNEL=recall``)."""

    name = "recall"
    priority = -1
    exact = False

    def __init__(self, slots: int | None = None, rescore: bool | None = None) -> None:
        self._slots = slots
        self.rescore = rescore_from_env() if rescore is None else rescore

    @property
    def slots(self) -> int:
        return slots_from_env() if self._slots is None else self._slots

    def _no_pads(self, pads: Tensor | None) -> None:
        if pads is not None:
            raise ConfigError("the recall kernel runs one unpadded prompt per call; this batch is left-padded",
                              hint="run the prompts one at a time, or use another kernel (unset LOLCATS_KERNEL)")

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, *, scale: float | None = None, pads: Tensor | None = None, log_decay: Tensor | None = None,
    ) -> tuple[Tensor, HybridState]:  # fmt: skip
        self._no_pads(pads)
        check_inputs(q, k, v, window_logits, log_decay)
        B, H, _, D = q.shape
        F = phi_k(k[:, :1, :1].expand(-1, H, -1, -1)).shape[-1]
        state = HybridState.empty(B, H, k.shape[1], D, v.shape[-1], F, window.span, q.device, k.dtype, window.sinks)
        state.recall = RecallSlots.empty(k, v, self.slots)
        if q.shape[2] == 0:
            return q.new_zeros(B, H, 0, v.shape[-1]), state
        return self.step(q, k, v, phi_q, phi_k, window_logits, window, state, scale=scale, log_decay=log_decay)

    def sequence(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, scale: float | None = None, *, log_decay: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        return self.prefill(q, k, v, phi_q, phi_k, window_logits, window, scale=scale, log_decay=log_decay)[0]

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, *, scale: float | None = None, pads: Tensor | None = None, log_decay: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        self._no_pads(pads)
        return self.sequence(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay=log_decay)

    step_chunk = CHUNK  # a long step and the prefill go CHUNK tokens at a time: the same cache decisions

    def step_tokens(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, state: HybridState, *, scale: float | None = None, pads: Tensor | None = None,
        log_decay: Tensor | None = None,
    ) -> tuple[Tensor, HybridState]:  # fmt: skip
        self._no_pads(pads)
        return recall_step(q, k, v, phi_q, phi_k, window_logits, window, state, scale, log_decay=log_decay,
                           slots=self.slots, rescore=self.rescore)  # fmt: skip

__all__ = [
    "CHUNK", "DEFAULT_SLOTS", "RESCORE_ENV", "SLOTS_ENV", "RecallKernel", "RecallSlots", "recall_error", "recall_step",
]
