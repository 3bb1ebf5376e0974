"""Fused Triton kernels for hybrid attention on CUDA: forward and backward, memory linear in T.

The op is :func:`~lolcats_cli.kernels.naive.hybrid_attention_naive` (docs/method.md section 1) given the
features: per batch row b, query head h (key/value head ``h // (H // Hkv)``: grouped-query attention reads
K and V at KV-head count, never repeated) and query n, with ``s_nj = q_n . k_j * scale``::

    c_n  = max_{j in W(n)} s_nj
    a_nj = sigmoid(window_logits[h]) exp(s_nj - c_n)                 j in W(n) (window keys and sinks)
    a_nj = (fq_n . fk_j) exp(log_decay[h] (n - j))                   j in L(n) (older keys, never sinks)
    y_n  = sum_j a_nj v_j / max(sum_j a_nj, 1e-12)

``fq = phi_q(q)``, ``fk = phi_k(k)`` are computed by PyTorch; :class:`HybridFn` is a ``torch.autograd.Function``
over (q, k, v, fq, fk, window_logits, log_decay) that returns gradients for all of them.

Design (blocks of ``BLOCK = 64`` positions; query block i covers ``[64 i, 64 i + 64)``):

* ``_state_fwd``: per (b, h, feature tile, value tile), a scan over key chunks of the linear state
  ``S(64 c) = sum_{sinks <= j < 64 c} exp(log_decay (64 c - j)) fk_j v_j^T`` and ``z(64 c)`` (the same with
  v = 1): the state *decayed to the chunk start*, so every exponent is ``log_decay`` times a distance >= 0.
  Stored for every chunk: ``(B H, T / 64, F, Dv)`` fp32 (not kept for the backward, which rescans).
* ``_fwd``: one program per (query block, b, h). The query block's window starts no earlier than
  ``kb = 64 floor(start(64 i) / 64)``; every key before kb (but the sinks) is linear for all its queries and
  comes from ``S(kb), z(kb)``. The local keys ``[kb, 64 i + 64)`` are visited in tiles of 64: the window keys
  as a softmax tile with an online max (flash style), the local linear keys as decayed scores
  ``fq fk^T``, the sinks older than kb as one extra tile. Window and linear numerators and denominators are
  kept apart and merged at the end through the shared normaliser. Saves, per query, the window max c, the
  denominator and the position of the window max (for the gradient through c).
* backward (recomputes the tiles; nothing T x T is stored): ``_bwd_dq`` (per query block: dq, the local
  part of d fq, the window share ``R_n = sum_{W(n)} a_nj dA_nj``, and the gradients of the sink keys seen
  through the sink tile as per-block partials), ``_state_bwd`` (a reverse scan of
  ``dH(b) = sum over the queries n of blocks whose kb >= b of exp(log_decay (n - b)) fq_n dy_n^T / den_n`` at
  ``b = 64 (c + 1)``),
  ``_bwd_dkv`` (per key block and KV head, looping over the heads of its group: dk, dv, the local part of
  d fk, plus dv from dH) and ``_bwd_prefix`` (the prefix parts of d fq and d fk, and per feature tile the
  decay's gradient). The window logits' gradient is ``(1 - g) sum R``; the decay's is
  ``sum_t t (fq_t . dfq_t - fk_t . dfk_t)`` (every linear term has the factor ``exp(log_decay (n - j))``, so
  ``d/d log_decay`` is the sum of ``(n - j)`` times its share, which this telescoping form gives from the
  feature gradients). The linear gate, when used, is folded into fq by the caller.

Dtypes: the matrix products take q's dtype (bf16 / fp16 / fp32; under CUDA autocast the autocast dtype; k,
v, fq and fk are cast to it) and accumulate in fp32; softmax statistics, the linear states and every
gradient accumulator are fp32; products with the fp32 states run in tf32 for bf16 / fp16 inputs and in full
fp32 (no tf32) for fp32 inputs. Output in q's dtype; gradients in each input's dtype.

Supported: the built-in windows (sliding, terrace, none) with up to 64 sinks, head dim 64 or 128, value
and feature dims up to 256, any T. Anything else goes through the chunked form (:class:`TritonKernel`
falls back). ``triton`` is imported on first use only, so CPU installs without it import this module fine;
under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (the tests use that).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..api import Window
from ..switches import triton_interpreting
from . import triton_tiles as tiles
from .base import Kernel
from .blocks import FeatureFn, check_inputs, decay_weights, expand_kv, kv_state, not_sinks
from .chunked import hybrid_attention_chunked
from .padded import folded_before_rows, keep_real, padded_prefill_state, row_sinks, shift_rows
from .recurrent import HybridState, last_positions
from .triton_import import triton_available
from .triton_tiles import BLOCK

MAX_SINKS = 64
HEAD_DIMS = (64, 128)
MAX_DIM = 256  # value and feature dims


def window_kind(window: Window) -> int | None:
    """0 sliding, 1 terrace, 2 none for the built-in windows (exactly those classes), else None."""
    from ..builtins.windows import NoWindow, Sliding, Terrace

    kinds = {Sliding: 0, Terrace: 1, NoWindow: 2}
    return kinds.get(type(window))


def unsupported(q: Tensor, k: Tensor, v: Tensor, window: Window, feature_dim: int | None = None) -> str | None:
    """Why these inputs cannot run through the fused kernel (None when they can)."""
    if window_kind(window) is None:
        return f"window {type(window).__name__} is not a built-in window"
    if window.sinks > MAX_SINKS:
        return f"{window.sinks} sinks (at most {MAX_SINKS})"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (supported: {HEAD_DIMS})"
    if v.shape[-1] > MAX_DIM or (feature_dim is not None and feature_dim > MAX_DIM):
        return f"value dim {v.shape[-1]} / feature dim {feature_dim} above {MAX_DIM}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if not (q.is_cuda or triton_interpreting()):
        return f"device {q.device.type} (CUDA only, or TRITON_INTERPRET=1)"
    return None


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(1, n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------
# Launchers and the autograd Function.
# ---------------------------------------------------------------------------------------------------------


def _config(q: Tensor, v: Tensor, F: int, window: Window) -> dict:
    D, DV = q.shape[-1], v.shape[-1]
    FP, VP = _pow2(F), _pow2(DV)
    low = q.dtype != torch.float32
    return dict(
        D=D, DV=DV, F=F, DP=_pow2(D), VP=VP, FP=FP, BF=min(64, FP), BV=min(64, VP),
        SP=_pow2(window.sinks) if window.sinks > 0 else 0,
        KIND=window_kind(window), WSIZE=int(getattr(window.params, "size", 1) or 1), SINKS=int(window.sinks),
        PREC="tf32" if low else "ieee", PREC_S="tf32" if low else "ieee",
        num_warps=8,  # ptxas, sm_90, D=128 F=128 bf16: 4 warps spill 1-6 KB in the tile kernels, 8 warps < 1 KB
    )  # fmt: skip


def _states(fk: Tensor, v: Tensor, log_decay: Tensor | None, cfg: dict, H: int, G: int) -> tuple[Tensor, Tensor]:
    """The prefix states at every block start: S ``(B H, T / 64, F, Dv)`` and z ``(B H, T / 64, F)`` fp32."""
    B, _, T, F = fk.shape
    NB = tiles.triton.cdiv(T, BLOCK)
    NV = tiles.triton.cdiv(cfg["DV"], cfg["BV"])
    f32 = dict(device=fk.device, dtype=torch.float32)
    sbuf = torch.empty(B * H, NB, F, cfg["DV"], **f32)
    zbuf = torch.empty(B * H, NB, F, **f32)
    has_decay = log_decay is not None
    tiles._state_fwd[(tiles.triton.cdiv(F, cfg["BF"]) * NV, B * H)](
        fk, v, log_decay if has_decay else sbuf, sbuf, zbuf, T, H, G, NB, NV, cfg["SINKS"], F=F, DV=cfg["DV"],
        BF=cfg["BF"], BV=cfg["BV"], BLOCK=BLOCK, HAS_DECAY=has_decay, PREC_S=cfg["PREC_S"], num_warps=4,
    )  # fmt: skip
    return sbuf, zbuf


def _forward(q, k, v, fq, fk, window_logits, log_decay, window: Window, scale: float):
    tiles.build()
    B, H, T, _ = q.shape
    G = H // k.shape[1]
    F = fq.shape[-1]
    cfg = _config(q, v, F, window)
    NB = tiles.triton.cdiv(T, BLOCK)
    has_decay = log_decay is not None
    ld = log_decay if has_decay else window_logits  # a dummy pointer when there is no decay
    f32 = dict(device=q.device, dtype=torch.float32)
    sbuf, zbuf = _states(fk, v, log_decay, cfg, H, G)
    y = torch.empty(B, H, T, cfg["DV"], device=q.device, dtype=q.dtype)
    cmax = torch.empty(B, H, T, **f32)
    den = torch.empty(B, H, T, **f32)
    amax = torch.empty(B, H, T, device=q.device, dtype=torch.int32)
    tiles._fwd[(NB, B * H)](
        q, k, v, fq, fk, window_logits, ld, sbuf, zbuf, y, cmax, den, amax,
        T, H, G, NB, scale, cfg["WSIZE"], cfg["SINKS"],
        D=cfg["D"], DV=cfg["DV"], F=F, DP=cfg["DP"], VP=cfg["VP"], FP=cfg["FP"], BF=cfg["BF"], SP=cfg["SP"],
        BLOCK=BLOCK, KIND=cfg["KIND"], HAS_DECAY=has_decay, PREC=cfg["PREC"], PREC_S=cfg["PREC_S"],
        num_warps=cfg["num_warps"], num_stages=2,
    )  # fmt: skip
    return y, sbuf, zbuf, cmax, den, amax


def _backward(dy, q, k, v, fq, fk, window_logits, log_decay, y, cmax, den, amax, window, scale):
    tiles.build()
    B, H, T, _ = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    F = fq.shape[-1]
    cfg = _config(q, v, F, window)
    NB = tiles.triton.cdiv(T, BLOCK)
    NF, NV = tiles.triton.cdiv(F, cfg["BF"]), tiles.triton.cdiv(cfg["DV"], cfg["BV"])
    has_decay = log_decay is not None
    ld = log_decay if has_decay else window_logits
    f32 = dict(device=q.device, dtype=torch.float32)
    dy = dy.to(q.dtype).contiguous()
    delta = torch.empty(B, H, T, **f32)  # dy . y, a few heads at a time (bounded fp32 temporaries)
    for h0 in range(0, H, 4):
        delta[:, h0 : h0 + 4] = (dy[:, h0 : h0 + 4].float() * y[:, h0 : h0 + 4].float()).sum(-1)
    SP = cfg["SP"]
    # dq, dk and dv are final when their kernel stores them: stored in the input dtype (the store rounds once,
    # as the cast after an fp32 buffer did) so no fp32 copy and no cast copy is held. dfq and dfk accumulate over
    # two kernels: fp32.
    dq = torch.empty(B, H, T, cfg["D"], device=q.device, dtype=q.dtype)
    dfq = torch.empty(B, H, T, F, **f32)
    rw = torch.empty(B, H, T, **f32)
    dks = torch.zeros(B * H, NB, max(SP, 1), cfg["D"], **f32)
    dvs = torch.zeros(B * H, NB, max(SP, 1), cfg["DV"], **f32)
    common = dict(D=cfg["D"], DV=cfg["DV"], F=F, DP=cfg["DP"], VP=cfg["VP"], FP=cfg["FP"], BLOCK=BLOCK,
                  KIND=cfg["KIND"], HAS_DECAY=has_decay, PREC=cfg["PREC"])  # fmt: skip
    tiles._bwd_dq[(NB, B * H)](
        q, k, v, fq, fk, window_logits, ld, dy, cmax, den, delta, amax, dq, dfq, rw, dks, dvs,
        T, H, G, NB, scale, cfg["WSIZE"], cfg["SINKS"], SP=SP, **common,
        num_warps=cfg["num_warps"], num_stages=2,
    )  # fmt: skip
    sbuf, zbuf = _states(fk, v, log_decay, cfg, H, G)  # recomputed, not saved by the forward
    hbuf = torch.empty(B * H, NB, F, cfg["DV"], **f32)
    hzbuf = torch.empty(B * H, NB, F, **f32)
    tiles._state_bwd[(NF * NV, B * H)](
        fq, dy, den, delta, ld, hbuf, hzbuf, T, H, NB, NV, cfg["WSIZE"], F=F, DV=cfg["DV"], BF=cfg["BF"],
        BV=cfg["BV"], BLOCK=BLOCK, KIND=cfg["KIND"], HAS_DECAY=has_decay, PREC_S=cfg["PREC_S"], num_warps=4,
    )  # fmt: skip
    dk = torch.empty(B, Hkv, T, cfg["D"], device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Hkv, T, cfg["DV"], device=q.device, dtype=v.dtype)
    dfk = torch.empty(B, H, T, F, **f32)
    tiles._bwd_dkv[(NB, B * Hkv)](
        q, k, v, fq, fk, window_logits, ld, dy, cmax, den, delta, amax, rw, hbuf, dk, dv, dfk,
        T, H, G, NB, scale, cfg["WSIZE"], cfg["SINKS"], BF=cfg["BF"], PREC_S=cfg["PREC_S"], **common,
        num_warps=cfg["num_warps"], num_stages=2,
    )  # fmt: skip
    share = torch.empty(B * H, NF, T, **f32) if has_decay else rw  # per feature tile: (t - c) (fq.dfq - fk.dfk)
    tiles._bwd_prefix[(NB, B * H, NF)](
        dy, den, delta, v, fq, fk, ld, sbuf, zbuf, hbuf, hzbuf, dfq, dfk, share, T, H, G, NB, cfg["WSIZE"],
        cfg["SINKS"], (T - 1) / 2, F=F, DV=cfg["DV"], VP=cfg["VP"], BF=cfg["BF"], BLOCK=BLOCK, KIND=cfg["KIND"],
        HAS_DECAY=has_decay, PREC_S=cfg["PREC_S"], num_warps=4,
    )  # fmt: skip
    sinks = min(cfg["SINKS"], T)
    if sinks:  # the sinks seen through the sink tile, summed over query blocks and the heads of each group (fp32)
        for grad, part in ((dk, dks), (dv, dvs)):
            grad[:, :, :sinks] = grad[:, :, :sinks].float() + part.sum(1)[:, :sinks].view(B, Hkv, G, sinks, -1).sum(2)
    g = torch.sigmoid(window_logits.float())
    dwl = (1 - g) * rw.sum(dim=(0, 2))
    # Every linear term carries exp(log_decay (n - j)): d log_decay = sum (n - j) a dA, which telescopes to
    # sum_t t (fq_t . dfq_t - fk_t . dfk_t) (t centred: the two sums are equal), reduced per tile in-kernel.
    dld = share.view(B, H, NF, T).double().sum(dim=(0, 2, 3)) if has_decay else None
    return dq, dk, dv, dfq, dfk, dwl, dld


class HybridFn(torch.autograd.Function):
    """The fused hybrid op: ``(q, k, v, fq, fk, window_logits, log_decay) -> y``, with its backward.

    q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``, fq / fk ``(B, H, T, F)`` (fk of the keys
    expanded to the query heads), all of q's dtype and contiguous; window_logits ``(H,)`` fp32; log_decay
    ``(H,)`` fp32 or None. Use :func:`triton_hybrid_attention`, which prepares the inputs.
    """

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, window_logits, log_decay, window, scale):  # type: ignore[override]
        y, _, _, cmax, den, amax = _forward(q, k, v, fq, fk, window_logits, log_decay, window, scale)
        # The prefix states (T / 64 x F x Dv per head) are not kept: backward recomputes them (one cheap scan).
        ctx.save_for_backward(q, k, v, fq, fk, window_logits, log_decay, y, cmax, den, amax)
        ctx.window, ctx.scale = window, scale
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        q, k, v, fq, fk, window_logits, log_decay, y, cmax, den, amax = ctx.saved_tensors
        dq, dk, dv, dfq, dfk, dwl, dld = _backward(
            dy, q, k, v, fq, fk, window_logits, log_decay, y, cmax, den, amax, ctx.window, ctx.scale
        )
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dfq.to(fq.dtype), dfk.to(fk.dtype),
            dwl.to(window_logits.dtype), None if dld is None else dld.to(log_decay.dtype), None, None,
        )  # fmt: skip


def _prepared(q, k, v, fq, fk, window_logits, window, scale, log_decay) -> tuple[list, float]:
    """The checked inputs of the fused op, cast to the compute dtype and contiguous, and the scale."""
    check_inputs(q, k, v, window_logits)
    why = unsupported(q, k, v, window, fq.shape[-1])
    if why is not None:
        raise ValueError(f"the triton hybrid kernel does not support {why}")
    B, H, T, D = q.shape
    if fq.shape != (B, H, T, fq.shape[-1]) or fk.shape != fq.shape:
        raise ValueError(f"fq and fk must have shape (B, H, T, F); got {tuple(fq.shape)} and {tuple(fk.shape)}")
    if log_decay is not None and tuple(log_decay.shape) != (H,):
        raise ValueError(f"log_decay must have shape (H,) = ({H},); got {tuple(log_decay.shape)}")
    dt = q.dtype  # the compute dtype of the products: q's, or the autocast dtype under CUDA autocast
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
    args = [x.to(dt).contiguous() for x in (q, k, v, fq, fk)]
    ld = None if log_decay is None else log_decay.float().contiguous()
    return [*args, window_logits.float().contiguous(), ld], D**-0.5 if scale is None else float(scale)


def triton_hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    window_logits: Tensor,
    window: Window,
    scale: float | None = None,
    log_decay: Tensor | None = None,
) -> Tensor:
    """The fused op given the features: fq ``(B, H, T, F)`` = phi_q(q), fk ``(B, H, T, F)`` = phi_k of the
    keys expanded to the query heads. The products run in q's dtype (under CUDA autocast: the autocast
    dtype), accumulating in fp32. Returns ``(B, H, T, Dv)`` in q's dtype; differentiable in every tensor
    argument. Raises ``ValueError`` for inputs the kernel does not support (see :func:`unsupported`).
    """
    args, scale = _prepared(q, k, v, fq, fk, window_logits, window, scale, log_decay)
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return HybridFn.apply(*args, window, scale).to(q.dtype)


def triton_hybrid_prefill(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window_logits: Tensor, window: Window,
    scale: float | None = None, log_decay: Tensor | None = None, pads: Tensor | None = None,
) -> tuple[Tensor, HybridState]:  # fmt: skip
    """The fused forward over prompts (T >= 1, no autograd) and the decode state after them; ``pads`` ``(B,)``:
    leading pad tokens per row (left padding, as :func:`~.padded.padded_prefill_state` takes them).

    Padded rows are rotated so their real tokens start at position 0 (as :func:`~.padded.padded_attention` does)
    for the forward, and the output is rotated back (pad rows 0). The state comes from the forward's own chunk
    states: per row, S and z at the last block start ``64 c`` at or before the row's fold point ``f(n)``, plus the
    fewer than 64 keys from there to ``f(n)``, decayed to the row's length n. So the prompt's keys are not read a
    second time in fp32 (:func:`~.padded.padded_prefill_state` does).
    """
    if q.shape[2] == 0:
        raise ValueError("triton_hybrid_prefill needs a prompt of at least one token (Kernel.prefill takes empty ones)")
    args, scale = _prepared(q, k, v, fq, fk, window_logits, window, scale, log_decay)
    B, H, T, F = fk.shape
    rows = torch.zeros(B, dtype=torch.long, device=q.device) if pads is None else pads.to(q.device)
    real = torch.arange(T, device=q.device)[None] >= rows[:, None]  # (B, T)
    if pads is not None:  # real tokens first; the pads (zeroed) go to the end, where causal attention hides them
        args[:5] = [shift_rows(keep_real(x, real), rows).contiguous() for x in args[:5]]
    y, sbuf, zbuf, *_ = _forward(*args, window, scale)
    if pads is not None:
        y = keep_real(shift_rows(y, (T - rows) % T), real)
    v_rot, fk_rot, ld = args[2], args[4], args[6]
    n = T - rows  # (B,) real tokens per row
    fold = folded_before_rows(window, n)
    c = (fold // BLOCK).clamp_max(sbuf.shape[1] - 1)  # sbuf[:, c] holds the keys before 64 c, decayed to 64 c
    lo = c * BLOCK
    every = torch.arange(B, device=q.device)
    S, z = sbuf.view(B, H, -1, F, sbuf.shape[-1])[every, :, c], zbuf.view(B, H, -1, F)[every, :, c]
    pos = lo[:, None] + torch.arange(BLOCK, device=q.device)[None]  # (B, 64): the keys from 64 c on
    take = pos.clamp_max(T - 1)[:, None, :, None]
    tail = fk_rot.gather(2, take.expand(B, H, BLOCK, F)).float()
    tail = keep_real(not_sinks(tail, pos, window.sinks), pos < fold[:, None])
    if ld is not None:
        tail = tail * decay_weights(ld, n[:, None] - pos)
    dS, dz = kv_state(tail, v_rot.gather(2, take.expand(B, k.shape[1], BLOCK, v.shape[-1])).float())
    if ld is not None:  # the states at 64 c, decayed on to each row's length
        moved = decay_weights(ld, (n - lo)[:, None])[:, :, 0]  # (B, H, 1)
        S, z = S * moved[..., None], z * moved
    if pads is not None:  # pad keys and values never reach the buffers (an unpadded prompt needs no copy)
        k, v = keep_real(k, real), keep_real(v, real)
    sinks = [row_sinks(x, rows, window.sinks) for x in (k, v)]
    state = HybridState(last_positions(k, window.span), last_positions(v, window.span), S + dS, z + dz, T, *sinks)
    return y.to(q.dtype), state


def _chunked_sequence(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay):
    if log_decay is None:
        return hybrid_attention_chunked(q, k, v, phi_q, phi_k, window_logits, window, scale)
    return hybrid_attention_chunked(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay=log_decay)


class TritonKernel(Kernel):
    """The fused Triton kernel on CUDA; inputs it does not support (a plugin window, more than 64 sinks,
    another head dim) go through the chunked form. A prefill without autograd, left-padded or not, is one fused
    forward whose chunk states give the decode state (:func:`triton_hybrid_prefill`); with autograd the state is
    built from the same key features (phi_k runs once; padded rows take the shared form); decoding uses the shared
    forms."""

    name = "triton"
    priority = 10

    def available(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda" and torch.cuda.is_available() and triton_available()

    def _features(self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn,
                  window: Window) -> tuple[Tensor, Tensor] | None:  # fmt: skip
        """``(phi_q(q), phi_k(k))`` (keys expanded to the query heads) when the fused op takes these inputs, else
        None (the chunked form runs)."""
        if unsupported(q, k, v, window) is not None or not triton_available():
            return None
        fq = phi_q(q)
        if fq.shape[-1] > MAX_DIM:
            return None
        return fq, phi_k(expand_kv(k, q.shape[1]))

    def sequence(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, scale: float | None = None, *, log_decay: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        if (features := self._features(q, k, v, phi_q, phi_k, window)) is None:
            return _chunked_sequence(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay)
        return triton_hybrid_attention(q, k, v, *features, window_logits, window, scale, log_decay)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, *, scale: float | None = None, pads: Tensor | None = None, log_decay: Tensor | None = None,
    ) -> tuple[Tensor, HybridState]:  # fmt: skip
        features = None if q.shape[2] == 0 else self._features(q, k, v, phi_q, phi_k, window)
        grad = features is not None and torch.is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v, window_logits, *features)
        )  # fmt: skip
        if features is None or (grad and pads is not None):
            return super().prefill(
                q, k, v, phi_q, phi_k, window_logits, window, scale=scale, pads=pads, log_decay=log_decay
            )
        if grad:  # the autograd Function, and the state from the same key features
            y = triton_hybrid_attention(q, k, v, *features, window_logits, window, scale, log_decay)
            no_pads = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            state = padded_prefill_state(k, v, phi_k, window, no_pads, q.shape[1], fk=features[1], log_decay=log_decay)
            return y, state
        return triton_hybrid_prefill(q, k, v, *features, window_logits, window, scale, log_decay, pads)


__all__ = ["BLOCK", "HybridFn", "TritonKernel", "triton_hybrid_attention", "triton_hybrid_prefill", "unsupported"]
