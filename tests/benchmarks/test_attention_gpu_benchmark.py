"""benchmarks/attention_gpu.py on CPU: it imports and parses without a GPU or fla, and its fla rows hand fla the
feature-mapped q, k and the values in fla's ``(B, T, H, F)`` layout, bf16, with K and V repeated to the query
heads (checked against a stand-in ``fla`` package: the real one needs a GPU)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from conftest import BENCHMARKS, load_benchmark  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bench(monkeypatch):
    module = load_benchmark("attention_gpu")
    monkeypatch.setattr(module, "DEVICE", "cpu")
    return module


def causal_linear(q, k, v, log_decay=None, normalize=True):
    """Reference in fla's layout: q, k ``(B, T, H, F)``, v ``(B, T, H, D)``, fp32, scale 1."""
    T = q.shape[1]
    s = torch.einsum("bthf,bshf->bhts", q.float(), k.float())
    n = torch.arange(T)
    mask = (n[:, None] >= n[None, :]).float()
    if log_decay is not None:
        mask = mask * torch.exp(log_decay.float()[:, None, None] * (n[:, None] - n[None, :]).clamp_min(0))
    s = s * mask
    y = torch.einsum("bhts,bshd->bthd", s, v.float())
    if normalize:
        y = y / (s.sum(-1).transpose(1, 2)[..., None] + 1e-10)
    return y


@pytest.fixture
def fake_fla(monkeypatch):
    """A stand-in ``fla`` with the two ops the benchmark calls (same keyword signature as fla 0.6.0); records the
    arguments it was given."""
    seen = {}

    def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                          cu_seqlens=None):  # fmt: skip
        seen["linear"] = dict(q=q, k=k, v=v, scale=scale, normalize=normalize)
        return causal_linear(q, k, v, normalize=normalize).to(q.dtype), None

    def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                         state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):  # fmt: skip
        seen["simple_gla"] = dict(q=q, k=k, v=v, g=g, g_gamma=g_gamma, scale=scale)
        return causal_linear(q, k, v, log_decay=g_gamma, normalize=False).to(q.dtype), None

    fla = types.ModuleType("fla")
    fla.__version__ = "0.0-fake"
    ops = types.ModuleType("fla.ops")
    lin = types.ModuleType("fla.ops.linear_attn")
    lin.chunk_linear_attn = chunk_linear_attn
    gla = types.ModuleType("fla.ops.simple_gla")
    gla.chunk_simple_gla = chunk_simple_gla
    fla.ops, ops.linear_attn, ops.simple_gla = ops, lin, gla
    for name, mod in {"fla": fla, "fla.ops": ops, "fla.ops.linear_attn": lin, "fla.ops.simple_gla": gla}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return seen


def test_help_works_without_gpu_or_fla() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "attention_gpu.py"), "--help"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fla-linear" in done.stdout and "fla-simple-gla" in done.stdout


def test_fla_status_reports_a_missing_fla(bench, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fla", None)  # import fla raises ImportError
    assert bench.fla_status() is not None


@pytest.mark.parametrize("method", ["fla-linear", "fla-simple-gla"])
def test_fla_rows_use_flas_layout_and_expand_gqa(bench, fake_fla, method) -> None:
    assert bench.fla_status() is None
    bench.SHAPES["tiny"] = (4, 2, 8)  # 4 q / 2 kv heads
    try:
        x = bench.make_inputs("tiny", 2, 12, torch.bfloat16)
    finally:
        del bench.SHAPES["tiny"]
    for t in bench.leaves(x, method):
        t.requires_grad_(True)
    y = bench.call(method, x)
    got = fake_fla["linear" if method == "fla-linear" else "simple_gla"]
    B, T, H, F, D = 2, 12, 4, 2 * bench.F_HALF, 8
    assert got["q"].shape == got["k"].shape == (B, T, H, F)
    assert got["v"].shape == (B, T, H, D)
    assert {got[n].dtype for n in "qkv"} == {torch.bfloat16}
    assert got["scale"] == 1.0
    if method == "fla-linear":
        assert got["normalize"] is True
    else:
        assert got["g"] is None and got["g_gamma"].shape == (H,)
    assert y.shape == (B, H, T, D)  # back in the benchmark's (B, H, T, D)

    # the same thing computed head-first here: kv head j serves query heads 2j and 2j + 1
    k = x["k"].detach().repeat_interleave(2, dim=1)
    v = x["v"].detach().repeat_interleave(2, dim=1)
    with torch.no_grad():
        fq, fk = x["phi_q"](x["q"].detach()), x["phi_k"](k)
    s = torch.einsum("bhtf,bhsf->bhts", fq.bfloat16().float(), fk.bfloat16().float())
    n = torch.arange(T)
    mask = (n[:, None] >= n[None, :]).float()
    if method == "fla-simple-gla":
        mask = mask * torch.exp(x["log_decay"].detach()[:, None, None] * (n[:, None] - n[None, :]).clamp_min(0))
    s = s * mask
    ref = torch.einsum("bhts,bhsd->bhtd", s, v.float())
    if method == "fla-linear":
        ref = ref / s.sum(-1, keepdim=True)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)

    # gradients reach q, k, v and both feature maps
    torch.autograd.backward(y, torch.randn_like(y))
    assert all(t.grad is not None for t in bench.leaves(x, method))
