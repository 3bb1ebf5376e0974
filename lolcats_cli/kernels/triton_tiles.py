"""The Triton kernels of :mod:`.triton_hybrid` (its docstring describes the design): defined on first use by
:func:`build`, so ``triton`` is imported lazily (a CPU install without it imports lolcats fine) and
``TRITON_INTERPRET`` is read at that moment. Every name a kernel uses is a global of this module, so Triton
resolves it without closures; the launchers in :mod:`.triton_hybrid` read the kernels from here after
:func:`build`.
"""

from __future__ import annotations

import functools
from typing import Any

from .triton_import import import_triton

BLOCK = 64  # queries per block = keys per tile = positions per linear-state chunk

# ---------------------------------------------------------------------------------------------------------
# The Triton kernels: defined on first use (triton imported lazily; TRITON_INTERPRET read at that moment).
# Every name a kernel uses is a module global (declared below), so Triton resolves it without closures.
# ---------------------------------------------------------------------------------------------------------

triton: Any = None
tl: Any = None
_start = _kb_of = _tile = _put = _masks = _scaled_dy = _softmax_tile = None
_state_fwd = _fwd = _bwd_dq = _state_bwd = _bwd_dkv = _bwd_prefix = None


@functools.lru_cache(maxsize=None)
def build() -> bool:  # noqa: C901 (one definition site for all kernels)
    global triton, tl, _start, _kb_of, _tile, _put, _masks, _scaled_dy, _softmax_tile
    global _state_fwd, _fwd, _bwd_dq, _state_bwd, _bwd_dkv, _bwd_prefix
    # optional: only the CUDA path (or TRITON_INTERPRET=1) gets here; a bundled export stays importable
    triton, tl = import_triton("the triton attention kernel")

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


__all__ = ["BLOCK", "build"]
