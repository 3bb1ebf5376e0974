"""The delta-rule hybrid (kernels/delta.py): the chunked form and decoding (prefill + steps of any size) agree with
the reference in values and gradients (the write strength's parameters and the decay included), for windows with
and without sinks, lengths off the chunk grid; the state really overwrites (a key stored twice returns its last
value, where the additive state averages) and stays constant-size; left padding is refused naming the way out."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lolcats_cli.api import Window
from lolcats_cli.builtins.windows import NoWindow
from lolcats_cli.errors import ModelError
from lolcats_cli.kernels.compare import rel_rms
from lolcats_cli.kernels.delta import (
    DeltaKernel,
    DeltaKeys,
    delta_prefill,
    delta_step,
    hybrid_delta_chunked,
    hybrid_delta_naive,
)
from lolcats_cli.kernels.naive import hybrid_attention_naive

from kernel_inputs import FP32_TOL, GRAD_ATOL, SMALL_WINDOWS, H, D, make_inputs, sliced
from kernel_inputs import decode as decode_with

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOWS = SMALL_WINDOWS


class Beta(nn.Module):
    """Write strength ``sigmoid(b_h + k . w_h)`` with learnable w ``(H, D)`` and b ``(H,)``."""

    def __init__(self, seed: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(H, D, generator=gen) * 0.3)
        self.b = nn.Parameter(torch.randn(H, generator=gen) * 0.5)

    def forward(self, k: Tensor) -> Tensor:
        return torch.sigmoid(self.b.view(1, -1, 1) + torch.einsum("bhtd,hd->bht", k.float(), self.w))


def delta_inputs(T: int, seed: int = 0) -> tuple[dict, Beta]:
    x = make_inputs(T, seed)
    beta = Beta(seed + 5)
    return {**x, "phi_k": DeltaKeys(x["phi_k"], beta)}, beta


def log_decay() -> Tensor:
    return -1.0 / torch.tensor([4.0, 12.0, 30.0, 80.0])[:H]


def decode(x: dict, window: Window, cuts: list[int], ld: Tensor | None) -> Tensor:
    return decode_with(x, window, cuts, ld, prefill=delta_prefill, step=delta_step)


@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("window_name,T", [(w, T) for w in WINDOWS for T in (1, 9, 37)])
def test_chunked_and_decoding_match_the_reference(window_name: str, T: int, decay: bool) -> None:
    x, _ = delta_inputs(T)
    window, ld = WINDOWS[window_name], log_decay() if decay else None
    with torch.no_grad():
        ref = hybrid_delta_naive(**x, window=window, log_decay=ld)
        for chunk in (4, 7, 64):  # several key chunks per query chunk's reach; one chunk
            got = hybrid_delta_chunked(**x, window=window, log_decay=ld, chunk_size=chunk)
            assert rel_rms(got, ref) < FP32_TOL, f"chunk {chunk}: {rel_rms(got, ref):.2e}"
        cuts = sorted({0, T // 3, T // 3 + 1, T - 1, T} - {-1})
        assert rel_rms(decode(x, window, cuts, ld), ref) < FP32_TOL, f"cuts={cuts}"
        assert rel_rms(decode(x, window, list(range(T + 1)), ld), ref) < FP32_TOL, "token by token"


@pytest.mark.parametrize("window_name", ["terrace5-sinks2", "sliding16-sinks4"])
def test_a_prompt_of_several_scan_chunks_hands_decoding_the_reference_state(window_name: str) -> None:
    """A prefill longer than one chunk of the delta scan (64 keys): its state comes from the sequence's own scan,
    read mid-chunk, and the tokens decoded after it match the reference."""
    T = 150
    x, _ = delta_inputs(T, seed=3)
    window, ld = WINDOWS[window_name], log_decay()
    with torch.no_grad():
        ref = hybrid_delta_naive(**x, window=window, log_decay=ld)
        for cut in (70, 129, 140):
            got = decode(x, window, [cut, cut + 1, T], ld)  # prefill [0, cut), then steps
            assert rel_rms(got, ref) < FP32_TOL, f"prefill {cut}: {rel_rms(got, ref):.2e}"


@pytest.mark.parametrize("window_name", ["terrace5-sinks2", "sliding16-sinks4"])
def test_chunked_gradients_match_the_reference(window_name: str) -> None:
    window, results = WINDOWS[window_name], []
    for fn in (hybrid_delta_naive, lambda **a: hybrid_delta_chunked(**a, chunk_size=8)):
        x, beta = delta_inputs(29, seed=1)
        leaves = {n: x[n].requires_grad_() for n in ("q", "k", "v", "window_logits")}
        ld = log_decay().requires_grad_()
        params = {"Wq": x["phi_q"].W, "Wk": x["phi_k"].phi.W, "beta_w": beta.w, "beta_b": beta.b, "log_decay": ld}
        y = fn(**x, window=window, log_decay=ld)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        names = [*leaves, *params]
        grads = torch.autograd.grad((y * dy).sum(), [*leaves.values(), *params.values()])
        results.append((y.detach(), dict(zip(names, grads))))
    (ref_y, ref_g), (got_y, got_g) = results
    assert rel_rms(got_y, ref_y) < FP32_TOL
    for name, ref in ref_g.items():
        assert rel_rms(got_g[name], ref) < 1e-4 or (got_g[name] - ref).abs().max() < GRAD_ATOL, name


def _one_hot_inputs(values: list[float], keys: list[int], query: int) -> dict:
    """Pure linear attention (no window) over keys that are one-hot features (phi = identity on them)."""
    T = len(values) + 1
    k = torch.zeros(1, 1, T, 4)
    for t, i in enumerate(keys):
        k[0, 0, t, i] = 1.0
    q = torch.zeros(1, 1, T, 4)
    q[0, 0, -1, query] = 1.0
    v = torch.tensor([*values, 0.0]).view(1, 1, T, 1)
    identity = lambda x: x.float()  # noqa: E731
    return dict(q=q, k=k, v=v, phi_q=identity, window_logits=torch.zeros(1)), identity


def test_a_key_stored_twice_returns_its_last_value() -> None:
    x, identity = _one_hot_inputs([1.0, 5.0, 3.0], keys=[0, 1, 0], query=0)
    full = DeltaKeys(identity, lambda k: torch.ones(k.shape[:-1]))  # beta = 1: each write replaces
    window = NoWindow()
    with torch.no_grad():
        delta = hybrid_delta_chunked(**x, phi_k=full, window=window)[0, 0, -1, 0]
        additive = hybrid_attention_naive(**x, phi_k=identity, window=window)[0, 0, -1, 0]
    assert delta.item() == pytest.approx(3.0, abs=1e-6)  # the state was corrected: key 0 now holds 3
    assert additive.item() == pytest.approx(2.0, abs=1e-6)  # the additive state averages 1 and 3


def test_the_state_is_constant_size_and_left_padding_is_refused() -> None:
    window = WINDOWS["terrace5-sinks2"]
    x, _ = delta_inputs(40)
    _, small = delta_prefill(**sliced(x, 0, 8), window=window)
    _, large = delta_prefill(**sliced(x, 0, 40), window=window)
    assert small.nbytes() == large.nbytes() > 0
    with pytest.raises(ModelError, match="does not decode left-padded batches yet"):
        DeltaKernel().attention(**x, window=window, pads=torch.tensor([0, 3]))
    with pytest.raises(ModelError, match="needs its phi_k as a DeltaKeys"):
        hybrid_delta_chunked(**make_inputs(5), window=window)
