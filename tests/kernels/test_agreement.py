"""The chunked and recurrent forms of hybrid attention agree with the naive reference: outputs, gradients
(q, k, v, window logits, feature-map parameters), token-by-token and multi-token decoding, bf16 inputs,
a constant state size, and no T x T intermediate in the chunked form (forward and backward)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from lolcats_cli.api import Window, WindowParams
from lolcats_cli.builtins.windows import NoWindow, Sliding, Terrace
from lolcats_cli.kernels import ENV_VAR, KERNELS, chunked, hybrid_attention
from lolcats_cli.kernels.chunked import DEFAULT_CHUNK, hybrid_attention_chunked, hybrid_prefill
from lolcats_cli.kernels.compare import rel_rms
from lolcats_cli.kernels.naive import hybrid_attention_naive
from lolcats_cli.kernels.recurrent import HybridState, hybrid_step

from kernel_inputs import B, BF16_TOL, decode, D, DV, F_HALF, FP32_TOL, GRAD_ATOL, H, HKV, make_inputs, sliced

WINDOWS: dict[str, Window] = {
    "sliding64": Sliding(WindowParams(size=64)),
    "terrace64": Terrace(WindowParams(size=64)),
    "none": NoWindow(),
    "sliding5": Sliding(WindowParams(size=5)),
    "terrace5": Terrace(WindowParams(size=5)),
}
LENGTHS = [1, 63, 64, 65, 127, 128, 129, 500]


pytestmark = pytest.mark.usefixtures("one_thread")


cases = pytest.mark.parametrize(
    "window_name,T", [(w, T) for w in WINDOWS for T in LENGTHS], ids=[f"{w}-T{T}" for w in WINDOWS for T in LENGTHS]
)


@cases
def test_chunked_output_matches_naive(window_name: str, T: int) -> None:
    x, window = make_inputs(T), WINDOWS[window_name]
    with torch.no_grad():
        ref = hybrid_attention_naive(**x, window=window)
        out = hybrid_attention_chunked(**x, window=window)
    assert out.shape == (B, H, T, DV) and out.dtype == torch.float32
    assert rel_rms(out, ref) < FP32_TOL


@cases
def test_chunked_gradients_match_naive(window_name: str, T: int) -> None:
    window = WINDOWS[window_name]
    grads = []
    for fn in (hybrid_attention_naive, hybrid_attention_chunked):
        x = make_inputs(T)
        leaves = {name: x[name].requires_grad_() for name in ("q", "k", "v", "window_logits")}
        leaves |= {"phi_q.W": x["phi_q"].W, "phi_k.W": x["phi_k"].W}
        y = fn(**x, window=window)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
        grads.append({name: t.grad for name, t in leaves.items()})
    ref, got = grads
    bad = {
        name: rel_rms(got[name], ref[name])
        for name in ref
        if rel_rms(got[name], ref[name]) >= FP32_TOL and (got[name] - ref[name]).abs().max() >= GRAD_ATOL
    }
    assert not bad, f"relative RMS errors of gradients: {bad}"


@cases
def test_token_by_token_decode_matches_naive(window_name: str, T: int) -> None:
    """A prompt of 0 to 3 tokens (T % 4), then one step per token."""
    x, window, prefill = make_inputs(T), WINDOWS[window_name], T % 4
    with torch.no_grad():
        ref = hybrid_attention_naive(**x, window=window)
        out = decode(x, window, list(range(prefill, T + 1)))
    assert rel_rms(out, ref) < FP32_TOL, f"prefill={prefill}"


@cases
def test_prefill_then_multi_token_steps_match_naive(window_name: str, T: int) -> None:
    x, window = make_inputs(T), WINDOWS[window_name]
    gen = torch.Generator().manual_seed(T)
    cuts = sorted({int(c) for c in torch.randint(0, T + 1, (4,), generator=gen)} | {T})
    with torch.no_grad():
        ref = hybrid_attention_naive(**x, window=window)
        out = decode(x, window, cuts)
    assert rel_rms(out, ref) < FP32_TOL, f"cuts={cuts}"


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 200])
def test_chunk_size_does_not_change_the_result(chunk_size: int) -> None:
    x, window = make_inputs(129), WINDOWS["terrace5"]
    with torch.no_grad():
        ref = hybrid_attention_naive(**x, window=window)
        out = hybrid_attention_chunked(**x, window=window, chunk_size=chunk_size)
    assert rel_rms(out, ref) < FP32_TOL


@pytest.mark.parametrize("chunk_size", [5, 7, 64])
def test_groups_of_chunks_do_not_change_the_result(chunk_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several groups of chunks, the last one short: outputs and gradients still match."""
    monkeypatch.setattr(chunked, "GROUP_QUERIES", 16)
    window, grads = WINDOWS["terrace5"], []
    for fn in (hybrid_attention_naive, partial(hybrid_attention_chunked, chunk_size=chunk_size)):
        x = make_inputs(129)
        x["k"].requires_grad_()
        y = fn(**x, window=window)
        y.square().sum().backward()
        grads.append((y.detach(), x["k"].grad))
    assert rel_rms(grads[1][0], grads[0][0]) < FP32_TOL
    assert rel_rms(grads[1][1], grads[0][1]) < FP32_TOL


@pytest.mark.parametrize("window_name", list(WINDOWS))
def test_bf16_inputs_within_bf16_tolerance(window_name: str) -> None:
    T, window = 129, WINDOWS[window_name]
    x = make_inputs(T, dtype=torch.bfloat16)
    x32 = {**x, **{name: x[name].float() for name in ("q", "k", "v")}}
    with torch.no_grad():
        ref = hybrid_attention_naive(**x32, window=window)
        chunked = hybrid_attention_chunked(**x, window=window)
        stepped = decode(x, window, [60, *range(61, T + 1)])
    assert chunked.dtype == stepped.dtype == torch.bfloat16
    assert rel_rms(chunked, ref) < BF16_TOL
    assert rel_rms(stepped, ref) < BF16_TOL


@pytest.mark.parametrize("window_name", list(WINDOWS))
def test_state_size_is_constant_in_length(window_name: str) -> None:
    window = WINDOWS[window_name]
    sizes = []
    with torch.no_grad():
        for T in (100, 5000):
            x = make_inputs(T + 1)
            _, state = hybrid_prefill(**sliced(x, 0, T), window=window)
            _, state = hybrid_step(**sliced(x, T, T + 1), window=window, state=state)
            assert state.length == T + 1
            sizes.append(state.nbytes())
    empty = HybridState.empty(B, H, HKV, D, DV, 2 * F_HALF, window.span)
    assert sizes[0] == sizes[1] == empty.nbytes()


def test_generation_from_an_empty_state_matches_naive() -> None:
    T, window = 70, WINDOWS["terrace5"]
    x = make_inputs(T)
    state = HybridState.empty(B, H, HKV, D, DV, 2 * F_HALF, window.span)
    outs = []
    with torch.no_grad():
        for t in range(T):
            y, state = hybrid_step(**sliced(x, t, t + 1), window=window, state=state)
            outs.append(y)
        ref = hybrid_attention_naive(**x, window=window)
    assert rel_rms(torch.cat(outs, dim=2), ref) < FP32_TOL


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("fn", [hybrid_attention_naive, hybrid_attention_chunked], ids=["naive", "chunked"])
def test_only_naive_builds_a_T_by_T_tensor(fn) -> None:  # noqa: ANN001
    """Forward and backward at T = 1024: no tensor of the chunked form outgrows (B, H, T, chunk + span)."""
    T, window = 1024, WINDOWS["terrace64"]
    linear_bound = B * H * T * (DEFAULT_CHUNK + window.span)
    x = make_inputs(T)
    x["q"].requires_grad_()
    with LargestTensor() as spy:
        fn(**x, window=window).sum().backward()
    if fn is hybrid_attention_naive:  # the spy does see T x T matrices
        assert spy.numel >= B * H * T * T
    else:
        assert spy.numel <= linear_bound, f"largest tensor: {spy.numel} elements, bound {linear_bound}"


@pytest.mark.parametrize("env,expected", [(None, "chunked"), ("naive", "naive")], ids=["auto", "env-naive"])
def test_dispatcher_runs_the_chosen_kernel(env: str | None, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """hybrid_attention runs the chunked kernel on CPU by default, the naive one under LOLCATS_KERNEL=naive."""
    if env is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env)
    ran: list[str] = []
    for name, kernel in KERNELS.items():
        def spy(*args, _name=name, _fn=kernel.sequence, **kwargs):  # noqa: ANN002, ANN003, ANN202
            ran.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernel, "sequence", spy)
    x, window = make_inputs(65), WINDOWS["sliding5"]
    with torch.no_grad():
        out = hybrid_attention(**x, window=window)
    assert ran == [expected]
    ref = {"chunked": hybrid_attention_chunked, "naive": hybrid_attention_naive}[expected](**x, window=window)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"k": torch.zeros(B, 3, 10, D), "v": torch.zeros(B, 3, 10, DV)}, "multiple of key/value heads Hkv=3"),
        ({"k": torch.zeros(B, HKV, 9, D)}, "k must have shape"),
        ({"v": torch.zeros(B, HKV, 9, DV)}, "v must have shape"),
        ({"window_logits": torch.zeros(H + 1)}, "window_logits must have shape"),
        ({"q": torch.zeros(H, 10, D)}, "q must be 4-D"),
    ],
    ids=["gqa-groups", "k-length", "v-length", "window-logits", "q-rank"],
)
def test_bad_shapes_raise_value_error(change: dict, message: str) -> None:
    x = {**make_inputs(10), **change}
    for fn in (hybrid_attention_chunked, hybrid_prefill):
        with pytest.raises(ValueError, match=message):
            fn(**x, window=WINDOWS["sliding5"])


def test_bad_chunk_size_and_state_raise_value_error() -> None:
    x, window = make_inputs(10), WINDOWS["sliding5"]
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        hybrid_attention_chunked(**x, window=window, chunk_size=0)
    _, state = hybrid_prefill(**x, window=window)
    with pytest.raises(ValueError, match="at least one new token"):
        hybrid_step(**sliced(x, 0, 0), window=window, state=state)
    with pytest.raises(ValueError, match="span 10"):
        hybrid_step(**sliced(x, 0, 1), window=Terrace(WindowParams(size=5)), state=state)
