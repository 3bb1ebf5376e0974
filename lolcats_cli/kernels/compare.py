"""Numerical comparison helpers shared by the kernel tests and the plugin conformance kit."""

from __future__ import annotations

from torch import Tensor


def rel_rms(a: Tensor, b: Tensor) -> float:
    """``||a - b||_rms / ||b||_rms`` in fp64, with ``b`` the reference; 0.0 when both are all zeros.

    Shapes must match (no broadcasting): a mismatch raises ``ValueError``.
    """
    if a.shape != b.shape:
        raise ValueError(f"rel_rms needs tensors of one shape (got {tuple(a.shape)} and {tuple(b.shape)})")
    a64, b64 = a.detach().double(), b.detach().double()
    err = (a64 - b64).square().mean().sqrt().item() if a64.numel() else 0.0
    ref = b64.square().mean().sqrt().item() if b64.numel() else 0.0
    if ref == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / ref
