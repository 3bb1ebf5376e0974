"""The static decode step (:func:`~.static.static_step`) fused into two Triton kernels per layer, for GPU decoding.

:func:`triton_step` has the signature and the semantics of ``static_step``: one token per row, the state of
:class:`~.static.StaticState` advanced in place, no host synchronisation, no data-dependent shapes (so a CUDA graph
captures it). Per layer and step it launches:

1. ``_step_in`` (one program per row and KV head): writes the new key and value into ring slot ``L % P``, the key
   and value into the row's sink slot while the row is in its first ``sinks`` tokens, copies ``length`` into a
   scratch scalar (the second kernel reads it, so it may advance ``length``), and gathers the ``fold`` keys that
   may leave the window (row positions ``[lo, lo + fold)``, ``lo = clamp(start(rel), 0, rel)``), already expanded
   to the query heads, for ``phi_k``;
2. the feature maps ``phi_q(q)`` and ``phi_k`` of those keys: PyTorch calls (they are plugins). The query features
   of the built-in hedgehog map (times the linear gate) are computed in ``_step_main`` instead when the caller
   passes ``q_map`` (:func:`fused_query_map`; the static decoder does), saving about ten small launches per layer
   at batch 1. When ``phi_k`` is the built-in hedgehog map (:func:`fused_key_map`), step 1 gathers nothing and
   ``phi_k`` is not called: ``_step_main`` computes the features of the keys that actually leave, from the ring
   and the map's weights, in fp32 (rounded to the ring's dtype, as the map's output is). A terrace window of size
   w may drop w keys at once, so the PyTorch call maps w keys every step; the fused one maps w keys once every w
   steps (on one H200 at batch 256 the PyTorch call took about 43 of the step's 72 ms);
3. ``_step_main`` (one program per row and query head): the window softmax over the sinks and the ring with
   exactly ``static_step``'s masks (sinks, window start, the fold boundary ``lo``, the row's pads), read at
   KV-head count (no repeat), combined with the linear readout ``phi_q(q) . S`` and ``phi_q(q) . z`` as
   :func:`~.blocks.hybrid_weights` does (``a = sigmoid(window_logits) exp(s - c)``, c the window max or 0, the
   denominator clamped to ``DEN_EPS``); then, in the same pass over S (each ``F x BV`` tile read once and written
   at most once), the fold ``S <- exp(s_log + log_decay) S + sum_leaving exp(log_decay (rel + 1 - p)) fk_p v_p^T``
   (``s_log``: the decay S has not had yet, see :class:`~.static.StaticState`) and z likewise. The leaving keys are
   a run of positions ``[max(lo, sinks), hi)`` computed on the device, visited by a loop of that many iterations:
   a step where no key leaves does no fold math and does not write S back (with a decay it only adds
   ``log_decay`` to ``s_log`` and rewrites the small z). Program 0 sets ``length += 1``.

All arithmetic is fp32 (scores, softmax, readout, fold; z stays fp32, S is stored fp32 or, in a bf16 / fp16
state, rounded once per rewrite after its fp32 update); K/V are read in the ring's dtype and
the output is in q's dtype. Supported (:func:`triton_step_problem`): the built-in sliding and terrace windows with
at most 64 sinks, contiguous buffers, CUDA tensors (or any device under ``TRITON_INTERPRET=1``, which the CPU tests
use). ``triton`` is imported on first use only.

The static decode path runs it by default on CUDA (:func:`triton_step_enabled`): on one H200, the random
Llama-3.1-8B shape decodes at 8.7 ms per step at batch 1 with it against 15.4 ms with ``static_step``, and
2.3-2.5x the tokens/s at batch 64 and 256 (``benchmarks/results/generation-llama8b-h200.json``).
``LOLCATS_TRITON_STEP=0`` puts ``static_step`` (the reference) back; ``=1`` asks for it off CUDA too, where it
runs only under ``TRITON_INTERPRET=1`` (the CPU tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ..api import Window
from ..builtins.feature_maps import Hedgehog
from ..switches import switch, triton_interpreting
from . import triton_tiles as tiles
from .blocks import DEN_EPS, FeatureFn
from .static import StaticState
from .triton_hybrid import MAX_DIM, MAX_SINKS, _pow2, window_kind
from .triton_import import triton_available

ENV = "LOLCATS_TRITON_STEP"  # "0" turns the fused decode step off on CUDA; "1" asks for it on any device
BV = 32  # value columns per S tile


def triton_step_enabled(device: torch.device | str | None = None) -> bool:
    """Whether the static decode path asks for the fused step on ``device``: where triton is installed, on CUDA
    unless ``LOLCATS_TRITON_STEP`` is 0/false/no/off, and on any device where it is 1/true/yes/on (whether it then
    runs a given layer is :func:`triton_step_problem`'s answer). ValueError for any other value."""
    value = switch(ENV, "on for CUDA devices")
    if value is False or not triton_available():
        return False
    return bool(value) or (device is not None and torch.device(device).type == "cuda")


def triton_step_problem(window: Window, state: StaticState, device: torch.device) -> str | None:
    """None when :func:`triton_step` runs ``window`` over ``state`` on ``device``; else why not (a sentence)."""
    if window_kind(window) not in (0, 1):
        return f"window {type(window).__name__} is not a built-in sliding or terrace window"
    if window.span < 1:
        return "the window has no ring"
    if window.sinks > MAX_SINKS:
        return f"{window.sinks} sinks (at most {MAX_SINKS})"
    F, DV, D = state.S.shape[2], state.S.shape[3], state.k_ring.shape[3]
    if max(F, DV, D) > MAX_DIM:
        return f"head dim {D}, value dim {DV} or feature dim {F} above {MAX_DIM}"
    if (state.k_sink is None) != (window.sinks == 0):
        return "the state's sink buffers do not match the window's sinks"
    buffers = [state.k_ring, state.v_ring, state.S, state.z, state.pads, state.k_sink, state.v_sink]
    if not all(t.is_contiguous() for t in buffers if t is not None):
        return "a state buffer is not contiguous"
    if state.S.dtype not in (torch.float32, torch.bfloat16, torch.float16) or state.z.dtype != torch.float32:
        return "S must be fp32, bf16 or fp16 and z fp32"
    if not (torch.device(device).type == "cuda" or triton_interpreting()):
        return f"device {torch.device(device).type} (CUDA only, or TRITON_INTERPRET=1)"
    return None


def fused_key_map(phi_k: FeatureFn, features: int) -> tuple[Tensor, float] | None:
    """``(weight (H, D, f), eps)`` when ``_step_main`` computes ``phi_k`` itself: ``phi_k`` is exactly the built-in
    hedgehog map (not a subclass, which may compute something else) with ``2 f == features``; else None (the
    PyTorch call)."""
    if type(phi_k) is not Hedgehog or phi_k.feature_dim != features or not phi_k.weight.is_contiguous():
        return None
    return phi_k.weight, float(phi_k.params.eps)


def fused_query_map(
    feature_map: Any, gate: Tensor | None, features: int
) -> tuple[Tensor, float, Tensor | None] | None:
    """``(weight, eps, gate)`` for :func:`triton_step`'s ``q_map`` when the query features ``feature_map(q) * gate``
    (``gate`` ``(H,)`` or None) can be computed in the kernel: ``feature_map`` is exactly the built-in hedgehog map
    with ``2 f == features``; else None (``phi_q`` is called)."""
    found = fused_key_map(feature_map, features)
    return None if found is None else (*found, gate)


def triton_step(
    q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor, window: Window,
    state: StaticState, scale: float | None = None, *, log_decay: Tensor | None = None, fold: int = 1,
    q_map: tuple[Tensor, float, Tensor | None] | None = None,
) -> Tensor:  # fmt: skip
    """:func:`~.static.static_step` in two Triton kernels (see the module docstring): attend one new token per row
    and advance ``state`` in place; returns ``(B, H, 1, Dv)`` in q's dtype. ``q_map`` (from
    :func:`fused_query_map` with the state's feature count): the kernel computes the query features itself,
    ``phi_q`` is not called; it must describe the same features as ``phi_q``. ``ValueError`` for what
    :func:`triton_step_problem` refuses."""
    if why := triton_step_problem(window, state, q.device):
        raise ValueError(f"the triton decode step does not support {why}")
    build()
    B, H, _, D = q.shape
    Hkv, P, s = state.k_ring.shape[1], state.k_ring.shape[2], window.sinks
    F, DV = state.S.shape[2], state.S.shape[3]
    scale = D**-0.5 if scale is None else float(scale)
    dev = q.device
    has_sinks, has_decay = state.k_sink is not None and s > 0, log_decay is not None
    k_sink = state.k_sink if has_sinks else state.k_ring  # dummy pointers without sinks
    v_sink = state.v_sink if has_sinks else state.v_ring
    shape = dict(P=P, FOLD=fold, WSIZE=int(window.params.size), SINKS=s)
    const = dict(D=D, DV=DV, DP=_pow2(D), KIND=window_kind(window), HAS_SINKS=has_sinks)
    fused = fused_key_map(phi_k, F)
    # fused: fk is scratch where _step_main writes the leaving keys' features (fp32); else the gathered keys
    k_out = state.k_ring if fused else torch.empty(B, H, fold, D, device=dev, dtype=state.k_ring.dtype)
    cur = torch.empty(1, device=dev, dtype=torch.long)
    _step_in[(B * Hkv,)](
        k.contiguous(), v.contiguous(), state.k_ring, state.v_ring, k_sink, v_sink, k_out, state.length,
        state.pads, cur, H, Hkv, **shape, VP=_pow2(DV), FOLDP=_pow2(fold), **const, GATHER=fused is None,
        num_warps=4,
    )  # fmt: skip
    if q_map is None:
        fq, wq, fq_eps, gate = phi_q(q).contiguous(), window_logits, 0.0, None  # (B, H, 1, F); dummy pointers
    else:
        fq, (wq, fq_eps, gate) = window_logits, q_map
    if fused:
        weight, fm_eps = fused
        fk = torch.empty(B, H, fold, F, device=dev, dtype=torch.float32)
    else:
        weight, fm_eps = window_logits, 0.0  # a dummy pointer
        fk = phi_k(k_out).contiguous()  # (B, H, fold, F)
    y = torch.empty(B, H, 1, DV, device=dev, dtype=q.dtype)
    _step_main[(B * H,)](
        q.contiguous(), fq, fk, state.k_ring, state.v_ring, k_sink, v_sink, state.S, state.z, window_logits,
        log_decay if has_decay else window_logits, state.s_log, y, cur, state.length, state.pads, weight, wq,
        window_logits if gate is None else gate, H, Hkv, scale, **shape,
        F=F, FP=_pow2(F), BD=min(32, _pow2(D)), BV=min(BV, _pow2(DV)), PP=_pow2(P), SP=_pow2(max(s, 1)),
        HAS_DECAY=has_decay, EPS=DEN_EPS, **const, FUSED_FM=fused is not None, FH=max(F // 2, 1), FM_EPS=fm_eps,
        FUSED_Q=q_map is not None, HAS_GATE=gate is not None, FQ_EPS=fq_eps, num_warps=4,
    )  # fmt: skip
    return y


# ---------------------------------------------------------------------------------------------------------
# The kernels: defined on first use (triton imported lazily; TRITON_INTERPRET read at that moment). Every
# name a kernel uses is a module global, so Triton resolves it without closures.
# ---------------------------------------------------------------------------------------------------------

triton: Any = None
tl: Any = None
_start = _folded = _hedgehog = _step_in = _step_main = None


@functools.lru_cache(maxsize=None)
def build() -> bool:
    global triton, tl, _start, _folded, _hedgehog, _step_in, _step_main
    tiles.build()  # imports triton and defines _start (the built-in windows' first position), shared here
    triton, tl, _start = tiles.triton, tiles.tl, tiles._start

    @triton.jit
    def _folded(n, KIND: tl.constexpr, WSIZE):
        """``clamp(start(n), 0, n)``: the row positions before it are in S and z (static._folded_before)."""
        return tl.minimum(tl.maximum(_start(n, KIND, WSIZE), 0), n)

    @triton.jit
    def _hedgehog(KR, W, key, h, D: tl.constexpr, F: tl.constexpr, FH: tl.constexpr, DP: tl.constexpr,
                  FP: tl.constexpr, BD: tl.constexpr, FM_EPS: tl.constexpr):  # fmt: skip
        """The built-in hedgehog map of query head ``h`` for row ``key`` of ``KR`` (the key ring, or q):
        ``(FP,)`` fp32, ``[softmax(x W_h), softmax(-x W_h)]`` clamped to FM_EPS, rounded to KR's dtype (as the
        map's output is); zeros past F."""
        rf = tl.arange(0, FP)
        fm = rf < F
        first = rf < FH
        u = tl.zeros([FP], dtype=tl.float32)
        for d0 in tl.static_range(0, DP, BD):
            rd = d0 + tl.arange(0, BD)
            dm = rd < D
            kd = tl.load(KR + key * D + rd, mask=dm, other=0.0).to(tl.float32)
            wt = tl.load(W + (h * D + rd)[:, None] * FH + (rf % FH)[None, :], mask=dm[:, None] & fm[None, :],
                         other=0.0)  # fmt: skip
            u += tl.sum(kd[:, None] * wt.to(tl.float32), axis=0)
        u = tl.where(first, u, -u)
        m1 = tl.max(tl.where(first & fm, u, float("-inf")), axis=0)
        m2 = tl.max(tl.where(fm & ~first, u, float("-inf")), axis=0)
        e = tl.where(fm, tl.exp(u - tl.where(first, m1, m2)), 0.0)
        s1 = tl.sum(tl.where(first, e, 0.0), axis=0)
        s2 = tl.sum(tl.where(first, 0.0, e), axis=0)
        w = tl.maximum(e / tl.where(first, s1, s2), FM_EPS)
        w = w.to(KR.dtype.element_ty).to(tl.float32)
        return tl.where(fm, w, 0.0)

    @triton.jit
    def _step_in(
        K, V, KR, VR, KS, VS, KOUT, LEN, PADS, CUR, H, HKV, P, FOLD, WSIZE, SINKS,
        D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, VP: tl.constexpr, FOLDP: tl.constexpr,
        KIND: tl.constexpr, HAS_SINKS: tl.constexpr, GATHER: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)  # b * HKV + kv: the row of k (B, HKV, 1, D) and of the ring (B, HKV, P, D)
        b = pid // HKV
        G = H // HKV
        L = tl.load(LEN)
        rel = L - tl.load(PADS + b)
        tl.store(CUR, L)  # every program stores the same value
        slot = L % P
        rd = tl.arange(0, DP)
        dm = rd < D
        rv = tl.arange(0, VP)
        vm = rv < DV
        k = tl.load(K + pid * D + rd, mask=dm, other=0.0).to(KR.dtype.element_ty)
        v = tl.load(V + pid * DV + rv, mask=vm, other=0.0).to(VR.dtype.element_ty)
        ring = pid.to(tl.int64) * P
        tl.store(KR + (ring + slot) * D + rd, k, mask=dm)
        tl.store(VR + (ring + slot) * DV + rv, v, mask=vm)
        if HAS_SINKS:
            is_sink = (rel >= 0) & (rel < SINKS)
            sink = pid.to(tl.int64) * SINKS + rel
            tl.store(KS + sink * D + rd, k, mask=dm & is_sink)
            tl.store(VS + sink * DV + rv, v, mask=vm & is_sink)
        if GATHER:
            # The keys that may leave: row positions lo + t, in slots (lo + t + pads) % P (the new key's slot is
            # read from k: this program's store above is not ordered before its loads).
            t = tl.arange(0, FOLDP)
            tm = t < FOLD
            slots = (_folded(rel, KIND, WSIZE) + t + (L - rel)) % P
            kt = tl.load(KR + (ring + slots)[:, None] * D + rd[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
            kt = tl.where((slots == slot)[:, None], k[None, :], kt)
            out = (b * H + (pid % HKV) * G).to(tl.int64) * FOLD
            for g in range(0, G):
                tl.store(KOUT + (out + g * FOLD + t)[:, None] * D + rd[None, :], kt,
                         mask=tm[:, None] & dm[None, :])  # fmt: skip

    @triton.jit
    def _step_main(
        Q, FQ, FK, KR, VR, KS, VS, S, Z, WL, LD, SL, Y, CUR, LEN, PADS, W, WQ, GATE, H, HKV, scale, P, FOLD, WSIZE,
        SINKS,
        D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
        BD: tl.constexpr, BV: tl.constexpr, PP: tl.constexpr, SP: tl.constexpr, KIND: tl.constexpr,
        HAS_SINKS: tl.constexpr, HAS_DECAY: tl.constexpr, EPS: tl.constexpr, FUSED_FM: tl.constexpr,
        FH: tl.constexpr, FM_EPS: tl.constexpr, FUSED_Q: tl.constexpr, HAS_GATE: tl.constexpr, FQ_EPS: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)  # b * H + h
        b = bh // H
        h = bh % H
        bkv = b * HKV + h // (H // HKV)
        L = tl.load(CUR)
        pad = tl.load(PADS + b)
        rel = L - pad
        tl.store(LEN, L + 1, mask=bh == 0)
        start = _start(rel, KIND, WSIZE)
        lo = _folded(rel, KIND, WSIZE)
        hi = _folded(rel + 1, KIND, WSIZE)

        # window scores over the ring: slot j holds padded position L - ((L - j) mod P), row position - pad
        j = tl.arange(0, PP)
        jm = j < P
        ring_rel = L - ((L - j) % P + P) % P - pad
        ring = bkv.to(tl.int64) * P
        sc = tl.zeros([PP], dtype=tl.float32)
        if HAS_SINKS:
            i = tl.arange(0, SP)
            im = i < SINKS
            ss = tl.zeros([SP], dtype=tl.float32)
        for d0 in tl.static_range(0, DP, BD):
            rd = d0 + tl.arange(0, BD)
            dm = rd < D
            qd = tl.load(Q + bh * D + rd, mask=dm, other=0.0).to(tl.float32)
            kt = tl.load(KR + (ring + j)[:, None] * D + rd[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
            sc += tl.sum(kt.to(tl.float32) * qd[None, :], axis=1)
            if HAS_SINKS:
                ks = tl.load(KS + (bkv * SINKS + i)[:, None] * D + rd[None, :], mask=im[:, None] & dm[None, :],
                             other=0.0)  # fmt: skip
                ss += tl.sum(ks.to(tl.float32) * qd[None, :], axis=1)
        sc = sc * scale
        sink = (ring_rel >= 0) & (ring_rel < SINKS)
        win = jm & (ring_rel >= lo) & ((ring_rel >= start) | sink)
        c = tl.max(tl.where(win, sc, float("-inf")), axis=0)
        if HAS_SINKS:
            ss = ss * scale
            swin = im & (i < lo)
            c = tl.maximum(c, tl.max(tl.where(swin, ss, float("-inf")), axis=0))
        c = tl.where(c == float("-inf"), 0.0, c)  # no window key: no shift
        g = 1.0 / (1.0 + tl.exp(-tl.load(WL + h).to(tl.float32)))
        a = tl.where(win, g * tl.exp(sc - c), 0.0)
        den = tl.sum(a, axis=0)
        if HAS_SINKS:
            a_s = tl.where(swin, g * tl.exp(ss - c), 0.0)
            den += tl.sum(a_s, axis=0)

        # linear readout (S, z before the fold) and the fold, one S tile at a time
        rf = tl.arange(0, FP)
        fm = rf < F
        if FUSED_Q:  # phi_q(q) = hedgehog(q) * gate, each product rounded to q's dtype as the PyTorch map does
            fq = _hedgehog(Q, WQ, bh, h, D, F, FH, DP, FP, BD, FQ_EPS)
            if HAS_GATE:
                g = tl.load(GATE + h).to(Q.dtype.element_ty).to(tl.float32)
                fq = (fq * g).to(Q.dtype.element_ty).to(tl.float32)
        else:
            fq = tl.load(FQ + bh * F + rf, mask=fm, other=0.0).to(tl.float32)
        z_base = Z + bh.to(tl.int64) * F
        z = tl.load(z_base + rf, mask=fm, other=0.0)
        den = tl.maximum(den + tl.sum(fq * z, axis=0), EPS)
        p0 = tl.maximum(lo, SINKS)  # the leaving keys: row positions [p0, p1)
        p1 = tl.minimum(hi, lo + FOLD)
        fk_base = FK + bh.to(tl.int64) * FOLD * F
        if FUSED_FM:  # the leaving keys' features, computed here into this program's rows of FK
            for p in range(p0, p1):
                w = _hedgehog(KR, W, ring + (p + pad) % P, h, D, F, FH, DP, FP, BD, FM_EPS)
                tl.store(fk_base + (p - lo) * F + rf, w, mask=fm)
            tl.debug_barrier()  # the loads below may run on other threads than these stores
        if HAS_DECAY:
            lam = tl.load(LD + h).to(tl.float32)
            z = z * tl.exp(lam)
            ls = tl.load(SL + bh)  # the decay S has not had yet: the state's S is exp(ls) S
            s_now = tl.exp(ls)
        else:
            s_now = 1.0
        for p in range(p0, p1):
            w = tl.load(fk_base + (p - lo) * F + rf, mask=fm, other=0.0).to(tl.float32)
            if HAS_DECAY:
                w = w * tl.exp(lam * (rel + 1 - p).to(tl.float32))
            z += w
        moved = p1 > p0  # keys leave: S is rewritten (with the pending decay applied); else S stays as it is
        if HAS_DECAY:
            z_changed = p1 >= 0  # z is kept decayed: every step rewrites it
            tl.store(SL + bh, tl.where(moved, 0.0, ls + lam))
        else:
            z_changed = moved
        tl.store(z_base + rf, z, mask=fm & z_changed)
        s_base = S + bh.to(tl.int64) * F * DV
        for v0 in tl.static_range(0, DV, BV):
            rv = v0 + tl.arange(0, BV)
            vm = rv < DV
            vt = tl.load(VR + (ring + j)[:, None] * DV + rv[None, :], mask=jm[:, None] & vm[None, :], other=0.0)
            num = tl.sum(a[:, None] * vt.to(tl.float32), axis=0)
            if HAS_SINKS:
                vs = tl.load(VS + (bkv * SINKS + i)[:, None] * DV + rv[None, :], mask=im[:, None] & vm[None, :],
                             other=0.0)  # fmt: skip
                num += tl.sum(a_s[:, None] * vs.to(tl.float32), axis=0)
            tile = s_base + rf[:, None] * DV + rv[None, :]
            st = tl.load(tile, mask=fm[:, None] & vm[None, :], other=0.0).to(tl.float32)  # S may be stored in bf16
            num += tl.sum(fq[:, None] * st, axis=0) * s_now
            tl.store(Y + bh * DV + rv, num / den, mask=vm)
            if HAS_DECAY:
                st = st * tl.exp(ls + lam)
            for p in range(p0, p1):
                w = tl.load(fk_base + (p - lo) * F + rf, mask=fm, other=0.0).to(tl.float32)
                if HAS_DECAY:
                    w = w * tl.exp(lam * (rel + 1 - p).to(tl.float32))
                vr = tl.load(VR + (ring + (p + pad) % P) * DV + rv, mask=vm, other=0.0).to(tl.float32)
                st += w[:, None] * vr[None, :]
            tl.store(tile, st, mask=fm[:, None] & vm[None, :] & moved)

    return True


__all__ = ["ENV", "fused_key_map", "fused_query_map", "triton_step", "triton_step_enabled", "triton_step_problem"]
