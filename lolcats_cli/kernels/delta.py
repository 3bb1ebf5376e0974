"""The delta-rule hybrid: the softmax window as in every other kernel, and a linear branch whose state corrects
what it stores instead of only adding (``attention.delta_rule``; docs/method.md section 6).

Per query head, keys enter the linear state in position order once they leave the window (sinks never do), as in
the additive form. With the unit key ``k^_j = phi_k(k_j) / |phi_k(k_j)|``, the write strength ``beta_j`` in (0, 1)
and the value with a ones column ``v~_j = [v_j, 1]``, the state after key j is (``d`` the decay, 1 without)::

    A(j) = d (I - beta_j k^_j k^_j^T) A(j - 1) + beta_j k^_j v~_j^T        A(-1) = 0;  beta_j = 0 for a sink

and query n, whose window starts at ``s = start(n)``, reads ``d^(n - s + 1) phi_q(q_n)^T A(s - 1)``: the first Dv
columns join the window's numerator, the last one its denominator (the shared normaliser, as in the additive
form, where ``A(j) = sum d^(j - i) phi_k(k_i) v~_i^T``). A key stored twice is overwritten, not counted twice, so
the normaliser is the matched mass of what the state holds, and a state read with its own key returns its value.

Forms, all fp32 inside:

* :func:`hybrid_delta_naive`: the reference, a token loop keeping every A(j) (tests and short sequences only).
* :func:`hybrid_delta_chunked`: chunks of C keys in the WY / UT form of the delta rule (Yang et al. 2024, gated
  DeltaNet): per chunk a unit lower-triangular solve gives ``W = T K`` and ``U = T V~ / Gamma``; the states at
  chunk starts come from a scan over chunks, and each query reads its own prefix of its key chunk. The window
  branch is the chunked kernel's, with no linear keys. O(T) memory.
* :func:`delta_prefill` / :func:`delta_step`: decoding. The state is a :class:`~.recurrent.HybridState` whose
  ``S`` and ``z`` are the value and ones columns of ``A(f(L) - 1)``, **not** decayed to the length L (the additive
  state is): ``f(L)`` keys have entered. A step runs token by token: fold the keys that left the window, read,
  attend the window.

The kernel's ``phi_k`` is a :class:`DeltaKeys`: the key feature map plus the function giving beta from the keys.
Left-padded rows are not supported yet (ModelError): decode one prompt per batch, or prompts of one length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import Window, window_masks
from ..errors import ModelError
from .base import Kernel
from .blocks import DEN_EPS, FeatureFn, check_inputs, expand_kv, hybrid_weights
from .chunked import DEFAULT_CHUNK, chunked_from_features
from .recurrent import HybridState, check_state, filled_sinks, folded_before, last_positions


@dataclasses.dataclass(eq=False)
class DeltaKeys:
    """``phi_k`` of the delta kernel: ``phi`` maps keys ``(B, H, T, D)`` to features ``(B, H, T, F)`` (calling
    the object does that), ``beta`` maps them to write strengths ``(B, H, T)`` in (0, 1)."""

    phi: FeatureFn
    beta: Callable[[Tensor], Tensor]

    def __call__(self, x: Tensor) -> Tensor:
        return self.phi(x)


def _delta_keys(phi_k: FeatureFn) -> DeltaKeys:
    if not isinstance(phi_k, DeltaKeys):
        raise ModelError(
            f"the delta kernel needs its phi_k as a DeltaKeys (features + write strength); got {type(phi_k).__name__}",
            hint="run it through a layer converted with attention.delta_rule: true",
        )
    return phi_k


def _no_pads(pads: Tensor | None) -> None:
    if pads is not None and bool((pads > 0).any()):
        raise ModelError(
            "the delta-rule state does not decode left-padded batches yet",
            hint="generate one prompt at a time (or prompts of one length), or use a model without delta_rule",
        )


def delta_inputs(k: Tensor, v: Tensor, phi_k: DeltaKeys, num_heads: int, sinks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Unit keys ``(B, H, T, F)``, values with a ones column ``(B, H, T, Dv + 1)`` and write strengths ``(B, H, T)``
    (0 at sink positions) of keys ``k`` ``(B, Hkv, T, D)`` at positions ``0 .. T - 1``, all fp32."""
    ke = expand_kv(k, num_heads)
    fk = phi_k(ke).float()
    kh = fk / fk.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    ve = expand_kv(v, num_heads).float()
    vt = torch.cat([ve, ve.new_ones(*ve.shape[:-1], 1)], dim=-1)
    beta = phi_k.beta(ke).float()
    if sinks:
        beta = beta * (torch.arange(k.shape[2], device=k.device) >= sinks).float()
    return kh, vt, beta


def _decay(log_decay: Tensor | None, steps: Tensor) -> Tensor:
    """``d_h^steps`` ``(H, *steps.shape)`` (ones ``(1, ...)`` without a decay)."""
    if log_decay is None:
        return torch.ones(1, *steps.shape, device=steps.device)
    return torch.exp(log_decay.float().view(-1, *([1] * steps.dim())) * steps.float())


def _combine(num: Tensor, den: Tensor, lin: Tensor) -> Tensor:
    """The window's numerator ``(B, H, T, Dv)`` and denominator ``(B, H, T)`` plus the linear read ``(..., Dv + 1)``."""
    return (num + lin[..., :-1]) / (den + lin[..., -1]).clamp_min(DEN_EPS).unsqueeze(-1)


# ----------------------------------------------------------------------------------------- the reference


def hybrid_delta_naive(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    scale: float | None = None, *, log_decay: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The delta-rule hybrid over one whole sequence from position 0, by its definition (module docstring):
    a token loop that keeps every state. q ``(B, H, T, D)``, k/v ``(B, Hkv, T, D)``. Returns q's dtype."""
    check_inputs(q, k, v, window_logits, log_decay)
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    keys = _delta_keys(phi_k)
    kh, vt, beta = delta_inputs(k, v, keys, H, window.sinks)
    pos = torch.arange(T, device=q.device)
    in_window, _ = window_masks(window, pos, pos)
    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), expand_kv(k, H).float()) * scale
    a = hybrid_weights(s, torch.zeros_like(s), in_window, torch.zeros_like(in_window), window_logits)
    num, den = torch.einsum("bhnm,bhmd->bhnd", a, expand_kv(v, H).float()), a.sum(dim=-1)

    d = _decay(log_decay, torch.ones(())).view(1, -1, 1, 1)
    A = q.new_zeros(B, H, kh.shape[-1], vt.shape[-1], dtype=torch.float32)
    states = []
    for j in range(T):  # the state after each key, by the one update the decode step also folds with
        A = _fold(A, kh[:, :, j : j + 1], vt[:, :, j : j + 1], beta[:, :, j : j + 1], d)
        states.append(A)
    start = window.start(pos).clamp(0, T)  # (T,) keys before it are linear
    read = torch.stack([A.new_zeros(A.shape), *states], dim=2)[:, :, start]  # (B, H, T, F, Dv + 1): A(s - 1)
    scale_n = _decay(log_decay, pos - start + 1).view(1, -1, T, 1)
    lin = torch.einsum("bhnf,bhnfv->bhnv", phi_q(q).float(), read) * scale_n
    return _combine(num, den, lin).to(q.dtype)


# ------------------------------------------------------------------------------------------ the chunked form


def _chunk_scan(kh: Tensor, vt: Tensor, beta: Tensor, log_decay: Tensor | None, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keys in chunks of C: ``(A0, P, Kc)`` with A0 ``(B, H, N, F, V)`` the state before each chunk, P ``(B, H, N,
    C, V)`` the chunk's pseudo-values ``U - W A0`` and Kc ``(B, H, N, C, F)`` its unit keys, so that the state after
    key r of chunk c is ``Gamma_r (A0_c + Kc[:r+1]^T P[:r+1])`` with ``Gamma_r = d^(r + 1)``."""
    B, H, T, Fd = kh.shape
    N = -(-T // C)
    pad = N * C - T
    Kc = F.pad(kh, (0, 0, 0, pad)).unflatten(2, (N, C))
    Vc = F.pad(vt, (0, 0, 0, pad)).unflatten(2, (N, C))
    bc = F.pad(beta, (0, pad)).unflatten(2, (N, C))
    gamma = _decay(log_decay, torch.arange(1, C + 1, device=kh.device)).view(1, -1, 1, C, 1)  # (1, H, 1, C, 1)
    eye = torch.eye(C, device=kh.device)
    lower = torch.tril(bc.unsqueeze(-1) * (Kc @ Kc.transpose(-1, -2)), diagonal=-1)
    Tm = torch.linalg.solve_triangular(eye + lower, torch.diag_embed(bc), upper=False, unitriangular=True)
    W, U = Tm @ Kc, Tm @ (Vc / gamma)
    step = gamma[:, :, :, -1:, :]  # d^C: (1, H, 1, 1, 1)
    A = kh.new_zeros(B, H, Fd, vt.shape[-1])
    starts, pseudo = [], []
    for c in range(N):
        starts.append(A)
        Pc = U[:, :, c] - W[:, :, c] @ A
        pseudo.append(Pc)
        A = step[:, :, 0] * (A + Kc[:, :, c].transpose(-1, -2) @ Pc)
    return torch.stack(starts, dim=2), torch.stack(pseudo, dim=2), Kc


def _shift(x: Tensor, o: int) -> Tensor:
    """``x`` ``(B, H, N, ...)`` moved o chunks later along dim 2 (zeros in front): slot c holds chunk c - o."""
    if o == 0:
        return x
    return torch.cat([torch.zeros_like(x[:, :, :o]), x[:, :, : x.shape[2] - o]], dim=2)


def delta_read(fq: Tensor, kh: Tensor, vt: Tensor, beta: Tensor, window: Window, log_decay: Tensor | None,
               C: int, scan: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    """The linear branch of every query, ``d^(n - s + 1) phi_q(q_n)^T A(s - 1)`` ``(B, H, T, Dv + 1)``, in chunks.

    Query n reads the state after key ``i = start(n) - 1``: in key chunk ``c' = i // C``, its first ``i % C + 1``
    keys on top of that chunk's start state. Queries of chunk c read key chunks c - o, ``o <= span / C + 1``.
    ``scan``: :func:`_chunk_scan` of these keys, when the caller has it already.
    """
    T = fq.shape[2]
    A0, P, Kc = _chunk_scan(kh, vt, beta, log_decay, C) if scan is None else scan
    N = A0.shape[2]
    pos = torch.arange(N * C, device=fq.device)
    last = window.start(pos).clamp(0, None).minimum(pos + 1) - 1  # (N C,) index of the last key read; -1: none
    key_chunk, upto = torch.div(last, C, rounding_mode="floor"), last % C
    q_chunk = torch.div(pos, C, rounding_mode="floor")
    fq_c = F.pad(fq, (0, 0, 0, N * C - T)).unflatten(2, (N, C))  # (B, H, N, C, F)
    within = torch.arange(C, device=fq.device)[None, :] <= upto.view(N, C)[..., None]  # (N, C, C)
    out = fq_c.new_zeros(*fq_c.shape[:-1], vt.shape[-1])
    for o in range(int(window.span // C) + 2):
        here = ((key_chunk == q_chunk - o) & (last >= 0)).view(N, C)  # queries that read key chunk c - o
        if not bool(here.any()):
            continue
        A_o, P_o, K_o = _shift(A0, o), _shift(P, o), _shift(Kc, o)
        scores = (fq_c @ K_o.transpose(-1, -2)) * (within & here[..., None])  # (B, H, N, C, C)
        out = out + (fq_c @ A_o) * here[..., None] + scores @ P_o
    # the read state is Gamma_r (...) at key chunk start c'C; then decayed to n: d^(n - c'C + 1) in all
    steps = (pos - key_chunk * C + 1).clamp_min(0)
    out = out * _decay(log_decay, steps).view(1, -1, N, C, 1)
    return out.flatten(2, 3)[:, :, :T]


def hybrid_delta_chunked(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    scale: float | None = None, chunk_size: int | None = None, *, log_decay: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The delta-rule hybrid over one whole sequence from position 0 in O(T) memory; same values and gradients
    as :func:`hybrid_delta_naive`. ``chunk_size``: keys per chunk of the delta scan and queries per window chunk."""
    check_inputs(q, k, v, window_logits, log_decay)
    B, H, T, D = q.shape
    if T == 0:
        return q.new_zeros(B, H, 0, v.shape[-1])
    C = DEFAULT_CHUNK if chunk_size is None else chunk_size
    scale = D**-0.5 if scale is None else scale
    return _delta_chunked(q, k, v, phi_q, phi_k, window_logits, window, scale, C, log_decay)[0]


def _delta_chunked(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    scale: float, C: int, log_decay: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:  # fmt: skip
    """:func:`hybrid_delta_chunked` (T >= 1) and its :func:`_chunk_scan` of every key, for a prefill's state."""
    B, H, T, _ = q.shape
    keys = _delta_keys(phi_k)
    fq = phi_q(q).float()
    no_linear = fq.new_zeros(B, H, T, fq.shape[-1])
    num, den = chunked_from_features(q, k, v, fq, no_linear, window_logits, window, scale, C, None, parts=True)
    kh, vt, beta = delta_inputs(k, v, keys, H, window.sinks)
    scan = _chunk_scan(kh, vt, beta, log_decay, C)
    return _combine(num, den, delta_read(fq, kh, vt, beta, window, log_decay, C, scan)).to(q.dtype), scan


# --------------------------------------------------------------------------------------------- decoding


def _fold(A: Tensor, kh: Tensor, vt: Tensor, beta: Tensor, d: Tensor) -> Tensor:
    """``A`` ``(B, H, F, V)`` after the keys ``kh`` ``(B, H, n, F)`` (values ``vt``, strengths ``beta``) in order."""
    for j in range(kh.shape[2]):
        kj, bj = kh[:, :, j], beta[:, :, j, None, None]
        A = d * (A - bj * kj.unsqueeze(-1) * torch.einsum("bhf,bhfv->bhv", kj, A).unsqueeze(-2))
        A = A + bj * kj.unsqueeze(-1) * vt[:, :, j].unsqueeze(-2)
    return A


def delta_prefill(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    scale: float | None = None, *, log_decay: Tensor | None = None,
) -> tuple[Tensor, HybridState]:  # fmt: skip
    """:func:`hybrid_delta_chunked` over a prompt from position 0, and the decode state after it."""
    B, H, T, D = q.shape
    check_inputs(q, k, v, window_logits, log_decay)
    scale = D**-0.5 if scale is None else scale
    folded = folded_before(window, T)
    if T == 0:
        y = q.new_zeros(B, H, 0, v.shape[-1])
        A = q.new_zeros(B, H, phi_k(expand_kv(k, H)).shape[-1], v.shape[-1] + 1, dtype=torch.float32)
    else:
        # the state after the keys before `folded` is read off the sequence's own chunk scan: row r of a chunk's
        # pseudo-values depends on its rows <= r only, so the keys after `folded` change nothing there
        y, (A0, P, Kc) = _delta_chunked(q, k, v, phi_q, phi_k, window_logits, window, scale, DEFAULT_CHUNK,
                                        log_decay)  # fmt: skip
        A = q.new_zeros(B, H, Kc.shape[-1], v.shape[-1] + 1, dtype=torch.float32)
    if folded:
        c, r = (folded - 1) // DEFAULT_CHUNK, (folded - 1) % DEFAULT_CHUNK
        gamma = _decay(log_decay, torch.tensor(float(r + 1), device=q.device)).view(1, -1, 1, 1)
        A = gamma * (A0[:, :, c] + Kc[:, :, c, : r + 1].transpose(-1, -2) @ P[:, :, c, : r + 1])
    sinks, seen = window.sinks, min(window.sinks, T)
    k_sink = v_sink = None
    if sinks:  # the first positions, zeros for those not seen yet
        k_sink, v_sink = k.new_zeros(B, k.shape[1], sinks, D), v.new_zeros(B, v.shape[1], sinks, v.shape[-1])
        k_sink[:, :, :seen], v_sink[:, :, :seen] = k[:, :, :seen], v[:, :, :seen]
    span = window.span
    state = HybridState(last_positions(k, span), last_positions(v, span), A[..., :-1], A[..., -1], T, k_sink, v_sink)
    return y, state


def delta_step(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    state: HybridState, scale: float | None = None, *, log_decay: Tensor | None = None,
) -> tuple[Tensor, HybridState]:  # fmt: skip
    """Attend t >= 1 new tokens after ``state`` (a :func:`delta_prefill` / :func:`delta_step` state), token by
    token, and advance it. Returns ``(B, H, t, Dv)`` in q's dtype and the new state (``state`` is not modified)."""
    check_inputs(q, k, v, window_logits, log_decay)
    check_state(q, k, v, state, window)
    B, H, t, D = q.shape
    P, L, sinks = window.span, state.length, window.sinks
    scale = D**-0.5 if scale is None else scale
    keys = _delta_keys(phi_k)
    k_all = torch.cat([state.k_buf.to(k.dtype), k], dim=2)  # positions [L - P, L + t)
    v_all = torch.cat([state.v_buf.to(v.dtype), v], dim=2)
    k_pos = torch.arange(L - P, L + t, device=q.device)
    d = _decay(log_decay, torch.ones((), device=q.device)).view(1, -1, 1, 1)
    A = torch.cat([state.S, state.z.unsqueeze(-1)], dim=-1)
    folded = first = folded_before(window, L)
    # only the keys that enter the state during these t tokens, positions [first, last), get features and beta
    starts = [min(max(int(window.start(torch.tensor(L + i)).item()), 0), L + i + 1) for i in range(t)]
    ends = [folded_before(window, L + i + 1) for i in range(t)]  # where the folded keys end after token i
    last = max([first, *starts, *ends])
    span = slice(first - (L - P), last - (L - P))
    kh, vt, beta = delta_inputs(k_all[:, :, span], v_all[:, :, span], keys, H, 0)
    beta = beta * ((k_pos[span] >= sinks) & (k_pos[span] >= 0)).float()
    k_sink, v_sink = filled_sinks(state, k, v, window)
    fq = phi_q(q).float()
    outs = []
    for i in range(t):
        p, start = L + i, starts[i]
        if start > folded:
            idx = slice(folded - first, start - first)
            A, folded = _fold(A, kh[:, :, idx], vt[:, :, idx], beta[:, :, idx], d), start
        lin = torch.einsum("bhf,bhfv->bhv", fq[:, :, i], A)  # (B, H, Dv + 1); A is 0 before any key entered
        lin = lin * _decay(log_decay, torch.tensor(float(p - start + 1), device=q.device)).view(1, -1, 1)
        local = slice(0, P + i + 1)  # keys at positions [L - P, p]
        kl, vl, kp = k_all[:, :, local], v_all[:, :, local], k_pos[local]
        in_window, _ = window_masks(window, torch.tensor([p], device=q.device), kp)  # (1, K)
        in_window = in_window & (kp >= 0)
        if sinks and k_sink is not None and v_sink is not None:
            old = torch.arange(sinks, device=q.device) < L - P  # sinks no longer among the local keys
            kl, vl = torch.cat([k_sink.to(kl.dtype), kl], dim=2), torch.cat([v_sink.to(vl.dtype), vl], dim=2)
            in_window = torch.cat([old[None] & (torch.arange(sinks, device=q.device) <= p)[None], in_window], dim=-1)
        s = torch.einsum("bhd,bhkd->bhk", q[:, :, i].float(), expand_kv(kl, H).float()) * scale
        a = hybrid_weights(s, torch.zeros_like(s), in_window, torch.zeros_like(in_window), window_logits)
        num, den = torch.einsum("bhk,bhkd->bhd", a, expand_kv(vl, H).float()), a.sum(dim=-1)
        outs.append(_combine(num, den, lin))
        end = ends[i]
        if end > folded:
            idx = slice(folded - first, end - first)
            A, folded = _fold(A, kh[:, :, idx], vt[:, :, idx], beta[:, :, idx], d), end
    y = torch.stack(outs, dim=2).to(q.dtype)
    new_state = HybridState(k_all[:, :, t:].clone(), v_all[:, :, t:].clone(), A[..., :-1], A[..., -1], L + t,
                            k_sink, v_sink)  # fmt: skip
    return y, new_state


class DeltaKernel(Kernel):
    """The delta-rule hybrid: chunked (``delta``) or the reference (``delta-naive``); never chosen automatically
    (the layers of a ``delta_rule`` model pick it themselves)."""

    priority = -1

    def __init__(self, reference: bool = False) -> None:
        self.name = "delta-naive" if reference else "delta"
        self.sequence = hybrid_delta_naive if reference else hybrid_delta_chunked  # type: ignore[assignment]

    def attention(self, q, k, v, phi_q, phi_k, window_logits, window, *, scale=None, pads=None, log_decay=None):  # type: ignore[override]
        _no_pads(pads)
        return self.sequence(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay=log_decay)

    def prefill(self, q, k, v, phi_q, phi_k, window_logits, window, *, scale=None, pads=None, log_decay=None):  # type: ignore[override]
        _no_pads(pads)
        return delta_prefill(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay=log_decay)

    def step(self, q, k, v, phi_q, phi_k, window_logits, window, state, *, scale=None, pads=None, log_decay=None):  # type: ignore[override]
        _no_pads(pads)
        return delta_step(q, k, v, phi_q, phi_k, window_logits, window, state, scale, log_decay=log_decay)


def initial_beta_bias(value: float = 0.5) -> float:
    """The bias of the write strength's logit that gives ``beta = value`` for every key at the start."""
    return math.log(value / (1 - value))


__all__ = [
    "DeltaKernel", "DeltaKeys", "delta_inputs", "delta_prefill", "delta_read", "delta_step", "hybrid_delta_chunked",
    "hybrid_delta_naive", "initial_beta_bias",
]
