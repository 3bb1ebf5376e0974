"""The per-head decay of the linear branch (``log_decay``) in every form of hybrid attention: the chunked,
recurrent (token by token and multi-token), padded and kernel-seam forms agree with the naive reference in
values and gradients (log_decay included), with and without sinks; a zero decay is no decay; the decay
really weighs old keys less; the state stays constant-size."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lolcats_cli.kernels import KERNELS
from lolcats_cli.kernels.chunked import hybrid_attention_chunked
from lolcats_cli.kernels.compare import rel_rms
from lolcats_cli.kernels.naive import hybrid_attention_naive
from lolcats_cli.kernels.padded import padded_attention, padded_prefill_state, padded_step

from kernel_inputs import B, FP32_TOL, GRAD_ATOL, H, SMALL_WINDOWS, decode, make_inputs, sliced

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOWS = SMALL_WINDOWS
LENGTHS = [1, 7, 64, 65, 150]


def log_decay(seed: int = 3) -> Tensor:
    """Per-head log decays spread over horizons of about 3 to 50 tokens, so decay matters at these lengths."""
    horizons = torch.tensor([3.0, 10.0, 25.0, 50.0])[:H]
    return -(1.0 / horizons) * (1 + 0.1 * torch.randn(H, generator=torch.Generator().manual_seed(seed))).abs()


cases = pytest.mark.parametrize(
    "window_name,T", [(w, T) for w in WINDOWS for T in LENGTHS], ids=[f"{w}-T{T}" for w in WINDOWS for T in LENGTHS]
)


@cases
def test_chunked_and_decoding_match_naive_with_decay(window_name: str, T: int) -> None:
    x, window, ld = make_inputs(T), WINDOWS[window_name], log_decay()
    gen = torch.Generator().manual_seed(T)
    cuts = sorted({int(c) for c in torch.randint(0, T + 1, (3,), generator=gen)} | {T})
    with torch.no_grad():
        ref = hybrid_attention_naive(**x, window=window, log_decay=ld)
        assert rel_rms(hybrid_attention_chunked(**x, window=window, log_decay=ld), ref) < FP32_TOL
        assert rel_rms(hybrid_attention_chunked(**x, window=window, log_decay=ld, chunk_size=7), ref) < FP32_TOL
        assert rel_rms(decode(x, window, list(range(T % 3, T + 1)), ld), ref) < FP32_TOL, "token by token"
        assert rel_rms(decode(x, window, cuts, ld), ref) < FP32_TOL, f"cuts={cuts}"


@pytest.mark.parametrize("window_name", list(WINDOWS))
def test_chunked_gradients_match_naive_with_decay(window_name: str) -> None:
    window, grads = WINDOWS[window_name], []
    for fn in (hybrid_attention_naive, hybrid_attention_chunked):
        x = make_inputs(150)
        ld = log_decay().requires_grad_()
        leaves = {name: x[name].requires_grad_() for name in ("q", "k", "v", "window_logits")}
        leaves |= {"phi_q.W": x["phi_q"].W, "phi_k.W": x["phi_k"].W, "log_decay": ld}
        y = fn(**x, window=window, log_decay=ld)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
        grads.append({name: t.grad for name, t in leaves.items()})
    ref, got = grads
    assert ref["log_decay"].abs().max() > 1e-4  # the decay is trained: its gradient is not zero
    bad = {
        name: rel_rms(got[name], ref[name])
        for name in ref
        if rel_rms(got[name], ref[name]) >= FP32_TOL and (got[name] - ref[name]).abs().max() >= GRAD_ATOL
    }
    assert not bad, f"relative RMS errors of gradients: {bad}"


def test_zero_decay_is_no_decay_and_a_decay_changes_the_output() -> None:
    x, window = make_inputs(150), WINDOWS["sliding5"]
    with torch.no_grad():
        plain = hybrid_attention_chunked(**x, window=window)
        zero = hybrid_attention_chunked(**x, window=window, log_decay=torch.zeros(H))
        decayed = hybrid_attention_chunked(**x, window=window, log_decay=log_decay())
    assert rel_rms(zero, plain) < FP32_TOL
    assert rel_rms(decayed, plain) > 1e-2


def test_a_strong_decay_leaves_only_the_window() -> None:
    """With a decay of e^-50 per position the linear branch of far keys vanishes: the output is the window's."""
    x, window = make_inputs(100), WINDOWS["sliding5"]
    silent = {**x, "phi_q": lambda t: torch.zeros(*t.shape[:-1], 16)}
    with torch.no_grad():
        window_only = hybrid_attention_naive(**silent, window=window)
        decayed = hybrid_attention_chunked(**x, window=window, log_decay=torch.full((H,), -50.0))
    assert rel_rms(decayed, window_only) < 1e-4


@pytest.mark.parametrize("window_name", ["sliding5", "terrace5-sinks2", "sliding16-sinks4"])
def test_left_padded_rows_with_decay_match_each_row_alone(window_name: str) -> None:
    """padded_attention, padded_prefill_state and padded_step: a row with p pad tokens gives the output of
    its real tokens alone, decayed by its own positions."""
    window, ld, T = WINDOWS[window_name], log_decay(), 40
    x = make_inputs(T + 6)
    pads = torch.tensor([0, 9])
    with torch.no_grad():
        y = padded_attention(
            hybrid_attention_chunked, x["q"][:, :, :T], x["k"][:, :, :T], x["v"][:, :, :T], x["phi_q"], x["phi_k"],
            x["window_logits"], window, pads, log_decay=ld,
        )  # fmt: skip
        state = padded_prefill_state(x["k"][:, :, :T], x["v"][:, :, :T], x["phi_k"], window, pads, H, log_decay=ld)
        steps = []
        for a, b in ((T, T + 1), (T + 1, T + 4), (T + 4, T + 6)):
            s = sliced(x, a, b)
            out, state = padded_step(
                s["q"], s["k"], s["v"], x["phi_q"], x["phi_k"], x["window_logits"], window, state, pads, log_decay=ld
            )
            steps.append(out)
        full = torch.cat([y, *steps], dim=2)
        for row, p in enumerate(pads.tolist()):
            alone = {n: (t[row : row + 1, :, p:] if n in ("q", "k", "v") else t) for n, t in x.items()}
            ref = hybrid_attention_naive(**alone, window=window, log_decay=ld)
            assert rel_rms(full[row : row + 1, :, p:], ref) < FP32_TOL, f"row {row} (pads {p})"


@pytest.mark.parametrize("name", sorted(n for n, k in KERNELS.items() if n != "naive" and k.exact))
def test_every_kernel_honours_log_decay(name: str) -> None:
    kernel, window, ld = KERNELS[name], WINDOWS["sliding16-sinks4"], log_decay()
    if not kernel.available(torch.device("cpu")):
        pytest.skip(f"kernel {name!r} does not run on this machine")
    x = make_inputs(90)
    args = (x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], x["window_logits"], window)
    with torch.no_grad():
        ref = hybrid_attention_naive(**x, window=window, log_decay=ld)
        y = kernel.attention(*args, log_decay=ld)
        y0, state = kernel.prefill(*[a[:, :, :50] if i < 3 else a for i, a in enumerate(args)], log_decay=ld)
        y1, _ = kernel.step(*[a[:, :, 50:] if i < 3 else a for i, a in enumerate(args)], state, log_decay=ld)
    assert rel_rms(y, ref) < FP32_TOL
    assert rel_rms(torch.cat([y0, y1], dim=2), ref) < FP32_TOL


def test_log_decay_of_the_wrong_shape_is_refused() -> None:
    x = make_inputs(10)
    with pytest.raises(ValueError, match=r"log_decay must be None or have shape \(H,\)"):
        hybrid_attention_chunked(**x, window=WINDOWS["sliding5"], log_decay=torch.zeros(H + 1))
    assert B == 2  # the padded test above indexes two rows
