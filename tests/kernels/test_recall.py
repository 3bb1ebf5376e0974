"""The recall cache (``LOLCATS_KERNEL=recall``): with no slots it is the recurrent form exactly; with a slot for
every key nothing is linear any more and it is full softmax attention; in between it keeps the keys the linear
state recalls worst, its state stays constant-size, and it refuses what it does not support."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lolcats_cli.api import WindowParams
from lolcats_cli.builtins.windows import Sliding, Terrace
from lolcats_cli.errors import ConfigError
from lolcats_cli.kernels import KERNELS
from lolcats_cli.kernels.compare import rel_rms
from lolcats_cli.kernels.naive import hybrid_attention_naive
from lolcats_cli.kernels.recall import RESCORE_ENV, SLOTS_ENV, RecallKernel, slots_from_env

from kernel_inputs import B, FP32_TOL, H, HKV, make_inputs, sliced

pytestmark = pytest.mark.usefixtures("one_thread")
WINDOWS = {"sliding8-sinks2": Sliding(WindowParams(size=8, sinks=2)), "terrace5": Terrace(WindowParams(size=5))}
LOG_DECAY = torch.tensor([-0.2, -0.05, -0.01, 0.0])[:H]


def args(x: dict) -> tuple:
    return x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], x["window_logits"]


@pytest.mark.parametrize("window_name", list(WINDOWS))
@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
def test_no_slots_is_the_plain_op(window_name: str, decay: bool) -> None:
    x, window = make_inputs(150), WINDOWS[window_name]
    ld = LOG_DECAY if decay else None
    kernel = RecallKernel(slots=0)
    with torch.no_grad():
        ref = hybrid_attention_naive(**x, window=window, log_decay=ld)
        assert rel_rms(kernel.attention(*args(x), window, log_decay=ld), ref) < FP32_TOL
        y, state = kernel.prefill(*args(sliced(x, 0, 70)), window, log_decay=ld)
        outs = [y]
        for n in range(70, 150):
            y, state = kernel.step(*args(sliced(x, n, n + 1)), window, state, log_decay=ld)
            outs.append(y)
    assert rel_rms(torch.cat(outs, dim=2), ref) < FP32_TOL


@pytest.mark.parametrize("window_name", list(WINDOWS))
def test_a_slot_for_every_key_is_full_softmax_attention(window_name: str) -> None:
    T, window = 130, WINDOWS[window_name]
    x = make_inputs(T)
    kernel = RecallKernel(slots=T)
    k, v = (x[n].repeat_interleave(H // HKV, dim=1) for n in ("k", "v"))
    with torch.no_grad():
        softmax = F.scaled_dot_product_attention(x["q"], k, v, is_causal=True)
        assert rel_rms(kernel.attention(*args(x), window, log_decay=LOG_DECAY), softmax) < FP32_TOL
        y, state = kernel.prefill(*args(sliced(x, 0, 40)), window)
        outs = [y]
        for n in range(40, T):
            y, state = kernel.step(*args(sliced(x, n, n + 1)), window, state)
            outs.append(y)
    assert rel_rms(torch.cat(outs, dim=2), softmax) < FP32_TOL


def test_the_cache_keeps_the_keys_the_state_recalls_worst() -> None:
    """Values near zero except at four positions: those four are what the linear state cannot read back."""
    T, window = 200, WINDOWS["sliding8-sinks2"]
    x = make_inputs(T)
    loud = [30, 77, 120, 160]
    x["v"] = x["v"] * 1e-3
    x["v"][:, :, loud] = 5.0
    with torch.no_grad():
        _, state = RecallKernel(slots=4).prefill(*args(x), window)
    assert state.recall.pos.shape == (B, HKV, 4)
    assert sorted(state.recall.pos[0, 0].tolist()) == loud
    plain = hybrid_attention_naive(**x, window=window)
    with torch.no_grad():
        recalled = RecallKernel(slots=4).attention(*args(x), window)
    assert rel_rms(recalled, plain) > 1e-3  # the loud values now come back exactly


def test_cached_keys_are_rescored_against_the_state_as_it_is_now() -> None:
    """Key A (value 3) enters the cache while the state knows nothing like it; then 74 copies of A go by, most
    of them into the state, which learns to read A's value back; then a novel key B (value -1.5) leaves the
    window. Scored against today's state, A's copy is now recalled well and B takes the one slot in every
    (row, KV head); with the score A had on entry kept (``rescore=False``), a copy of A holds on in some."""
    T, window = 200, WINDOWS["sliding8-sinks2"]
    x = make_inputs(T)
    x["v"] = x["v"] * 1e-3
    for p in range(10, 160, 2):
        x["k"][:, :, p], x["v"][:, :, p] = x["k"][:, :, 10], 3.0
    x["v"][:, :, 170] = -1.5
    with torch.no_grad():
        fresh = RecallKernel(slots=1, rescore=True).prefill(*args(x), window)[1].recall.pos
        stale = RecallKernel(slots=1, rescore=False).prefill(*args(x), window)[1].recall.pos
    assert fresh.flatten().tolist() == [170] * (B * HKV)
    assert any(p < 160 for p in stale.flatten().tolist())


def test_state_size_is_constant_in_length() -> None:
    window, kernel = WINDOWS["sliding8-sinks2"], RecallKernel(slots=6)
    sizes = []
    with torch.no_grad():
        for T in (50, 400):
            x = make_inputs(T + 1)
            _, state = kernel.prefill(*args(sliced(x, 0, T)), window)
            _, state = kernel.step(*args(sliced(x, T, T + 1)), window, state)
            sizes.append(state.nbytes())
    assert sizes[0] == sizes[1]
    assert state.map(lambda t: t.clone()).recall.pos.equal(state.recall.pos)


def test_registered_by_name_only_and_refuses_padding_and_bad_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert KERNELS["recall"].priority < 0  # never the automatic choice
    x = make_inputs(20)
    with pytest.raises(ConfigError, match="left-padded"):
        RecallKernel(slots=2).attention(*args(x), WINDOWS["terrace5"], pads=torch.tensor([0, 3]))
    monkeypatch.setenv(SLOTS_ENV, "many")
    with pytest.raises(ConfigError, match=f"{SLOTS_ENV}='many' is not a number of keys"):
        slots_from_env()
    monkeypatch.setenv(SLOTS_ENV, "16")
    assert RecallKernel().slots == 16
    monkeypatch.setenv(RESCORE_ENV, "0")
    assert not RecallKernel().rescore and RecallKernel(rescore=True).rescore
    monkeypatch.setenv(RESCORE_ENV, "yes please")
    with pytest.raises(ConfigError, match=f"{RESCORE_ENV}='yes please' is not 0 or 1"):
        RecallKernel()
    monkeypatch.delenv(RESCORE_ENV)
    assert RecallKernel().rescore


def test_a_long_step_goes_in_chunks_like_the_prefill() -> None:
    """A step of many tokens (a chat turn) runs CHUNK tokens at a time, as the prefill does: 64 prefilled tokens
    and one step of 136 give exactly the prefill of all 200 (the same chunks, the same cache decisions)."""
    from lolcats_cli.kernels.recall import CHUNK

    assert CHUNK == 64
    x, window = make_inputs(200, seed=7), WINDOWS["sliding8-sinks2"]
    kernel = RecallKernel(slots=6)
    with torch.no_grad():
        want, whole = kernel.prefill(*args(x), window, log_decay=LOG_DECAY)
        y, state = kernel.prefill(*args(sliced(x, 0, 64)), window, log_decay=LOG_DECAY)
        y2, state = kernel.step(*args(sliced(x, 64, 200)), window, state, log_decay=LOG_DECAY)
    torch.testing.assert_close(torch.cat([y, y2], dim=2), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state.recall.pos, whole.recall.pos)
    torch.testing.assert_close(state.S, whole.S, atol=1e-6, rtol=1e-6)
