"""Stage 1's per-layer loss, ``mean((student - teacher)^2)`` in fp32, fused into one Triton kernel per direction for CUDA.

The PyTorch form, ``F.mse_loss(student.float(), teacher.float())`` (:func:`mse_reference`, the CPU path and the
reference of the tests), writes two fp32 copies of the ``(B, H, T, Dv)`` outputs, their difference and its square,
and in the backward the fp32 gradient and its cast: on the Llama-3.1-8B shape about 1.5 GB of memory traffic per
layer and step. Here the forward reads both tensors once (any strides; fp32 sums per block of ``BLOCK`` elements,
then one PyTorch sum of the partials: deterministic) and the backward reads them once more and writes the
student's gradient ``2 (s - t) g / n`` directly in the student's dtype (and the teacher's, negated, if it needs
one). All arithmetic is fp32.

Used by :func:`transfer_mse` where :func:`fused_mse_enabled` says so: CUDA tensors with triton installed unless
``LOLCATS_TRITON_MSE`` is 0, and CPU tensors too when it is 1 under ``TRITON_INTERPRET=1`` (the CPU tests).
``triton`` is imported on first use only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .triton_import import fused_wanted, import_triton

ENV = "LOLCATS_TRITON_MSE"  # "0": the PyTorch loss on CUDA too; "1": the fused one on CPU under the interpreter
BLOCK = 4096  # elements per program


def mse_reference(student: Tensor, teacher: Tensor) -> Tensor:
    """``F.mse_loss`` of the two tensors upcast to fp32 (the PyTorch form)."""
    return F.mse_loss(student.float(), teacher.float())


def fused_mse_enabled(student: Tensor, teacher: Tensor) -> bool:
    """Whether :func:`transfer_mse` runs the fused kernels: 4-D tensors of one shape on one device, triton
    installed, not inside ``torch.compile``, and ``LOLCATS_TRITON_MSE`` not 0 on CUDA, or 1 on CPU under
    ``TRITON_INTERPRET=1``. ValueError for a value that is not a switch."""
    if not fused_wanted(ENV, student):
        return False
    return student.shape == teacher.shape and student.dim() == 4 and student.device == teacher.device


def transfer_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean((student - teacher)^2)`` as an fp32 scalar, differentiable in both: the fused kernels where
    :func:`fused_mse_enabled` says so, else :func:`mse_reference`."""
    if fused_mse_enabled(student, teacher):
        return MseFn.apply(student, teacher)
    return mse_reference(student, teacher)


class MseFn(torch.autograd.Function):
    """``(student, teacher) (B, H, T, D) -> mean((student - teacher)^2)`` fp32, with its backward."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor) -> Tensor:  # type: ignore[override]
        build()
        n = s.numel()
        partial = torch.zeros(max(1, triton.cdiv(n, BLOCK)), device=s.device, dtype=torch.float32)
        if n:
            _mse_fwd[(triton.cdiv(n, BLOCK),)](s, t, partial, n, *s.shape[1:], *s.stride(), *t.stride(), BLOCK=BLOCK)
        ctx.save_for_backward(s, t)
        return partial.sum() / n if n else partial.sum() * float("nan")  # mean of nothing: nan, as F.mse_loss

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        s, t = ctx.saved_tensors
        n = s.numel()
        need_s, need_t = ctx.needs_input_grad
        ds = torch.empty(s.shape, device=s.device, dtype=s.dtype) if need_s else None
        dt = torch.empty(t.shape, device=t.device, dtype=t.dtype) if need_t else None
        if n and (need_s or need_t):
            scale = (2.0 * g.float() / n).reshape(1).contiguous()  # on the device: no host synchronisation
            _mse_bwd[(triton.cdiv(n, BLOCK),)](
                s, t, scale, ds if need_s else s, dt if need_t else t, n, *s.shape[1:], *s.stride(), *t.stride(),
                NEED_S=need_s, NEED_T=need_t, BLOCK=BLOCK,
            )  # fmt: skip
        return ds, dt


# ---------------------------------------------------------------------------------------------------------
# The Triton kernels: defined on first use (triton imported lazily; TRITON_INTERPRET read at that moment). Every
# name a kernel uses is a module global, so Triton resolves it without closures.
# ---------------------------------------------------------------------------------------------------------

triton: Any = None
tl: Any = None
_offsets = _mse_fwd = _mse_bwd = None


@functools.lru_cache(maxsize=None)
def build() -> bool:
    global triton, tl, _offsets, _mse_fwd, _mse_bwd
    triton, tl = import_triton("the fused stage-1 loss")

    @triton.jit
    def _offsets(i, S1, S2, S3, st0, st1, st2, st3):
        """Memory offsets of the flat (row-major) indices ``i`` of a ``(S0, S1, S2, S3)`` tensor with strides st."""
        i = i.to(tl.int64)
        d = i % S3
        r = i // S3
        c = r % S2
        r = r // S2
        return (r // S1) * st0 + (r % S1) * st1 + c * st2 + d * st3

    @triton.jit
    def _mse_fwd(S, T, PART, N, S1, S2, S3, ss0, ss1, ss2, ss3, ts0, ts1, ts2, ts3, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        s = tl.load(S + _offsets(i, S1, S2, S3, ss0, ss1, ss2, ss3), mask=ok, other=0.0).to(tl.float32)
        t = tl.load(T + _offsets(i, S1, S2, S3, ts0, ts1, ts2, ts3), mask=ok, other=0.0).to(tl.float32)
        d = s - t
        tl.store(PART + pid, tl.sum(d * d, axis=0))

    @triton.jit
    def _mse_bwd(S, T, SCALE, DS, DT, N, S1, S2, S3, ss0, ss1, ss2, ss3, ts0, ts1, ts2, ts3,
                 NEED_S: tl.constexpr, NEED_T: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """Gradients ``2 g (s - t) / n`` (student) and its negation (teacher), contiguous, in each input's dtype."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        s = tl.load(S + _offsets(i, S1, S2, S3, ss0, ss1, ss2, ss3), mask=ok, other=0.0).to(tl.float32)
        t = tl.load(T + _offsets(i, S1, S2, S3, ts0, ts1, ts2, ts3), mask=ok, other=0.0).to(tl.float32)
        grad = tl.load(SCALE) * (s - t)
        if NEED_S:
            tl.store(DS + i, grad.to(DS.dtype.element_ty), mask=ok)
        if NEED_T:
            tl.store(DT + i, (-grad).to(DT.dtype.element_ty), mask=ok)

    return True


__all__ = ["ENV", "MseFn", "fused_mse_enabled", "mse_reference", "transfer_mse"]
