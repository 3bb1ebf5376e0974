"""The built-in Hedgehog feature map in one Triton kernel per direction, for CUDA training and prefill.

``phi(x) = cat([softmax(x W), softmax(-x W)], -1).clamp(min=eps)`` per head, as
:class:`~lolcats_cli.builtins.feature_maps.Hedgehog` computes it in PyTorch (its ``reference``, which stays the
CPU path and the reference of the tests). The PyTorch form writes an fp32 copy of x, the projection, both
softmaxes, the concatenation, the clamp and the rounded result (and reads them back in the backward): on the
Llama-3.1-8B shape most of stage 1's elementwise time. Here:

* ``_hh_fwd`` (one program per block of ``BT`` rows of one (batch, head)): ``u = x W_h`` with fp32 accuracy
  (``tl.dot`` in ``tf32x3``: three tf32 tensor-core products, about fp32's rounding, as the reference's fp32
  einsum), the two softmaxes over the features, the clamp, one store of the result in x's dtype. x may be
  strided (q and k after RoPE are usually ``(B, T, H, D)`` in memory): only its last dim must be contiguous.
* ``_hh_bwd`` (one program per ``BT * NB`` rows of one (batch, head) and ``BD`` head-dim columns): recomputes u
  and both softmaxes from x (nothing but x and W is kept for it), applies the clamp's mask (``p >= eps``, as
  ``torch.clamp``'s backward) and the softmax backward, writes its columns of ``dx = du W_h^T`` (only when x
  needs a gradient: in stage 1 q and k do not) and accumulates its rows of ``x^T du`` in registers; the
  per-program partials ``(B, H, n, D, f)`` fp32 are summed by one PyTorch reduction (deterministic, no atomics).
  With dx, a head dim of 128 is two column programs, each recomputing u (it keeps the register tiles small: with
  fp32 FMA products one 128 x 64 tile per program spilled and ran 3x slower than the PyTorch form on an H200);
  without dx (stage 1) one program with 8 warps takes all of dW's columns, so u is computed once.

All arithmetic is fp32; the output and dx are in x's dtype, dW in W's dtype. Used by ``Hedgehog.forward`` where
:func:`fused_hedgehog_enabled` says so: CUDA tensors with triton installed unless ``LOLCATS_TRITON_MAP`` is 0 (then
the PyTorch form runs), and CPU tensors too when it is 1 under ``TRITON_INTERPRET=1`` (the CPU tests); head dim and
feature_dim at most 128 (else the PyTorch form). ``triton`` is imported on first use only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .triton_import import fused_wanted, import_triton

ENV = "LOLCATS_TRITON_MAP"  # "0": the PyTorch hedgehog map on CUDA too; "1": the fused one on any device
MAX_DIM = 128  # head dim and feature_dim (the backward keeps a D x f accumulator in registers)
BT = 64  # rows per block
NB = 4  # blocks per backward program (its dW partial covers BT * NB rows)
BD = 64  # head-dim columns per product (and per backward program)


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, n) - 1).bit_length())  # tl.dot wants every dim >= 16


def fused_hedgehog_enabled(x: Tensor, weight: Tensor) -> bool:
    """Whether ``Hedgehog.forward`` runs the fused kernels on ``x`` with ``weight`` ``(H, D, f)``: triton installed,
    head dim and f at most ``MAX_DIM``, not inside ``torch.compile`` (which fuses the PyTorch form itself), and
    ``LOLCATS_TRITON_MAP`` not 0 on a CUDA tensor, or 1 on a CPU tensor under ``TRITON_INTERPRET=1`` (the tests).
    ValueError for a value that is not a switch."""
    if not fused_wanted(ENV, x):
        return False
    return x.dim() == 4 and x.shape[-1] <= MAX_DIM and weight.shape[-1] <= MAX_DIM and x.shape[1] == weight.shape[0]


class HedgehogFn(torch.autograd.Function):
    """``(x (B, H, T, D), weight (H, D, f), eps) -> phi (B, H, T, 2 f)`` in x's dtype, with its backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        build()
        B, H, T, D = x.shape
        f = weight.shape[-1]
        if x.stride(-1) != 1:
            x = x.contiguous()
        w = weight.float().contiguous()
        out = torch.empty(B, H, T, 2 * f, device=x.device, dtype=x.dtype)
        if T > 0:
            DP = _pow2(D)
            _hh_fwd[(triton.cdiv(T, BT), B * H)](
                x, w, out, H, T, D, f, *x.stride()[:3], eps, BT=BT, BD=min(DP, BD), DP=DP, FP=_pow2(f), num_warps=4,
            )  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dphi: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        B, H, T, D = x.shape
        f = weight.shape[-1]
        need_dx = ctx.needs_input_grad[0]
        dphi = dphi.contiguous()
        w = weight.float().contiguous()
        n = triton.cdiv(T, BT * NB)
        dx = torch.empty(B, H, T, D, device=x.device, dtype=x.dtype) if need_dx else dphi  # dphi: an unused pointer
        partial = torch.zeros(B, H, max(n, 1), D, f, device=x.device, dtype=torch.float32)
        if T > 0:
            DP = _pow2(D)
            BC = min(DP, BD) if need_dx else DP  # columns per program: without dx one program takes all of dW's
            _hh_bwd[(n, B * H, DP // BC)](
                x, w, dphi, dx, partial, H, T, D, f, *x.stride()[:3], n, ctx.eps,
                BT=BT, NB=NB, BD=min(DP, BD), BC=BC, DP=DP, FP=_pow2(f), NEED_DX=need_dx,
                num_warps=4 if need_dx else 8,
            )  # fmt: skip
        dw = partial.sum(dim=(0, 2)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return (dx if need_dx else None), dw, None


def fused_hedgehog(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The Hedgehog map of ``x`` ``(B, H, T, D)`` with per-head ``weight`` ``(H, D, f)``: ``(B, H, T, 2 f)`` in x's
    dtype, differentiable in x and weight (see the module docstring)."""
    return HedgehogFn.apply(x, weight, float(eps))


# ---------------------------------------------------------------------------------------------------------
# The Triton kernels: defined on first use (triton imported lazily; TRITON_INTERPRET read at that moment). Every
# name a kernel uses is a module global, so Triton resolves it without closures.
# ---------------------------------------------------------------------------------------------------------

triton: Any = None
tl: Any = None
_hh_softmaxes = _hh_fwd = _hh_bwd = None


@functools.lru_cache(maxsize=None)
def build() -> bool:
    global triton, tl, _hh_softmaxes, _hh_fwd, _hh_bwd
    triton, tl = import_triton("the fused hedgehog map")

    @triton.jit
    def _hh_softmaxes(X, W, x_row, h, rt, T, D, F, st, BD: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr):
        """The two softmaxes over the F features of ``u = x W_h`` for the rows ``rt`` of x (row pointer base
        ``x_row``), fp32, before the clamp, 0 past F. D goes in chunks of BD; products in tf32x3 (fp32 accuracy on
        tensor cores)."""
        rf = tl.arange(0, FP)
        mt, mf = rt < T, rf < F
        u = tl.zeros([rt.shape[0], FP], dtype=tl.float32)
        for d0 in tl.static_range(0, DP, BD):
            rd = d0 + tl.arange(0, BD)
            md = rd < D
            x = tl.load(x_row + rt[:, None].to(tl.int64) * st + rd[None, :], mask=mt[:, None] & md[None, :], other=0.0)
            w = tl.load(W + (h * D + rd)[:, None] * F + rf[None, :], mask=md[:, None] & mf[None, :], other=0.0)
            u += tl.dot(x.to(tl.float32), w, input_precision="tf32x3")
        up = tl.where(mf[None, :], u, float("-inf"))
        un = tl.where(mf[None, :], -u, float("-inf"))
        e1 = tl.exp(up - tl.max(up, axis=1)[:, None])
        e2 = tl.exp(un - tl.max(un, axis=1)[:, None])
        return e1 / tl.sum(e1, axis=1)[:, None], e2 / tl.sum(e2, axis=1)[:, None]

    @triton.jit
    def _hh_fwd(X, W, OUT, H, T, D, F, sb, sh, st, EPS,
                BT: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr):  # fmt: skip
        tb, bh = tl.program_id(0), tl.program_id(1)
        h = bh % H
        x_row = X + (bh // H).to(tl.int64) * sb + h.to(tl.int64) * sh
        rt = tb * BT + tl.arange(0, BT)
        rf = tl.arange(0, FP)
        p1, p2 = _hh_softmaxes(X, W, x_row, h, rt, T, D, F, st, BD, DP, FP)
        ok = (rt < T)[:, None] & (rf < F)[None, :]
        o = OUT + bh.to(tl.int64) * T * 2 * F + rt[:, None].to(tl.int64) * (2 * F) + rf[None, :]
        tl.store(o, tl.maximum(p1, EPS).to(OUT.dtype.element_ty), mask=ok)
        tl.store(o + F, tl.maximum(p2, EPS).to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _hh_bwd(X, W, DPHI, DX, PART, H, T, D, F, sb, sh, st, NPROG, EPS, BT: tl.constexpr, NB: tl.constexpr,
                BD: tl.constexpr, BC: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
                NEED_DX: tl.constexpr):  # fmt: skip
        """Program (rows tp, (b, h), column chunk c): du of its rows (recomputed whole, every chunk does), then dx
        and the partial dW of chunk c's BC columns of x."""
        tp, bh, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        h = bh % H
        x_row = X + (bh // H).to(tl.int64) * sb + h.to(tl.int64) * sh
        rd = c * BC + tl.arange(0, BC)
        rf = tl.arange(0, FP)
        md, mf = rd < D, rf < F
        w_c = tl.load(W + (h * D + rd)[:, None] * F + rf[None, :], mask=md[:, None] & mf[None, :], other=0.0)
        acc = tl.zeros([BC, FP], dtype=tl.float32)  # sum over this program's rows of x_c^T du
        for j in range(NB):
            rt = (tp * NB + j) * BT + tl.arange(0, BT)
            mt = rt < T
            p1, p2 = _hh_softmaxes(X, W, x_row, h, rt, T, D, F, st, BD, DP, FP)
            ok = mt[:, None] & mf[None, :]
            g = DPHI + bh.to(tl.int64) * T * 2 * F + rt[:, None].to(tl.int64) * (2 * F) + rf[None, :]
            g1 = tl.load(g, mask=ok, other=0.0).to(tl.float32)
            g2 = tl.load(g + F, mask=ok, other=0.0).to(tl.float32)
            g1 = tl.where(p1 >= EPS, g1, 0.0)  # the clamp passes gradient where its input is >= eps
            g2 = tl.where(p2 >= EPS, g2, 0.0)
            du = p1 * (g1 - tl.sum(g1 * p1, axis=1)[:, None]) - p2 * (g2 - tl.sum(g2 * p2, axis=1)[:, None])
            x_c = tl.load(x_row + rt[:, None].to(tl.int64) * st + rd[None, :], mask=mt[:, None] & md[None, :],
                          other=0.0).to(tl.float32)  # fmt: skip
            acc += tl.dot(tl.trans(x_c), du, input_precision="tf32x3")
            if NEED_DX:
                dx = tl.dot(du, tl.trans(w_c), input_precision="tf32x3")  # (BT, BD)
                o = DX + bh.to(tl.int64) * T * D + rt[:, None].to(tl.int64) * D + rd[None, :]
                tl.store(o, dx.to(DX.dtype.element_ty), mask=mt[:, None] & md[None, :])
        p = PART + (bh.to(tl.int64) * NPROG + tp) * D * F + rd[:, None] * F + rf[None, :]
        tl.store(p, acc, mask=md[:, None] & mf[None, :])

    return True


__all__ = ["ENV", "HedgehogFn", "MAX_DIM", "fused_hedgehog", "fused_hedgehog_enabled"]
