"""The static decode step (kernels/static.py) against the reference hybrid_step / padded_step: token by token for
200 steps (fp32, CPU), sliding and terrace windows, 0 or 4 sinks, with and without a decay, grouped-query heads,
batch 2, unpadded and left-padded rows; the state round-trips; the step compiles with fullgraph=True."""

from __future__ import annotations

import pytest
import torch

from lolcats_cli.api import WindowParams
from lolcats_cli.builtins.windows import NoWindow, Sliding, Terrace
from lolcats_cli.kernels.padded import padded_prefill_state, padded_step
from lolcats_cli.kernels.recurrent import HybridState, hybrid_step
from lolcats_cli.kernels.static import StaticState, fold_width, static_step, static_supported

from kernel_inputs import B, D, DV, F_HALF, H, HKV, make_inputs, sliced

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, PROMPT = 200, 11
LOG_DECAY = -1.0 / torch.tensor([3.0, 10.0, 40.0, 200.0])


def _window(kind: str, sinks: int):
    return (Sliding if kind == "sliding" else Terrace)(WindowParams(size=6, sinks=sinks))


def _reference_and_static(window, log_decay, pads, prompt: int, s_dtype=None):
    """Prefill ``prompt`` tokens, then STEPS one-token steps through the reference and the static step: both
    outputs ``(B, H, STEPS, Dv)`` and both final states."""
    x = make_inputs(prompt + STEPS, seed=5)
    with torch.no_grad():
        if prompt:
            p = sliced(x, 0, prompt)
            ref = padded_prefill_state(p["k"], p["v"], x["phi_k"], window, pads, H, log_decay=log_decay)
        else:
            ref = HybridState.empty(B, H, HKV, D, DV, 2 * F_HALF, window.span, sinks=window.sinks)
        static = StaticState.from_hybrid(ref, pads, s_dtype=s_dtype)
        fold = fold_width(window)
        want, got = [], []
        for t in range(prompt, prompt + STEPS):
            s = sliced(x, t, t + 1)
            args = (s["q"], s["k"], s["v"], x["phi_q"], x["phi_k"], x["window_logits"], window)
            if bool(pads.any()):
                y, ref = padded_step(*args, ref, pads, log_decay=log_decay)
            else:
                y, ref = hybrid_step(*args, ref, log_decay=log_decay)
            want.append(y)
            got.append(static_step(*args, static, log_decay=log_decay, fold=fold))
    return torch.cat(want, dim=2), torch.cat(got, dim=2), ref, static


@pytest.mark.parametrize("kind", ["sliding", "terrace"])
@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("pads", [(0, 0), (0, 5)], ids=["unpadded", "left-padded"])
def test_the_static_step_equals_hybrid_step_token_by_token(kind, sinks, decay, pads) -> None:
    window = _window(kind, sinks)
    pads_t = torch.tensor(pads)
    want, got, ref, static = _reference_and_static(window, LOG_DECAY if decay else None, pads_t, PROMPT)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    back = static.to_hybrid()
    assert back.length == ref.length == PROMPT + STEPS
    for name in ("k_buf", "v_buf", "S", "z", "k_sink", "v_sink"):
        a, b = getattr(back, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("s_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_s_stays_close_to_the_fp32_reference(decay, s_dtype) -> None:
    """S kept in bf16 / fp16 (half the state's bytes): 200 steps past the prompt, every step computing in fp32 and
    rounding S once, stay within the rounding of the format of the fp32 reference (outputs and S)."""
    from lolcats_cli.kernels.compare import rel_rms

    window, pads = _window("terrace", 4), torch.tensor([0, 5])
    want, got, ref, static = _reference_and_static(window, LOG_DECAY if decay else None, pads, PROMPT, s_dtype)
    full = StaticState.from_hybrid(ref, pads)
    assert static.S.dtype == s_dtype and static.z.dtype == torch.float32
    assert static.nbytes() < full.nbytes() - full.S.numel() * 2 + 1  # S takes half its fp32 bytes
    eps = torch.finfo(s_dtype).eps
    y_err, s_err = rel_rms(got, want), rel_rms(static.to_hybrid().S, ref.S)
    print(f"{s_dtype} decay={decay}: output rel rms {y_err:.2e}, S rel rms {s_err:.2e} (eps {eps:.1e})")
    assert 0 < y_err < 4 * eps and 0 < s_err < 8 * eps


@pytest.mark.parametrize("kind", ["sliding", "terrace"])
def test_the_static_step_from_an_empty_state_fills_its_sinks(kind) -> None:
    want, got, ref, static = _reference_and_static(_window(kind, 4), LOG_DECAY, torch.zeros(2, dtype=torch.long), 0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(static.k_sink, ref.k_sink)


def test_the_buffers_keep_their_size_and_addresses() -> None:
    window = _window("terrace", 4)
    x = make_inputs(40, seed=1)
    state = StaticState.from_hybrid(HybridState.empty(B, H, HKV, D, DV, 2 * F_HALF, window.span, sinks=4))
    before = {n: (t.data_ptr(), t.shape) for n, t in vars(state).items() if isinstance(t, torch.Tensor)}
    size = state.nbytes()
    with torch.no_grad():
        for t in range(40):
            s = sliced(x, t, t + 1)
            static_step(s["q"], s["k"], s["v"], x["phi_q"], x["phi_k"], x["window_logits"], window, state,
                        fold=fold_width(window))  # fmt: skip
    assert {n: (t.data_ptr(), t.shape) for n, t in vars(state).items() if isinstance(t, torch.Tensor)} == before
    assert state.nbytes() == size and int(state.length) == 40


def test_fold_width_and_unsupported_windows() -> None:
    assert fold_width(Sliding(WindowParams(size=6))) == 1
    assert fold_width(Terrace(WindowParams(size=6, sinks=4))) == 6
    assert static_supported(Sliding(WindowParams(size=6))) is None
    assert "span 0" in static_supported(NoWindow())


def test_a_loaded_state_keeps_the_buffers_and_refuses_other_shapes() -> None:
    window = _window("sliding", 4)
    x = make_inputs(30, seed=2)
    p = sliced(x, 0, 30)
    ref = padded_prefill_state(p["k"], p["v"], x["phi_k"], window, torch.tensor([0, 3]), H)
    state = StaticState.from_hybrid(HybridState.empty(B, H, HKV, D, DV, 2 * F_HALF, window.span, sinks=4))
    ptr = state.k_ring.data_ptr()
    state.load_(ref, torch.tensor([0, 3]))
    assert state.k_ring.data_ptr() == ptr and int(state.length) == 30 and state.pads.tolist() == [0, 3]
    torch.testing.assert_close(state.to_hybrid().k_buf, ref.k_buf)
    other = HybridState.empty(B, H, HKV, D, DV, 2 * F_HALF, window.span + 1, sinks=4)
    with pytest.raises(ValueError, match="k_ring has another shape"):
        state.load_(other)


def test_the_step_compiles_without_graph_breaks() -> None:
    """fullgraph=True fails on any graph break: data-dependent Python control flow or a host read."""
    window = _window("terrace", 4)
    x = make_inputs(PROMPT + 3, seed=4)
    p = sliced(x, 0, PROMPT)
    pads = torch.tensor([0, 2])
    ref = padded_prefill_state(p["k"], p["v"], x["phi_k"], window, pads, H, log_decay=LOG_DECAY)
    eager, compiled = StaticState.from_hybrid(ref, pads), StaticState.from_hybrid(ref, pads)
    fold = fold_width(window)

    def step(q, k, v, state):
        return static_step(q, k, v, x["phi_q"], x["phi_k"], x["window_logits"], window, state,
                           log_decay=LOG_DECAY, fold=fold)  # fmt: skip

    torch._dynamo.reset()
    fast = torch.compile(step, fullgraph=True, backend="eager")
    with torch.no_grad():
        for t in range(PROMPT, PROMPT + 3):
            s = sliced(x, t, t + 1)
            torch.testing.assert_close(fast(s["q"], s["k"], s["v"], compiled), step(s["q"], s["k"], s["v"], eager))
    torch.testing.assert_close(compiled.S, eager.S)
