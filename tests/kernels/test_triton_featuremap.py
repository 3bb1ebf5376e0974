"""The fused hedgehog map (kernels/triton_featuremap.py) against ``Hedgehog.reference``, the PyTorch form: values and
the gradients of x and W, fp32 and bf16, head dims and feature counts that are not powers of two, a sequence
that is not a multiple of the block (and spans several backward programs), a strided x (q after RoPE), an active
clamp, an x without a gradient (stage 1's q and k); and the switch that chooses between the two forms.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, see tests/triton_interp.py).
"""

from __future__ import annotations

import pytest
import torch

from triton_interp import DEVICE  # sets TRITON_INTERPRET=1 without a GPU, before triton is imported

pytest.importorskip("triton")

from lolcats_cli.builtins.feature_maps import Hedgehog, HedgehogParams  # noqa: E402
from lolcats_cli.kernels.triton_featuremap import ENV, fused_hedgehog, fused_hedgehog_enabled  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "triton_interpreter")


def hedgehog(H: int, D: int, f: int, eps: float = 1e-12, seed: int = 0, spread: float = 1.0) -> Hedgehog:
    torch.manual_seed(seed)
    fm = Hedgehog(H, D, HedgehogParams(feature_dim=f, eps=eps)).to(DEVICE)
    with torch.no_grad():
        fm.weight.add_(torch.randn_like(fm.weight) * spread)
    return fm


def grads(fn, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(x.requires_grad)
    w.grad = None
    y = fn(x)
    y.backward(g)
    return y.detach().float(), (x.grad.float() if x.requires_grad else None), w.grad.detach().clone()


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item() + 1e-30, f"max abs error {err:.3g} against max {want.abs().max():.3g}"


@pytest.mark.parametrize(
    "dtype, B, H, T, D, f, strided, eps, spread, x_grad",
    [
        (torch.float32, 2, 3, 70, 48, 20, False, 1e-12, 1.0, True),  # odd sizes, two forward blocks
        (torch.float32, 1, 2, 70, 96, 24, True, 1e-12, 1.0, True),  # two head-dim chunks, the second one partial
        (torch.bfloat16, 1, 2, 80, 128, 64, True, 1e-12, 1.0, True),  # Llama's head dim
        (torch.float32, 1, 2, 300, 64, 64, True, 1e-12, 1.0, True),  # two backward programs, strided x
        (torch.float32, 1, 2, 65, 32, 16, False, 1e-3, 4.0, True),  # the clamp is active for many features
        (torch.bfloat16, 2, 2, 130, 64, 32, True, 1e-12, 1.0, True),
        (torch.float32, 2, 2, 70, 64, 32, True, 1e-12, 1.0, False),  # stage 1: no gradient into x
        (torch.bfloat16, 1, 2, 70, 128, 64, True, 1e-12, 1.0, False),  # ... with all of dW's columns in one program
    ],
)
def test_fused_hedgehog_matches_the_reference_in_values_and_gradients(dtype, B, H, T, D, f, strided, eps, spread,
                                                                      x_grad):  # fmt: skip
    fm = hedgehog(H, D, f, eps=eps, spread=spread)
    torch.manual_seed(1)
    if strided:  # (B, T, H, D) in memory, as q and k after RoPE
        x = torch.randn(B, T, H, D, device=DEVICE).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(B, H, T, D, device=DEVICE).to(dtype)
    x.requires_grad_(x_grad)
    g = torch.randn(B, H, T, 2 * f, device=DEVICE).to(dtype)
    y, dx, dw = grads(lambda t: fused_hedgehog(t, fm.weight, eps), x, fm.weight, g)
    y_ref, dx_ref, dw_ref = grads(fm.reference, x, fm.weight, g)
    assert y.dtype == y_ref.dtype and y.shape == (B, H, T, 2 * f)
    if eps > 1e-6:
        assert (y_ref <= eps).float().mean() > 0.05, "the case should exercise the clamp"
    rel = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the same fp32 value, at most an ulp apart
    assert_close(y, y_ref, rel)
    assert_close(dw, dw_ref, 1e-4 if dtype == torch.float32 else 2e-2)
    if x_grad:
        assert dx.dtype == torch.float32 and dx.shape == x.shape
        assert_close(dx, dx_ref, 1e-4 if dtype == torch.float32 else 2e-2)


def test_hedgehog_forward_runs_the_fused_kernels_where_the_switch_says(monkeypatch):
    fm = hedgehog(2, 32, 16)
    x = torch.randn(1, 2, 40, 32, device=DEVICE)
    monkeypatch.setenv(ENV, "1")
    assert fused_hedgehog_enabled(x, fm.weight)
    y = fm(x)
    assert y.grad_fn is not None and "HedgehogFn" in type(y.grad_fn).__name__
    assert_close(y.detach(), fm.reference(x).detach(), 1e-5)
    monkeypatch.setenv(ENV, "0")
    assert not fused_hedgehog_enabled(x, fm.weight)
    assert "HedgehogFn" not in type(fm(x).grad_fn).__name__
    monkeypatch.delenv(ENV)
    assert fused_hedgehog_enabled(x, fm.weight) == x.is_cuda  # unset: CUDA tensors only
    monkeypatch.setenv(ENV, "1")
    wide = hedgehog(2, 160, 16)  # head dim above MAX_DIM: the PyTorch form
    assert not fused_hedgehog_enabled(torch.randn(1, 2, 4, 160, device=DEVICE), wide.weight)
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match=f"{ENV}='fast' is not a switch"):
        fm(x)
