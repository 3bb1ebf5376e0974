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

import functools
import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

from ..api import Window
from .base import Kernel
from .blocks import FeatureFn, check_inputs, expand_kv
from .chunked import hybrid_attention_chunked

BLOCK = 64  # queries per block = keys per tile = positions per linear-state chunk
MAX_SINKS = 64
HEAD_DIMS = (64, 128)
MAX_DIM = 256  # value and feature dims


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (without importing it)."""
    return importlib.util.find_spec("triton") is not None


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
    if not (q.is_cuda or _interpret()):
        return f"device {q.device.type} (CUDA only, or TRITON_INTERPRET=1)"
    return None


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(1, n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------
# The Triton kernels: defined on first use (triton imported lazily; TRITON_INTERPRET read at that moment).
# Every name a kernel uses is a module global (declared below), so Triton resolves it without closures.
# ---------------------------------------------------------------------------------------------------------

triton: Any = None
tl: Any = None
_start = _kb_of = _tile = _put = _masks = _scaled_dy = _softmax_tile = None
_state_fwd = _fwd = _bwd_dq = _state_bwd = _bwd_dkv = _bwd_prefix = None


@functools.lru_cache(maxsize=None)
def _build() -> bool:  # noqa: C901 (one definition site for all kernels)
    global triton, tl, _start, _kb_of, _tile, _put, _masks, _scaled_dy, _softmax_tile
    global _state_fwd, _fwd, _bwd_dq, _state_bwd, _bwd_dkv, _bwd_prefix
    try:  # optional: only the CUDA path (or TRITON_INTERPRET=1) gets here; a bundled export stays importable
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the triton attention kernel needs the triton package (pip install triton)") from e

    @triton.jit
    def _start(n, KIND: tl.constexpr, WSIZE):
        """First window position of queries n >= 0 (see builtins/windows.py)."""
        if KIND == 0:
            s = tl.maximum(n - WSIZE + 1, 0)
        elif KIND == 1:
            s = tl.maximum((n // WSIZE - 1) * WSIZE, 0)
        else:
            s = n + 1
        return s

    @triton.jit
    def _kb_of(i, KIND: tl.constexpr, WSIZE, BLOCK: tl.constexpr):
        """Start of query block i's local keys: its first window position, floored to a block."""
        return (_start(tl.maximum(i, 0) * BLOCK, KIND, WSIZE) // BLOCK) * BLOCK

    @triton.jit
    def _tile(base, rows, cols, row_ok, ncols):
        """``base[rows, cols]`` of a row-major matrix of ncols columns; 0 off row_ok or past ncols."""
        return tl.load(base + rows[:, None] * ncols + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < ncols),
                       other=0.0)  # fmt: skip

    @triton.jit
    def _put(base, rows, cols, row_ok, ncols, x):
        tl.store(base + rows[:, None] * ncols + cols[None, :], x, mask=row_ok[:, None] & (cols[None, :] < ncols))

    @triton.jit
    def _masks(qp, kp, st, SINKS, k_ok):
        """Window and linear masks of query positions qp against key positions kp (broadcast 2-D), st = start(qp)."""
        sink = kp < SINKS
        return (kp <= qp) & ((kp >= st) | sink) & k_ok, (kp < st) & (~sink)

    @triton.jit
    def _scaled_dy(DY, DEN, DELTA, bh, T, rm, mq, rv, DV):
        """``dy / den`` (fp32) and ``(dy . y) / den`` (0 where den was clamped) of the query rows rm."""
        dy = _tile(DY + (bh * T).to(tl.int64) * DV, rm, rv, mq, DV).to(tl.float32)
        den = tl.load(DEN + bh * T + rm, mask=mq, other=1.0)
        inv = 1.0 / tl.maximum(den, 1e-12)
        delta = tl.where(den > 1e-12, tl.load(DELTA + bh * T + rm, mask=mq, other=0.0) * inv, 0.0)
        return dy * inv[:, None], delta

    @triton.jit
    def _softmax_tile(s, win, col0, m_w, l_w, acc_w, am, v, PREC: tl.constexpr):
        """Online-softmax update over one tile of window scores; am tracks the position of the max."""
        sw = tl.where(win, s, float("-inf"))
        mt = tl.max(sw, axis=1)
        am = tl.where(mt > m_w, tl.argmax(sw, axis=1).to(tl.int32) + col0, am)
        m_new = tl.maximum(m_w, mt)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_w - m_safe)
        p = tl.exp(sw - m_safe[:, None])
        l_w = l_w * alpha + tl.sum(p, axis=1)
        acc_w = acc_w * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_w, acc_w, am

    @triton.jit
    def _state_fwd(
        FK, V, LD, SBUF, ZBUF, T, H, G, NC, NV, SINKS,
        F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BLOCK: tl.constexpr,
        HAS_DECAY: tl.constexpr, PREC_S: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % H
        bkv = (bh // H) * (H // G) + h // G
        fi = pid // NV
        vi = pid % NV
        rf = fi * BF + tl.arange(0, BF)
        rv = vi * BV + tl.arange(0, BV)
        rt = tl.arange(0, BLOCK)
        fk_base = FK + (bh * T).to(tl.int64) * F
        v_base = V + (bkv * T).to(tl.int64) * DV
        s_base = SBUF + (bh * NC).to(tl.int64) * F * DV
        z_base = ZBUF + (bh * NC).to(tl.int64) * F
        if HAS_DECAY:
            lam = tl.load(LD + h).to(tl.float32)
        S = tl.zeros([BF, BV], dtype=tl.float32)
        z = tl.zeros([BF], dtype=tl.float32)
        for c in range(0, NC):
            _put(s_base + c * F * DV, rf, rv, rf < F, DV, S)
            tl.store(z_base + c * F + rf, z, mask=(rf < F) & (vi == 0))
            rj = c * BLOCK + rt
            mk = (rj < T) & (rj >= SINKS)
            fk = _tile(fk_base, rj, rf, mk, F).to(tl.float32)
            v = _tile(v_base, rj, rv, mk, DV).to(tl.float32)
            if HAS_DECAY:
                fk = fk * tl.exp(lam * ((c + 1) * BLOCK - rj).to(tl.float32))[:, None]
                step = tl.exp(lam * BLOCK)
                S = S * step
                z = z * step
            S += tl.dot(tl.trans(fk), v, input_precision=PREC_S)
            z += tl.sum(fk, axis=0)

    @triton.jit
    def _fwd(
        Q, K, V, FQ, FK, WL, LD, SBUF, ZBUF, Y, CMAX, DEN, AMAX,
        T, H, G, NC, scale, WSIZE, SINKS,
        D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, VP: tl.constexpr,
        FP: tl.constexpr, BF: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
        HAS_DECAY: tl.constexpr, PREC: tl.constexpr, PREC_S: tl.constexpr,
    ):  # fmt: skip
        i = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % H
        bkv = (bh // H) * (H // G) + h // G
        m0 = i * BLOCK
        rm = m0 + tl.arange(0, BLOCK)
        rn = tl.arange(0, BLOCK)
        rd = tl.arange(0, DP)
        rv = tl.arange(0, VP)
        rf = tl.arange(0, FP)
        mq = rm < T
        fq_base = FQ + (bh * T).to(tl.int64) * F
        k_base = K + (bkv * T).to(tl.int64) * D
        v_base = V + (bkv * T).to(tl.int64) * DV
        fk_base = FK + (bh * T).to(tl.int64) * F
        q = _tile(Q + (bh * T).to(tl.int64) * D, rm, rd, mq, D)
        fq = _tile(fq_base, rm, rf, mq, F)
        g = tl.sigmoid(tl.load(WL + h).to(tl.float32))
        if HAS_DECAY:
            lam = tl.load(LD + h).to(tl.float32)
        st = _start(rm, KIND, WSIZE)
        kb = _kb_of(i, KIND, WSIZE, BLOCK)

        m_w = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        l_w = tl.zeros([BLOCK], dtype=tl.float32)
        acc_w = tl.zeros([BLOCK, VP], dtype=tl.float32)
        l_l = tl.zeros([BLOCK], dtype=tl.float32)
        acc_l = tl.zeros([BLOCK, VP], dtype=tl.float32)
        am = tl.zeros([BLOCK], dtype=tl.int32)

        # Linear keys before kb: the prefix state decayed to kb.
        if kb > 0:
            c = kb // BLOCK
            for f0 in tl.static_range(0, FP, BF):
                rfc = f0 + tl.arange(0, BF)
                fqc = _tile(fq_base, rm, rfc, mq, F).to(tl.float32)
                S = _tile(SBUF + (bh * NC + c).to(tl.int64) * F * DV, rfc, rv, rfc < F, DV)
                z = tl.load(ZBUF + (bh * NC + c).to(tl.int64) * F + rfc, mask=rfc < F, other=0.0)
                acc_l += tl.dot(fqc, S, input_precision=PREC_S)
                l_l += tl.sum(fqc * z[None, :], axis=1)
            if HAS_DECAY:
                e = tl.exp(lam * (rm - kb).to(tl.float32))
                acc_l = acc_l * e[:, None]
                l_l = l_l * e

        # Sinks older than kb: window keys only.
        if SP > 0:
            if kb > 0:
                rs = tl.arange(0, SP)
                ms = rs < tl.minimum(SINKS, kb)
                s = tl.dot(q, tl.trans(_tile(k_base, rs, rd, ms, D)), input_precision=PREC) * scale
                vs = _tile(v_base, rs, rv, ms, DV)
                m_w, l_w, acc_w, am = _softmax_tile(s, ms[None, :], 0, m_w, l_w, acc_w, am, vs, PREC)

        # Local keys [kb, m0 + BLOCK): window tile with online max, local linear keys with decay.
        for j0 in range(kb, m0 + BLOCK, BLOCK):
            rj = j0 + rn
            mk = rj < T
            v = _tile(v_base, rj, rv, mk, DV)
            s = tl.dot(q, tl.trans(_tile(k_base, rj, rd, mk, D)), input_precision=PREC) * scale
            win, lin_m = _masks(rm[:, None], rj[None, :], st[:, None], SINKS, mk[None, :])
            m_w, l_w, acc_w, am = _softmax_tile(s, win, j0, m_w, l_w, acc_w, am, v, PREC)
            lin = tl.dot(fq, tl.trans(_tile(fk_base, rj, rf, mk, F)), input_precision=PREC)
            if HAS_DECAY:
                lin = lin * tl.exp(lam * tl.maximum(rm[:, None] - rj[None, :], 0).to(tl.float32))
            lin = tl.where(lin_m, lin, 0.0)
            l_l += tl.sum(lin, axis=1)
            acc_l += tl.dot(lin.to(v.dtype), v, input_precision=PREC)

        den = g * l_w + l_l
        y = (g * acc_w + acc_l) / tl.maximum(den, 1e-12)[:, None]
        _put(Y + (bh * T).to(tl.int64) * DV, rm, rv, mq, DV, y.to(Y.dtype.element_ty))
        tl.store(CMAX + bh * T + rm, tl.where(m_w == float("-inf"), 0.0, m_w), mask=mq)
        tl.store(DEN + bh * T + rm, den, mask=mq)
        tl.store(AMAX + bh * T + rm, am, mask=mq)

    @triton.jit
    def _bwd_dq(
        Q, K, V, FQ, FK, WL, LD, DY, CMAX, DEN, DELTA, AMAX, DQ, DFQ, RW, DKS, DVS,
        T, H, G, NB, scale, WSIZE, SINKS,
        D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, VP: tl.constexpr,
        FP: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
        HAS_DECAY: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        i = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % H
        bkv = (bh // H) * (H // G) + h // G
        m0 = i * BLOCK
        rm = m0 + tl.arange(0, BLOCK)
        rn = tl.arange(0, BLOCK)
        rd = tl.arange(0, DP)
        rv = tl.arange(0, VP)
        rf = tl.arange(0, FP)
        mq = rm < T
        k_base = K + (bkv * T).to(tl.int64) * D
        v_base = V + (bkv * T).to(tl.int64) * DV
        fk_base = FK + (bh * T).to(tl.int64) * F
        q = _tile(Q + (bh * T).to(tl.int64) * D, rm, rd, mq, D)
        dyt, delta = _scaled_dy(DY, DEN, DELTA, bh, T, rm, mq, rv, DV)
        dyt = dyt.to(q.dtype)
        c_n = tl.load(CMAX + bh * T + rm, mask=mq, other=0.0)
        am = tl.load(AMAX + bh * T + rm, mask=mq, other=0)
        g = tl.sigmoid(tl.load(WL + h).to(tl.float32))
        if HAS_DECAY:
            lam = tl.load(LD + h).to(tl.float32)
        st = _start(rm, KIND, WSIZE)
        kb = _kb_of(i, KIND, WSIZE, BLOCK)

        dq = tl.zeros([BLOCK, DP], dtype=tl.float32)
        dfq = tl.zeros([BLOCK, FP], dtype=tl.float32)
        rw = tl.zeros([BLOCK], dtype=tl.float32)
        for j0 in range(kb, m0 + BLOCK, BLOCK):
            rj = j0 + rn
            mk = rj < T
            k = _tile(k_base, rj, rd, mk, D)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            win, lin_m = _masks(rm[:, None], rj[None, :], st[:, None], SINKS, mk[None, :])
            p = tl.where(win, g * tl.exp(s - c_n[:, None]), 0.0)
            dp = tl.dot(dyt, tl.trans(_tile(v_base, rj, rv, mk, DV)), input_precision=PREC) - delta[:, None]
            ds = p * dp
            rw += tl.sum(ds, axis=1)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            dl = dp
            if HAS_DECAY:
                dl = dl * tl.exp(lam * tl.maximum(rm[:, None] - rj[None, :], 0).to(tl.float32))
            fk = _tile(fk_base, rj, rf, mk, F)
            dfq += tl.dot(tl.where(lin_m, dl, 0.0).to(fk.dtype), fk, input_precision=PREC)

        if SP > 0:
            if kb > 0:
                rs = tl.arange(0, SP)
                ms = rs < tl.minimum(SINKS, kb)
                ks = _tile(k_base, rs, rd, ms, D)
                s = tl.dot(q, tl.trans(ks), input_precision=PREC) * scale
                p = tl.where(ms[None, :] & mq[:, None], g * tl.exp(s - c_n[:, None]), 0.0)
                dp = tl.dot(dyt, tl.trans(_tile(v_base, rs, rv, ms, DV)), input_precision=PREC) - delta[:, None]
                ds = p * dp
                rw += tl.sum(ds, axis=1)
                dq += tl.dot(ds.to(ks.dtype), ks, input_precision=PREC)
                # The sinks' own gradients, for this query block (summed over blocks by the caller); the
                # gradient through the window max goes to the key that holds it.
                ds = tl.where(rs[None, :] == am[:, None], ds - rw[:, None], ds)
                part = (bh * NB + i).to(tl.int64) * SP
                dks = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
                _put(DKS + part * D, rs, rd, ms, D, dks)
                _put(DVS + part * DV, rs, rv, ms, DV, tl.dot(tl.trans(p.to(dyt.dtype)), dyt, input_precision=PREC))

        # The gradient through c_n = max over the window: -R_n at the key holding the max.
        kam = _tile(k_base, am, rd, mq, D).to(tl.float32)
        _put(DQ + (bh * T).to(tl.int64) * D, rm, rd, mq, D, (dq - rw[:, None] * kam) * scale)
        _put(DFQ + (bh * T).to(tl.int64) * F, rm, rf, mq, F, dfq)
        tl.store(RW + bh * T + rm, rw, mask=mq)

    @triton.jit
    def _state_bwd(
        FQ, DY, DEN, DELTA, LD, HBUF, HZBUF, T, H, NC, NV, WSIZE,
        F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BLOCK: tl.constexpr,
        KIND: tl.constexpr, HAS_DECAY: tl.constexpr, PREC_S: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % H
        fi = pid // NV
        vi = pid % NV
        rf = fi * BF + tl.arange(0, BF)
        rv = vi * BV + tl.arange(0, BV)
        rt = tl.arange(0, BLOCK)
        fq_base = FQ + (bh * T).to(tl.int64) * F
        h_base = HBUF + (bh * NC).to(tl.int64) * F * DV
        hz_base = HZBUF + (bh * NC).to(tl.int64) * F
        if HAS_DECAY:
            lam = tl.load(LD + h).to(tl.float32)
        Gs = tl.zeros([BF, BV], dtype=tl.float32)
        hz = tl.zeros([BF], dtype=tl.float32)
        i = NC - 1
        kbi = _kb_of(i, KIND, WSIZE, BLOCK)
        for cc in range(0, NC):
            c = NC - 1 - cc
            bnd = (c + 1) * BLOCK
            if HAS_DECAY:
                step = tl.exp(lam * BLOCK)
                Gs = Gs * step
                hz = hz * step
            # Query blocks whose prefix state holds chunk c: kb_i >= bnd (kb non-decreasing in i).
            while (i >= 0) & (kbi >= bnd):
                rm = i * BLOCK + rt
                mq = rm < T
                fq = _tile(fq_base, rm, rf, mq, F).to(tl.float32)
                dyt, delta = _scaled_dy(DY, DEN, DELTA, bh, T, rm, mq, rv, DV)
                if HAS_DECAY:
                    fq = fq * tl.exp(lam * (rm - bnd).to(tl.float32))[:, None]
                Gs += tl.dot(tl.trans(fq), dyt, input_precision=PREC_S)
                hz += tl.sum(fq * delta[:, None], axis=0)
                i -= 1
                kbi = _kb_of(i, KIND, WSIZE, BLOCK)
            _put(h_base + c * F * DV, rf, rv, rf < F, DV, Gs)
            tl.store(hz_base + c * F + rf, hz, mask=(rf < F) & (vi == 0))

    @triton.jit
    def _bwd_dkv(
        Q, K, V, FQ, FK, WL, LD, DY, CMAX, DEN, DELTA, AMAX, RW, HBUF, DK, DV_, DFK,
        T, H, G, NB, scale, WSIZE, SINKS,
        D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, VP: tl.constexpr,
        FP: tl.constexpr, BF: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
        HAS_DECAY: tl.constexpr, PREC: tl.constexpr, PREC_S: tl.constexpr,
    ):  # fmt: skip
        kc = tl.program_id(0)
        bkv = tl.program_id(1)
        Hkv = H // G
        b = bkv // Hkv
        j0 = kc * BLOCK
        rj = j0 + tl.arange(0, BLOCK)
        rt = tl.arange(0, BLOCK)
        rd = tl.arange(0, DP)
        rv = tl.arange(0, VP)
        rf = tl.arange(0, FP)
        mk = rj < T
        k = _tile(K + (bkv * T).to(tl.int64) * D, rj, rd, mk, D)
        v = _tile(V + (bkv * T).to(tl.int64) * DV, rj, rv, mk, DV)
        dk = tl.zeros([BLOCK, DP], dtype=tl.float32)
        dv = tl.zeros([BLOCK, VP], dtype=tl.float32)
        for gh in range(0, G):
            h = (bkv % Hkv) * G + gh
            bh = b * H + h
            g = tl.sigmoid(tl.load(WL + h).to(tl.float32))
            if HAS_DECAY:
                lam = tl.load(LD + h).to(tl.float32)
            fk_base = FK + (bh * T).to(tl.int64) * F
            fk = _tile(fk_base, rj, rf, mk, F)
            dfk = tl.zeros([BLOCK, FP], dtype=tl.float32)
            # Query blocks that see this key block among their local keys: i >= kc with kb_i <= j0.
            i = kc
            kbi = _kb_of(i, KIND, WSIZE, BLOCK)
            while (i < NB) & (kbi <= j0):
                rm = i * BLOCK + rt
                mq = rm < T
                q = _tile(Q + (bh * T).to(tl.int64) * D, rm, rd, mq, D)
                fq = _tile(FQ + (bh * T).to(tl.int64) * F, rm, rf, mq, F)
                dyt, delta = _scaled_dy(DY, DEN, DELTA, bh, T, rm, mq, rv, DV)
                dyt = dyt.to(q.dtype)
                c_n = tl.load(CMAX + bh * T + rm, mask=mq, other=0.0)
                am = tl.load(AMAX + bh * T + rm, mask=mq, other=-1)
                rw = tl.load(RW + bh * T + rm, mask=mq, other=0.0)
                st = _start(rm, KIND, WSIZE)
                # Transposed tiles: rows are keys, columns queries.
                sT = tl.dot(k, tl.trans(q), input_precision=PREC) * scale
                win, lin_m = _masks(rm[None, :], rj[:, None], st[None, :], SINKS, mk[:, None] & mq[None, :])
                lin_m = lin_m & mq[None, :]
                pT = tl.where(win, g * tl.exp(sT - c_n[None, :]), 0.0)
                dpT = tl.dot(v, tl.trans(dyt), input_precision=PREC) - delta[None, :]
                dsT = pT * dpT
                dsT = tl.where(rj[:, None] == am[None, :], dsT - rw[None, :], dsT)
                dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
                linT = tl.dot(fk, tl.trans(fq), input_precision=PREC)
                dlT = dpT
                if HAS_DECAY:
                    dec = tl.exp(lam * tl.maximum(rm[None, :] - rj[:, None], 0).to(tl.float32))
                    linT = linT * dec
                    dlT = dlT * dec
                linT = tl.where(lin_m, linT, 0.0)
                dv += tl.dot((pT + linT).to(dyt.dtype), dyt, input_precision=PREC)
                dfk += tl.dot(tl.where(lin_m, dlT, 0.0).to(fq.dtype), fq, input_precision=PREC)
                i += 1
                kbi = _kb_of(i, KIND, WSIZE, BLOCK)
            _put(DFK + (bh * T).to(tl.int64) * F, rj, rf, mk, F, dfk)
            # Queries whose prefix state holds this key block: dv += exp(lam (64 (kc + 1) - j)) fk_j dH.
            for f0 in tl.static_range(0, FP, BF):
                rfc = f0 + tl.arange(0, BF)
                fkc = _tile(fk_base, rj, rfc, mk & (rj >= SINKS), F).to(tl.float32)
                if HAS_DECAY:
                    fkc = fkc * tl.exp(lam * ((kc + 1) * BLOCK - rj).to(tl.float32))[:, None]
                dH = _tile(HBUF + (bh * NB + kc).to(tl.int64) * F * DV, rfc, rv, rfc < F, DV)
                dv += tl.dot(fkc, dH, input_precision=PREC_S)
        _put(DK + (bkv * T).to(tl.int64) * D, rj, rd, mk, D, dk * scale)
        _put(DV_ + (bkv * T).to(tl.int64) * DV, rj, rv, mk, DV, dv)

    @triton.jit
    def _bwd_prefix(
        DY, DEN, DELTA, V, FQ, FK, LD, SBUF, ZBUF, HBUF, HZBUF, DFQ, DFK, SHARE, T, H, G, NB, WSIZE, SINKS, center,
        F: tl.constexpr, DV: tl.constexpr, VP: tl.constexpr, BF: tl.constexpr, BLOCK: tl.constexpr,
        KIND: tl.constexpr, HAS_DECAY: tl.constexpr, PREC_S: tl.constexpr,
    ):  # fmt: skip
        i = tl.program_id(0)
        bh = tl.program_id(1)
        fi = tl.program_id(2)
        h = bh % H
        bkv = (bh // H) * (H // G) + h // G
        rm = i * BLOCK + tl.arange(0, BLOCK)  # the block's positions: queries for d fq, keys for d fk
        mq = rm < T
        rv = tl.arange(0, VP)
        rf = fi * BF + tl.arange(0, BF)
        if HAS_DECAY:
            lam = tl.load(LD + h).to(tl.float32)
        # d fq of query block i from its prefix state S(kb), z(kb).
        kb = _kb_of(i, KIND, WSIZE, BLOCK)
        dfq_base = DFQ + (bh * T).to(tl.int64) * F
        dfq = _tile(dfq_base, rm, rf, mq, F)
        if kb > 0:
            dyt, delta = _scaled_dy(DY, DEN, DELTA, bh, T, rm, mq, rv, DV)
            c = kb // BLOCK
            S = _tile(SBUF + (bh * NB + c).to(tl.int64) * F * DV, rf, rv, rf < F, DV)
            z = tl.load(ZBUF + (bh * NB + c).to(tl.int64) * F + rf, mask=rf < F, other=0.0)
            part = tl.dot(dyt, tl.trans(S), input_precision=PREC_S) - delta[:, None] * z[None, :]
            if HAS_DECAY:
                part = part * tl.exp(lam * (rm - kb).to(tl.float32))[:, None]
            dfq += part
            _put(dfq_base, rm, rf, mq, F, dfq)
        # d fk of key block i from dH(64 (i + 1)).
        mk = mq & (rm >= SINKS)
        v = _tile(V + (bkv * T).to(tl.int64) * DV, rm, rv, mk, DV).to(tl.float32)
        dH = _tile(HBUF + (bh * NB + i).to(tl.int64) * F * DV, rf, rv, rf < F, DV)
        hz = tl.load(HZBUF + (bh * NB + i).to(tl.int64) * F + rf, mask=rf < F, other=0.0)
        part = tl.dot(v, tl.trans(dH), input_precision=PREC_S) - hz[None, :]
        if HAS_DECAY:
            part = part * tl.exp(lam * ((i + 1) * BLOCK - rm).to(tl.float32))[:, None]
        dfk_base = DFK + (bh * T).to(tl.int64) * F
        dfk = _tile(dfk_base, rm, rf, mk, F) + part
        _put(dfk_base, rm, rf, mk, F, dfk)
        if HAS_DECAY:
            # This feature tile's share of d log_decay = sum_t (t - center) (fq_t . dfq_t - fk_t . dfk_t).
            fq = _tile(FQ + (bh * T).to(tl.int64) * F, rm, rf, mq, F).to(tl.float32)
            fk = _tile(FK + (bh * T).to(tl.int64) * F, rm, rf, mk, F).to(tl.float32)
            share = (tl.sum(fq * dfq, axis=1) - tl.sum(fk * tl.where(mk[:, None], dfk, 0.0), axis=1))
            tl.store(SHARE + (bh * tl.num_programs(2) + fi) * T + rm, share * (rm.to(tl.float32) - center), mask=mq)

    return True


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
    NB = triton.cdiv(T, BLOCK)
    NV = triton.cdiv(cfg["DV"], cfg["BV"])
    f32 = dict(device=fk.device, dtype=torch.float32)
    sbuf = torch.empty(B * H, NB, F, cfg["DV"], **f32)
    zbuf = torch.empty(B * H, NB, F, **f32)
    has_decay = log_decay is not None
    _state_fwd[(triton.cdiv(F, cfg["BF"]) * NV, B * H)](
        fk, v, log_decay if has_decay else sbuf, sbuf, zbuf, T, H, G, NB, NV, cfg["SINKS"], F=F, DV=cfg["DV"],
        BF=cfg["BF"], BV=cfg["BV"], BLOCK=BLOCK, HAS_DECAY=has_decay, PREC_S=cfg["PREC_S"], num_warps=4,
    )  # fmt: skip
    return sbuf, zbuf


def _forward(q, k, v, fq, fk, window_logits, log_decay, window: Window, scale: float):
    _build()
    B, H, T, _ = q.shape
    G = H // k.shape[1]
    F = fq.shape[-1]
    cfg = _config(q, v, F, window)
    NB = triton.cdiv(T, BLOCK)
    has_decay = log_decay is not None
    ld = log_decay if has_decay else window_logits  # a dummy pointer when there is no decay
    f32 = dict(device=q.device, dtype=torch.float32)
    sbuf, zbuf = _states(fk, v, log_decay, cfg, H, G)
    y = torch.empty(B, H, T, cfg["DV"], device=q.device, dtype=q.dtype)
    cmax = torch.empty(B, H, T, **f32)
    den = torch.empty(B, H, T, **f32)
    amax = torch.empty(B, H, T, device=q.device, dtype=torch.int32)
    _fwd[(NB, B * H)](
        q, k, v, fq, fk, window_logits, ld, sbuf, zbuf, y, cmax, den, amax,
        T, H, G, NB, scale, cfg["WSIZE"], cfg["SINKS"],
        D=cfg["D"], DV=cfg["DV"], F=F, DP=cfg["DP"], VP=cfg["VP"], FP=cfg["FP"], BF=cfg["BF"], SP=cfg["SP"],
        BLOCK=BLOCK, KIND=cfg["KIND"], HAS_DECAY=has_decay, PREC=cfg["PREC"], PREC_S=cfg["PREC_S"],
        num_warps=cfg["num_warps"], num_stages=2,
    )  # fmt: skip
    return y, sbuf, zbuf, cmax, den, amax


def _backward(dy, q, k, v, fq, fk, window_logits, log_decay, y, cmax, den, amax, window, scale):
    _build()
    B, H, T, _ = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    F = fq.shape[-1]
    cfg = _config(q, v, F, window)
    NB = triton.cdiv(T, BLOCK)
    NF, NV = triton.cdiv(F, cfg["BF"]), triton.cdiv(cfg["DV"], cfg["BV"])
    has_decay = log_decay is not None
    ld = log_decay if has_decay else window_logits
    f32 = dict(device=q.device, dtype=torch.float32)
    dy = dy.to(q.dtype).contiguous()
    delta = torch.empty(B, H, T, **f32)  # dy . y, a few heads at a time (bounded fp32 temporaries)
    for h0 in range(0, H, 4):
        delta[:, h0 : h0 + 4] = (dy[:, h0 : h0 + 4].float() * y[:, h0 : h0 + 4].float()).sum(-1)
    SP = cfg["SP"]
    dq = torch.empty(B, H, T, cfg["D"], **f32)
    dfq = torch.empty(B, H, T, F, **f32)
    rw = torch.empty(B, H, T, **f32)
    dks = torch.zeros(B * H, NB, max(SP, 1), cfg["D"], **f32)
    dvs = torch.zeros(B * H, NB, max(SP, 1), cfg["DV"], **f32)
    common = dict(D=cfg["D"], DV=cfg["DV"], F=F, DP=cfg["DP"], VP=cfg["VP"], FP=cfg["FP"], BLOCK=BLOCK,
                  KIND=cfg["KIND"], HAS_DECAY=has_decay, PREC=cfg["PREC"])  # fmt: skip
    _bwd_dq[(NB, B * H)](
        q, k, v, fq, fk, window_logits, ld, dy, cmax, den, delta, amax, dq, dfq, rw, dks, dvs,
        T, H, G, NB, scale, cfg["WSIZE"], cfg["SINKS"], SP=SP, **common,
        num_warps=cfg["num_warps"], num_stages=2,
    )  # fmt: skip
    sbuf, zbuf = _states(fk, v, log_decay, cfg, H, G)  # recomputed, not saved by the forward
    hbuf = torch.empty(B * H, NB, F, cfg["DV"], **f32)
    hzbuf = torch.empty(B * H, NB, F, **f32)
    _state_bwd[(NF * NV, B * H)](
        fq, dy, den, delta, ld, hbuf, hzbuf, T, H, NB, NV, cfg["WSIZE"], F=F, DV=cfg["DV"], BF=cfg["BF"],
        BV=cfg["BV"], BLOCK=BLOCK, KIND=cfg["KIND"], HAS_DECAY=has_decay, PREC_S=cfg["PREC_S"], num_warps=4,
    )  # fmt: skip
    dk = torch.empty(B, Hkv, T, cfg["D"], **f32)
    dv = torch.empty(B, Hkv, T, cfg["DV"], **f32)
    dfk = torch.empty(B, H, T, F, **f32)
    _bwd_dkv[(NB, B * Hkv)](
        q, k, v, fq, fk, window_logits, ld, dy, cmax, den, delta, amax, rw, hbuf, dk, dv, dfk,
        T, H, G, NB, scale, cfg["WSIZE"], cfg["SINKS"], BF=cfg["BF"], PREC_S=cfg["PREC_S"], **common,
        num_warps=cfg["num_warps"], num_stages=2,
    )  # fmt: skip
    share = torch.empty(B * H, NF, T, **f32) if has_decay else rw  # per feature tile: (t - c) (fq.dfq - fk.dfk)
    _bwd_prefix[(NB, B * H, NF)](
        dy, den, delta, v, fq, fk, ld, sbuf, zbuf, hbuf, hzbuf, dfq, dfk, share, T, H, G, NB, cfg["WSIZE"],
        cfg["SINKS"], (T - 1) / 2, F=F, DV=cfg["DV"], VP=cfg["VP"], BF=cfg["BF"], BLOCK=BLOCK, KIND=cfg["KIND"],
        HAS_DECAY=has_decay, PREC_S=cfg["PREC_S"], num_warps=4,
    )  # fmt: skip
    sinks = min(cfg["SINKS"], T)
    if sinks:  # the sinks seen through the sink tile, summed over query blocks and the heads of each group
        dk[:, :, :sinks] += dks.sum(1)[:, :sinks].view(B, Hkv, G, sinks, -1).sum(2)
        dv[:, :, :sinks] += dvs.sum(1)[:, :sinks].view(B, Hkv, G, sinks, -1).sum(2)
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
    check_inputs(q, k, v, window_logits)
    why = unsupported(q, k, v, window, fq.shape[-1])
    if why is not None:
        raise ValueError(f"the triton hybrid kernel does not support {why}")
    B, H, T, D = q.shape
    if fq.shape != (B, H, T, fq.shape[-1]) or fk.shape != fq.shape:
        raise ValueError(f"fq and fk must have shape (B, H, T, F); got {tuple(fq.shape)} and {tuple(fk.shape)}")
    if log_decay is not None and tuple(log_decay.shape) != (H,):
        raise ValueError(f"log_decay must have shape (H,) = ({H},); got {tuple(log_decay.shape)}")
    if T == 0:
        return q.new_zeros(B, H, 0, v.shape[-1])
    scale = D**-0.5 if scale is None else float(scale)
    dt = q.dtype  # the compute dtype of the products: q's, or the autocast dtype under CUDA autocast
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
    args = [x.to(dt).contiguous() for x in (q, k, v, fq, fk)]
    ld = None if log_decay is None else log_decay.float().contiguous()
    y = HybridFn.apply(*args, window_logits.float().contiguous(), ld, window, scale)
    return y.to(q.dtype)


def _chunked_sequence(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay):
    if log_decay is None:
        return hybrid_attention_chunked(q, k, v, phi_q, phi_k, window_logits, window, scale)
    return hybrid_attention_chunked(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay=log_decay)


class TritonKernel(Kernel):
    """The fused Triton kernel on CUDA; inputs it does not support (a plugin window, more than 64 sinks,
    another head dim) go through the chunked form. Prefill and decoding use the shared forms."""

    name = "triton"
    priority = 10

    def available(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda" and torch.cuda.is_available() and triton_available()

    def sequence(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, scale: float | None = None, *, log_decay: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        if unsupported(q, k, v, window) is not None or not triton_available():
            return _chunked_sequence(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay)
        fq = phi_q(q)
        fk = phi_k(expand_kv(k, q.shape[1]))
        if fq.shape[-1] > MAX_DIM:
            return _chunked_sequence(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay)
        return triton_hybrid_attention(q, k, v, fq, fk, window_logits, window, scale, log_decay)


__all__ = ["BLOCK", "HybridFn", "TritonKernel", "triton_available", "triton_hybrid_attention", "unsupported"]
