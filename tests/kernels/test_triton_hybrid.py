"""The fused Triton kernel (kernels/triton_hybrid.py) agrees with the naive reference: outputs and gradients
of q, k, v, both feature maps' parameters, the window logits and the decay, for sliding and terrace windows
with 0 and 4 sinks, with and without decay, grouped-query heads (H=4, Hkv=2), T not a multiple of 64.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before the kernels
are built) at small sizes, so CI checks them on CPU. On a CUDA machine with ``TRITON_INTERPRET`` unset the
same tests run compiled, on the GPU, at larger sizes (and in bf16 too)::

    python -m pytest -q tests/kernels/test_triton_hybrid.py
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import Tensor, nn

from triton_interp import DEVICE, ON_GPU  # sets TRITON_INTERPRET=1 without a GPU, before triton is imported

pytest.importorskip("triton")

from lolcats_cli.api import Window, WindowParams  # noqa: E402
from lolcats_cli.builtins.windows import NoWindow, Sliding, Terrace  # noqa: E402
from lolcats_cli.kernels import KERNELS  # noqa: E402
from lolcats_cli.kernels.chunked import hybrid_attention_chunked  # noqa: E402
from lolcats_cli.kernels.compare import rel_rms  # noqa: E402
from lolcats_cli.kernels.naive import hybrid_attention_naive  # noqa: E402
from lolcats_cli.kernels import triton_hybrid  # noqa: E402
from lolcats_cli.kernels.triton_hybrid import TritonKernel, triton_hybrid_attention, unsupported  # noqa: E402

H, HKV, F_HALF = 4, 2, 16
# (B, T): the interpreter is slow, so CPU sizes stay small (still 3 query blocks: prefix states and the
# sink tile are exercised); on the GPU, many blocks.
SIZES = [(2, 1100), (1, 2100)] if ON_GPU else [(1, 150)]
HEAD_DIMS = [64, 128] if ON_GPU else [64]
# fp32 against the fp32 reference: rounding only (the window-logit gradient is a long sum with cancellations).
TOL, GRAD_TOL = 2e-5, 1e-4
NAIVE_HAS_DECAY = "log_decay" in inspect.signature(hybrid_attention_naive).parameters


pytestmark = pytest.mark.usefixtures("one_thread", "triton_interpreter")


class TwoSoftmaxMap(nn.Module):
    """Hedgehog-like map with learnable W ``(H, D, F/2)``: ``[softmax(x W), softmax(-x W)]``, fp32."""

    def __init__(self, D: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter((torch.randn(H, D, F_HALF, generator=gen) * 0.3).to(DEVICE))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.einsum("bhtd,hdf->bhtf", x.float(), self.W)
        return torch.cat([h.softmax(-1), (-h).softmax(-1)], dim=-1)


def make_inputs(B: int, T: int, D: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=gen).to(DEVICE) for h in (H, HKV, HKV))
    return {"q": q, "k": k, "v": v, "phi_q": TwoSoftmaxMap(D, seed + 1), "phi_k": TwoSoftmaxMap(D, seed + 2),
            "window_logits": torch.randn(H, generator=gen).to(DEVICE)}  # fmt: skip


def make_log_decay() -> Tensor:
    """Per-head log decays over horizons of about 5 to 100 tokens, so the decay matters at these lengths."""
    return -1.0 / torch.tensor([5.0, 20.0, 50.0, 100.0], device=DEVICE)


def reference(x: dict, window: Window, log_decay: Tensor | None) -> Tensor:
    """The naive reference; with a decay and a naive form that has none yet, the same O(T^2) op written here."""
    if log_decay is None:
        return hybrid_attention_naive(**x, window=window)
    if NAIVE_HAS_DECAY:
        return hybrid_attention_naive(**x, window=window, log_decay=log_decay)
    from lolcats_cli.api import window_masks
    from lolcats_cli.kernels.blocks import expand_kv

    q, k, v = x["q"], expand_kv(x["k"], H), expand_kv(x["v"], H)
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    in_window, in_linear = window_masks(window, pos, pos)
    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * q.shape[-1] ** -0.5
    s = s.masked_fill(~in_window, float("-inf"))
    c = s.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    g = torch.sigmoid(x["window_logits"].float()).view(1, H, 1, 1)
    decay = torch.exp(log_decay.view(1, H, 1, 1) * (pos[:, None] - pos[None, :]).clamp_min(0))
    lin = torch.einsum("bhnf,bhmf->bhnm", x["phi_q"](q), x["phi_k"](k)) * decay * in_linear
    a = g * torch.exp(s - c) + lin
    return (torch.einsum("bhnm,bhmd->bhnd", a, v.float()) / a.sum(-1, keepdim=True).clamp_min(1e-12)).to(q.dtype)


def fused(x: dict, window: Window, log_decay: Tensor | None) -> Tensor:
    fq = x["phi_q"](x["q"])
    fk = x["phi_k"](x["k"].repeat_interleave(H // HKV, dim=1))
    return triton_hybrid_attention(x["q"], x["k"], x["v"], fq, fk, x["window_logits"], window, None, log_decay)


def values_and_grads(fn, x: dict, window: Window, decay: bool) -> tuple[Tensor, dict[str, Tensor]]:  # noqa: ANN001
    x = dict(x, **{n: x[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "window_logits")})
    leaves = {n: x[n] for n in ("q", "k", "v", "window_logits")} | {"Wq": x["phi_q"].W, "Wk": x["phi_k"].W}
    ld = make_log_decay().requires_grad_() if decay else None
    if ld is not None:
        leaves["log_decay"] = ld
    for p in (x["phi_q"].W, x["phi_k"].W):
        p.grad = None
    y = fn(x, window, ld)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    grads = torch.autograd.grad((y.float() * dy.float()).sum(), list(leaves.values()))
    return y.detach(), dict(zip(leaves, grads))


WINDOWS: dict[str, Window] = {
    "sliding64": Sliding(WindowParams(size=64)),
    "sliding64-sinks4": Sliding(WindowParams(size=64, sinks=4)),
    "terrace64": Terrace(WindowParams(size=64)),
    "terrace64-sinks4": Terrace(WindowParams(size=64, sinks=4)),
}
# Windows whose blocks start off the 64 grid, several prefix states, a pure linear branch with sinks; sizes
# that attention.train_window_sizes draws around a window of 64 (48 and 96 are not powers of two).
EXTRA: dict[str, Window] = {
    "sliding16-sinks4": Sliding(WindowParams(size=16, sinks=4)),
    "terrace32-sinks3": Terrace(WindowParams(size=32, sinks=3)),
    "terrace48-sinks4": Terrace(WindowParams(size=48, sinks=4)),
    "terrace96-sinks4": Terrace(WindowParams(size=96, sinks=4)),
    "none-sinks4": NoWindow(WindowParams(sinks=4)),
}


def check(window: Window, decay: bool, B: int, T: int, D: int) -> None:
    x = make_inputs(B, T, D)
    ref_y, ref_g = values_and_grads(reference, x, window, decay)
    got_y, got_g = values_and_grads(fused, x, window, decay)
    assert got_y.dtype == ref_y.dtype and got_y.shape == ref_y.shape
    assert rel_rms(got_y, ref_y) < TOL, f"values: rel rms {rel_rms(got_y, ref_y):.2e}"
    for name, ref in ref_g.items():
        err = rel_rms(got_g[name], ref)
        assert err < GRAD_TOL, f"d {name}: rel rms {err:.2e}"


@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("window_name", list(WINDOWS))
@pytest.mark.parametrize("B,T", SIZES, ids=[f"B{b}-T{t}" for b, t in SIZES])
@pytest.mark.parametrize("D", HEAD_DIMS, ids=[f"D{d}" for d in HEAD_DIMS])
def test_values_and_gradients_match_naive(window_name: str, decay: bool, B: int, T: int, D: int) -> None:
    check(WINDOWS[window_name], decay, B, T, D)


@pytest.mark.parametrize("window_name", list(EXTRA))
def test_other_windows_match_naive(window_name: str) -> None:
    window = EXTRA[window_name]  # long enough for keys in the linear branch (else d window_logits is 0 + noise)
    check(window, True, 2 if ON_GPU else 1, 700 if ON_GPU else max(150, window.span + 60), 64)


@pytest.mark.parametrize("T", [1, 63, 64, 65])
def test_short_sequences_match_naive(T: int) -> None:
    window = WINDOWS["terrace64-sinks4"]
    x = make_inputs(2, T, 64, seed=T)
    ref_y, ref_g = values_and_grads(reference, x, window, True)
    got_y, got_g = values_and_grads(fused, x, window, True)
    assert rel_rms(got_y, ref_y) < TOL
    for name, ref in ref_g.items():
        # No linear key yet at T <= 128 with this window: the window logits' gradient is 0 in theory and fp32
        # rounding noise (1e-6 to 1e-5, a sum over 2 T rows) in both forms, so it passes on an absolute bound.
        assert rel_rms(got_g[name], ref) < GRAD_TOL or (got_g[name] - ref).abs().max() < 5e-5, name


# The interpreter's tl.dot is wrong on bf16 operands (numpy has no bf16; fp16 is exact), so bf16 runs on a GPU only.
HALF = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=[str(d).split(".")[-1] for d in HALF])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    """bf16 / fp16 inputs (fp32 accumulation) against the fp32 reference of the same rounded inputs."""
    window = WINDOWS["terrace64-sinks4"]
    x = make_inputs(2, 2100, 128) if ON_GPU else make_inputs(1, 150, 64)
    x16 = dict(x, q=x["q"].to(dtype), k=x["k"].to(dtype), v=x["v"].to(dtype))
    x32 = dict(x, q=x16["q"].float(), k=x16["k"].float(), v=x16["v"].float())
    ref_y, ref_g = values_and_grads(reference, x32, window, True)
    got_y, got_g = values_and_grads(fused, x16, window, True)
    # Rounding of the output (8 bits of mantissa in bf16, 11 in fp16); the window logits' gradient is a long
    # sum with cancellations through dy . y, with y rounded to the input dtype (as in flash attention).
    tol, grad_tol = (2e-3, 2e-2) if dtype == torch.float16 else (1.5e-2, 1e-1)
    assert got_y.dtype == dtype
    assert rel_rms(got_y, ref_y) < tol, f"values: rel rms {rel_rms(got_y, ref_y):.2e}"
    for name, ref in ref_g.items():
        assert rel_rms(got_g[name], ref) < grad_tol, f"d {name}: rel rms {rel_rms(got_g[name], ref):.2e}"


def test_kernel_is_registered_above_chunked_and_falls_back() -> None:
    kernel = KERNELS["triton"]
    assert isinstance(kernel, TritonKernel) and kernel.priority > KERNELS["chunked"].priority
    assert not kernel.available(torch.device("cpu"))
    # A head dim the fused kernel does not take goes through the chunked form, same result.
    x, window = make_inputs(1, 70, 32), WINDOWS["sliding64-sinks4"]
    assert unsupported(x["q"], x["k"], x["v"], window) is not None
    with torch.no_grad():
        torch.testing.assert_close(kernel.attention(**x, window=window), hybrid_attention_chunked(**x, window=window))


@pytest.fixture
def fused_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets a 1 each time the fused forward is launched (it still runs)."""
    ran: list[int] = []
    launch = triton_hybrid._forward

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        ran.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_hybrid, "_forward", spy)
    return ran


def test_kernel_seam_runs_the_fused_kernel(fused_runs: list[int]) -> None:
    """Through Kernel.attention (what the model calls), with the decay keyword: the fused op runs."""
    window, ld = WINDOWS["sliding64-sinks4"], make_log_decay()
    x = make_inputs(2, 130, 64)
    with torch.no_grad():
        got = KERNELS["triton"].attention(**x, window=window, log_decay=ld)
    assert fused_runs == [1]
    assert rel_rms(got, reference(x, window, ld)) < TOL


PREFILLS = [  # (window, prompt length, decay, pads): the fold point inside a block, on a block start, before the sinks
    # end; left-padded rows whose lengths put their fold points in different blocks
    ("sliding64-sinks4", 130, True, None), ("sliding64", 129, False, None), ("terrace64-sinks4", 128, True, None),
    ("terrace32-sinks3", 70, False, None), ("none-sinks4", 67, True, None), ("sliding64-sinks4", 3, True, None),
    ("sliding64-sinks4", 130, True, (0, 70)), ("terrace64-sinks4", 128, False, (5, 126)),
    ("none-sinks4", 67, True, (2, 0)),
]


@pytest.mark.parametrize("window_name,T,decay,pads", PREFILLS)
def test_the_fused_prefill_gives_the_chunked_prefills_output_and_state(
    fused_runs: list[int], window_name: str, T: int, decay: bool, pads: tuple[int, int] | None
) -> None:
    """TritonKernel.prefill (no autograd, left-padded rows too): one fused forward, the state from its chunk states
    and the keys up to each row's fold point; output and every state buffer equal the chunked kernel's prefill, and
    decoding on from it matches too."""
    window, ld = {**WINDOWS, **EXTRA}[window_name], make_log_decay() if decay else None
    x = make_inputs(2, T + 10, 64, seed=5)
    head = {**x, **{n: x[n][:, :, :T] for n in ("q", "k", "v")}}
    rows = None if pads is None else torch.tensor(pads, device=DEVICE)
    with torch.no_grad():
        got_y, got = KERNELS["triton"].prefill(**head, window=window, log_decay=ld, pads=rows)
        want_y, want = KERNELS["chunked"].prefill(**head, window=window, log_decay=ld, pads=rows)
        tail = [x[n][:, :, T:] for n in ("q", "k", "v")]
        rest = (x["phi_q"], x["phi_k"], x["window_logits"], window)
        got_next, _ = KERNELS["triton"].step(*tail, *rest, got, log_decay=ld, pads=rows)
        want_next, _ = KERNELS["chunked"].step(*tail, *rest, want, log_decay=ld, pads=rows)
    assert fused_runs == [1]
    assert rel_rms(got_y, want_y) < TOL and rel_rms(got_next, want_next) < TOL
    assert got.length == want.length == T
    for name in ("k_buf", "v_buf", "S", "z", "k_sink", "v_sink"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=TOL, rtol=TOL, msg=name)
