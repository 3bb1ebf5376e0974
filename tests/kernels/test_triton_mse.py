"""The fused stage-1 loss (kernels/triton_mse.py) against ``F.mse_loss`` of the fp32 upcasts (its reference): the
value and the gradients of both inputs, fp32 and bf16, contiguous and strided inputs (SDPA's output is
``(B, T, H, D)`` in memory), a size that is not a multiple of the block; the converted layer's transfer loss
through it; and the switch.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, see tests/triton_interp.py).
"""

from __future__ import annotations

import pytest
import torch

from triton_interp import DEVICE  # sets TRITON_INTERPRET=1 without a GPU, before triton is imported

pytest.importorskip("triton")

from lolcats_cli.core.model.convert import convert_model, freeze_for_transfer, linearized_layers  # noqa: E402
from lolcats_cli.kernels.triton_mse import BLOCK, ENV, MseFn, fused_mse_enabled, mse_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "triton_interpreter")


def inputs(shape, dtype, strided: bool, seed: int = 0):
    """A student and a teacher near it; the teacher strided like SDPA's output when ``strided``."""
    torch.manual_seed(seed)
    s = torch.randn(shape, device=DEVICE)
    t = s + 0.3 * torch.randn(shape, device=DEVICE)
    if strided:
        t = t.transpose(1, 2).contiguous().transpose(1, 2)
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_fused_mse_matches_the_reference_in_value_and_gradients(dtype, strided):
    shape = (2, 3, 37, 24)  # 5,328 elements: one full block and a partial one
    assert 2 * 3 * 37 * 24 > BLOCK
    s, t = inputs(shape, dtype, strided)
    assert t.is_contiguous() != strided
    g = torch.tensor(1.7)
    got = []
    for fn in (MseFn.apply, mse_reference):
        a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
        loss = fn(a, b)
        (loss * g).backward()
        got.append((loss.detach(), a.grad, b.grad))
    (loss, ds, dt), (ref, ds_ref, dt_ref) = got
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert ds.dtype == dtype and dt.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the same fp32 gradient
    for got_g, want in ((ds, ds_ref), (dt, dt_ref)):
        assert (got_g.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def test_a_converted_layer_trains_on_the_same_loss_and_gradients_through_either_form(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(DEVICE).eval()
    convert_model(model, feature_map="hedgehog", feature_map_params={"feature_dim": 8}, window="terrace",
                  window_params={"size": 4}, mode="transfer")  # fmt: skip
    freeze_for_transfer(model)
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    runs = []
    for value in ("1", "0"):
        monkeypatch.setenv(ENV, value)
        model.zero_grad(set_to_none=True)
        model(ids)
        losses = [layer.transfer_loss for _, layer in linearized_layers(model)]
        sum(losses).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append(([loss.item() for loss in losses], grads))
    (fused, g_fused), (ref, g_ref) = runs
    assert fused == pytest.approx(ref, rel=1e-5) and all(v > 0 for v in ref)
    assert g_fused.keys() == g_ref.keys() and g_ref
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fused[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_the_teacher_gets_no_gradient_buffer_when_it_needs_none():
    s, t = inputs((1, 2, 9, 8), torch.float32, False)
    a = s.detach().requires_grad_(True)
    MseFn.apply(a, t).backward()
    ref = s.detach().requires_grad_(True)
    mse_reference(ref, t).backward()
    assert torch.allclose(a.grad, ref.grad, rtol=1e-6, atol=0)


def test_the_switch_chooses_the_form(monkeypatch):
    s, t = inputs((1, 2, 9, 8), torch.float32, False)
    monkeypatch.setenv(ENV, "1")
    assert fused_mse_enabled(s, t)
    assert not fused_mse_enabled(s, t[:, :1])  # shapes differ: the reference (which broadcasts or raises)
    monkeypatch.setenv(ENV, "0")
    assert not fused_mse_enabled(s, t)
    monkeypatch.delenv(ENV)
    assert fused_mse_enabled(s, t) == s.is_cuda
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match=f"{ENV}='maybe' is not a switch"):
        fused_mse_enabled(s, t)
